"""landmark_attention: naive loops == torch reference == Triton kernel (interpreted on the
CPU; compiled on a GPU with LANDMARK_TEST_DEVICE=cuda: see kernel_helpers)."""

import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import (  # before landmark_cli: on the CPU it sets TRITON_INTERPRET=1 first
    DEVICE,
    H100_SHARED_BYTES,
    ON_GPU,
    TOLS,
    assert_close,
    compile_for_sm90,
    needs_kernel,
    randn,
    require_device,
)

import landmark_cli.kernels.landmark_attention as la

require_device()

# Triton decides at import whether it interprets (TRITON_INTERPRET=1: the CPU), so the
# environment must say so before any test module imports it (tests/conftest.py does).
needs_triton = needs_kernel(la._fwd_kernel, la.HAVE_TRITON)


def landmarks(t, pattern, seed=0):
    """[2, t] bool: row 0 per `pattern` (block length incl. its landmark, or "random":
    a landmark at 0, two in a row, random others); row 1 always random (other blocks).
    Drawn on the CPU, on DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    rand = torch.rand(2, t, generator=gen) < 0.25
    rand[:, 0] = True
    rand[:, t // 2 : t // 2 + 2] = True
    is_lm = rand.clone()
    if pattern != "random":
        is_lm[0] = (torch.arange(t) % pattern) == pattern - 1
    return is_lm.to(DEVICE)


def inputs(t, group, dtype=torch.float32, d=16, hkv=2, seed=0):
    """q, k, v (leaves that require grad), drawn on the CPU, on DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, hkv * group, t, d, generator=gen)
    k, v = (torch.randn(2, hkv, t, d, generator=gen) for _ in range(2))
    return [x.to(DEVICE, dtype).requires_grad_() for x in (q, k, v)]


def grads(fn, q, k, v, is_lm, dout, **kw):
    for x in (q, k, v):
        x.grad = None
    out = fn(q, k, v, is_lm, **kw)
    out.backward(dout)
    return out, q.grad, k.grad, v.grad


@pytest.mark.parametrize("t,pattern,group", [(37, 7, 3), (5, 3, 1), (23, "random", 1), (16, 16, 3)])
def test_reference_matches_naive(t, pattern, group):
    q, k, v = inputs(t, group, hkv=1)
    is_lm = landmarks(t, pattern)
    dout = randn(q.shape)
    naive = grads(la.landmark_attention_naive, q, k, v, is_lm, dout)
    ref = grads(la.landmark_attention_reference, q, k, v, is_lm, dout)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ref, naive, strict=True):
        assert_close(a, b, 2e-5, 2e-5, name)


def test_reference_edge_cases():
    q, k, v = inputs(9, 1, hkv=1)
    is_lm = torch.zeros(2, 9, dtype=torch.bool, device=DEVICE)
    # no landmark at all: ordinary causal attention
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_close(la.landmark_attention_reference(q, k, v, is_lm), expected, 2e-5, 2e-5)
    # a landmark query with nothing before it sees nothing: zero output, no NaN
    is_lm[:, 0] = True
    out = la.landmark_attention_reference(q, k, v, is_lm)
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
    # a landmark query sees exactly the keys the token before it sees (not itself)
    is_lm[:, 4] = True
    q = q.detach().clone()
    q[:, :, 4] = q[:, :, 3]
    out = la.landmark_attention_reference(q, k, v, is_lm)
    assert_close(out[:, :, 4], out[:, :, 3], 1e-6, 1e-6)


CASES = [(t, p, g, 16) for t in (1, 5, 37) for p, g in ((3, 1), (7, 3), (16, 1), ("random", 3))]


@needs_triton
@pytest.mark.parametrize("t,pattern,group,d", CASES + [(70, 11, 1, 64)])  # 2 query tiles
def test_triton_forward(t, pattern, group, d):
    q, k, v = inputs(t, group, d=d)
    is_lm = landmarks(t, pattern)
    with torch.no_grad():
        out = la.landmark_attention(q, k, v, is_lm, impl="triton")
        assert_close(out, la.landmark_attention_reference(q, k, v, is_lm), *TOLS[torch.float32])


@needs_triton
@pytest.mark.parametrize("pattern,dtype,split,sharp", [("random", torch.float32, True, 1),
                                                       ("random", torch.float32, False, 1),
                                                       (5, torch.bfloat16, True, 1),
                                                       (5, torch.float32, True, 60)])
def test_triton_many_query_tiles(pattern, dtype, split, sharp, monkeypatch):
    """Query tiles of 16 rows, so that most tiles have blocks before all their rows (which
    the SPLIT kernels read in loops of their own, without per-row masks, and the forward
    with a fixed softmax reference: the largest of their gate logits) besides blocks they
    share: values and gradients, either way. sharp: queries scaled up so that logits span
    hundreds (an exp2 against a wrong reference overflows)."""
    for which in ("fwd", "bwd"):
        monkeypatch.setitem(la.TUNING, which, {"BLOCK_M": 16, "SPLIT": split})
    q, k, v = inputs(45, 3, dtype, hkv=1)
    with torch.no_grad():
        q *= sharp
    is_lm = landmarks(45, pattern)
    dout = randn(q.shape).to(dtype)
    got = grads(la.landmark_attention, q, k, v, is_lm, dout, impl="triton")
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    want = grads(la.landmark_attention_reference, q32, k32, v32, is_lm, dout.float())
    tols = [x * (10 if sharp > 1 else 1) for x in TOLS[dtype]]  # sharp: large gradients
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert_close(a, b, *tols, name)


@needs_triton
@pytest.mark.parametrize("t,pattern,group,dtype", [
    (37, 7, 3, torch.float32),
    (37, "random", 1, torch.float32),  # landmark at 0, two in a row, partial last block
    (70, 9, 1, torch.float32),  # blocks across query tiles
    (5, 3, 3, torch.float32),
    (1, 16, 1, torch.float32),
    (37, 16, 1, torch.float16),
    (37, 7, 3, torch.bfloat16),
])
def test_triton_backward(t, pattern, group, dtype):
    q, k, v = inputs(t, group, dtype)
    is_lm = landmarks(t, pattern)
    dout = randn(q.shape).to(dtype)
    got = grads(la.landmark_attention, q, k, v, is_lm, dout, impl="triton")
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    want = grads(la.landmark_attention_reference, q32, k32, v32, is_lm, dout.float())
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert a.dtype == dtype
        assert_close(a, b, *TOLS[dtype], name)


@needs_triton
def test_triton_custom_scale_and_long_blocks():
    q, k, v = inputs(20, 1)
    is_lm = landmarks(20, 5)
    with torch.no_grad():
        out = la.landmark_attention(q, k, v, is_lm, sm_scale=0.3, impl="triton")
        ref = la.landmark_attention(q, k, v, is_lm, sm_scale=0.3, impl="torch")
    assert_close(out, ref, *TOLS[torch.float32])
    t = la.MAX_BLOCK_LEN + 3
    q, k, v = inputs(t, 1)
    with pytest.raises(ValueError, match="block"):
        la.landmark_attention(q, k, v, torch.zeros(2, t, dtype=torch.bool, device=DEVICE), impl="triton")


def test_auto_uses_reference_on_cpu():
    """impl="auto": the reference on the CPU; on a GPU the kernel (when triton imports)."""
    q, k, v = inputs(6, 1)
    is_lm = landmarks(6, 3)
    kernel = ON_GPU and la.HAVE_TRITON
    want = (la.landmark_attention(q, k, v, is_lm, impl="triton") if kernel
            else la.landmark_attention_reference(q, k, v, is_lm))
    assert torch.equal(la.landmark_attention(q, k, v, is_lm), want)
    with pytest.raises(ValueError, match="impl"):
        la.landmark_attention(q, k, v, is_lm, impl="cuda")


SM90_COMPILE = """
import json, torch
import landmark_cli.kernels.landmark_attention as la
from landmark_cli.kernels.sm90 import census, compile_sm90, landmark_types

out = {}
# the largest tiles (D=128, 128-token blocks); fp32 backward compiles slowly, so only bf16
for dtype, ty, fns in ((torch.bfloat16, "bf16", ("_fwd_kernel", "_bwd_dq_kernel",
                                               "_bwd_dkdv_kernel")),
                       (torch.float32, "fp32", ("_fwd_kernel",))):
    for name in fns:
        cfg = la._config(128, la.MAX_BLOCK_LEN, dtype, "fwd" if name == "_fwd_kernel" else "bwd")
        kernel = compile_sm90(getattr(la, name), cfg, landmark_types(ty), aligned=("T", "H", "HKV"))
        out[f"{name}-{ty}"] = kernel.metadata.shared
        if name == "_fwd_kernel" and ty == "bf16":
            loops = census(kernel)["loops"]
print(json.dumps(dict(shared=out, loops=loops)))
"""


@pytest.mark.skipif(not la.HAVE_TRITON, reason="triton is not installed")
def test_kernels_compile_for_h100():
    pytest.importorskip("triton.backends.nvidia")
    result = compile_for_sm90(SM90_COMPILE)
    assert len(result["shared"]) == 4
    for name, nbytes in result["shared"].items():
        assert nbytes <= H100_SHARED_BYTES, f"{name} needs {nbytes} bytes of shared memory"
    # the machine-code census finds the forward's three loops: the largest gate logit
    # (matrix multiplies, no exp2), blocks before every row and blocks a row shares (both)
    loops = result["loops"]
    assert len(loops) == 3, loops
    assert all(loop["mma"] > 0 for loop in loops), loops
    assert loops[0]["mufu"] == 0 and loops[1]["mufu"] > 0 and loops[2]["mufu"] > 0, loops
    assert loops[1]["instructions"] < loops[2]["instructions"], loops


@pytest.mark.parametrize("tq", [1, 5, 12])
def test_reference_queries_at_the_end(tq):
    """A step of the last tq queries over all keys = the last tq rows of the full result."""
    q, k, v = inputs(29, 3, hkv=1)
    is_lm = landmarks(29, 6)
    full = la.landmark_attention_reference(q, k, v, is_lm)
    step = la.landmark_attention_reference(q[:, :, -tq:], k, v, is_lm)
    assert_close(step, full[:, :, -tq:], 1e-6, 1e-6, "out")


@pytest.mark.parametrize("t,block,group", [(29, 6, 3), (32, 8, 1), (7, 3, 2)])
def test_regular_blocks_match_reference(t, block, group):
    """The regular-layout path (training, reading) = the general reference, values and gradients."""
    q, k, v = inputs(t, group, hkv=1)
    is_lm = (torch.arange(t, device=DEVICE) % block == block - 1).expand(q.shape[0], t)
    assert la.regular_block(is_lm) == block and la.regular_block(landmarks(t, "random")) is None
    dout = randn(q.shape)
    ref = grads(la.landmark_attention_reference, q, k, v, is_lm, dout)
    fast = grads(lambda *a, **kw: la.landmark_attention_blocks(*a[:3], block, **kw), q, k, v, is_lm, dout)
    for name, a, b in zip(("out", "dq", "dk", "dv"), fast, ref, strict=True):
        assert_close(a, b, 2e-5, 2e-5, name)
    for tq in (1, block + 1):  # a step of the last tq queries (reading, answering)
        step = la.landmark_attention_blocks(q[:, :, -tq:], k, v, block)
        assert_close(step, la.landmark_attention_reference(q[:, :, -tq:], k, v, is_lm), 2e-5, 2e-5, "step")


def test_allowed_blocks_read_as_if_the_others_were_not_there():
    """landmark_attention_blocks(allowed=...): a query that may read only some earlier
    blocks gets the reference's output over its own block and those blocks alone."""
    t, block = 29, 6
    q, k, v = (x.detach() for x in inputs(t, 2, hkv=1))
    nb = -(-t // block)
    allowed = (torch.rand(2, 2, t, nb, generator=torch.Generator().manual_seed(3)) < 0.5).to(DEVICE)
    out = la.landmark_attention_blocks(q, k, v, block, allowed=allowed)
    pos = torch.arange(t, device=DEVICE)
    blk = pos // block
    is_lm = pos % block == block - 1
    for b in range(2):
        for h in range(2):
            for i in (4, 13, 20, 28):
                keep = (pos <= i) & ((blk == blk[i]) | allowed[b, h, i][blk])
                ref = la.landmark_attention_reference(q[b:b + 1, h:h + 1, i:i + 1], k[b:b + 1, :, keep],
                                                      v[b:b + 1, :, keep], is_lm[keep][None])
                assert_close(out[b, h, i], ref[0, 0, 0], 2e-5, 2e-5, f"row {i}")
    everything = la.landmark_attention_blocks(q, k, v, block, allowed=torch.ones_like(allowed))
    assert_close(everything, la.landmark_attention_blocks(q, k, v, block), 0, 0, "all allowed")
    assert not torch.allclose(out, everything)


@pytest.mark.parametrize("reach", [1, 0], ids=["previous-block", "own-block"])
@pytest.mark.parametrize("t,pattern", [(37, 7), (23, "random")])
def test_local_reads_only_the_previous_block(t, pattern, reach):
    """local=True (a layer trained to read near its query): the reference equals the naive
    definition and the regular-layout path (all queries, and steps of the last few), values
    and gradients, and a query's output is the ordinary grouped softmax over its own block
    and the `reach` (local_blocks: 1 or 0) blocks before it alone."""
    q, k, v = inputs(t, 2, hkv=1)
    is_lm = landmarks(t, pattern)
    if pattern != "random":  # both rows regular, for the regular-layout path
        is_lm = (torch.arange(t, device=DEVICE) % pattern == pattern - 1).expand(2, t)
    dout = randn(q.shape)
    kw = {"local": True, "local_blocks": reach}
    ref = grads(la.landmark_attention_reference, q, k, v, is_lm, dout, **kw)
    naive = grads(la.landmark_attention_naive, q, k, v, is_lm, dout, **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ref, naive, strict=True):
        assert_close(a, b, 2e-5, 2e-5, name)
    if pattern == 7:
        fast = grads(lambda *a, **kw: la.landmark_attention_blocks(*a[:3], 7, **kw), q, k, v, is_lm, dout, **kw)
        for name, a, b in zip(("out", "dq", "dk", "dv"), fast, ref, strict=True):
            assert_close(a, b, 2e-5, 2e-5, f"blocks {name}")
        assert_close(la.landmark_attention(q, k, v, is_lm, **kw), ref[0], 2e-5, 2e-5, "dispatch")
        for tq in (1, 8):  # a step of the last tq queries (reading, answering)
            step = la.landmark_attention_blocks(q[:, :, -tq:].detach(), k.detach(), v.detach(), 7, **kw)
            assert_close(step, ref[0][:, :, -tq:].detach(), 2e-5, 2e-5, f"step of {tq}")
    blk = la._block_ids(is_lm)
    out = ref[0].detach()
    for i in range(0, t, 5):
        keep = (torch.arange(t, device=DEVICE) <= i) & (blk[0] >= blk[0, i] - reach)
        alone = la.landmark_attention_reference(q[:1, :, i:i + 1].detach(), k[:1, :, keep].detach(),
                                                v[:1, :, keep].detach(), is_lm[:1, keep])
        assert_close(out[0, :, i], alone[0, :, 0], 2e-5, 2e-5, f"row {i}")
    assert not torch.allclose(out, la.landmark_attention_reference(q, k, v, is_lm).detach())
    if reach == 0:  # not the previous-block layer either
        assert not torch.allclose(out, la.landmark_attention_reference(q, k, v, is_lm, local=True).detach())
