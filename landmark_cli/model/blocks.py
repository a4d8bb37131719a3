"""Matrices in groups of 32 weights, packed as GGUF files pack them, for answering on the CPU.

Two of llama.cpp's layouts, one row of groups after another:

- `q8_0`: per group, a float16 scale d and 32 int8 codes q: w = d * q (34 bytes).
- `q4_1`: per group, float16 d and m, and 32 4-bit codes q in 16 bytes (weight j in the
  low nibble of byte j, weight j + 16 in its high nibble): w = d * q + m (20 bytes).

A GGUF model's tensors in these types are read packed, as its file holds them
(model/gguf_weights.py): the default model's layer matrices are q4_1 groups and its
embedding q8_0 groups. Float weights that were once stored this way (a checkpoint
dequantized from such a file) are packed again by `exact`, which finds the format that
holds a matrix *exactly* (every float32 weight comes back bit for bit). Either way
answering from the packed form changes no weight while streaming a quarter (q4_1) or half
(q8_0) of float16's bytes per token. A matrix no format holds exactly stays float16: no
weight is ever rounded here.

A packed matrix is one uint8 tensor [rows, groups * bytes per group] (`PACKED`), so it is
fused, kept on disk and handed over like any other matrix; its row length tells its
format. The native answer step (kernels/cpu_step.c) reads it packed; `linear` unpacks it.
"""

from __future__ import annotations

import torch

PACKED = torch.uint8  # the dtype of a packed matrix
GROUP = 32  # weights per group
GROUP_BYTES = {"q8_0": 34, "q4_1": 20}


def _groups(w: torch.Tensor) -> torch.Tensor:
    rows, cols = w.shape
    return w.float().reshape(rows, cols // GROUP, GROUP)


def _assemble(header: list[torch.Tensor], codes: torch.Tensor) -> torch.Tensor:
    """float16 header fields [rows, groups] each, then code bytes [rows, groups, n] -> packed rows."""
    parts = [h.to(torch.float16)[..., None].view(torch.uint8) for h in header] + [codes]
    return torch.cat(parts, -1).reshape(codes.shape[0], -1)


def pack_q8_0(w: torch.Tensor) -> torch.Tensor:
    g = _groups(w)
    d = (g.abs().amax(-1) / 127).to(torch.float16)
    q = torch.round(g / d.float().clamp_min(1e-30)[..., None]).clamp_(-127, 127).to(torch.int8)
    return _assemble([d], q.view(torch.uint8))


def pack_q4_1(w: torch.Tensor) -> torch.Tensor:
    g = _groups(w)
    lo, hi = g.amin(-1), g.amax(-1)
    d, m = ((hi - lo) / 15).to(torch.float16), lo.to(torch.float16)
    q = torch.round((g - m.float()[..., None]) / d.float().clamp_min(1e-30)[..., None]).clamp_(0, 15).to(torch.uint8)
    return _assemble([d, m], q[..., :16] | (q[..., 16:] << 4))


PACKERS = {"q4_1": pack_q4_1, "q8_0": pack_q8_0}  # smallest first


def format_of(p: torch.Tensor, cols: int) -> str:
    """The format of packed rows p holding `cols` weights each."""
    for name, size in GROUP_BYTES.items():
        if p.shape[-1] == cols // GROUP * size:
            return name
    raise ValueError(f"packed rows of {p.shape[-1]} bytes do not hold {cols} weights in any format")


def unpack(p: torch.Tensor, cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed rows [rows, ...] of `cols` weights -> the weights [rows, cols] in dtype."""
    fmt = format_of(p, cols)
    b = p.reshape(p.shape[0], cols // GROUP, GROUP_BYTES[fmt])
    d = b[..., 0:2].contiguous().view(torch.float16).float()
    if fmt == "q8_0":
        w = b[..., 2:].contiguous().view(torch.int8).float() * d
    else:
        m = b[..., 2:4].contiguous().view(torch.float16).float()
        nib = b[..., 4:]
        q = torch.cat([nib & 15, nib >> 4], -1).float()
        w = q * d + m
    return w.reshape(p.shape[0], cols).to(dtype)


def exact(w: torch.Tensor) -> torch.Tensor | None:
    """w packed in the smallest format that gives every weight back exactly, or None. A
    format is tried on a few rows first: weights that were never packed (a float
    checkpoint) fail there, without packing the whole matrix."""
    if w.dim() != 2 or w.shape[1] % GROUP or not w.is_floating_point():
        return None
    for pack in PACKERS.values():
        if not _holds(pack, w[:8]):
            continue
        p = pack(w)
        if torch.equal(unpack(p, w.shape[1]), w.float()):
            return p
    return None


def _holds(pack, w: torch.Tensor) -> bool:
    return torch.equal(unpack(pack(w), w.shape[1]), w.float())


def convert(w: torch.Tensor, dtype: torch.dtype, cols: int) -> torch.Tensor:
    """w (a matrix of `cols` columns, floats or packed) in `dtype`; PACKED: packed where a
    format holds it exactly, else float16."""
    if w.dtype == PACKED:
        return w if dtype == PACKED else unpack(w, cols, dtype)
    if dtype != PACKED:
        return w.to(dtype)
    p = exact(w)
    return p if p is not None else w.to(torch.float16)


def cat_rows(parts: list[torch.Tensor], cols: int) -> torch.Tensor:
    """Matrices of `cols` columns stacked row-wise (a fused projection): packed rows stay
    packed when every part has the same format and floats stay in their dtype; a mix is
    unpacked to float32."""
    if len({(p.dtype, p.shape[-1]) for p in parts}) == 1:
        return torch.cat(parts)
    return torch.cat([unpack(p, cols) if p.dtype == PACKED else p.float() for p in parts])


def format_name(w: torch.Tensor, cols: int) -> str:
    """A matrix's format: its packed format, or its dtype's name."""
    return format_of(w, cols) if w.dtype == PACKED else str(w.dtype).removeprefix("torch.")
