"""Triton if it is installed; otherwise stand-ins so the kernel modules still import
(a CPU-only install: the torch references are then the only path)."""

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
