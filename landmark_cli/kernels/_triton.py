"""Triton if it is installed; otherwise stand-ins so the kernel modules still import
(a CPU-only install: the torch references are then the only path). `on_device`: Triton
launches a kernel on the current CUDA device, so a launch for tensors on cuda:N runs
inside on_device(that device) (a no-op off CUDA: the interpreter)."""

import contextlib

import torch


def on_device(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


try:
    import triton
    import triton.language as tl
except ImportError:
    from types import SimpleNamespace

    triton = SimpleNamespace(jit=lambda fn: fn)
    tl = SimpleNamespace(constexpr=None)
    HAVE_TRITON = False
else:
    HAVE_TRITON = True
