"""On-disk KV block store: one directory per (document, model, settings), written once.

Layout of an entry `LANDMARK_HOME/store/<key>/`:

    meta.json       format version, shapes, settings, checksums of the small arrays
    kv.npy          [layers, 2, kv_heads, n_blocks, block, head_dim]  pre-RoPE keys (0) and values (1)
    scales.npy      [layers, 2, kv_heads, n_blocks, head_dim]  float16 scales of int8 codes (kvformat.py; int8 only)
    reps.npy        [layers, kv_heads, n_blocks, n_reps, head_dim]    block representatives (loaded whole)
    ids.npy         [n_tokens] int32 token ids
    spans.npy       [n_blocks, 2] int64 character span of each block in the document (-1 = prompt)
    block_sums.npy  [layers, 2, n_blocks] uint64 checksum of each block's keys (0) and values (1),
                    their scales included

`kv.npy` and `scales.npy` are memory-mapped, so reading one block touches only its
bytes. An entry is built in `<key>.tmp-*` and renamed into place when complete; its
writer holds the lock file inside that directory, so a directory whose lock is free
belongs to a writer that is gone (a crash, a kill) and the next engine on the store
removes it. `open_entry` checks the format version, the shapes and sizes of every file
and the checksums of the small arrays; anything wrong means "no valid entry" and the
caller rebuilds it. The keys and values are checked block by block as they are used
(`Entry.verify`): a block whose checksum does not match, or that holds a value that is
not finite, raises `DamagedEntry`, so nothing is ever computed from damaged data and
the cost of checking stays proportional to what a question reads.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout
from numpy.lib.format import open_memmap

from landmark_cli.errors import StoreError
from landmark_cli.storage.kvformat import Stored, quantize, stored_kv

FORMAT_VERSION = 3
SMALL = ("reps", "ids", "spans", "block_sums")
WRITER_LOCK = "writer.lock"  # held inside a temporary entry by the process writing it
SUM_CHUNK = 256  # blocks checksummed at a time (bounds the temporary memory)
TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class DamagedEntry(StoreError):
    """A block of a store entry does not match its checksum, or holds non-finite values."""

    def __init__(self, path: Path, layer: int, block: int):
        super().__init__(f"the cached reading {path.name} is damaged (layer {layer}, block {block})",
                         "it is removed; the document is read again")
        self.path = path


@functools.lru_cache(maxsize=8)
def _weights(n: int) -> np.ndarray:
    """n fixed odd 64-bit multipliers, one per word of a block (made once per block size)."""
    w = np.random.default_rng(0x1A2B3C).integers(1, 2**63, n, dtype=np.uint64) | np.uint64(1)
    w.flags.writeable = False
    return w


_EXPONENT = {2: 0x7C00, 4: 0x7F800000}  # exponent bits all ones: inf or NaN (fp16, fp32)


def block_checksums(blocks: np.ndarray) -> np.ndarray:
    """blocks [kv_heads, n, block, head_dim] (fp16 or fp32) -> [n] uint64: the sum of each
    block's 64-bit words times fixed odd multipliers, modulo 2**64. A change of any one
    word always changes the sum; several changes cancel out with probability about 2**-64."""
    H, n = blocks.shape[:2]
    rows = np.ascontiguousarray(blocks).reshape(H, n, -1)
    row_bytes = rows.shape[2] * rows.itemsize
    word = next(w for w in (np.uint64, np.uint32, np.uint16) if row_bytes % np.dtype(w).itemsize == 0)
    words = rows.view(word)
    weights = _weights(H * words.shape[2]).reshape(H, 1, -1)
    with np.errstate(over="ignore"):
        return (words * weights).sum(2, dtype=np.uint64).sum(0, dtype=np.uint64)


def part_checksums(kv: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
    """Checksums [n] of blocks kv [kv_heads, n, block, head_dim] with their int8 scales
    [kv_heads, n, head_dim] (None for float formats): the codes' sum plus the scales'."""
    sums = block_checksums(kv)
    if scales is not None:
        with np.errstate(over="ignore"):
            sums += block_checksums(scales[:, :, None])
    return sums


def part_damaged(kv: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
    """[n] bool: blocks holding a value that is not finite (int8: in their scales)."""
    return non_finite(kv) if scales is None else non_finite(scales[:, :, None])


def non_finite(blocks: np.ndarray) -> np.ndarray:
    """blocks [kv_heads, n, block, head_dim] (fp16 or fp32) -> [n] bool: holds an inf or NaN
    (read from the exponent bits, without converting the values)."""
    H, n = blocks.shape[:2]
    unsigned = np.uint16 if blocks.itemsize == 2 else np.uint32
    bits = np.ascontiguousarray(blocks).reshape(H, n, -1).view(unsigned)
    hit: np.ndarray = np.bitwise_and(bits, _EXPONENT[blocks.itemsize]) == _EXPONENT[blocks.itemsize]
    return np.asarray(hit.any(axis=(0, 2)))


def kv_checksums(kv: np.ndarray, scales: np.ndarray | None = None) -> np.ndarray:
    """kv [layers, 2, kv_heads, n_blocks, block, head_dim] (scales [layers, 2, kv_heads,
    n_blocks, head_dim] for int8) -> [layers, 2, n_blocks] uint64."""
    L, _, _, N = kv.shape[:4]
    out = np.zeros((L, 2, N), dtype=np.uint64)
    for layer in range(L):
        for j in range(2):
            for b in range(0, N, SUM_CHUNK):
                part = slice(b, b + SUM_CHUNK)
                out[layer, j, part] = part_checksums(kv[layer, j, :, part],
                                                     None if scales is None else scales[layer, j, :, part])
    return out


def entry_key(parts: dict) -> str:
    """Content address of an entry: hash of everything its contents depend on."""
    blob = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def digest(a: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(a).view(np.uint8).data, digest_size=16).hexdigest()


class Hold:
    """A shared lock on an entry's meta.json while the entry is open in this process:
    `landmark cache prune` and `clear` never remove an entry someone holds."""

    def __init__(self, path: Path):
        self.fd = os.open(path / "meta.json", os.O_RDONLY)
        fcntl.flock(self.fd, fcntl.LOCK_SH)

    def __del__(self):
        try:
            os.close(self.fd)
        except OSError:
            pass


def _exclusive(path: Path) -> int | None:
    """An open descriptor of path's meta.json locked exclusively, or None when a process
    holds the entry (Hold); -1 when there is no meta.json (an entry nobody can open)."""
    try:
        fd = os.open(path / "meta.json", os.O_RDONLY)
    except OSError:
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def is_held(path: Path) -> bool:
    """Whether a process holds the entry at path open."""
    fd = _exclusive(path)
    if fd is None:
        return True
    if fd >= 0:
        os.close(fd)
    return False


def remove_unless_held(path: Path) -> bool:
    """Remove the entry at path unless a process holds it (Hold); whether it was removed.
    The exclusive lock is kept while removing, so nobody opens the entry meanwhile."""
    fd = _exclusive(path)
    if fd is None:
        return False
    try:
        remove(path)
    finally:
        if fd >= 0:
            os.close(fd)
    return True


def touch(path: Path) -> None:
    """Mark an entry used now (its meta.json's modification time is its last use)."""
    try:
        os.utime(path / "meta.json")
    except OSError:  # a read-only store still answers
        pass


@dataclass
class Entry:
    """A complete, validated store entry (arrays are read-only memory maps)."""

    path: Path
    meta: dict
    kv: np.ndarray  # float16 or float32 values, or int8 codes
    scales: np.ndarray | None  # the int8 codes' scales (kvformat.py); None for float formats
    reps: np.ndarray
    ids: np.ndarray
    spans: np.ndarray
    block_sums: np.ndarray
    verified: np.ndarray = field(init=False)  # [layers, 2, n_blocks]: blocks checked in this process
    hold: Hold | None = field(default=None, repr=False)  # held while this object lives

    def __post_init__(self):
        self.verified = np.zeros(self.block_sums.shape, dtype=bool)

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    def tensor(self) -> Stored:
        """The keys and values [layers, 2, kv_heads, n_blocks, block, head_dim] as attention
        reads them (memory-mapped: nothing is read until used; verify first)."""
        return stored_kv(self.kv, self.scales)

    def verify(self, layers, parts, blocks) -> None:
        """Check the keys (part 0) and/or values (part 1) of `blocks` in `layers` against
        their checksums, each block once per process; raise DamagedEntry on a mismatch or
        a value that is not finite. layers, parts, blocks: an int, a range or slice, or
        indices (a tensor on any device, or an array, of any shape)."""
        if hasattr(blocks, "cpu"):
            blocks = blocks.cpu()
        ids = np.unique(np.asarray(blocks, dtype=np.int64).ravel()) if not isinstance(blocks, slice) else \
            np.arange(self.block_sums.shape[2])[blocks]
        layer_ids = np.arange(self.block_sums.shape[0])[layers] if not isinstance(layers, int) else [layers]
        part_ids = np.arange(2)[parts] if not isinstance(parts, int) else [parts]
        for layer in layer_ids:
            for j in part_ids:
                todo = ids[~self.verified[layer, j, ids]]
                for b in range(0, todo.size, SUM_CHUNK):
                    chunk = todo[b:b + SUM_CHUNK]
                    data = self.kv[layer, j][:, chunk]  # [kv_heads, n, block, head_dim]: only these blocks are read
                    scales = None if self.scales is None else self.scales[layer, j][:, chunk]
                    bad = (part_checksums(data, scales) != self.block_sums[layer, j, chunk]) | \
                        part_damaged(data, scales)
                    if bad.any():
                        raise DamagedEntry(self.path, int(layer), int(chunk[bad.argmax()]))
                self.verified[layer, j, todo] = True

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
        self.scales = open_memmap(self.tmp / "scales.npy", mode="w+", dtype=np.float16, shape=(L, 2, H, N, D)) \
            if kv_dtype == "int8" else None
        self.reps = np.zeros((L, H, N, R, D), dtype=np.float32)
        self.ids = np.zeros(shape["n_tokens"], dtype=np.int32)
        self.spans = np.full((N, 2), -1, dtype=np.int64)
        self.meta = {"format": FORMAT_VERSION, "key": key, **shape, **meta, "kv_dtype": kv_dtype}
        self.lock = FileLock(str(self.tmp / WRITER_LOCK))  # tells sweep_temporaries this writer is alive
        self.lock.acquire()

    def tensor(self) -> Stored:
        """What is written so far, as attention reads it (Entry.tensor)."""
        return stored_kv(self.kv, self.scales)

    def put(self, layer: int, part: int, first: int, blocks: torch.Tensor) -> None:
        """Write blocks [kv_heads, n, block, head_dim] (floats, any device) as blocks
        [first, first + n) of `layer`'s keys (part 0) or values (part 1)."""
        rows = slice(first, first + blocks.shape[1])
        if self.scales is None:
            self.kv[layer, part, :, rows] = blocks.to("cpu", TORCH_DTYPES[self.kv.dtype.name]).numpy()
        else:
            codes, scales = quantize(blocks)
            self.kv[layer, part, :, rows] = codes.cpu().numpy()
            self.scales[layer, part, :, rows] = scales.cpu().numpy()

    def copy_from(self, entry: "Entry", n_blocks: int) -> None:
        """The first n_blocks blocks of every layer, as `entry` (of the same format) holds them."""
        self.kv[:, :, :, :n_blocks] = entry.kv[:, :, :, :n_blocks]
        if self.scales is not None and entry.scales is not None:
            self.scales[:, :, :, :n_blocks] = entry.scales[:, :, :, :n_blocks]
        self.reps[:, :, :n_blocks] = entry.reps[:, :, :n_blocks]

    def commit(self) -> Path:
        self.kv.flush()
        if self.scales is not None:
            self.scales.flush()
        self.block_sums = kv_checksums(self.kv, self.scales)
        checks = {}
        for name in SMALL:
            a = getattr(self, name)
            np.save(self.tmp / f"{name}.npy", a, allow_pickle=False)
            checks[name] = digest(a)
        del self.kv, self.scales  # close the memory maps before renaming
        meta = {**self.meta, "checksums": checks, "created": time.time()}
        (self.tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        self.lock.release()
        (self.tmp / WRITER_LOCK).unlink(missing_ok=True)
        final = self.root / self.key
        if final.exists():  # a concurrent writer finished first: keep theirs
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            os.replace(self.tmp, final)
        return final

    def abort(self) -> None:
        if hasattr(self, "kv"):
            del self.kv, self.scales
        self.lock.release()
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
        scales = None
        if meta["kv_dtype"] == "int8":
            scales = np.load(path / "scales.npy", mmap_mode="r", allow_pickle=False)
            if scales.shape != (L, 2, H, N, D) or scales.dtype != np.float16 or not _complete(path / "scales.npy",
                                                                                              scales):
                return None
        if not _complete(path / "kv.npy", kv):
            return None
        small = {}
        for name in SMALL:
            a = np.load(path / f"{name}.npy", allow_pickle=False)
            if digest(a) != meta["checksums"][name]:
                return None
            small[name] = a
        if small["reps"].shape != (L, H, N, R, D) or small["ids"].shape != (meta["n_tokens"],) \
                or small["block_sums"].shape != (L, 2, N):
            return None
        return Entry(path=path, meta=meta, kv=kv, scales=scales, **small, hold=Hold(path))
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None


def _complete(file: Path, a: np.memmap) -> bool:
    """Whether the .npy file holding the memory map `a` is exactly as long as its header says."""
    return file.stat().st_size == a.offset + a.size * a.itemsize


def remove(path: Path) -> None:
    """Delete an entry (a corrupt one before rebuilding it): rename away first, then delete."""
    if path.exists():
        trash = path.with_name(f"{path.name}.trash-{os.getpid()}-{time.time_ns()}")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _writer_gone(tmp: Path, older_than_s: float) -> bool:
    """Whether the temporary entry tmp belongs to no running writer: its lock is free (or,
    for a directory whose writer has not made its lock yet, it is older than older_than_s)."""
    if not (tmp / WRITER_LOCK).exists():
        return time.time() - tmp.stat().st_mtime > older_than_s
    lock = FileLock(str(tmp / WRITER_LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return False
    lock.release()
    return True


def _older_format(path: Path) -> bool:
    """Whether path is a complete entry of an earlier format, which this version never reads."""
    try:
        return json.loads((path / "meta.json").read_text()).get("format", 0) < FORMAT_VERSION
    except (OSError, ValueError, AttributeError):
        return False


def sweep_temporaries(root: Path, older_than_s: float = 3600) -> None:
    """Remove what interrupted commands left in the store (temporary entries whose writer
    is gone, directories an interrupted removal left behind) and entries of an earlier
    format (their content address differs, so nothing would ever read or replace them)."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        try:
            if ".trash-" in p.name or (".tmp-" in p.name and _writer_gone(p, older_than_s)):
                shutil.rmtree(p, ignore_errors=True)
            elif p.is_dir() and _older_format(p):
                remove(p)
        except OSError:  # removed meanwhile by another process
            continue
