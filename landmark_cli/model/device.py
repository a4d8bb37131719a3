"""Where the model runs and in what precision: `--device`, `--dtype` and `--kernels`, resolved once.

The engine is one code path on every device. The KV store stays on disk (memory-mapped)
whatever the device: on the CPU the attention reads the retrieved blocks in place; on a
GPU `stage` gathers them into pinned host memory and copies them over asynchronously, so
only the blocks a step reads cross the bus. The same function does both; LANDMARK_STAGE=1
makes it stage on the CPU too (into ordinary memory), which is how the tests run the GPU's
staging path on a machine without one.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import NamedTuple

import torch

from landmark_cli.errors import LandmarkError
from landmark_cli.paths import home
from landmark_cli.storage.kvformat import QuantizedKV, Stored, dequantize

DEVICES = "auto | cpu | cuda | cuda:N"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KERNELS = ("auto", "torch", "triton")


def resolve_device(spec: str | None) -> torch.device:
    """--device -> a torch device: auto (CUDA when present, else the CPU), cpu, cuda, cuda:N."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise LandmarkError(f"unknown device {spec!r}", f"use --device {DEVICES}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise LandmarkError(f"--device {spec}: only the CPU and CUDA GPUs are supported", f"use --device {DEVICES}")
    if not torch.cuda.is_available():
        raise LandmarkError(f"--device {spec}: CUDA is not available to this torch ({torch.__version__})",
                            "use --device cpu, or install a CUDA build of torch (see README, Installing)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise LandmarkError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)",
                            "use --device cuda:0 .. cuda:N-1")
    return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())


class Precision(NamedTuple):
    """--dtype, resolved: the activations' dtype (and the weights', unless named below),
    and the dtype of the projection matrices and the LM head for reading documents and for
    answering."""

    dtype: torch.dtype
    read: torch.dtype
    answer: torch.dtype


def resolve_dtypes(spec: str | None, device: torch.device, kernels: str = "auto") -> Precision:
    """--dtype -> Precision. A named dtype on a GPU is used throughout, activations
    included; on the CPU it is the weight format of the projection matrices and the LM
    head, for reading and answering alike, and the activations stay float32 (this CPU's
    arithmetic between the matrices, the norms, attention and logits). auto:
    bfloat16 on a GPU (float16 where the GPU has no bfloat16); on the CPU the same as
    mixed. mixed (the CPU): float32 activations everywhere (the residual stream, norms,
    attention, logits), with the matrices in the dtype this CPU multiplies fastest
    (`cpu_matrix_dtypes`): for reading, which is compute-bound, bfloat16 where the CPU has
    bfloat16 arithmetic, else float32; for answering, which is memory-bound (every token
    streams all the matrices), the packed form the native answer step reads where it
    runs (`packed_answers`: a GGUF model's own 4- and 8-bit groups, else float16), else
    float16 where PyTorch multiplies it faster, else float32."""
    spec = (spec or "auto").strip().lower()
    if spec in ("auto", "mixed") and device.type == "cuda":
        half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return Precision(half, half, half)
    if spec in ("auto", "mixed"):
        read, answer = cpu_matrix_dtypes()
        return Precision(torch.float32, read, packed_answers(kernels) or answer)
    if spec not in DTYPES:
        raise LandmarkError(f"unknown dtype {spec!r}", f"use --dtype auto | mixed | {' | '.join(DTYPES)}")
    named = DTYPES[spec]
    return Precision(named if device.type == "cuda" else torch.float32, named, named)


def packed_answers(kernels: str) -> torch.dtype | None:
    """blocks.PACKED where answer steps run natively (kernels/cpu_step.py builds here and
    --kernels is not torch), else None. The native step streams each matrix in the
    smallest form that holds its weights exactly: a GGUF model answers from its file's
    4- and 8-bit groups, any other from float16 (model/blocks.py)."""
    from landmark_cli.kernels import cpu_step
    from landmark_cli.model.blocks import PACKED

    return PACKED if kernels != "torch" and cpu_step.library() is not None else None


CPU_DTYPE_FILE = "cpu-dtype.json"
MIN_GAIN = 1.3  # a half-precision format is used only where it is clearly faster


def cpu_matrix_dtypes() -> tuple[torch.dtype, torch.dtype]:
    """(reading, answering) matrix dtypes for the CPU's mixed precision, whichever is faster
    on this CPU with this torch's threads: reading a 256-row chunk through a 2048 x 2048
    matrix in bfloat16 or float32, answering one row through a 4096 x 4096 matrix (64 MiB
    in float32: more than the caches, like a model's weights) in float16 or float32.
    Measured once (about a second) and kept in LANDMARK_HOME, keyed by the processor,
    torch's version and the thread count."""
    key = f"{platform.machine()} {_cpu_name()} torch {torch.__version__} threads {torch.get_num_threads()}"
    path = home() / CPU_DTYPE_FILE
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if not isinstance(known.get(key), dict) or not {"read", "answer"} <= set(known[key]):
        rows = {name: _matmul_ms(DTYPES[name], rows=1) for name in ("float32", "float16")}
        chunk = {name: _matmul_ms(DTYPES[name], rows=256, n=2048, runs=5) for name in ("float32", "bfloat16")}
        known[key] = {"ms": rows, "chunk_ms": chunk,
                      "read": "bfloat16" if chunk["float32"] > MIN_GAIN * chunk["bfloat16"] else "float32",
                      "answer": "float16" if rows["float32"] > MIN_GAIN * rows["float16"] else "float32"}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps(known, indent=1) + "\n")
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home: measure again next time
    return DTYPES[known[key]["read"]], DTYPES[known[key]["answer"]]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _matmul_ms(dtype: torch.dtype, rows: int, n: int = 4096, runs: int = 9) -> float:
    """Median milliseconds of [rows, n] @ [n, n] in `dtype` (after two warm-up runs)."""
    w = torch.randn(n, n).to(dtype)
    x = torch.randn(rows, n).to(dtype)
    times = []
    for i in range(runs + 2):
        t0 = time.perf_counter()
        x @ w.T
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e3, 3)


def check_kernels(spec: str, device: torch.device) -> str:
    """--kernels: auto (the Triton kernels on a GPU where triton imports, else torch), torch or triton."""
    from landmark_cli.kernels._triton import HAVE_TRITON

    if spec not in KERNELS:
        raise LandmarkError(f"unknown kernels {spec!r}", f"use --kernels {' | '.join(KERNELS)}")
    if spec == "triton" and device.type != "cuda":
        raise LandmarkError("--kernels triton runs on a CUDA GPU only", "use --device cuda, or --kernels torch")
    if spec == "triton" and not HAVE_TRITON:
        raise LandmarkError("--kernels triton: the triton package is not installed",
                            "pip install triton, or use --kernels torch")
    return spec


def stage(k_store: Stored, v_store: Stored, block_idx: torch.Tensor,
          device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The blocks block_idx [Hkv, K] of k_store / v_store [Hkv, N, B, D] where `device` can
    read them: the stores and indices themselves when they are there already as floats (read
    in place); otherwise the K blocks of every head gathered into (pinned, for a GPU) host
    memory, copied over without blocking the host, int8 codes decoded there, with indices
    arange(K). Returns (keys, values, indices)."""
    forced = device.type == "cpu" and os.environ.get("LANDMARK_STAGE") == "1"
    if isinstance(k_store, torch.Tensor) and k_store.device == device and not forced:  # or staged before
        return k_store, v_store, block_idx.to(device)  # type: ignore[return-value]
    idx = block_idx.cpu()
    hkv, k = idx.shape
    pin = device.type == "cuda"
    out = []
    for store in (k_store, v_store):
        if isinstance(store, QuantizedKV):
            codes, scales = store.gather(idx, pin)
            out.append(dequantize(codes.to(device, non_blocking=pin), scales.to(device, non_blocking=pin)))
            continue
        buf = torch.empty((hkv, k) + tuple(store.shape[2:]), dtype=store.dtype, pin_memory=pin)
        for h in range(hkv):
            torch.index_select(store[h], 0, idx[h], out=buf[h])
        out.append(buf.to(device, non_blocking=pin))
    return out[0], out[1], torch.arange(k, device=device).expand(hkv, k)
