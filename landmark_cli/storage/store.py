"""On-disk KV block store: one directory per (document, model, settings), written once.

Layout of an entry `LANDMARK_HOME/store/<key>/`:

    meta.json   format version, shapes, settings, checksums of the small arrays
    kv.npy      [layers, 2, kv_heads, n_blocks, block, head_dim]  pre-RoPE keys (0) and values (1)
    reps.npy    [layers, kv_heads, n_blocks, n_reps, head_dim]    block representatives (loaded whole)
    ids.npy     [n_tokens] int32 token ids
    spans.npy   [n_blocks, 2] int64 character span of each block in the document (-1 = prompt)

`kv.npy` is memory-mapped, so reading one block touches only its bytes. An entry is
built in `<key>.tmp-*` and renamed into place when complete; a crash leaves only a
temporary directory, which is never read. `open_entry` checks the format version, the
shapes and sizes of every file and the checksums of the small arrays; anything wrong
means "no valid entry" and the caller rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap

FORMAT_VERSION = 1
SMALL = ("reps", "ids", "spans")


def entry_key(parts: dict) -> str:
    """Content address of an entry: hash of everything its contents depend on."""
    blob = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def digest(a: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(a).view(np.uint8).data, digest_size=16).hexdigest()


@dataclass
class Entry:
    """A complete, validated store entry (arrays are read-only memory maps)."""

    path: Path
    meta: dict
    kv: np.ndarray
    reps: np.ndarray
    ids: np.ndarray
    spans: np.ndarray

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir())


class Writer:
    """Builds an entry in a temporary directory; `commit()` renames it into place."""

    def __init__(self, root: Path, key: str, shape: dict, meta: dict, kv_dtype: str = "float16"):
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.key = root, key
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{key}.tmp-", dir=root))
        L, H, N, B, D, R = (shape[k] for k in ("layers", "kv_heads", "n_blocks", "block", "head_dim", "n_reps"))
        self.kv = open_memmap(self.tmp / "kv.npy", mode="w+", dtype=kv_dtype, shape=(L, 2, H, N, B, D))
        self.reps = np.zeros((L, H, N, R, D), dtype=np.float32)
        self.ids = np.zeros(shape["n_tokens"], dtype=np.int32)
        self.spans = np.full((N, 2), -1, dtype=np.int64)
        self.meta = {"format": FORMAT_VERSION, "key": key, **shape, **meta, "kv_dtype": kv_dtype}

    def commit(self) -> Path:
        self.kv.flush()
        checks = {}
        for name in SMALL:
            a = getattr(self, name)
            np.save(self.tmp / f"{name}.npy", a, allow_pickle=False)
            checks[name] = digest(a)
        del self.kv  # close the memory map before renaming
        meta = {**self.meta, "checksums": checks, "created": time.time()}
        (self.tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        final = self.root / self.key
        if final.exists():  # a concurrent writer finished first: keep theirs
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            os.replace(self.tmp, final)
        return final

    def abort(self) -> None:
        if hasattr(self, "kv"):
            del self.kv
        shutil.rmtree(self.tmp, ignore_errors=True)


def open_entry(path: Path) -> Entry | None:
    """The entry at `path` if it is complete and intact; None if absent or invalid."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("format") != FORMAT_VERSION:
            return None
        L, H, N, B, D, R = (meta[k] for k in ("layers", "kv_heads", "n_blocks", "block", "head_dim", "n_reps"))
        kv = np.load(path / "kv.npy", mmap_mode="r", allow_pickle=False)
        if kv.shape != (L, 2, H, N, B, D) or str(kv.dtype) != meta["kv_dtype"]:
            return None
        expected = kv.offset + kv.size * kv.itemsize
        if (path / "kv.npy").stat().st_size != expected:
            return None
        small = {}
        for name in SMALL:
            a = np.load(path / f"{name}.npy", allow_pickle=False)
            if digest(a) != meta["checksums"][name]:
                return None
            small[name] = a
        if small["reps"].shape != (L, H, N, R, D) or small["ids"].shape != (meta["n_tokens"],):
            return None
        return Entry(path=path, meta=meta, kv=kv, **small)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None


def remove(path: Path) -> None:
    """Delete an entry (a corrupt one before rebuilding it): rename away first, then delete."""
    if path.exists():
        trash = path.with_name(f"{path.name}.trash-{os.getpid()}-{time.time_ns()}")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


def sweep_temporaries(root: Path, older_than_s: float = 3600) -> None:
    """Remove leftovers of interrupted builds (temporary / trash directories)."""
    if not root.is_dir():
        return
    now = time.time()
    for p in root.iterdir():
        if (".tmp-" in p.name or ".trash-" in p.name) and now - p.stat().st_mtime > older_than_s:
            shutil.rmtree(p, ignore_errors=True)
