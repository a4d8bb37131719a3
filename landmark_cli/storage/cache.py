"""What the store holds, and trimming it: `landmark cache list | prune | clear`.

An entry's last use is its meta.json's modification time (store.touch, on every
lookup). Pruning removes the least recently used entries first and never one that a
process holds open (store.Hold). The folder index keeps its rows: a row whose entry is
gone is reported as stale by `landmark index --status` and read again by the next
`landmark index`, and `landmark ask DIR` leaves that document out with a warning.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from landmark_cli.errors import LandmarkError
from landmark_cli.storage import store

CAP_VARIABLE = "LANDMARK_CACHE_MAX"  # e.g. 20G: the store is pruned to this after every new reading
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclass
class Cached:
    """One entry of the store, as `landmark cache list` shows it."""

    key: str
    path: Path
    source: str | None  # the document it was read from (the first, if several share its text)
    model: str | None
    settings: dict
    tokens: int | None
    bytes: int
    last_used: float
    intact: bool  # sizes and small arrays check out (the blocks are checked as they are read)
    in_use: bool  # held open by a process

    def as_json(self) -> dict:
        return {"key": self.key, "source": self.source, "model": self.model, "settings": self.settings,
                "tokens": self.tokens, "bytes": self.bytes, "last_used": self.last_used, "intact": self.intact,
                "in_use": self.in_use}


def parse_size(text: str) -> int:
    """'20G', '500M', '1.5T', '1024' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not m:
        raise LandmarkError(f"cannot read the size {text!r}", "write it like 20G, 500M or 1.5T")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def entries(root: Path, check: bool = True) -> list[Cached]:
    """Every complete entry under root, least recently used first. check: open each entry
    to tell whether it is intact (without, every entry counts as intact)."""
    out: list[Cached] = []
    if not root.is_dir():
        return out
    for path in root.iterdir():
        if not path.is_dir() or ".tmp-" in path.name or ".trash-" in path.name:
            continue
        try:
            meta = json.loads((path / "meta.json").read_text())
            last_used = (path / "meta.json").stat().st_mtime
        except (OSError, ValueError):
            meta, last_used = {}, path.stat().st_mtime
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        intact = not check or store.open_entry(path) is not None
        out.append(Cached(key=path.name, path=path, source=meta.get("source"), model=meta.get("model"),
                          settings=meta.get("settings", {}), tokens=meta.get("n_tokens"), bytes=size,
                          last_used=last_used, intact=intact, in_use=store.is_held(path)))
    return sorted(out, key=lambda c: c.last_used)


def prune(root: Path, max_bytes: int, check: bool = True) -> list[Cached]:
    """Remove least recently used entries (damaged ones first when `check`) until the
    store holds at most max_bytes, skipping entries in use; the removed ones."""
    listed = sorted(entries(root, check), key=lambda c: (c.intact, c.last_used))
    total = sum(c.bytes for c in listed)
    removed = []
    for c in listed:
        if total <= max_bytes:
            break
        if store.remove_unless_held(c.path):
            total -= c.bytes
            removed.append(c)
    return removed


def clear(root: Path) -> tuple[list[Cached], list[Cached]]:
    """Remove every entry not in use: (removed, left because in use)."""
    removed: list[Cached] = []
    kept: list[Cached] = []
    for c in entries(root):
        (removed if store.remove_unless_held(c.path) else kept).append(c)
    return removed, kept


def apply_cap(root: Path) -> list[Cached]:
    """Prune to LANDMARK_CACHE_MAX when it is set; the removed entries. Runs after every
    new reading, so it reads only sizes and times, not the entries themselves."""
    cap = os.environ.get(CAP_VARIABLE)
    return prune(root, parse_size(cap), check=False) if cap else []
