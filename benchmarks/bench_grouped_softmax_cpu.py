"""CPU speed of the grouped softmax that `landmark finetune` trains with (the torch path).

    python benchmarks/bench_grouped_softmax_cpu.py [--threads 1] [--runs 7] [--json out.json]

Times one forward + backward of `landmark_attention_blocks` (the regular-layout path the
engine and `landmark finetune` use off CUDA) against `landmark_attention_reference` (the
general path: [T, T] scores, masks and scatters) on the same inputs, in the same process,
at the shapes of experiments/trained_facts.py's training (batches of 16 x 256 tokens,
blocks of 31 + landmark): its global layer with 4 heads of 32 and 8 heads of 16, and its
local first layer. Reports the median of --runs (after one warm-up) and the ratio. The
two outputs and gradients are compared too, so a fast wrong path shows up here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from landmark_cli.kernels.landmark_attention import landmark_attention_blocks, landmark_attention_reference  # noqa: E402

SHAPES = [  # (name, heads, head dim, local)
    ("global layer, 4 heads of 32", 4, 32, False),
    ("global layer, 8 heads of 16", 8, 16, False),
    ("local layer, 4 heads of 32", 4, 32, True),
]


def fwd_bwd_seconds(fn, q, k, v, dout, runs: int) -> tuple[float, tuple]:
    times, result = [], None
    for _ in range(runs + 1):
        t0 = time.perf_counter()
        out = fn(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        times.append(time.perf_counter() - t0)
        result = (out.detach(), *grads)
    return statistics.median(times[1:]), result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--block", type=int, default=32, help="block length, landmark included")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t, block = args.context, args.block
    is_lm = (torch.arange(t) % block == block - 1).expand(args.batch, t)
    rows = []
    for name, heads, d, local in SHAPES:
        q, k, v = (torch.randn(args.batch, heads, t, d, requires_grad=True) for _ in range(3))
        dout = torch.randn(args.batch, heads, t, d)
        fast_s, fast = fwd_bwd_seconds(
            lambda q, k, v, local=local: landmark_attention_blocks(q, k, v, block, local=local),
            q, k, v, dout, args.runs)
        ref_s, ref = fwd_bwd_seconds(
            lambda q, k, v, local=local: landmark_attention_reference(q, k, v, is_lm, local=local),
            q, k, v, dout, args.runs)
        err = max((a - b).abs().max().item() for a, b in zip(fast, ref, strict=True))
        rows.append({"shape": name, "blocks_ms": round(fast_s * 1e3, 1), "reference_ms": round(ref_s * 1e3, 1),
                     "speed_up": round(ref_s / fast_s, 2), "max_abs_diff": err})
        print(f"{name}: blocks {fast_s * 1e3:.1f} ms, reference {ref_s * 1e3:.1f} ms, "
              f"{ref_s / fast_s:.2f}x (max |diff| {err:.1e})")
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
              "threads": args.threads, "runs": args.runs, "batch": args.batch, "context": t, "block": block,
              "torch": torch.__version__, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
