"""A compact LLaMA-family forward pass on Hugging Face weights.

The model is split into the pieces the landmark engine needs: embedding, per-layer
`qkv` (keys and values come out *before* RoPE, as the KV store keeps them), per-layer
`finish` (attention output projection + MLP), and the LM head on the last position only.
`run_layers` is the one layer loop: every reader and answering session runs the model
through it, passing the attention it needs. `forward` runs it with plain causal (or
trained landmarks' grouped) attention: the parity test against transformers, the `full`
baseline and `landmark finetune`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from landmark_cli.kernels.landmark_attention import landmark_attention
from landmark_cli.kernels.rope import apply_rope
from landmark_cli.model import blocks


@dataclass
class LlamaConfig:
    vocab_size: int
    dim: int  # hidden size
    n_layers: int
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (GQA when < n_heads)
    head_dim: int
    ffn_dim: int
    norm_eps: float
    rope_theta: float
    context: int  # the context length the model was trained for
    tie_embeddings: bool
    rope_scaling: dict | None = None  # llama3 / linear scaling parameters, or None

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_hf(cls, cfg) -> "LlamaConfig":
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
        theta = rope.pop("rope_theta", None) or getattr(cfg, "rope_theta", None) or 10000.0
        kind = rope.get("rope_type", rope.get("type", "default"))
        return cls(
            vocab_size=cfg.vocab_size,
            dim=cfg.hidden_size,
            n_layers=cfg.num_hidden_layers,
            n_heads=heads,
            n_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            ffn_dim=cfg.intermediate_size,
            norm_eps=cfg.rms_norm_eps,
            rope_theta=float(theta),
            context=int(getattr(cfg, "max_position_embeddings", 2048)),
            tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            rope_scaling=None if kind == "default" else rope,
        )


def inv_frequencies(cfg: LlamaConfig) -> torch.Tensor:
    """RoPE inverse frequencies [head_dim/2], with llama3 / linear scaling applied."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    sc = cfg.rope_scaling
    if not sc:
        return inv.float()
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "linear":
        return (inv / sc["factor"]).float()
    if kind == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = ((old / wavelen) - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        mid = (1 - smooth) * inv / factor + smooth * inv
        is_mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        return torch.where(is_mid, mid, scaled).float()
    raise ValueError(f"unsupported rope scaling {kind!r}")


class Rope:
    """cos/sin tables (float32, on the model's device) for positions [0, n), grown on demand."""

    def __init__(self, cfg: LlamaConfig, device: torch.device | str = "cpu"):
        self.inv = inv_frequencies(cfg)
        self.device = torch.device(device)
        self.cos = self.sin = torch.empty(0, cfg.head_dim, device=self.device)

    def tables(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if n > self.cos.shape[0]:
            n2 = max(n, 2 * self.cos.shape[0], 1024)
            freqs = torch.arange(n2, dtype=torch.float32)[:, None] * self.inv[None, :]
            emb = torch.cat([freqs, freqs], dim=-1)
            self.cos, self.sin = emb.cos().to(self.device), emb.sin().to(self.device)
        return self.cos[:n], self.sin[:n]

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables' rows at `positions` (a tensor on any device)."""
        cos, sin = self.tables(int(positions.max()) + 1 if positions.numel() else 0)
        positions = positions.to(self.device)
        return cos[positions], sin[positions]


# attend(layer, q [H, T, D], k [Hkv, T, D], v [Hkv, T, D]) -> attention output [H, T, D]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T; a matrix kept in another dtype than the activations (`Llama.with_matrices`)
    multiplies them cast to its dtype and gives its result back in theirs; a packed one
    (model/blocks.py) is unpacked to theirs first (the native answer step reads it packed)."""
    if w.dtype == blocks.PACKED:
        return x @ blocks.unpack(w, x.shape[-1], x.dtype).T
    if x.dtype == w.dtype:
        return x @ w.T
    return (x.to(w.dtype) @ w.T).to(x.dtype)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """LLaMA's RMSNorm as transformers computes it: normalised in float32, cast back to x's
    dtype, then scaled by w. In float32 PyTorch's fused F.rms_norm gives the same numbers
    in one operation instead of six."""
    if x.dtype == torch.float32 and w.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


MATRICES = ("qkv", "o", "gate_up", "down")  # a layer's projection matrices (fused)
EMBEDDINGS = "model.embed_tokens.weight"


class Llama:
    """Weights (a flat HF-named state dict) plus the forward pieces. Batch size 1.

    The model runs where its weights are (`device`), in their dtype; token ids and
    positions given on the CPU are moved there. Each layer's projections are fused
    (qkv, gate_up) and kept only fused: `w` holds the embeddings, the final norm and the
    LM head, `state_dict()` gives the Hugging Face names back."""

    def __init__(self, cfg: LlamaConfig, weights: dict[str, torch.Tensor], take: bool = False):
        """take: `weights` is handed over, and each layer's tensors leave it as they are
        fused, so that a model being loaded is never held twice (the fused copies beside
        the separate ones); otherwise the caller's dict is left as it was."""
        self.cfg = cfg
        self.dtype = weights["model.norm.weight"].dtype  # the activations'
        self.device = weights[EMBEDDINGS].device
        self.rope = Rope(cfg, self.device)
        weights = weights if take else dict(weights)
        self.layers = [self._layer(weights, i) for i in range(cfg.n_layers)]
        lm = weights.pop("lm_head.weight", None)
        self.lm_head = weights[EMBEDDINGS] if lm is None or cfg.tie_embeddings else lm
        self.w = {k: v for k, v in weights.items() if not k.startswith("model.layers.")}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Llama":
        """This model with its weights on `device` and / or in `dtype` (itself if nothing changes)."""
        device = torch.device(device) if device is not None else self.device
        if device == self.device and dtype in (None, self.dtype):
            return self
        return Llama(self.cfg, {k: v.to(device=device, dtype=v.dtype if dtype is None or v.dtype == blocks.PACKED
                                       else dtype) for k, v in self.state_dict().items()}, take=True)

    @property
    def matrix_dtype(self) -> torch.dtype:
        """The dtype of the projection matrices and the LM head (`dtype` unless `with_matrices`)."""
        return self.lm_head.dtype

    def with_matrices(self, dtype: torch.dtype, given: dict[str, torch.Tensor] | None = None) -> "Llama":
        """This model with its projection matrices and LM head in `dtype` (new tensors) and
        everything else shared with it: the embeddings, the norms and so the activations
        (the residual stream, norms and attention) stay in this model's dtype. Decoding
        streams every matrix once per token, so their bytes set its speed; the activations
        are a few thousand numbers and keep their precision.

        given: those matrices already in `dtype`, as `matrices()` names them (a copy kept
        on disk), used as they are instead of converted."""
        def convert(name: str, t: torch.Tensor) -> torch.Tensor:
            return given[name] if given is not None else blocks.convert(t, dtype, self.columns(name))

        m = copy.copy(self)
        m.lm_head = convert("lm_head", self.lm_head)
        m.layers = [{k: convert(f"layers.{i}.{k}", v) if k in MATRICES else v for k, v in L.items()}
                    for i, L in enumerate(self.layers)]
        return m

    def columns(self, name: str) -> int:
        """The columns of a matrix named as `matrices()` names them (its input's size)."""
        c = self.cfg
        return {"o": c.n_heads * c.head_dim, "down": c.ffn_dim}.get(name.rsplit(".", 1)[-1], c.dim)

    def matrix_formats(self) -> list[str]:
        """The format of each layer's MATRICES in turn, then the LM head's: a dtype's name, or
        a packed format (model/blocks.py)."""
        return [blocks.format_name(t, self.columns(name)) for name, t in self.matrices().items()]

    def matrices(self) -> dict[str, torch.Tensor]:
        """The projection matrices and the LM head, by name (what `with_matrices` converts)."""
        out = {f"layers.{i}.{k}": L[k] for i, L in enumerate(self.layers) for k in MATRICES}
        return {**out, "lm_head": self.lm_head}

    def _layer(self, w: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
        """Layer i's tensors, fused (qkv, gate_up), taken out of w."""
        p, dim = f"model.layers.{i}.", self.cfg.dim
        qkv = blocks.cat_rows([w.pop(p + "self_attn.q_proj.weight"), w.pop(p + "self_attn.k_proj.weight"),
                               w.pop(p + "self_attn.v_proj.weight")], dim)
        gate_up = blocks.cat_rows([w.pop(p + "mlp.gate_proj.weight"), w.pop(p + "mlp.up_proj.weight")], dim)
        return {
            "attn_norm": w.pop(p + "input_layernorm.weight"),
            "qkv": qkv,
            "o": w.pop(p + "self_attn.o_proj.weight"),
            "mlp_norm": w.pop(p + "post_attention_layernorm.weight"),
            "gate_up": gate_up,
            "down": w.pop(p + "mlp.down_proj.weight"),
        }

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] (on any device) -> hidden [T, dim] in the activations' dtype: a table kept in
        another (a named --dtype on the CPU) or packed converts the rows it looks up."""
        table, ids = self.w[EMBEDDINGS], ids.to(self.device)
        if table.dtype == blocks.PACKED:
            return blocks.unpack(table[ids.reshape(-1)], self.cfg.dim, self.dtype).reshape(*ids.shape, -1)
        return F.embedding(ids, table).to(self.dtype)

    def qkv(self, i: int, x: torch.Tensor):
        """hidden [T, dim] -> q [H, T, D], k [Hkv, T, D], v [Hkv, T, D]; no RoPE applied.
        (A leading batch dimension passes through: [Bt, T, dim] -> [Bt, H, T, D] etc.)"""
        c, L = self.cfg, self.layers[i]
        h = linear(rms_norm(x, L["attn_norm"], c.norm_eps), L["qkv"])
        q, k, v = h.split([c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim], -1)
        q = q.unflatten(-1, (c.n_heads, c.head_dim)).transpose(-3, -2)  # [H, T, D]
        k = k.unflatten(-1, (c.n_kv_heads, c.head_dim)).transpose(-3, -2)  # [Hkv, T, D]
        v = v.unflatten(-1, (c.n_kv_heads, c.head_dim)).transpose(-3, -2)
        return q, k, v

    def finish(self, i: int, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """residual stream x [T, dim] + attention output attn [H, T, D] -> next hidden [T, dim]"""
        c, L = self.cfg, self.layers[i]
        x = x + linear(attn.transpose(-3, -2).flatten(-2), L["o"])
        gate, up = linear(rms_norm(x, L["mlp_norm"], c.norm_eps), L["gate_up"]).chunk(2, -1)
        return x + linear(F.silu(gate) * up, L["down"])

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """hidden [T, dim] -> logits [T, vocab] (callers pass only the positions they read)."""
        return linear(rms_norm(x, self.w["model.norm.weight"], self.cfg.norm_eps), self.lm_head)

    def forward(self, ids: torch.Tensor, is_landmark: torch.Tensor | None = None, local_layers: int = 0,
                local_blocks: int = 1) -> torch.Tensor:
        """Causal forward over ids [T] (or a batch [Bt, T]) -> logits [T, vocab] (parity
        tests, baselines, `landmark finetune`).

        is_landmark (shaped like ids, bool): a trained landmark model's full forward, with
        the grouped softmax (landmark_cli/kernels/landmark_attention) in place of the ordinary one; its
        first `local_layers` layers read only their own block and the `local_blocks` (1 or 0)
        blocks before it."""
        x = self.embed(ids)
        cos, sin = self.rope.tables(ids.shape[-1])
        batched = ids.dim() > 1

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if is_landmark is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.cfg.group > 1)
            if not batched:
                q, k, v = q[None], k[None], v[None]
            flags = is_landmark.to(q.device)
            out = landmark_attention(q, k, v, flags if batched else flags[None],
                                     local=layer < local_layers, local_blocks=local_blocks)
            return out if batched else out[0]

        return self.logits(self.run_layers(x, attend))

    def run_layers(self, x: torch.Tensor, attend: Attend, layers: int | None = None) -> torch.Tensor:
        """The layer loop, for every path that runs the model: hidden states x [T, dim]
        through layers [0, layers) (default: all). `attend(layer, q, k, v)` gets the
        layer's queries, keys and values before RoPE and returns the attention output
        [H, T, D]; positions, caches and retrieval are its business."""
        for layer in range(self.cfg.n_layers if layers is None else layers):
            q, k, v = self.qkv(layer, x)
            x = self.finish(layer, x, attend(layer, q, k, v))
        return x

    def parameters(self) -> list[torch.Tensor]:
        """The tensors the forward reads (fused per layer), for training them in place."""
        out = [self.w[EMBEDDINGS], self.w["model.norm.weight"]]
        if self.lm_head is not out[0]:
            out.append(self.lm_head)
        return out + [t for L in self.layers for t in L.values()]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Hugging Face-named weights from the (possibly trained) fused tensors."""
        c = self.cfg
        sd = {EMBEDDINGS: self.w[EMBEDDINGS],
              "model.norm.weight": self.w["model.norm.weight"]}
        if self.lm_head is not sd[EMBEDDINGS]:
            sd["lm_head.weight"] = self.lm_head
        for i, L in enumerate(self.layers):
            p = f"model.layers.{i}."
            q, k, v = L["qkv"].split([c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim])
            gate, up = L["gate_up"].chunk(2)
            sd.update({p + "input_layernorm.weight": L["attn_norm"], p + "self_attn.q_proj.weight": q,
                       p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
                       p + "self_attn.o_proj.weight": L["o"], p + "post_attention_layernorm.weight": L["mlp_norm"],
                       p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                       p + "mlp.down_proj.weight": L["down"]})
        return {k: v.detach().contiguous() for k, v in sd.items()}
