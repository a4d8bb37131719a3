"""GPU benchmark of the attention kernels against the device's ceilings and torch SDPA.

    python benchmarks/bench_kernels.py [--json results.json] [--sweep] [--quick]

Every kernel is first checked against its torch reference on the GPU (the script stops on
a mismatch), then timed: median of CUDA-event timings after warm-up. Prints a Markdown
table. Needs a CUDA GPU and triton.
  (a) ceilings: bf16 matmul TFLOP/s (8192^3) and device-to-device copy GB/s;
  (b) landmark_attention forward and backward, T=8192, Hq=Hkv=32, D=128, bf16, a landmark
      every 64th token, vs SDPA flash (is_causal) on the same shape; both are credited
      with causal attention FLOPs (fwd 2*2*T*T/2*D per head, bwd 2.5x that); the kernels
      run with their SPLIT launch setting (the default) and without it, in one process;
  (c) retrieval_attention decode, T=1 and 16 queries, Hq=32, Hkv=8, D=128, fp16, a store
      of 1M tokens (blocks of 64), K=16 blocks per kv head + 1024 dense tokens (~8 MB, near
      launch latency) and K=64 + 4096 (~33 MB, bandwidth-bound): the bytes it must move
      (selected blocks, dense K/V, q, output, block_idx, the cos/sin rows it reads, landmark
      keys when grouped) over its time, against the copy ceiling, and against SDPA over a
      pre-gathered K/V holding the same K/V bytes. L2 is flushed before every decode call,
      so these are HBM numbers. Each is timed twice: launched from Python, as the engine
      calls it (the events then also time any wait for Python to launch a kernel: a
      decode call's kernels are about as short as a launch), and replayed from a CUDA
      graph (the kernels back to back). --sweep also times other launch settings of both
      kernels, skipping those that run out of resources.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import landmark_cli.kernels.landmark_attention as la  # noqa: E402
import landmark_cli.kernels.retrieval_attention as ra  # noqa: E402
from landmark_cli.kernels.rope import rope_tables  # noqa: E402

DEV = "cuda"


# ----------------------------------------------------------------------------- helpers


def timed(fn, reps=20, warmup=3, flush=None):
    """Median milliseconds of fn() by CUDA events; `flush` (a big tensor) evicts L2 first."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_of(fn):
    """fn captured in a CUDA graph: its replay runs fn's kernels back to back, without the
    Python launch overhead between them (which can exceed a decode kernel's own time).
    None, with a message, when capture fails."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # compile and warm up outside the capture
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as exc:
        print(f"CUDA graph capture failed, graph rows left out: {exc}", file=sys.stderr)
        return None
    return graph.replay


def check(name, got, want, tol):
    """Stop the benchmark when the kernel disagrees with its reference (beyond tol, relative
    to each element and to the largest reference element); say where."""
    got, want = got.detach().float(), want.detach().float()
    diff = (got - want).abs()
    bad = ~(diff <= tol * (want.abs().max() + want.abs()))
    if bad.any():
        idx = tuple(int(i) for i in torch.unravel_index(diff.nan_to_num(float("inf")).argmax(),
                                                         diff.shape))
        sys.exit(f"MISMATCH {name}: {int(bad.sum())}/{diff.numel()} differ, max abs diff "
                 f"{diff[idx]:.3g} at {idx} (got {got[idx]:.5g}, expected {want[idx]:.5g})")
    print(f"ok  {name}: max abs diff {diff.max():.2e}", file=sys.stderr)


def every(t, period, bt=1):
    """is_landmark [bt, t] with a landmark closing every block of `period` tokens."""
    return ((torch.arange(t, device=DEV) % period) == period - 1).expand(bt, t).contiguous()


# ----------------------------------------------------------------------------- (a) ceilings


def ceilings(rows):
    n = 8192
    a, b = (torch.randn(n, n, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    ms = timed(lambda: a @ b, reps=10)
    tflops = 2 * n**3 / ms / 1e9
    rows.append(dict(name="bf16 matmul 8192^3", ms=ms, tflops=tflops))
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), reps=10)
    gbps = 2 * src.numel() / ms / 1e6  # read + write
    rows.append(dict(name="device copy 1 GiB", ms=ms, gbps=gbps))
    return tflops, gbps


# ----------------------------------------------------------------------------- (b) landmark


def check_landmark():
    gen = torch.Generator(device=DEV).manual_seed(0)
    bt, hq, hkv, t, d = 2, 8, 2, 1000, 128
    is_lm = torch.rand(bt, t, device=DEV, generator=gen) < 1 / 50  # ragged blocks
    is_lm[:, 100::100] = True  # no block longer than the kernel's 128-token limit
    is_lm[0, :640] = every(640, 64)[0]
    for dtype, tol, split in ((torch.bfloat16, 2e-2, True), (torch.float16, 4e-3, True),
                              (torch.float32, 1e-4, True), (torch.bfloat16, 2e-2, False)):
        for which in ("fwd", "bwd"):
            la.TUNING[which] = {"SPLIT": split}
        q = torch.randn(bt, hq, t, d, device=DEV, generator=gen).to(dtype).requires_grad_()
        k, v = (torch.randn(bt, hkv, t, d, device=DEV, generator=gen).to(dtype).requires_grad_()
                for _ in range(2))
        dout = torch.randn(bt, hq, t, d, device=DEV, generator=gen).to(dtype)
        out = la.landmark_attention(q, k, v, is_lm, impl="triton")
        got = (out, *torch.autograd.grad(out, (q, k, v), dout))
        q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
        ref = la.landmark_attention_reference(q32, k32, v32, is_lm)
        want = (ref, *torch.autograd.grad(ref, (q32, k32, v32), dout.float()))
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
            check(f"landmark_attention {dtype} SPLIT={split} {name}", a, b, tol)
    la.TUNING.update(fwd={}, bwd={})


def bench_landmark(rows, peak_tflops, t=8192, hq=32, hkv=32, d=128, block=64, sweep=False):
    check_landmark()
    gen = torch.Generator(device=DEV).manual_seed(1)
    q = torch.randn(1, hq, t, d, device=DEV, dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(1, hkv, t, d, device=DEV, dtype=torch.bfloat16, generator=gen)
            for _ in range(2))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    dout = torch.randn_like(q)
    is_lm = every(t, block)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hq != hkv)

    # full size check against the torch reference on one query head (the kernel's blocks
    # are capped at 128 tokens, so "no landmarks" cannot be compared with SDPA directly)
    with torch.no_grad():
        got = la.landmark_attention(q[:, :1], k[:, :1], v[:, :1], is_lm, impl="triton")
        want = la.landmark_attention_reference(q[:, :1].float(), k[:, :1].float(), v[:, :1].float(), is_lm)
    check("landmark_attention T=%d vs reference (1 head)" % t, got, want, 2e-2)

    def fwd_bwd_ms(split):
        """Forward and backward times with the kernels' SPLIT launch setting on or off."""
        for which in ("fwd", "bwd"):
            la.TUNING[which] = {"SPLIT": split}
        out = la.landmark_attention(q, k, v, is_lm, impl="triton")
        times = (timed(lambda: la.landmark_attention(q, k, v, is_lm, impl="triton")),
                 timed(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)))
        la.TUNING.update(fwd={}, bwd={})
        return times

    fwd_flops = 4 * hq * t * t * d / 2
    out_s = sdpa()
    ms_s = timed(sdpa)
    bms_s = timed(lambda: torch.autograd.grad(out_s, (q, k, v), dout, retain_graph=True))
    (ms_l, bms_l), (ms_one, bms_one) = fwd_bwd_ms(True), fwd_bwd_ms(False)
    shape = f"T={t} Hq={hq} Hkv={hkv} D={d} bf16"
    for what, ms, ms_1, base, flops in (("forward", ms_l, ms_one, ms_s, fwd_flops),
                                        ("backward", bms_l, bms_one, bms_s, 2.5 * fwd_flops)):
        rows.append(dict(name=f"SDPA flash causal {what}, {shape}", ms=base,
                         tflops=flops / base / 1e9, of_peak=flops / base / 1e9 / peak_tflops))
        for name, x in ((f"landmark_attention {what}, block {block}", ms),
                        (f"landmark_attention {what}, block {block}, one loop (SPLIT=False)", ms_1)):
            rows.append(dict(name=name, ms=x, tflops=flops / x / 1e9,
                             of_peak=flops / x / 1e9 / peak_tflops, vs_sdpa=base / x))
    if sweep:
        sweep_landmark(rows, q, k, v, is_lm, dout, fwd_flops)


def sweep_landmark(rows, q, k, v, is_lm, dout, fwd_flops):
    for which in ("fwd", "bwd"):
        for bm in (32, 64, 128):
            for warps in (4, 8):
                for stages in (1, 2, 3):
                    la.TUNING[which] = dict(BLOCK_M=bm, num_warps=warps, num_stages=stages)
                    try:
                        out = la.landmark_attention(q, k, v, is_lm, impl="triton")
                        if which == "fwd":
                            ms = timed(lambda: la.landmark_attention(q, k, v, is_lm, impl="triton"))
                        else:
                            ms = timed(lambda out=out: torch.autograd.grad(out, (q, k, v), dout,
                                                                           retain_graph=True))
                    except Exception as exc:  # noqa: BLE001 (out of resources, ...)
                        print(f"sweep {which} {la.TUNING[which]}: {exc}", file=sys.stderr)
                        continue
                    flops = fwd_flops * (1 if which == "fwd" else 2.5)
                    rows.append(dict(name=f"sweep {which} {la.TUNING[which]}", ms=ms,
                                     tflops=flops / ms / 1e9))
        la.TUNING[which] = {}


# ----------------------------------------------------------------------------- (c) retrieval


def bench_retrieval(rows, copy_gbps, hq=32, hkv=8, d=128, n_tokens=1 << 20, b=64,
                    problems=((16, 1024), (64, 4096)), sweep=False):
    """Decode over `problems` of (K retrieved blocks per kv head, L dense tokens)."""
    gen = torch.Generator(device=DEV).manual_seed(2)
    dt = torch.float16
    n = n_tokens // b
    k_store, v_store = (torch.randn(hkv, n, b, d, device=DEV, dtype=dt, generator=gen)
                        for _ in range(2))
    lm_keys = torch.randn(hkv, n, d, device=DEV, dtype=dt, generator=gen)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=DEV)
    ret_pos0 = 64
    for kb, n_dense in problems:
        idx = torch.stack([torch.randperm(n, device=DEV, generator=gen)[:kb] for _ in range(hkv)])
        cos, sin = rope_tables(ret_pos0 + kb * b + n_dense, d, 10000.0, torch.float32, DEV)
        for t in (1, 16):
            bench_retrieval_one(rows, copy_gbps, flush, gen, k_store, v_store, lm_keys, idx, cos,
                                sin, ret_pos0, hq, t, n_dense, sweep)


def bench_retrieval_one(rows, copy_gbps, flush, gen, k_store, v_store, lm_keys, idx, cos, sin,
                        ret_pos0, hq, t, n_dense, sweep):
    hkv, _, b, d = k_store.shape
    kb, dt = idx.shape[1], k_store.dtype
    q = torch.randn(hq, t, d, device=DEV, dtype=dt, generator=gen)
    kd, vd = (torch.randn(hkv, n_dense, d, device=DEV, dtype=dt, generator=gen) for _ in range(2))
    args = (q, kd, vd, k_store, v_store, idx, cos, sin, ret_pos0)
    for grouped in (False, True):
        lmk = lm_keys if grouped else None
        want = ra.retrieval_attention_reference(*args, landmark_keys=lmk)
        got = ra.retrieval_attention(*args, landmark_keys=lmk, impl="triton")
        check(f"retrieval_attention K={kb} L={n_dense} T={t} grouped={grouped}", got, want, 4e-3)
    # bytes that must move: selected K/V blocks, dense K/V, q, the output, block_idx and the
    # cos/sin rows of the retrieved positions (first halves, float32); grouped mode adds the
    # selected landmark keys. Split partials (in L2) are not counted.
    nbytes = ((2 * hkv * kb * b * d + 2 * hkv * n_dense * d + 2 * hq * t * d) * dt.itemsize
              + idx.numel() * 8 + 2 * kb * b * (d // 2) * 4)
    lm_bytes = hkv * kb * d * dt.itemsize
    # SDPA over a pre-gathered K/V of the same K/V bytes (no mask: an upper bound on speed)
    kg = torch.cat([k_store[0, :kb].reshape(1, -1, d).expand(hkv, -1, -1), kd], 1)[None]
    vg = torch.cat([v_store[0, :kb].reshape(1, -1, d).expand(hkv, -1, -1), vd], 1)[None]
    kg, vg = kg.contiguous(), vg.contiguous()
    sdpa_bytes = (kg.numel() + vg.numel() + 2 * q.numel()) * dt.itemsize
    shape = f"T={t} Hq={hq} Hkv={hkv} K={kb}x{b} L={n_dense} fp16"
    ours = (("retrieval_attention", lambda: ra.retrieval_attention(*args, impl="triton"), nbytes),
            ("retrieval_attention grouped", lambda: ra.retrieval_attention(
                *args, landmark_keys=lm_keys, impl="triton"), nbytes + lm_bytes))
    reference = (("torch reference (gather + SDPA)",
                  lambda: ra.retrieval_attention_reference(*args), nbytes),)

    def sdpa():
        return F.scaled_dot_product_attention(q[None], kg, vg, enable_gqa=True)

    # launched from Python as the engine does, then replayed from CUDA graphs (kernel time)
    for how, wrap, problems in (("", lambda fn: fn, ours + reference),
                                (" (CUDA graph)", graph_of, ours)):
        run_sdpa = wrap(sdpa)
        if run_sdpa is None:
            continue
        ms_sdpa = timed(run_sdpa, reps=50, flush=flush)
        rows.append(dict(name=f"SDPA on pre-gathered K/V{how}, K={kb} L={n_dense} T={t}", ms=ms_sdpa,
                         gbps=sdpa_bytes / ms_sdpa / 1e6,
                         of_peak=sdpa_bytes / ms_sdpa / 1e6 / copy_gbps))
        for name, fn, nb in problems:
            run = wrap(fn)
            if run is None:
                continue
            ms = timed(run, reps=50, flush=flush)
            rows.append(dict(name=f"{name}{how}, {shape}", ms=ms, gbps=nb / ms / 1e6,
                             of_peak=nb / ms / 1e6 / copy_gbps, vs_sdpa=ms_sdpa / ms))
    if sweep:
        sweep_retrieval(rows, args, lm_keys, flush, nbytes, f"K={kb} L={n_dense} T={t}")


def sweep_retrieval(rows, args, lm_keys, flush, nbytes, label):
    """Time other launch settings; skip those the GPU cannot run (out of shared memory...)."""
    from triton.runtime.errors import OutOfResources

    saved = dict(ra.TUNING)
    for grouped in (False, True):
        lmk = lm_keys if grouped else None
        for block_n in (32, 64) if not grouped else (64,):
            for warps in (2, 4, 8):
                for stages in (1, 2, 3):
                    for waves in (1, 2, 4, 8):
                        ra.TUNING.update(num_warps=warps, num_stages=stages, waves=waves,
                                         BLOCK_N=block_n)
                        cfg = f"grouped={grouped} {dict(ra.TUNING)}"
                        try:
                            ms = timed(lambda lmk=lmk: ra.retrieval_attention(
                                *args, landmark_keys=lmk, impl="triton"), reps=20, flush=flush)
                        except OutOfResources as exc:
                            print(f"sweep retrieval {label} {cfg}: skipped, {exc}", file=sys.stderr)
                            continue
                        rows.append(dict(name=f"sweep retrieval {label} {cfg}", ms=ms,
                                         gbps=nbytes / ms / 1e6))
    ra.TUNING.clear()
    ra.TUNING.update(saved)


# ----------------------------------------------------------------------------- main


def table(rows):
    cols = [("name", "benchmark", "{}"), ("ms", "median ms", "{:.4f}"),
            ("tflops", "TFLOP/s", "{:.1f}"), ("gbps", "GB/s", "{:.0f}"),
            ("of_peak", "of ceiling", "{:.0%}"), ("vs_sdpa", "SDPA time / ours", "{:.2f}")]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [fmt.format(r[key]) if key in r else "" for key, _, fmt in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="also save the results to this file")
    parser.add_argument("--sweep", action="store_true", help="also time other launch configs")
    parser.add_argument("--quick", action="store_true", help="T=2048 and a 64k-token store")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU: torch.cuda.is_available() is False")
    if not la.HAVE_TRITON:
        sys.exit("bench_kernels.py needs triton: pip install triton")
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    peak_tflops, copy_gbps = ceilings(rows)
    bench_landmark(rows, peak_tflops, t=2048 if args.quick else 8192, sweep=args.sweep)
    bench_retrieval(rows, copy_gbps, n_tokens=1 << (16 if args.quick else 20), sweep=args.sweep,
                    problems=((16, 1024),) if args.quick else ((16, 1024), (64, 4096)))
    import triton

    device = torch.cuda.get_device_name()
    print(f"\n{device}, torch {torch.__version__}, triton {triton.__version__}\n")
    print(table(rows))
    if args.json:
        meta = dict(device=device, torch=torch.__version__, triton=triton.__version__)
        args.json.write_text(json.dumps(dict(meta, results=rows), indent=1))


if __name__ == "__main__":
    main()
