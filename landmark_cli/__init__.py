"""landmark: ask questions about long documents with Landmark Attention."""

__version__ = "0.1.0"
