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

Triton kernel (flash-decoding). A program owns one kv head, a tile of the G*T query rows
of that head's group (G query heads x T tokens, so each K/V row is read once per group)
and a split of the key axis: either a run of retrieved blocks, read through block_idx
straight from the store, or a range of dense keys; the splits are sized so that the grid
fills the GPU several times over (TUNING["waves"] programs per SM) even for one query.
Each key tile is loaded whole ([BLOCK_N, D/2] halves, vectorised) and rotated in
registers with one [BLOCK_N, D/2] cos and sin tile: with the LLaMA tables (both halves
of a row equal, as rope_tables and every Hugging Face RoPE variant make them) the
rotation is k_rot = [k1 c - k2 s, k2 c + k1 s], so q.k_rot = q1.(k1 c - k2 s) +
q2.(k2 c + k1 s) needs no permuted reload of the key and only half of each table row.
Each split keeps an online softmax; in grouped mode a block (one tile when B <= BLOCK_N)
is normalised by its own max/sum and enters the outer softmax as one entry of logit
g = q.landmark. A split writes its normalised output and log-sum-exp; a second small
kernel merges the splits of each query row.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from landmark_cli.kernels._triton import HAVE_TRITON, on_device, tl, triton
from landmark_cli.kernels.rope import apply_rope

# launch settings (benchmarks sweep them): num_warps 0 = 4 for up to 32 query rows, else 8;
# BLOCK_N = keys per tile (grouped mode: at least 64, so that a 64-token block is one tile);
# waves = programs per SM that the key splits aim at
# the reference: above this many query tokens (reading chunks) PyTorch's fused attention is faster
DECODE_ROWS = 32
TUNING = {"num_warps": 0, "num_stages": 2, "waves": 4, "BLOCK_N": 32}


# ----------------------------------------------------------------------------- reference


def gather_blocks(store: torch.Tensor, block_idx: torch.Tensor) -> torch.Tensor:
    """store[h, block_idx[h]] for every kv head, reading only the selected blocks."""
    idx = block_idx.to(store.device)
    return torch.stack([store[h].index_select(0, idx[h]) for h in range(store.shape[0])])


def rotated_blocks(k_store, v_store, block_idx, cos, sin, ret_pos0, device=None):
    """The selected blocks as dense float32 keys (RoPE'd at their new positions ret_pos0 +
    j*B + t) and values: ([Hkv, K*B, D], [Hkv, K*B, D])."""
    hkv, kb, bsz, d = k_store.shape[0], block_idx.shape[1], k_store.shape[2], k_store.shape[3]
    pos = ret_pos0 + torch.arange(kb * bsz, device=cos.device)
    k_ret = gather_blocks(k_store, block_idx).to(device).float().reshape(hkv, kb * bsz, d)
    k_ret = apply_rope(k_ret, cos[pos].to(device).float(), sin[pos].to(device).float())
    v_ret = gather_blocks(v_store, block_idx).to(device).float().reshape(hkv, kb * bsz, d)
    return k_ret, v_ret


def retrieval_attention_reference(q, k_dense, v_dense, k_store, v_store, block_idx, cos, sin,
                                  ret_pos0, *, sm_scale=None, landmark_keys=None):
    """Plain torch version (the CPU path); same arguments as retrieval_attention."""
    hq, t, d = q.shape
    hkv, n_dense, _ = k_dense.shape
    kb, bsz = block_idx.shape[1], k_store.shape[2]
    scale = d**-0.5 if sm_scale is None else sm_scale
    dev = q.device
    qf = q.float().reshape(hkv, hq // hkv * t, d)  # [Hkv, G*T, D], rows (g, t)

    k_ret, v_ret = rotated_blocks(k_store, v_store, block_idx, cos, sin, ret_pos0, dev)
    visible = torch.arange(n_dense, device=dev)[None, :] <= (n_dense - t + torch.arange(t, device=dev))[:, None]

    if landmark_keys is None and t > DECODE_ROWS:  # one softmax over [retrieved, dense]: PyTorch's fused attention
        g = hq // hkv
        k_all = torch.cat([k_ret, k_dense.float()], 1).repeat_interleave(g, 0)  # [Hq, K*B + L, D]
        v_all = torch.cat([v_ret, v_dense.float()], 1).repeat_interleave(g, 0)
        bias = None
        if t > 1:
            bias = torch.zeros(t, kb * bsz + n_dense, device=dev)
            bias[:, kb * bsz:].masked_fill_(~visible, float("-inf"))
        out = F.scaled_dot_product_attention(q.float()[None], k_all[None], v_all[None], attn_mask=bias,
                                             scale=scale)[0]
        return out.to(q.dtype)

    s_dense = qf @ k_dense.float().transpose(1, 2) * scale  # [Hkv, G*T, L]
    s_dense = s_dense.masked_fill(~visible.repeat(hq // hkv, 1), float("-inf"))
    s_ret = qf @ k_ret.transpose(1, 2) * scale  # [Hkv, G*T, K*B]
    if landmark_keys is None:  # a few queries (answering): the same softmax, GQA by grouping the
        # query rows per kv head instead of copying K/V per query head (no copy of the blocks per head)
        p = torch.softmax(torch.cat([s_ret, s_dense], dim=-1), dim=-1)
        out = p[..., :kb * bsz] @ v_ret + p[..., kb * bsz:] @ v_dense.float()
        return out.reshape(hq, t, d).to(q.dtype)
    # grouped softmax (trained landmarks): the outer softmax gates each block's inner one
    lm_pos = ret_pos0 + torch.arange(kb, device=cos.device) * bsz + bsz - 1
    k_lm = gather_blocks(landmark_keys, block_idx).to(dev).float()  # [Hkv, K, D]
    k_lm = apply_rope(k_lm, cos[lm_pos].to(dev).float(), sin[lm_pos].to(dev).float())
    s_lm = qf @ k_lm.transpose(1, 2) * scale  # [Hkv, G*T, K]
    p = torch.softmax(torch.cat([s_lm, s_dense], dim=-1), dim=-1)
    pi = torch.softmax(s_ret.view(hkv, qf.shape[1], kb, bsz), dim=-1) * p[..., :kb, None]
    out = p[..., kb:] @ v_dense.float() + pi.flatten(2) @ v_ret
    return out.reshape(hq, t, d).to(q.dtype)


# ----------------------------------------------------------------------------- Triton


@triton.jit
def _mm_t(a, b, PREC: tl.constexpr):
    """a [M, K] @ b[N, K]^T in float32: tensor cores when K >= 16, else multiply-and-sum."""
    if a.shape[1] >= 16:
        return tl.dot(a, tl.trans(b), input_precision=PREC)
    else:
        return tl.sum(a.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :], 2)


@triton.jit
def _retrieved_scores(q1, q2, kp, cp, sp, ok, HALF: tl.constexpr, PREC: tl.constexpr):
    """Scores of q (as halves q1, q2) against a tile of pre-RoPE keys at kp (first halves;
    second halves HALF further), rotated in registers with cos/sin rows at cp/sp (first
    half of each table row: in the LLaMA convention its two halves are equal):
        k_rot = [k1*c - k2*s, k2*c + k1*s],   q.k_rot = q1.(k1*c - k2*s) + q2.(k2*c + k1*s)."""
    k1 = tl.load(kp, mask=ok, other=0.0).to(tl.float32)
    k2 = tl.load(kp + HALF, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(cp, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(sp, mask=ok, other=0.0).to(tl.float32)
    r1 = (k1 * c - k2 * s).to(q1.dtype)
    r2 = (k2 * c + k1 * s).to(q1.dtype)
    return _mm_t(q1, r1, PREC) + _mm_t(q2, r2, PREC)


@triton.jit
def _online(m, denom, acc, s, v, PREC: tl.constexpr):
    """Fold a [rows, keys] score tile and its values into a running softmax."""
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, denom * alpha + tl.sum(p, 1), acc


@triton.jit
def _retrieval_kernel(Q, KD, VD, KS, VS, LMK, IDX, COS, SIN, PART, LSE,
                      T, L_DENSE, NKB, B, GT, ret_pos0, sm_scale,
                      skd_h, skd_n, svd_h, svd_n, sks_h, sks_n, sks_b, svs_h, svs_n, svs_b,
                      slm_h, slm_n, scs, blocks_per_split, keys_per_split, n_ret_splits,
                      n_splits,
                      D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      ONE_TILE: tl.constexpr, GROUPED: tl.constexpr, PREC: tl.constexpr):
    # (query tile, key split, kv head): the query tiles of one split run side by side and
    # share its K/V through L2
    pid_m, split, hk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    HALF: tl.constexpr = D // 2
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (g, t) of this kv head's group
    row_ok = rows < GT
    dd = tl.arange(0, D)
    dh = tl.arange(0, HALF)
    q_rows = Q + (hk * GT + rows)[:, None] * D
    hk64 = hk.to(tl.int64)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)

    if split < n_ret_splits:  # a run of retrieved blocks, read in place and rotated
        q1 = tl.load(q_rows + dh[None, :], mask=row_ok[:, None], other=0.0)
        q2 = tl.load(q_rows + HALF + dh[None, :], mask=row_ok[:, None], other=0.0)
        dt = q1.dtype
        j0 = split * blocks_per_split
        for j in range(j0, tl.minimum(j0 + blocks_per_split, NKB)):
            blk = tl.load(IDX + hk64 * NKB + j).to(tl.int64)
            ks_base = KS + hk64 * sks_h + blk * sks_n
            vs_base = VS + hk64 * svs_h + blk * svs_n
            pos0 = ret_pos0 + j * B  # position of the block's first token
            if GROUPED:  # the block's landmark key, rotated at its last token's position
                lm = LMK + hk64 * slm_h + blk * slm_n
                cs = (pos0 + B - 1) * scs
                l1 = tl.load(lm + dh).to(tl.float32)
                l2 = tl.load(lm + HALF + dh).to(tl.float32)
                c = tl.load(COS + cs + dh).to(tl.float32)
                sn = tl.load(SIN + cs + dh).to(tl.float32)
                r1 = l1 * c - l2 * sn
                r2 = l2 * c + l1 * sn
                g = (tl.sum(q1.to(tl.float32) * r1[None, :], 1)
                     + tl.sum(q2.to(tl.float32) * r2[None, :], 1)) * sm_scale
            if ONE_TILE:  # the whole block in one tile (B <= BLOCK_N): exact inner softmax
                tt = tl.arange(0, BLOCK_N)
                ok = tt < B
                s = _retrieved_scores(q1, q2, ks_base + tt[:, None] * sks_b + dh[None, :],
                                      COS + (pos0 + tt)[:, None] * scs + dh[None, :],
                                      SIN + (pos0 + tt)[:, None] * scs + dh[None, :],
                                      ok[:, None], HALF, PREC) * sm_scale
                s = tl.where(ok[None, :], s, float("-inf"))
                v = tl.load(vs_base + tt[:, None] * svs_b + dd[None, :], mask=ok[:, None],
                            other=0.0).to(dt)
                if GROUPED:  # outer softmax entry g, carrying the block's inner average
                    m_b = tl.max(s, 1)
                    p = tl.exp(s - m_b[:, None])
                    m_new = tl.maximum(m_i, g)
                    alpha = tl.exp(m_i - m_new)
                    w = tl.exp(g - m_new)
                    p = p * (w / tl.sum(p, 1))[:, None]
                    acc = acc * alpha[:, None] + tl.dot(p.to(dt), v, input_precision=PREC)
                    l_i = l_i * alpha + w
                    m_i = m_new
                else:
                    m_i, l_i, acc = _online(m_i, l_i, acc, s, v, PREC)
            else:  # a block longer than a tile: online softmax over its tiles
                if GROUPED:
                    m_b = tl.full([BLOCK_M], float("-inf"), tl.float32)
                    l_b = tl.zeros([BLOCK_M], tl.float32)
                    acc_b = tl.zeros([BLOCK_M, D], tl.float32)
                for t0 in range(0, B, BLOCK_N):
                    tt = t0 + tl.arange(0, BLOCK_N)
                    ok = tt < B
                    s = _retrieved_scores(q1, q2, ks_base + tt[:, None] * sks_b + dh[None, :],
                                          COS + (pos0 + tt)[:, None] * scs + dh[None, :],
                                          SIN + (pos0 + tt)[:, None] * scs + dh[None, :],
                                          ok[:, None], HALF, PREC) * sm_scale
                    s = tl.where(ok[None, :], s, float("-inf"))
                    v = tl.load(vs_base + tt[:, None] * svs_b + dd[None, :], mask=ok[:, None],
                                other=0.0).to(dt)
                    if GROUPED:
                        m_b, l_b, acc_b = _online(m_b, l_b, acc_b, s, v, PREC)
                    else:
                        m_i, l_i, acc = _online(m_i, l_i, acc, s, v, PREC)
                if GROUPED:
                    m_new = tl.maximum(m_i, g)
                    alpha = tl.exp(m_i - m_new)
                    w = tl.exp(g - m_new)
                    acc = acc * alpha[:, None] + (w / l_b)[:, None] * acc_b
                    l_i = l_i * alpha + w
                    m_i = m_new
    else:  # a range of dense keys (RoPE'd already), causal for the last T
        q = tl.load(q_rows + dd[None, :], mask=row_ok[:, None], other=0.0)
        n0 = (split - n_ret_splits) * keys_per_split
        n1 = tl.minimum(n0 + keys_per_split, L_DENSE)
        last = L_DENSE - T + rows % T  # last dense key each row may see
        kd_base = KD + hk64 * skd_h
        vd_base = VD + hk64 * svd_h
        for n in range(n0, n1, BLOCK_N):
            keys = n + tl.arange(0, BLOCK_N)
            ok = keys < n1
            k = tl.load(kd_base + keys[:, None] * skd_n + dd[None, :], mask=ok[:, None],
                        other=0.0)
            v = tl.load(vd_base + keys[:, None] * svd_n + dd[None, :], mask=ok[:, None],
                        other=0.0)
            s = _mm_t(q, k.to(q.dtype), PREC) * sm_scale
            s = tl.where(ok[None, :] & (keys[None, :] <= last[:, None]), s, float("-inf"))
            m_i, l_i, acc = _online(m_i, l_i, acc, s, v.to(q.dtype), PREC)

    # this split's normalised output and log-sum-exp; rows [Hkv * GT, n_splits]
    out_rows = (hk * GT + rows) * n_splits + split
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    tl.store(LSE + out_rows, tl.where(l_i > 0, m_i + tl.log(l_safe), float("-inf")),
             mask=row_ok)
    tl.store(PART + out_rows[:, None] * D + dd[None, :], acc / l_safe[:, None],
             mask=row_ok[:, None])


@triton.jit
def _combine_kernel(PART, LSE, OUT, n_splits, D: tl.constexpr, CHUNK: tl.constexpr):
    """out[r] = sum_s exp(lse_s) o_s / sum_s exp(lse_s) over the splits of row r."""
    r = tl.program_id(0).to(tl.int64)
    dd = tl.arange(0, D)
    mv = tl.full([CHUNK], float("-inf"), tl.float32)
    for s0 in range(0, n_splits, CHUNK):
        sp = s0 + tl.arange(0, CHUNK)
        mv = tl.maximum(mv, tl.load(LSE + r * n_splits + sp, mask=sp < n_splits,
                                    other=float("-inf")))
    m = tl.max(mv, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([D], tl.float32)
    den = tl.zeros([CHUNK], tl.float32)
    for s0 in range(0, n_splits, CHUNK):
        sp = s0 + tl.arange(0, CHUNK)
        ok = sp < n_splits
        w = tl.exp(tl.load(LSE + r * n_splits + sp, mask=ok, other=float("-inf")) - m)
        o = tl.load(PART + (r * n_splits + sp)[:, None] * D + dd[None, :], mask=ok[:, None],
                    other=0.0)
        acc += tl.sum(o * w[:, None], 0)
        den += w
    den_t = tl.sum(den, 0)
    out = acc / tl.where(den_t > 0, den_t, 1.0)
    tl.store(OUT + r * D + dd, out.to(OUT.dtype.element_ty))


# ----------------------------------------------------------------------------- host side


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """TUNING["waves"] programs per SM (4 SMs' worth off the GPU, for tests)."""
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4
    return TUNING["waves"] * sms


def _retrieval_triton(q, k_dense, v_dense, k_store, v_store, block_idx, cos, sin, ret_pos0,
                      scale, landmark_keys, n_splits=None):
    hq, t, d = q.shape
    hkv, n_dense, _ = k_dense.shape
    kb, bsz = block_idx.shape[1], k_store.shape[2]
    gt = hq // hkv * t
    for name, x in (("k_dense", k_dense), ("v_dense", v_dense), ("k_store", k_store),
                    ("v_store", v_store), ("landmark_keys", landmark_keys)):
        if x is not None and x.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit stride on its last dim")
    if cos.shape[0] < ret_pos0 + kb * bsz:
        raise ValueError(f"cos/sin tables of {cos.shape[0]} rows do not reach position "
                         f"{ret_pos0 + kb * bsz - 1}")
    q = q.contiguous()
    cos, sin, idx = cos.contiguous(), sin.contiguous(), block_idx.to(torch.int64).contiguous()
    lmk = landmark_keys if landmark_keys is not None else k_store  # unused when not grouped

    grouped = landmark_keys is not None
    block_m = max(16, min(64, triton.next_power_of_2(gt)))
    # a grouped block in one tile when it fits 64 keys: no second accumulator for it
    block_n = max(16, min(TUNING["BLOCK_N"] if not grouped else max(64, TUNING["BLOCK_N"]),
                          triton.next_power_of_2(bsz)))
    m_tiles = triton.cdiv(gt, block_m)
    tiles_per_block = triton.cdiv(bsz, block_n)
    tiles = kb * tiles_per_block + triton.cdiv(n_dense, block_n)  # key tiles per kv head
    splits = n_splits or max(1, _target_programs(q.device) // (hkv * m_tiles))
    # a split writes [rows, D] float32 partials: let it read at least as many K/V bytes
    min_tiles = 1 if n_splits else max(1, min(gt, block_m) // block_n)
    tiles_per_split = max(min_tiles, triton.cdiv(tiles, splits))
    blocks_per_split = max(1, tiles_per_split // tiles_per_block)
    keys_per_split = tiles_per_split * block_n
    n_ret = triton.cdiv(kb, blocks_per_split)
    n_total = n_ret + triton.cdiv(n_dense, keys_per_split)

    rows_total = hq * t
    work = torch.empty(rows_total * n_total * (d + 1), dtype=torch.float32, device=q.device)
    part, lse = work[: rows_total * n_total * d], work[rows_total * n_total * d:]
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    _retrieval_kernel[(m_tiles, n_total, hkv)](
        q, k_dense, v_dense, k_store, v_store, lmk, idx, cos, sin, part, lse,
        t, n_dense, kb, bsz, gt, ret_pos0, scale,
        k_dense.stride(0), k_dense.stride(1), v_dense.stride(0), v_dense.stride(1),
        k_store.stride(0), k_store.stride(1), k_store.stride(2),
        v_store.stride(0), v_store.stride(1), v_store.stride(2),
        lmk.stride(0), lmk.stride(1), cos.stride(0),
        blocks_per_split, keys_per_split, n_ret, n_total,
        D=d, BLOCK_M=block_m, BLOCK_N=block_n, ONE_TILE=tiles_per_block == 1,
        GROUPED=grouped, PREC=prec,
        num_warps=TUNING["num_warps"] or (4 if block_m <= 32 else 8),
        num_stages=TUNING["num_stages"],
    )
    out = torch.empty_like(q)
    _combine_kernel[(rows_total,)](part, lse, out, n_total, D=d,
                                   CHUNK=min(32, max(2, triton.next_power_of_2(n_total))))
    return out


def retrieval_attention(q, k_dense, v_dense, k_store, v_store, block_idx, cos, sin, ret_pos0,
                        *, sm_scale=None, landmark_keys=None, impl="auto"):
    """Attention of T queries over dense context + retrieved store blocks (module docstring).

    q: [Hq, T, D] (RoPE'd); k_dense, v_dense: [Hkv, L, D], L >= T, keys RoPE'd;
    k_store, v_store: [Hkv, N, B, D] pre-RoPE; block_idx: [Hkv, K] int64;
    cos, sin: [P, D] tables with P >= ret_pos0 + K*B, LLaMA convention (the two halves of
    each row equal: the kernel reads the first halves); landmark_keys: optional [Hkv, N, D]
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
    with on_device(q.device):
        return _retrieval_triton(q, k_dense, v_dense, k_store, v_store, block_idx, cos, sin,
                                 ret_pos0, scale, landmark_keys)
