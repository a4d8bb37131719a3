"""Static census of the kernels' H100 machine code, on any machine (no GPU needed).

    python benchmarks/kernel_census.py [--json out.json]

Compiles the fused landmark attention kernels (forward, backward dQ, backward dK/dV) for
sm_90 at bench_kernels.py's shape (D=128, bf16, 64-token landmark blocks, the default
launch settings), with SPLIT on and off, and the retrieval kernel at its decode setting.
For each innermost loop it counts the instructions one thread issues per iteration (one
(query tile, key block) pair), the matrix-multiply and special-function (exp2) ones among
them, and spill accesses; with registers, spill stack and shared memory per thread block.

Why count: a flash-attention style loop on an H100 is bound by instruction issue, not by
the tensor cores, once its elementwise work (masks, max, exp, sums) grows; the fused
kernel's loop is the same matrix work as flash attention's plus the grouped softmax's
extra masks and reductions. These counts are not timings: time the kernels with
bench_kernels.py on a GPU. Run without TRITON_INTERPRET=1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's default in triton 3.9
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

try:
    import triton.backends.nvidia  # noqa: E402, F401
except ImportError:
    sys.exit("kernel_census.py needs triton with its NVIDIA backend: pip install triton")

import landmark_cli.kernels.landmark_attention as la  # noqa: E402
import landmark_cli.kernels.retrieval_attention as ra  # noqa: E402
from landmark_cli.kernels.sm90 import census, compile_sm90, landmark_types, retrieval_types  # noqa: E402

# integer arguments that are multiples of 16 in the benchmark problems (the JIT notices)
FUSED_ALIGNED = ("T", "H", "HKV")
RETRIEVAL_ALIGNED = ("L_DENSE", "B", "NKB", "ret_pos0", "skd_h", "skd_n", "svd_h", "svd_n",
                     "sks_h", "sks_n", "sks_b", "svs_h", "svs_n", "svs_b", "slm_h", "slm_n", "scs")
LOOPS = {  # what each innermost loop is, in code order
    ("fwd", True): ("largest gate logit (64 blocks)", "blocks before every row",
                    "blocks a row shares"),
    ("fwd", False): ("every block",),
    ("bwd_dq", True): ("blocks before every row", "blocks a row shares"),
    ("bwd_dq", False): ("every block",),
    ("bwd_dkdv", True): ("query tiles after the block", "query tiles sharing it"),
    ("bwd_dkdv", False): ("every query tile",),
}


def fused(which: str, split: bool) -> dict:
    cfg = la._config(128, 64, torch.bfloat16, "fwd" if which == "fwd" else "bwd")
    cfg["SPLIT"] = split
    fn = getattr(la, f"_{which}_kernel")
    kernel = compile_sm90(fn, cfg, landmark_types("bf16"), aligned=FUSED_ALIGNED)
    out = census(kernel)
    out["kernel"], out["launch"] = f"landmark {which} SPLIT={split}", cfg
    out["loop_names"] = LOOPS[which, split]
    return out


def retrieval(grouped: bool) -> dict:
    """The decode setting of bench_kernels.py: 1 query x 4 heads per kv head (16-row tile),
    64-token blocks (one key tile each when the tile holds 64 keys, as _retrieval_triton picks)."""
    block_n = max(64, ra.TUNING["BLOCK_N"]) if grouped else ra.TUNING["BLOCK_N"]
    launch = dict(D=128, BLOCK_M=16, BLOCK_N=block_n, ONE_TILE=block_n >= 64, GROUPED=grouped, PREC="tf32",
                  num_warps=ra.TUNING["num_warps"] or 4, num_stages=ra.TUNING["num_stages"])
    kernel = compile_sm90(ra._retrieval_kernel, launch, retrieval_types("fp16"),
                          aligned=RETRIEVAL_ALIGNED)
    out = census(kernel)
    out["kernel"] = f"retrieval decode grouped={grouped}"
    out["launch"] = launch
    out["loop_names"] = ("retrieved blocks", "dense keys")
    return out


def table(results: list[dict]) -> str:
    rows = ["| kernel | loop | instructions / iteration | MMA | MUFU | spill | registers | "
            "stack B | shared B |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        names = list(r["loop_names"]) + [f"loop {i + 1}" for i in range(len(r["loops"]))]
        for name, loop in zip(names, r["loops"], strict=False):
            rows.append(f"| {r['kernel']} | {name} | {loop['instructions']} | {loop['mma']} | "
                        f"{loop['mufu']} | {loop['spill']} | {r['registers']} | {r['stack']} | "
                        f"{r['shared']} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the counts here")
    args = parser.parse_args()
    results = [fused(which, split) for which in ("fwd", "bwd_dq", "bwd_dkdv")
               for split in (True, False)]
    results += [retrieval(grouped) for grouped in (False, True)]
    import triton

    print(f"sm_90 code from triton {triton.__version__} (compiled offline, no GPU)\n")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
