"""Does torch.compile pay for the answer step on the CPU?

    python experiments/compile_step.py [--tokens 64] [--runs 3]

Decodes greedily on a cached 4k-token reading with the default model in `--dtype auto`,
first eagerly, then with each layer's two stretches of small operations around attention
(RMSNorm + QKV projection; output projection + residual + RMSNorm + MLP + residual)
compiled by torch.compile (Inductor, which needs a C++ compiler) as one graph each,
shared by every layer; attention and the dense buffer stay as they are. Prints the
first compiled call's time (cold, and again in a second process with Inductor's on-disk
cache warm), ms per token for both (medians of --runs) and whether the tokens agree.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_ask import prompt_ids  # noqa: E402

from landmark_cli.model import llama  # noqa: E402
from landmark_cli.model.loading import load_in  # noqa: E402
from landmark_cli.retrieval.engine import Engine  # noqa: E402
from landmark_cli.retrieval.session import Session  # noqa: E402
from landmark_cli.retrieval.settings import Settings  # noqa: E402


def qkv_math(x, norm, w, eps: float):
    return llama.linear(llama.rms_norm(x, norm, eps), w)


def finish_math(x, attn, o, norm, gate_up, down, eps: float):
    x = x + llama.linear(attn, o)
    gate, up = llama.linear(llama.rms_norm(x, norm, eps), gate_up).chunk(2, -1)
    return x + llama.linear(torch.nn.functional.silu(gate) * up, down)


def compiled(model: llama.Llama) -> None:
    """Route `model`'s qkv and finish through compiled graphs (one per stretch, every layer)."""
    c = model.cfg
    qkv_c, finish_c = torch.compile(qkv_math, dynamic=False), torch.compile(finish_math, dynamic=False)
    sizes = [c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim]

    def qkv(i, x):
        L = model.layers[i]
        q, k, v = qkv_c(x, L["attn_norm"], L["qkv"], c.norm_eps).split(sizes, -1)
        return (q.unflatten(-1, (c.n_heads, c.head_dim)).transpose(-3, -2),
                k.unflatten(-1, (c.n_kv_heads, c.head_dim)).transpose(-3, -2),
                v.unflatten(-1, (c.n_kv_heads, c.head_dim)).transpose(-3, -2))

    def finish(i, x, attn):
        L = model.layers[i]
        return finish_c(x, attn.transpose(-3, -2).flatten(-2), L["o"], L["mlp_norm"], L["gate_up"], L["down"],
                        c.norm_eps)

    model.qkv, model.finish = qkv, finish


def decode(sess: Session, logits: torch.Tensor, n: int) -> tuple[torch.Tensor, list[int], float]:
    out = []
    t = time.perf_counter()
    for _ in range(n):
        tok = logits.argmax().view(1)
        out.append(int(tok))
        logits = sess.step(tok)
    return logits, out, (time.perf_counter() - t) / n * 1e3


def session(lm, root: Path) -> tuple[Session, torch.Tensor]:
    e = Engine(lm, Settings(), root=root)
    entry, _ = e.read(prompt_ids(lm.tokenizer, 4096))
    suffix = prompt_ids(lm.tokenizer, 16)
    s = Session(e, entry, capacity=len(suffix) + 600)
    return s, s.step(torch.tensor(suffix))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--first-call-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    lm = load_in("default", "auto")
    answering = lm.model
    with tempfile.TemporaryDirectory() as d:
        sess, logits = session(lm, Path(d))
        if not args.first_call_only:
            _, eager_tokens, _ = decode(sess, logits, args.tokens)
        sess, logits = session(lm, Path(d))
        compiled(answering)
        t = time.perf_counter()
        logits, first, _ = decode(sess, logits, 1)
        first_s = time.perf_counter() - t
        if args.first_call_only:
            print(f"{first_s:.1f}")
            return
        print(f"first compiled step (cold Inductor cache): {first_s:.1f} s")
        logits, rest, _ = decode(sess, logits, args.tokens - 1)
        same = (first + rest) == eager_tokens
        eager_ms, compiled_ms = [], []
        for _ in range(args.runs):  # alternate, on fresh sessions of the same reading
            for model_ms, patch in ((eager_ms, False), (compiled_ms, True)):
                if not patch:
                    del answering.qkv, answering.finish  # back to the class's eager methods
                else:
                    compiled(answering)
                s, lg = session(lm, Path(d))
                model_ms.append(decode(s, lg, args.tokens)[2])
    warm = subprocess.run([sys.executable, __file__, "--first-call-only"], capture_output=True, text=True,
                          env=os.environ.copy())
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    print(f"first compiled step in a new process (warm Inductor cache): {warm.stdout.strip()} s")
    print(f"ms per token, medians of {args.runs}: eager {med(eager_ms):.1f}, compiled {med(compiled_ms):.1f} "
          f"({med(eager_ms) / med(compiled_ms):.2f}x); the same {args.tokens} tokens: {same}")


if __name__ == "__main__":
    main()
