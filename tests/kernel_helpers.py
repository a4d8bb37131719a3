"""Shared helpers of the kernel tests."""

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
