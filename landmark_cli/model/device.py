"""Where the model runs and in what precision: `--device`, `--dtype` and `--kernels`, resolved once.

The engine is one code path on every device. The KV store stays on disk (memory-mapped)
whatever the device: on the CPU the attention reads the retrieved blocks in place; on a
GPU `stage` gathers them into pinned host memory and copies them over asynchronously, so
only the blocks a step reads cross the bus. The same function does both; LANDMARK_STAGE=1
makes it stage on the CPU too (into ordinary memory), which is how the tests run the GPU's
staging path on a machine without one.
"""

from __future__ import annotations

import os

import torch

from landmark_cli.errors import LandmarkError

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


def resolve_dtype(spec: str | None, device: torch.device) -> torch.dtype:
    """--dtype -> the weights' and activations' dtype. auto: float32 on the CPU (its fastest
    exact path), bfloat16 on a GPU (float16 where the GPU has no bfloat16)."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if spec not in DTYPES:
        raise LandmarkError(f"unknown dtype {spec!r}", f"use --dtype auto | {' | '.join(DTYPES)}")
    return DTYPES[spec]


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


def stage(k_store: torch.Tensor, v_store: torch.Tensor, block_idx: torch.Tensor,
          device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The blocks block_idx [Hkv, K] of k_store / v_store [Hkv, N, B, D] where `device` can
    read them: the stores and indices themselves when they are there already (read in place);
    otherwise the K blocks of every head gathered into pinned host memory, copied over without
    blocking the host, with indices arange(K). Returns (keys, values, indices)."""
    forced = device.type == "cpu" and os.environ.get("LANDMARK_STAGE") == "1"
    if k_store.device == device and not forced:  # on the device already (or staged before)
        return k_store, v_store, block_idx.to(device)
    idx = block_idx.cpu()
    hkv, k = idx.shape
    pin = device.type == "cuda"
    out = []
    for store in (k_store, v_store):
        buf = torch.empty((hkv, k) + tuple(store.shape[2:]), dtype=store.dtype, pin_memory=pin)
        for h in range(hkv):
            torch.index_select(store[h], 0, idx[h], out=buf[h])
        out.append(buf.to(device, non_blocking=pin))
    return out[0], out[1], torch.arange(k, device=device).expand(hkv, k)
