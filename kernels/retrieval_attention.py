"""Attention of a few query tokens over [dense context + retrieved blocks read in place].

Semantics, for query head h (kv head hk = h // (Hq // Hkv)) and query i of T:
  dense keys   k_dense[hk, n], n <= L - T + i       (the last T dense tokens are the
               queries' own, causal; RoPE already applied)
  retrieved    block j of kv head hk is k_store[hk, block_idx[hk, j]], its token t placed
               at position ret_pos0 + j*B + t and rotated there (the store holds keys
               before RoPE), values from v_store likewise.
Plain mode (landmark_keys is None): one softmax over all dense and retrieved keys.
Grouped mode (landmark_keys [Hkv, N, D], trained landmark models): the outer softmax runs
over the visible dense keys plus one landmark key per retrieved block (the block's
landmark key, pre-RoPE, rotated at position ret_pos0 + j*B + B - 1); block j's B tokens
get a softmax of their own, weighted by the outer probability of its landmark; the
landmark itself carries no value:
  out = sum_n p_n v_n + sum_j p_lm(j) * sum_t softmax_t(s_jt) v_jt.
Scores are scaled by sm_scale (default D**-0.5); softmax in float32; output in q.dtype.

Triton kernel (flash-decoding): a program owns one kv head, a tile of the G*T query rows
of that head's group (G query heads x T tokens, so each K/V row is read once per group)
and a split of the keys: either a run of retrieved blocks, read through block_idx
straight from the store and rotated in registers, or a range of dense keys. Each split
keeps an online softmax (running max m, sum l, unnormalised accumulator); in grouped
mode a block is reduced first with its own max/sum and then enters the outer softmax as
one entry of logit g = q.landmark. A second small kernel merges the splits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.rope import apply_rope

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the torch reference is the only path
    from types import SimpleNamespace

    triton = SimpleNamespace(jit=lambda fn: fn)
    tl = SimpleNamespace(constexpr=None)
    HAVE_TRITON = False
else:
    HAVE_TRITON = True

TUNING = {"num_warps": 4, "num_stages": 2, "waves": 2}  # launch settings; benchmarks sweep


# ----------------------------------------------------------------------------- reference


def _gather(store: torch.Tensor, block_idx: torch.Tensor) -> torch.Tensor:
    """store[h, block_idx[h]] for every kv head, reading only the selected blocks."""
    idx = block_idx.to(store.device)
    return torch.stack([store[h].index_select(0, idx[h]) for h in range(store.shape[0])])


def retrieval_attention_reference(q, k_dense, v_dense, k_store, v_store, block_idx, cos, sin,
                                  ret_pos0, *, sm_scale=None, landmark_keys=None):
    """Plain torch version (the CPU path); same arguments as retrieval_attention."""
    hq, t, d = q.shape
    hkv, l, _ = k_dense.shape
    kb, bsz = block_idx.shape[1], k_store.shape[2]
    scale = d**-0.5 if sm_scale is None else sm_scale
    dev = q.device
    qf = q.float().reshape(hkv, hq // hkv * t, d)  # [Hkv, G*T, D], rows (g, t)

    pos = ret_pos0 + torch.arange(kb * bsz, device=cos.device)
    k_ret = _gather(k_store, block_idx).to(dev).float().reshape(hkv, kb * bsz, d)
    k_ret = apply_rope(k_ret, cos[pos].to(dev).float(), sin[pos].to(dev).float())
    v_ret = _gather(v_store, block_idx).to(dev).float().reshape(hkv, kb * bsz, d)
    visible = torch.arange(l, device=dev)[None, :] <= (l - t + torch.arange(t, device=dev))[:, None]

    if landmark_keys is None:  # one softmax over [retrieved, dense]: PyTorch's fused attention
        g = hq // hkv
        k_all = torch.cat([k_ret, k_dense.float()], 1).repeat_interleave(g, 0)  # [Hq, K*B + L, D]
        v_all = torch.cat([v_ret, v_dense.float()], 1).repeat_interleave(g, 0)
        bias = None
        if t > 1:
            bias = torch.zeros(t, kb * bsz + l, device=dev)
            bias[:, kb * bsz:].masked_fill_(~visible, float("-inf"))
        out = F.scaled_dot_product_attention(q.float()[None], k_all[None], v_all[None], attn_mask=bias,
                                             scale=scale)[0]
        return out.to(q.dtype)

    s_dense = qf @ k_dense.float().transpose(1, 2) * scale  # [Hkv, G*T, L]
    s_dense = s_dense.masked_fill(~visible.repeat(hq // hkv, 1), float("-inf"))
    s_ret = qf @ k_ret.transpose(1, 2) * scale  # [Hkv, G*T, K*B]
    # grouped softmax (trained landmarks): the outer softmax gates each block's inner one
    lm_pos = pos.view(kb, bsz)[:, -1]
    k_lm = _gather(landmark_keys, block_idx).to(dev).float()  # [Hkv, K, D]
    k_lm = apply_rope(k_lm, cos[lm_pos].to(dev).float(), sin[lm_pos].to(dev).float())
    s_lm = qf @ k_lm.transpose(1, 2) * scale  # [Hkv, G*T, K]
    p = torch.softmax(torch.cat([s_lm, s_dense], dim=-1), dim=-1)
    pi = torch.softmax(s_ret.view(hkv, qf.shape[1], kb, bsz), dim=-1) * p[..., :kb, None]
    out = p[..., kb:] @ v_dense.float() + pi.flatten(2) @ v_ret
    return out.reshape(hq, t, d).to(q.dtype)


# ----------------------------------------------------------------------------- Triton


@triton.jit
def _online(m, l, acc, s, v, PREC: tl.constexpr):
    """Fold a [rows, keys] score tile and its values into a running softmax."""
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l * alpha + tl.sum(p, 1), acc


@triton.jit
def _roped(X, offs, swap_offs, cs_offs, mask, COS, SIN, sign):
    """Load rows of pre-RoPE keys and rotate them: x*cos + rotate_half(x)*sin (float32)."""
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    xs = tl.load(X + swap_offs, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(COS + cs_offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(SIN + cs_offs, mask=mask, other=0.0).to(tl.float32)
    return x * c + sign * xs * s


@triton.jit
def _retrieval_kernel(Q, KD, VD, KS, VS, LMK, IDX, COS, SIN, ACC, M, L,
                      T, L_DENSE, NKB, B, GT, ret_pos0, sm_scale,
                      sks_h, sks_n, sks_b, svs_h, svs_n, svs_b, slm_h, slm_n,
                      blocks_per_split, keys_per_split, n_ret_splits, rows_total,
                      D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      GROUPED: tl.constexpr, PREC: tl.constexpr):
    split, hk, pid_m = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (g, t) of this kv head's group
    row_ok = rows < GT
    dd = tl.arange(0, D)
    swap = (dd + D // 2) % D
    sign = tl.where(dd < D // 2, -1.0, 1.0)
    q = tl.load(Q + (hk * GT + rows)[:, None] * D + dd[None, :], mask=row_ok[:, None], other=0.0)
    dt = q.dtype
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)

    if split < n_ret_splits:  # a run of retrieved blocks
        j0 = split * blocks_per_split
        for j in range(j0, tl.minimum(j0 + blocks_per_split, NKB)):
            blk = tl.load(IDX + hk * NKB + j)
            ks_base = KS + hk * sks_h + blk * sks_n
            vs_base = VS + hk * svs_h + blk * svs_n
            if GROUPED:
                lm_pos = ret_pos0 + j * B + B - 1
                lm = _roped(LMK + hk * slm_h + blk * slm_n, dd, swap, lm_pos * D + dd, dd < D,
                            COS, SIN, sign)
                g = tl.sum(q.to(tl.float32) * lm[None, :], 1) * sm_scale
                m_b = tl.full([BLOCK_M], float("-inf"), tl.float32)
                l_b = tl.zeros([BLOCK_M], tl.float32)
                acc_b = tl.zeros([BLOCK_M, D], tl.float32)
            for t0 in range(0, B, BLOCK_N):
                tt = t0 + tl.arange(0, BLOCK_N)
                ok = tt < B
                pos = ret_pos0 + j * B + tt
                k = _roped(ks_base, tt[:, None] * sks_b + dd[None, :],
                           tt[:, None] * sks_b + swap[None, :], pos[:, None] * D + dd[None, :],
                           ok[:, None], COS, SIN, sign)
                v = tl.load(vs_base + tt[:, None] * svs_b + dd[None, :], mask=ok[:, None],
                            other=0.0)
                s = tl.dot(q, tl.trans(k.to(dt)), input_precision=PREC) * sm_scale
                s = tl.where(ok[None, :], s, float("-inf"))
                if GROUPED:
                    m_b, l_b, acc_b = _online(m_b, l_b, acc_b, s, v.to(dt), PREC)
                else:
                    m_i, l_i, acc = _online(m_i, l_i, acc, s, v.to(dt), PREC)
            if GROUPED:  # the block enters the outer softmax as one entry of logit g
                m_new = tl.maximum(m_i, g)
                alpha = tl.exp(m_i - m_new)
                w = tl.exp(g - m_new)
                acc = acc * alpha[:, None] + (w / l_b)[:, None] * acc_b
                l_i = l_i * alpha + w
                m_i = m_new
    else:  # a range of dense keys, causal for the last T
        n0 = (split - n_ret_splits) * keys_per_split
        last = L_DENSE - T + rows % T  # last dense key each row may see
        for n in range(n0, tl.minimum(n0 + keys_per_split, L_DENSE), BLOCK_N):
            keys = n + tl.arange(0, BLOCK_N)
            ok = keys < L_DENSE
            offs = (hk * L_DENSE + keys)[:, None] * D + dd[None, :]
            k = tl.load(KD + offs, mask=ok[:, None], other=0.0)
            v = tl.load(VD + offs, mask=ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k.to(dt)), input_precision=PREC) * sm_scale
            s = tl.where(ok[None, :] & (keys[None, :] <= last[:, None]), s, float("-inf"))
            m_i, l_i, acc = _online(m_i, l_i, acc, s, v.to(dt), PREC)

    out_rows = split * rows_total + hk * GT + rows
    tl.store(M + out_rows, m_i, mask=row_ok)
    tl.store(L + out_rows, l_i, mask=row_ok)
    tl.store(ACC + out_rows[:, None] * D + dd[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _combine_kernel(ACC, M, L, O, n_splits, rows_total,
                    D: tl.constexpr, SPLITS: tl.constexpr):
    r = tl.program_id(0)
    sp = tl.arange(0, SPLITS)
    ok = sp < n_splits
    dd = tl.arange(0, D)
    m = tl.load(M + sp * rows_total + r, mask=ok, other=float("-inf"))
    l = tl.load(L + sp * rows_total + r, mask=ok, other=0.0)
    acc_off = (sp * rows_total + r)[:, None] * D + dd[None, :]
    acc = tl.load(ACC + acc_off, mask=ok[:, None], other=0.0)
    m_max = tl.max(m, 0)
    w = tl.exp(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    den = tl.sum(l * w, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(den > 0, den, 1.0)
    tl.store(O + r * D + dd, out.to(O.dtype.element_ty))


# ----------------------------------------------------------------------------- host side


def _target_splits(device: torch.device, programs_per_split: int) -> int:
    """Enough key splits to give every SM TUNING["waves"] programs; 4 off the GPU."""
    if device.type != "cuda":
        return 4
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, -(-TUNING["waves"] * sms // programs_per_split))


def _retrieval_triton(q, k_dense, v_dense, k_store, v_store, block_idx, cos, sin, ret_pos0,
                      scale, landmark_keys, n_splits=None):
    hq, t, d = q.shape
    hkv, l, _ = k_dense.shape
    kb, bsz = block_idx.shape[1], k_store.shape[2]
    gt = hq // hkv * t
    for name, x in (("k_store", k_store), ("v_store", v_store), ("landmark_keys", landmark_keys)):
        if x is not None and x.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit stride on its last dim")
    q, k_dense, v_dense = q.contiguous(), k_dense.contiguous(), v_dense.contiguous()
    cos, sin, idx = cos.contiguous(), sin.contiguous(), block_idx.to(torch.int64).contiguous()
    lmk = landmark_keys if landmark_keys is not None else k_store  # unused when not grouped

    block_m = max(16, min(64, triton.next_power_of_2(gt)))
    block_n = max(16, min(64, triton.next_power_of_2(bsz)))
    m_tiles = triton.cdiv(gt, block_m)
    splits = n_splits or _target_splits(q.device, hkv * m_tiles)
    keys_per_split = block_n * max(1, triton.cdiv(kb * bsz + l, splits * block_n))
    blocks_per_split = max(1, keys_per_split // bsz)
    n_ret = triton.cdiv(kb, blocks_per_split)
    n_total = n_ret + triton.cdiv(l, keys_per_split)

    rows_total = hq * t
    acc = torch.empty(n_total, rows_total, d, dtype=torch.float32, device=q.device)
    m = torch.empty(n_total, rows_total, dtype=torch.float32, device=q.device)
    lsum = torch.empty_like(m)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    _retrieval_kernel[(n_total, hkv, m_tiles)](
        q, k_dense, v_dense, k_store, v_store, lmk, idx, cos, sin, acc, m, lsum,
        t, l, kb, bsz, gt, ret_pos0, scale,
        k_store.stride(0), k_store.stride(1), k_store.stride(2),
        v_store.stride(0), v_store.stride(1), v_store.stride(2),
        lmk.stride(0), lmk.stride(1),
        blocks_per_split, keys_per_split, n_ret, rows_total,
        D=d, BLOCK_M=block_m, BLOCK_N=block_n, GROUPED=landmark_keys is not None, PREC=prec,
        num_warps=TUNING["num_warps"], num_stages=TUNING["num_stages"],
    )
    out = torch.empty_like(q)
    _combine_kernel[(rows_total,)](acc, m, lsum, out, n_total, rows_total,
                                   D=d, SPLITS=max(2, triton.next_power_of_2(n_total)))
    return out


def retrieval_attention(q, k_dense, v_dense, k_store, v_store, block_idx, cos, sin, ret_pos0,
                        *, sm_scale=None, landmark_keys=None, impl="auto"):
    """Attention of T queries over dense context + retrieved store blocks (module docstring).

    q: [Hq, T, D] (RoPE'd); k_dense, v_dense: [Hkv, L, D], L >= T, keys RoPE'd;
    k_store, v_store: [Hkv, N, B, D] pre-RoPE; block_idx: [Hkv, K] int64;
    cos, sin: [P, D] tables with P > ret_pos0 + K*B; landmark_keys: optional [Hkv, N, D]
    pre-RoPE landmark keys (grouped softmax). Returns [Hq, T, D] in q.dtype.
    impl: "auto" (Triton when every tensor is on CUDA and triton imports), "torch", "triton".
    """
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', not {impl!r}")
    hq, t, d = q.shape
    if hq % k_dense.shape[0] or k_dense.shape[1] < t:
        raise ValueError(f"bad shapes: q {tuple(q.shape)}, k_dense {tuple(k_dense.shape)}")
    scale = d**-0.5 if sm_scale is None else float(sm_scale)
    tensors = [q, k_dense, v_dense, k_store, v_store, block_idx, cos, sin]
    if landmark_keys is not None:
        tensors.append(landmark_keys)
    on_one_gpu = all(x.is_cuda and x.device == q.device for x in tensors)
    if impl == "torch" or (impl == "auto" and not (HAVE_TRITON and on_one_gpu and d >= 16
                                                   and d & (d - 1) == 0)):
        return retrieval_attention_reference(q, k_dense, v_dense, k_store, v_store, block_idx,
                                             cos, sin, ret_pos0, sm_scale=scale,
                                             landmark_keys=landmark_keys)
    if not HAVE_TRITON:
        raise RuntimeError("impl='triton' needs the triton package (pip install triton)")
    if not all(x.device == q.device for x in tensors):
        raise ValueError("retrieval_attention kernel: every tensor must be on q's device")
    if d < 16 or d & (d - 1):
        raise ValueError(f"retrieval_attention kernel: head dim {d} is not a power of two >= 16")
    return _retrieval_triton(q, k_dense, v_dense, k_store, v_store, block_idx, cos, sin,
                             ret_pos0, scale, landmark_keys)
