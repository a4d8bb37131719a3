"""All on-disk state lives under one home directory, overridable with LANDMARK_HOME."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """LANDMARK_HOME, or ~/.cache/landmark."""
    root = os.environ.get("LANDMARK_HOME") or Path.home() / ".cache" / "landmark"
    return Path(root).expanduser()
