"""Shared helpers of the kernel tests."""

import os

import torch

TOLS = {  # dtype: (atol, rtol) against the float32 reference
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


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
