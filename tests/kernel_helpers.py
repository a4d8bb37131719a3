r"""Shared helpers of the kernel tests.

To run the kernel tests on a GPU (TRITON_INTERPRET unset; cuda:N for another GPU):

    LANDMARK_TEST_DEVICE=cuda python -m pytest tests/test_kernel_retrieval_attention.py \
        tests/test_kernel_landmark_attention.py

Triton then compiles the kernels for that GPU, every tensor the tests give the kernels and
the torch references is put on it (drawn from the CPU's random numbers: the same inputs as
on the CPU), with the same tolerances; without CUDA both modules are skipped. By default
(LANDMARK_TEST_DEVICE unset or cpu) everything stays on the CPU and the kernels run in
Triton's interpreter: this module sets TRITON_INTERPRET=1 (unless set) before the kernel
modules import triton, as tests/conftest.py does for the whole suite.
"""

import os

import pytest
import torch

DEVICE = torch.device(os.environ.get("LANDMARK_TEST_DEVICE", "cpu"))
ON_GPU = DEVICE.type == "cuda"
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

TOLS = {  # dtype: (atol, rtol) against the float32 reference
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


def require_device():
    """Called by each kernel test module at import: skip it when DEVICE is a GPU this
    machine lacks; make DEVICE the current CUDA device (Triton launches on that one)."""
    if not ON_GPU:
        return
    if not torch.cuda.is_available():
        pytest.skip(f"LANDMARK_TEST_DEVICE={DEVICE}: CUDA is not available (torch {torch.__version__})",
                    allow_module_level=True)
    if DEVICE.index is not None:
        if DEVICE.index >= torch.cuda.device_count():
            pytest.skip(f"LANDMARK_TEST_DEVICE={DEVICE}: only {torch.cuda.device_count()} CUDA device(s)",
                        allow_module_level=True)
        torch.cuda.set_device(DEVICE.index)


def needs_kernel(kernel, have_triton):
    """The skip mark of the tests that launch a Triton kernel (`kernel`, one of the module's):
    on the CPU it must be interpreted (then the interpreter's bf16 dot is fixed), on a GPU
    compiled."""
    interpreted = type(kernel).__name__ == "InterpretedFunction"
    if interpreted:
        _fix_interpreter_bf16_dot()
    reason = None
    if not have_triton:
        reason = "triton is not installed"
    elif ON_GPU and interpreted:
        reason = f"TRITON_INTERPRET is set: unset it to run the kernels compiled for {DEVICE}"
    elif not ON_GPU and not interpreted:
        reason = ("triton was imported before TRITON_INTERPRET=1 was set: run pytest with "
                  "TRITON_INTERPRET=1 (or on a GPU with LANDMARK_TEST_DEVICE=cuda)")
    return pytest.mark.skipif(reason is not None, reason=reason or "")


def randn(*shape):
    """torch.randn from the global generator on the CPU (the same numbers whatever DEVICE
    is), moved to DEVICE."""
    return torch.randn(*shape).to(DEVICE)


def assert_close(actual, expected, atol, rtol, name="output"):
    """Like torch.testing.assert_close, but says where the tensors differ most."""
    actual, expected = actual.detach().float(), expected.detach().float()
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    diff = (actual - expected).abs()
    bad = ~(diff <= atol + rtol * expected.abs())  # NaN counts as bad
    if bad.any():
        worst = diff.nan_to_num(float("inf")).argmax()
        idx = tuple(int(i) for i in torch.unravel_index(worst, diff.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{diff.numel()} elements differ; max abs diff "
            f"{diff[idx]:.3g} at {idx}: got {actual[idx]:.6g}, expected {expected[idx]:.6g}"
        )


def _fix_interpreter_bf16_dot():
    """The interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584);
    upcast the operands as the GPU's tensor cores effectively do."""
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "bf16_fixed", False):
        return
    original = builder.create_dot

    def create_dot(self, a, b, *args):
        a, b = (self.cast_impl(x, tl.float32) if x.dtype.scalar == tl.bfloat16 else x
                for x in (a, b))
        return original(self, a, b, *args)

    create_dot.bf16_fixed = True
    builder.create_dot = create_dot


def compile_for_sm90(code):
    """Compile kernels for an H100 (sm_90) in a fresh process without TRITON_INTERPRET: the
    interpreter cannot catch code generation errors nor shared-memory overflow."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


H100_SHARED_BYTES = 232448  # most shared memory one block may use on an H100
