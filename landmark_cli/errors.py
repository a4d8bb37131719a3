"""Domain errors: each carries a one-line message and a hint of what to do next.

The CLI maps every `LandmarkError` to `Error: <message>` (+ hint) on stderr, exit 1.
"""

from __future__ import annotations


class LandmarkError(Exception):
    """An error the user can act on. `hint` says what to do next."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class DocumentError(LandmarkError):
    """A document could not be read: missing, wrong type, encrypted, scanned, empty, binary."""


class ModelError(LandmarkError):
    """A model could not be resolved or is not supported."""


class StoreError(LandmarkError):
    """The on-disk KV store is unusable (locked, corrupt beyond repair, wrong version)."""
