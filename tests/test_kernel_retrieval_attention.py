"""retrieval_attention: naive loops == torch reference == Triton kernel (interpreted on the
CPU; compiled on a GPU with LANDMARK_TEST_DEVICE=cuda: see kernel_helpers)."""

import warnings

import numpy as np
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

import landmark_cli.kernels.retrieval_attention as ra
from landmark_cli.kernels.rope import apply_rope, rope_tables

require_device()
THETA = 10000.0

# Triton decides at import whether it interprets (TRITON_INTERPRET=1: the CPU), so the
# environment must say so before any test module imports it (tests/conftest.py does).
needs_triton = needs_kernel(ra._retrieval_kernel, ra.HAVE_TRITON)


def make(t, group, b, k, *, hkv=2, n_dense=None, n=9, d=16, dtype=torch.float32,
         store_dtype=None, grouped=False, seed=0):
    """Random arguments for retrieval_attention (everything but impl), drawn on the CPU and
    moved to DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    n_dense = n_dense or t + 6

    def rnd(*shape):
        return torch.randn(*shape, generator=gen)

    store_dtype = store_dtype or dtype
    idx = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(hkv)])
    ret_pos0 = 3
    cos, sin = rope_tables(ret_pos0 + k * b + 1, d, THETA)
    args = dict(
        q=rnd(hkv * group, t, d).to(dtype),
        k_dense=rnd(hkv, n_dense, d).to(dtype), v_dense=rnd(hkv, n_dense, d).to(dtype),
        k_store=rnd(hkv, n, b, d).to(store_dtype), v_store=rnd(hkv, n, b, d).to(store_dtype),
        block_idx=idx, cos=cos, sin=sin, ret_pos0=ret_pos0,
        landmark_keys=rnd(hkv, n, d).to(store_dtype) if grouped else None,
    )
    return {name: x.to(DEVICE) if torch.is_tensor(x) else x for name, x in args.items()}


def naive(q, k_dense, v_dense, k_store, v_store, block_idx, cos, sin, ret_pos0, landmark_keys):
    """Query by query, block by block, RoPE from fresh tables at explicit positions (computed
    on the CPU, as make's, and moved to q's device)."""
    hq, t, d = q.shape
    hkv, n_dense, _ = k_dense.shape
    kb, b = block_idx.shape[1], k_store.shape[2]
    dev = q.device
    out = torch.zeros(hq, t, d, device=dev)
    for h in range(hq):
        hk = h // (hq // hkv)
        blocks = []  # (keys, values, landmark key) of each retrieved block, in order
        for j in range(kb):
            n = int(block_idx[hk, j])
            c, s = (x.to(dev) for x in rope_tables(torch.arange(b) + ret_pos0 + j * b, d, THETA))
            keys = apply_rope(k_store[hk, n].float(), c, s)
            lm = None
            if landmark_keys is not None:
                c, s = (x.to(dev) for x in rope_tables(torch.tensor([ret_pos0 + j * b + b - 1]), d, THETA))
                lm = apply_rope(landmark_keys[hk, n].float()[None], c, s)[0]
            blocks.append((keys, v_store[hk, n].float(), lm))
        for i in range(t):
            qi = q[h, i].float() * d**-0.5
            kd, vd = k_dense[hk, : n_dense - t + i + 1].float(), v_dense[hk, : n_dense - t + i + 1].float()
            if landmark_keys is None:
                keys = torch.cat([kb_ for kb_, _, _ in blocks] + [kd])
                vals = torch.cat([vb for _, vb, _ in blocks] + [vd])
                out[h, i] = torch.softmax(keys @ qi, 0) @ vals
            else:
                lms = torch.stack([lm for _, _, lm in blocks]) if blocks else torch.zeros(0, d, device=dev)
                p = torch.softmax(torch.cat([lms @ qi, kd @ qi]), 0)
                out[h, i] = p[kb:] @ vd
                for j, (keys, vals, _) in enumerate(blocks):
                    out[h, i] += p[j] * (torch.softmax(keys @ qi, 0) @ vals)
    return out


def test_rope_matches_transformers():
    """On the CPU whatever DEVICE is: transformers computes its inverse frequencies there,
    and the tables must be equal bit for bit."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                      rope_theta=100000.0)
    pos = torch.tensor([[0, 5, 100, 7000, 123456]])
    x = torch.randn(1, 9, 5, 64)
    cos, sin = llama.LlamaRotaryEmbedding(cfg)(x, pos)
    ours = rope_tables(pos[0], 64, 100000.0)
    assert torch.equal(ours[0], cos[0]) and torch.equal(ours[1], sin[0])
    want, _ = llama.apply_rotary_pos_emb(x, x, cos, sin)
    assert_close(apply_rope(x, *ours), want, 0, 0)
    assert rope_tables(7, 64)[0].shape == (7, 64)


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("t,group,b,k", [(1, 1, 3, 0), (5, 3, 7, 2), (4, 1, 16, 3),
                                         (ra.DECODE_ROWS + 3, 2, 5, 2)])  # the fused-attention path for chunks
def test_reference_matches_naive(t, group, b, k, grouped):
    args = make(t, group, b, k, grouped=grouped)
    assert_close(ra.retrieval_attention_reference(**args), naive(**args), 2e-5, 2e-5)


def test_reference_equals_full_causal_attention():
    """Every block retrieved in document order + the tail as dense = plain causal attention."""
    hkv, group, n, b, tail, t, d = 2, 3, 4, 5, 6, 3, 16
    gen = torch.Generator().manual_seed(1)
    k_raw, v = (torch.randn(hkv, n * b + tail, d, generator=gen).to(DEVICE) for _ in range(2))
    q_raw = torch.randn(hkv * group, t, d, generator=gen).to(DEVICE)
    cos, sin = (x.to(DEVICE) for x in rope_tables(n * b + tail, d, THETA))
    k = apply_rope(k_raw, cos, sin)
    q = apply_rope(q_raw, cos[-t:], sin[-t:])
    idx = torch.arange(n, device=DEVICE).repeat(hkv, 1)
    out = ra.retrieval_attention(
        q, k[:, n * b :], v[:, n * b :], k_raw[:, : n * b].reshape(hkv, n, b, d),
        v[:, : n * b].reshape(hkv, n, b, d), idx, cos, sin, 0, impl="torch")
    mask = torch.ones(t, n * b + tail, dtype=torch.bool, device=DEVICE).tril(n * b + tail - t)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 0),
                                          v.repeat_interleave(group, 0), attn_mask=mask)
    assert_close(out, want, 2e-5, 2e-5)


def test_reference_reads_a_readonly_memmap(tmp_path):
    """k_store a read-only memory map (on the CPU, with the other arguments on DEVICE)."""
    args = make(2, 3, 4, 2, store_dtype=torch.float16, grouped=True)
    arr = np.lib.format.open_memmap(tmp_path / "k.npy", mode="w+", dtype=np.float16,
                                    shape=tuple(args["k_store"].shape))
    arr[:] = args["k_store"].cpu().numpy()
    arr.flush()
    with warnings.catch_warnings():  # torch warns that the read-only array is not writable
        warnings.simplefilter("ignore")
        mm = torch.from_numpy(np.load(tmp_path / "k.npy", mmap_mode="r"))
    want = ra.retrieval_attention_reference(**args)
    assert_close(ra.retrieval_attention_reference(**{**args, "k_store": mm}), want, 0, 0)


CASES = [  # T, group, B, K, grouped: T 1..37, B not a power of two, K 0..3, GQA 1 and 3
    (1, 1, 3, 0, False), (1, 3, 7, 3, True), (1, 1, 16, 2, False),
    (5, 3, 3, 1, True), (5, 1, 7, 2, False), (5, 3, 16, 0, True),
    (37, 1, 3, 3, False), (37, 3, 7, 1, False), (37, 1, 16, 3, True), (37, 3, 20, 2, True),
    (3, 1, 70, 2, False), (3, 1, 70, 2, True),  # blocks longer than one key tile
]


@needs_triton
@pytest.mark.parametrize("t,group,b,k,grouped", CASES)
def test_triton_matches_reference(t, group, b, k, grouped):
    args = make(t, group, b, k, grouped=grouped)
    want = ra.retrieval_attention_reference(**args)
    assert_close(ra.retrieval_attention(**args, impl="triton"), want, *TOLS[torch.float32])


@needs_triton
@pytest.mark.parametrize("n_splits", [1, 9])
def test_triton_split_counts(n_splits):
    args = make(5, 3, 7, 3, n_dense=40, grouped=True)
    want = ra.retrieval_attention_reference(**args)
    scale = args["q"].shape[-1] ** -0.5
    got = ra._retrieval_triton(*list(args.values())[:-1], scale, args["landmark_keys"],
                               n_splits=n_splits)
    assert_close(got, want, *TOLS[torch.float32])


@needs_triton
@pytest.mark.parametrize("grouped", [False, True])
def test_triton_head_dim_64_strided_dense(grouped):
    """D=64 (tensor-core dots on the rotated halves) with k_dense/v_dense strided views of
    a longer buffer, as the engine passes them (read in place, not copied)."""
    args = make(3, 2, 20, 3, d=64, n_dense=40, grouped=grouped)
    buf = randn(2, 2, 50, 64)
    buf[0, :, :40], buf[1, :, :40] = args["k_dense"], args["v_dense"]
    want = ra.retrieval_attention_reference(**args)
    args.update(k_dense=buf[0, :, :40], v_dense=buf[1, :, :40])
    assert not args["k_dense"].is_contiguous()
    assert_close(ra.retrieval_attention(**args, impl="triton"), want, *TOLS[torch.float32])


@needs_triton
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision(dtype, grouped):
    args = make(5, 3, 7, 2, dtype=dtype, store_dtype=torch.float16, grouped=grouped)
    out = ra.retrieval_attention(**args, impl="triton", sm_scale=0.2)
    assert out.dtype == dtype
    args32 = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in args.items()}
    want = ra.retrieval_attention_reference(**args32, sm_scale=0.2)
    assert_close(out, want, *TOLS[dtype])


def test_impl_argument():
    """impl="auto": the reference on the CPU, the kernel on a GPU (when triton imports)."""
    args = make(2, 1, 3, 1)
    kernel = ON_GPU and ra.HAVE_TRITON
    want = ra.retrieval_attention(**args, impl="triton") if kernel else ra.retrieval_attention_reference(**args)
    assert torch.equal(ra.retrieval_attention(**args), want)
    with pytest.raises(ValueError, match="impl"):
        ra.retrieval_attention(**args, impl="cuda")


SM90_COMPILE = """
import json
import landmark_cli.kernels.retrieval_attention as ra
from landmark_cli.kernels.sm90 import compile_sm90, retrieval_types

out = {}
# the largest tiles the host picks for D=128: 64 query rows (8 warps), 64-key grouped tiles
opts = dict(num_warps=ra.TUNING["num_warps"] or 8, num_stages=ra.TUNING["num_stages"])
for grouped, block_n in ((False, ra.TUNING["BLOCK_N"]), (True, max(64, ra.TUNING["BLOCK_N"]))):
    consts = dict(D=128, BLOCK_M=64, BLOCK_N=block_n, ONE_TILE=True, GROUPED=grouped,
                  PREC="tf32")
    kernel = compile_sm90(ra._retrieval_kernel, dict(consts, **opts), retrieval_types())
    out[f"retrieval-grouped={grouped}"] = kernel.metadata.shared
kernel = compile_sm90(ra._combine_kernel, dict(D=128, CHUNK=32), retrieval_types())
out["combine"] = kernel.metadata.shared
print(json.dumps(out))
"""


@pytest.mark.skipif(not ra.HAVE_TRITON, reason="triton is not installed")
def test_kernels_compile_for_h100():
    pytest.importorskip("triton.backends.nvidia")
    shared = compile_for_sm90(SM90_COMPILE)
    assert len(shared) == 3
    for name, nbytes in shared.items():
        assert nbytes <= H100_SHARED_BYTES, f"{name} needs {nbytes} bytes of shared memory"
