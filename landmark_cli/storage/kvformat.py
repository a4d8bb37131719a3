"""How the store keeps keys and values: as floats, or as int8 codes with scales.

`float16` and `float32` keep every value as it is. `int8` keeps each value as a signed
8-bit code plus, for every block, KV head and channel, one float16 scale (the channel's
largest magnitude in the block / 127): value = code * scale. Pre-RoPE keys have channels
of very different sizes, which a scale per channel follows; over this project's default
model that gave a relative error of 0.4% on keys and 0.5% on values, against 1.3% for one
scale per block and head (docs/measurements.md). With 32-token blocks of 64 channels,
int8 takes 1.06 bytes a value, float16 2.

`stored_kv` turns an entry's arrays into what attention reads: a tensor (float formats)
or a `QuantizedKV`, which indexes like one without decoding and decodes in `to`.
"""

from __future__ import annotations

import warnings
from typing import Union

import numpy as np
import torch

QMAX = 127  # codes lie in [-127, 127]: symmetric, so -x decodes to the negative of x


def as_torch(a: np.ndarray) -> torch.Tensor:
    """A (possibly read-only, memory-mapped) numpy array as a tensor, without copying."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., B, D] (floats) -> int8 codes [..., B, D] and float16 scales [..., D]: one
    scale per channel over the block's B tokens. A channel that is all zeros has scale 0."""
    x = x.float()
    scale = (x.abs().amax(-2) / QMAX).half()
    s = scale.float().unsqueeze(-2)  # the scale as stored, so that decoding inverts exactly this rounding
    codes = torch.where(s > 0, x / s.clamp_min(torch.finfo(torch.float32).tiny), 0).round().clamp_(-QMAX, QMAX)
    return codes.to(torch.int8), scale


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes [..., B, D] and scales broadcastable to them -> values in dtype."""
    return (codes.float() * scales.float()).to(dtype)


class QuantizedKV:
    """int8 codes [..., B, D] with their scales seen as one array of values. Indexing selects
    from both and decodes nothing (on a memory map, nothing is read either); `to` decodes
    what is selected. The scales are kept expanded over the block's tokens (a view), so any
    index that applies to the codes applies to them."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor):
        self.codes, self.scales = codes, scales

    @classmethod
    def of(cls, codes: torch.Tensor, scales: torch.Tensor) -> "QuantizedKV":
        """codes [..., B, D] and their per-channel scales [..., D]."""
        return cls(codes, scales.unsqueeze(-2).expand(codes.shape))

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def __getitem__(self, key) -> "QuantizedKV":
        return QuantizedKV(self.codes[key], self.scales[key])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The selected values, decoded on `device` (default: where they are) in `dtype`."""
        device = self.device if device is None else device
        return dequantize(self.codes.to(device), self.scales.to(device), dtype)

    def gather(self, block_idx: torch.Tensor, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks block_idx [Hkv, K] of a [Hkv, N, B, D] array -> their codes [Hkv, K, B, D] and
        scales [Hkv, K, 1, D], still encoded (in pinned memory when `pin`)."""
        hkv, k = block_idx.shape
        codes = torch.empty((hkv, k) + tuple(self.codes.shape[2:]), dtype=self.codes.dtype, pin_memory=pin)
        scales = torch.empty((hkv, k, 1, self.codes.shape[3]), dtype=self.scales.dtype, pin_memory=pin)
        for h in range(hkv):
            torch.index_select(self.codes[h], 0, block_idx[h], out=codes[h])
            torch.index_select(self.scales[h, :, :1], 0, block_idx[h], out=scales[h])
        return codes, scales


Stored = Union[torch.Tensor, QuantizedKV]  # what attention reads from the store, before staging


def stored_kv(kv: np.ndarray, scales: np.ndarray | None) -> Stored:
    """An entry's keys and values [layers, 2, Hkv, N, B, D] as attention reads them (no copy)."""
    return as_torch(kv) if scales is None else QuantizedKV.of(as_torch(kv), as_torch(scales))
