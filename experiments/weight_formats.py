"""Do int8 or int4 weights answer like float32 on the CPU, and how fast is one token?

    python experiments/weight_formats.py [--tokens 1024] [--threads 2] [--modes int8-dynamic,float16]

Weights per mode: `int8-dynamic` (PyTorch's fbgemm dynamic quantization: int8 weights
with a scale per output channel, each call's activations quantized to 8 bits on the fly,
int8 products), `int8-weight` (`_weight_int8pack_mm`: int8 weights, float activations),
`int4` (4-bit weights in groups of 32 with a scale and offset each, as the default
model's GGUF stores them, through `_weight_int4pack_mm_for_cpu`, which multiplies in
bfloat16), `float16`, `bfloat16`. Every matrix is converted, the LM head included (the embedding
stays float32: it is a lookup). Reports, for each mode beside float32:

- top-token agreement, teacher-forced one token at a time (as answers are generated)
  over --tokens tokens of examples/lantern_bay.md after a 256-token prefix;
- the median time of one token through the whole model (a 256-token cache).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from landmark_cli.kernels.rope import apply_rope  # noqa: E402
from landmark_cli.model.llama import Llama, rms_norm  # noqa: E402
from landmark_cli.model.loading import load_model  # noqa: E402


class Int8Dynamic:
    """x @ w.T with fbgemm's dynamically quantized int8 linear."""

    def __init__(self, w: torch.Tensor):
        w = w.float()
        scales = (w.abs().amax(1) / 127).clamp_min(1e-12).double()
        qw = torch.quantize_per_channel(w, scales, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(qw, None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.float().contiguous(), self.packed, True)


class Int8Weight:
    """x @ w.T with int8 weights (a scale per output channel) and float activations."""

    def __init__(self, w: torch.Tensor):
        w = w.float()
        self.scales = (w.abs().amax(1) / 127).clamp_min(1e-12)
        self.q = (w / self.scales[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x.float().contiguous(), self.q, self.scales)


class Int4:
    """x @ w.T with 4-bit weights in groups of 32 along the input (a scale and an offset per
    group, as GGUF's Q4_1 stores them), through PyTorch's packed int4 CPU kernel, which
    multiplies in bfloat16: activations are rounded to bfloat16 on the way in."""

    GROUP = 32

    def __init__(self, w: torch.Tensor):
        w = w.float()
        n, k = w.shape
        g = w.view(n, k // self.GROUP, self.GROUP)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(1e-12)
        q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).view(n, k)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        # the kernel computes (q - 8) * scale + zero
        self.scales = torch.stack([scale.t(), (lo + 8 * scale).t()], -1).to(torch.bfloat16).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, self.GROUP,
                                                         self.scales).float()


class Cast:
    def __init__(self, w: torch.Tensor, dtype: torch.dtype):
        self.w, self.dtype = w.to(dtype).contiguous(), dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.dtype) @ self.w.T).float()


def linears(model: Llama, mode: str) -> dict:
    """Per layer and the LM head: the four matrices as callables x -> x @ w.T. A mode
    "A/B:m1+m2" uses A for the matrices named m1, m2 (qkv, o, gate_up, down, head), B for the others."""
    if "/" in mode:
        spec, names = mode.split(":")
        first, rest = spec.split("/")
        a, b = linears(model, first), linears(model, rest)
        chosen = set(names.split("+"))
        return {"layers": [{k: (la if k in chosen else lb)[k] for k in la} for la, lb in zip(a["layers"], b["layers"],
                                                                                           strict=True)],
                "head": a["head"] if "head" in chosen else b["head"]}

    def make(w):
        if mode == "float32":
            return lambda x: x @ w.T
        if mode == "int8-dynamic":
            return Int8Dynamic(w)
        if mode == "int8-weight":
            return Int8Weight(w)
        if mode == "int4":
            return Int4(w)
        return Cast(w, getattr(torch, mode))
    return {"layers": [{k: make(L[k]) for k in ("qkv", "o", "gate_up", "down")} for L in model.layers],
            "head": make(model.lm_head)}


class Decoder:
    """One token at a time over a dense cache, with one mode's matrices."""

    def __init__(self, model: Llama, mode: str):
        self.m, self.lin = model, linears(model, mode)
        self.cache: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * model.cfg.n_layers
        self.pos = 0

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        m, c = self.m, self.m.cfg
        T = ids.shape[0]
        cos, sin = m.rope.at(torch.arange(self.pos, self.pos + T))
        x = m.embed(ids)
        for i, L in enumerate(m.layers):
            lin = self.lin["layers"][i]
            h = lin["qkv"](rms_norm(x, L["attn_norm"], c.norm_eps))
            q, k, v = h.split([c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim], -1)
            q = apply_rope(q.unflatten(-1, (c.n_heads, c.head_dim)).transpose(0, 1), cos, sin)
            k = apply_rope(k.unflatten(-1, (c.n_kv_heads, c.head_dim)).transpose(0, 1), cos, sin)
            v = v.unflatten(-1, (c.n_kv_heads, c.head_dim)).transpose(0, 1)
            cached = self.cache[i]
            if cached is not None:
                k, v = torch.cat([cached[0], k], 1), torch.cat([cached[1], v], 1)
            self.cache[i] = (k, v)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)
            x = x + lin["o"](a.transpose(0, 1).flatten(-2))
            gate, up = lin["gate_up"](rms_norm(x, L["mlp_norm"], c.norm_eps)).chunk(2, -1)
            x = x + lin["down"](F.silu(gate) * up)
        self.pos += T
        return self.lin["head"](rms_norm(x[-1:], m.w["model.norm.weight"], c.norm_eps))[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--modes", default="int8-dynamic,int8-weight,float16,bfloat16")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model("default")
    ids = lm.tokenizer((ROOT / "examples" / "lantern_bay.md").read_text())["input_ids"][:256 + args.tokens + 1]
    ids = torch.tensor(ids)
    modes = ["float32"] + args.modes.split(",")
    with torch.inference_mode():
        decoders = {mode: Decoder(lm.model, mode) for mode in modes}
        tops: dict[str, list[int]] = {mode: [] for mode in modes}
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        for d in decoders.values():
            d.step(ids[:256])
        for t in range(256, 256 + args.tokens):
            for mode, d in decoders.items():
                t0 = time.perf_counter()
                logits = d.step(ids[t:t + 1])
                times[mode].append(time.perf_counter() - t0)
                tops[mode].append(int(logits.argmax()))
    base = tops["float32"]
    print(f"{args.tokens} tokens of examples/lantern_bay.md, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    for mode in modes:
        agree = sum(a == b for a, b in zip(tops[mode], base, strict=True)) / len(base)
        ms = statistics.median(times[mode]) * 1e3
        print(f"{mode:>13}: top token agrees with float32 at {agree:.2%} of positions; one token {ms:.1f} ms "
              f"({1e3 / ms:.0f} tok/s)", flush=True)


if __name__ == "__main__":
    main()
