"""Rotary position embedding (RoPE) in the Hugging Face LLaMA convention.

    inv_freq = 1 / theta ** (arange(0, D, 2) / D)
    emb      = cat(pos * inv_freq, pos * inv_freq)          # [P, D]
    x_rot    = x * cos(emb) + rotate_half(x) * sin(emb)
    rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])

Plain torch; the engine and the kernels' references share these two functions, and the
Triton kernels apply the same formula to keys they read from the KV store.
"""

from __future__ import annotations

import torch


def rope_tables(
    positions: int | torch.Tensor,
    head_dim: int,
    theta: float = 10000.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape [P, head_dim] for `positions` (an int P means 0..P-1).

    Computed in float32 exactly as transformers' LlamaRotaryEmbedding does, then cast.
    """
    if isinstance(positions, int):
        positions = torch.arange(positions, device=device)
    pos = positions.to(device=device, dtype=torch.float32)
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, dtype=torch.int64, device=pos.device).float() / head_dim
    )
    freqs = pos[:, None] * inv_freq[None, :]  # [P, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., P, D] by the tables cos, sin [P, D] (broadcast over leading dims).

    Like transformers, the tables are cast to x's dtype and the result has x's dtype.
    rotate_half(x) * sin is formed as roll(x, D/2) * sin with its first half negated in
    place: the same numbers (negation is exact) in fewer operations than a concatenation,
    which matters in a decode step, where every layer rotates a single token.
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    half = x.shape[-1] // 2
    rotated = x.roll(half, -1) * sin
    rotated[..., :half].neg_()
    return x * cos + rotated
