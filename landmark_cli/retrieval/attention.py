"""What one attention step reads, for every reader and answering session.

- `DenseKV`: per layer, the RoPE'd keys and values a session attends to in full (the
  sink, the local window, the question, the answer), at fixed positions.
- `FreeLandmarks` / `TrainedLandmarks`: the two kinds of landmark, as one interface.
  Training-free landmarks attend with an ordinary softmax over the retrieved blocks and
  the dense keys; trained landmarks (the paper's method) put a `<landmark>` token after
  every block, attend with the grouped softmax (each retrieved block's landmark gates
  its tokens), may have local layers that never retrieve, and never generate a landmark.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from landmark_cli.kernels.landmark_attention import landmark_attention
from landmark_cli.kernels.retrieval_attention import gather_blocks, retrieval_attention
from landmark_cli.kernels.rope import apply_rope
from landmark_cli.model.checkpoint import LandmarkSpec
from landmark_cli.model.device import stage
from landmark_cli.retrieval.landmarks import insert_landmarks, is_landmark_position
from landmark_cli.retrieval.selection import LocalLayers, Selection


class DenseKV:
    """Per layer, keys (RoPE'd) and values at positions [0, capacity): [layers, 2, Hkv, reserved + capacity, D].
    `length` is how many positions hold tokens; `write` fills the next ones.

    `reserved` slots in front of position 0 take a session's fixed retrieved blocks
    (`place`), so that from then on each step attends to one contiguous buffer (`joined`)
    instead of gathering, concatenating and scoring the two parts apart."""

    def __init__(self, layers: int, kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", reserved: int = 0):
        self.kv = torch.empty(layers, 2, kv_heads, reserved + capacity, head_dim, dtype=dtype, device=device)
        # per layer, its keys and values [Hkv, reserved + capacity, D]: views made once, since
        # a decode step slices each layer's buffer a few times
        self.keys, self.values = list(self.kv[:, 0].unbind()), list(self.kv[:, 1].unbind())
        self.reserved = reserved
        self.length = 0

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [Hkv, T, D] at positions [start, start + T) of `layer`; return that
        layer's keys and values [Hkv, start + T, D] (views, the reserved slots not included)."""
        r, end = self.reserved, start + k.shape[1]
        keys, values = self.keys[layer], self.values[layer]
        keys[:, r + start:r + end] = k
        values[:, r + start:r + end] = v
        return keys[:, r:r + end], values[:, r:r + end]

    def place(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Fill the reserved slots of `layer` with k, v [Hkv, reserved, D] (keys RoPE'd)."""
        self.keys[layer][:, :self.reserved] = k
        self.values[layer][:, :self.reserved] = v

    def joined(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The reserved slots and positions [0, end) of `layer`: keys, values [Hkv, reserved + end, D] (views)."""
        return self.keys[layer][:, :self.reserved + end], self.values[layer][:, :self.reserved + end]


def dense_dtype(model) -> torch.dtype:
    """The dtype of a session's dense keys and values: float32 on the CPU, whose fused
    attention has no fast half-precision path (the queries are cast to it); the model's
    own dtype elsewhere."""
    return torch.float32 if model.device.type == "cpu" else model.dtype


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Queries q [H, T, D] (RoPE'd) over keys and values [Hkv, L, D] whose last T are the
    queries' own (causal among them; every earlier key visible): PyTorch's fused
    attention, grouped-query heads without copies. Returns [H, T, D] in q.dtype."""
    t, n = q.shape[1], k.shape[1]
    mask = torch.ones(t, n, dtype=torch.bool, device=q.device).tril(n - t) if t > 1 else None
    out = F.scaled_dot_product_attention(q.to(k.dtype)[None], k[None], v[None], attn_mask=mask,
                                         enable_gqa=q.shape[0] != k.shape[0])[0]
    return out.to(q.dtype)


def grouped_attention(q, dense_k, dense_v, dense_flags, k_store, v_store, sel, cos, sin, local=False,
                      local_blocks=1) -> torch.Tensor:
    """Trained landmarks: grouped-softmax attention of queries q [H, T, D] (RoPE'd) over the
    blocks sel [Hkv, k] of k_store/v_store [Hkv, N, B, D] (pre-RoPE; placed at positions
    [0, k*B) and rotated there by the cos/sin tables), followed by dense keys/values
    [Hkv, L, D] (RoPE'd; the last T are the queries' own) whose landmark flags are
    dense_flags [L]. Every retrieved block ends with its landmark, which gates the block's
    tokens; the torch path of landmark_cli/kernels/landmark_attention does the math.
    local: a local layer (LandmarkSpec.local_layers): each query reads only its own block
    and the `local_blocks` (1 or 0) before it."""
    hkv, k = sel.shape
    B, D = k_store.shape[2], k_store.shape[3]
    kr = gather_blocks(k_store, sel).reshape(hkv, k * B, D).to(q.dtype)
    vr = gather_blocks(v_store, sel).reshape(hkv, k * B, D).to(q.dtype)
    kr = apply_rope(kr, cos[:k * B], sin[:k * B])
    flags = torch.cat([is_landmark_position(torch.arange(k * B, device=q.device), B), dense_flags.to(q.device)])
    keys, vals = torch.cat([kr, dense_k], 1), torch.cat([vr, dense_v], 1)
    return landmark_attention(q[None], keys[None], vals[None], flags[None], impl="torch", local=local,
                              local_blocks=local_blocks)[0]


def local_selection(first_dense: int, n_kv_heads: int, local_blocks: int = 1) -> torch.Tensor:
    """What a local layer reads from the store: the block right before the dense keys (the
    previous block of their first block), or nothing at the document's start or when the
    layer reads its own block only (local_blocks 0). [Hkv, 0 or 1]."""
    prev = torch.tensor([first_dense - 1] if first_dense > 0 and local_blocks else [], dtype=torch.long)
    return prev.expand(n_kv_heads, -1)


class FreeLandmarks:
    """Training-free landmarks: block representatives computed from the cached keys; an
    ordinary softmax over [sink] [retrieved blocks] [dense keys].

    impl: the attention implementation (retrieval_attention's: auto, torch, triton).
    `attend` reads the retrieved blocks from wherever the store is: blocks not on the
    queries' device are staged there first (device.stage)."""

    spec: LandmarkSpec | None = None

    def __init__(self, impl: str = "auto"):
        self.impl = impl

    def stream(self, ids: list[int], spans=None, pos: int = 0):
        """The token stream the store holds for ids (unchanged)."""
        return ids, spans

    def stream_length(self, tokens: int) -> int:
        """Most stream positions that `tokens` new tokens take (with the landmarks inserted among them)."""
        return tokens

    def local(self, layer: int) -> bool:
        return False

    def selection(self, inner: Selection, first_dense: int, n_kv_heads: int) -> Selection:
        return inner

    def attend(self, layer, q, keys, values, flags, k_store, v_store, sel, cos, sin, ret_pos0) -> torch.Tensor:
        """q [H, T, D] RoPE'd over the blocks sel of the store, placed from ret_pos0 and
        rotated by the cos/sin tables, then the dense keys and values [Hkv, L, D]."""
        k_store, v_store, sel = stage(k_store, v_store, sel, q.device)
        return retrieval_attention(q, keys, values, k_store, v_store, sel, cos, sin, ret_pos0, impl=self.impl)

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def folder_session(self, engine, entries: list, capacity: int):
        """The answering session for a question over several store entries."""
        from landmark_cli.retrieval.corpus import CorpusSession

        return CorpusSession(engine, entries, capacity)


class TrainedLandmarks(FreeLandmarks):
    """A model's own `<landmark>` token after every `mem_freq` tokens (LandmarkSpec)."""

    spec: LandmarkSpec

    def __init__(self, spec: LandmarkSpec, impl: str = "auto"):
        super().__init__(impl)
        self.spec = spec

    def stream(self, ids: list[int], spans=None, pos: int = 0):
        """ids with a <landmark> after every mem_freq tokens of the stream (pos: the stream
        position of ids[0]); spans get (-1, -1) rows for the landmarks."""
        return insert_landmarks(ids, spans, self.spec.mem_freq, self.spec.mem_id, pos)

    def stream_length(self, tokens: int) -> int:
        return tokens + tokens // self.spec.mem_freq + 2

    def local(self, layer: int) -> bool:
        """A local layer reads its own block and the local_blocks before it; it retrieves nothing."""
        return layer < self.spec.local_layers

    def selection(self, inner: Selection, first_dense: int, n_kv_heads: int) -> Selection:
        """inner for the retrieving layers; the block before the dense keys for local layers."""
        return LocalLayers(inner, self.spec.local_layers,
                           local_selection(first_dense, n_kv_heads, self.spec.local_blocks))

    def attend(self, layer, q, keys, values, flags, k_store, v_store, sel, cos, sin, ret_pos0) -> torch.Tensor:
        k_store, v_store, sel = stage(k_store, v_store, sel, q.device)
        return grouped_attention(q, keys, values, flags, k_store, v_store, sel, cos, sin, local=self.local(layer),
                                 local_blocks=self.spec.local_blocks)

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """After a landmark the model predicts the next token (the reference's convention): it
        never writes one."""
        logits[self.spec.mem_id] = float("-inf")
        return logits

    def folder_session(self, engine, entries: list, capacity: int):
        from landmark_cli.retrieval.corpus_trained import TrainedCorpusSession

        return TrainedCorpusSession(engine, entries, capacity)


def landmark_kind(spec: LandmarkSpec | None, impl: str = "auto") -> FreeLandmarks:
    return FreeLandmarks(impl) if spec is None else TrainedLandmarks(spec, impl)
