"""Fused grouped-softmax causal attention (Landmark Attention, arXiv 2305.16300), fwd + bwd.

Semantics. `is_landmark[b, j]` marks landmark tokens; the block of a position is the
number of landmarks strictly before it, so a landmark closes its block (a trailing block
without a landmark is allowed). For query i in block b(i), with s_ij = q_i.k_j * scale:

  own:    j <= i, b(j) == b(i), j not a landmark      -> outer softmax, value v_j
  gate:   j a landmark, b(j) < b(i)                   -> outer softmax, no value
  inner:  j not a landmark, b(j) = c < b(i)           -> weight G_ic * softmax_{j in c}(s_ij)

where the outer softmax runs over own + gate keys and G_ic is the outer probability of
block c's landmark. With local=True (a layer trained to read near its query only) the
gate and inner keys are those of the `local_blocks` blocks before b(i) alone: block
b(i) - 1 (local_blocks=1), or none (0: the query's own block only). As in the paper's code, a
landmark query does not attend to itself (it sees what the token before it sees):
landmark keys act only as gates. A query with no visible key at all (a landmark at
position 0) gets a zero output.

Algorithm (Triton). The key loop walks *blocks*, not fixed tiles: one landmark block per
iteration, loaded at its own start offset into a tile of BLOCK_N >= its length (masked).
So each block's within-block normaliser is exact inside one tile, whatever the block
length (up to MAX_BLOCK_LEN; longer blocks fall back to the reference) and wherever the
landmarks are; queries are fixed tiles of BLOCK_M rows, each row knowing its own block
id, so a tile may straddle blocks. (A block much shorter than its tile wastes the rest:
BLOCK_N is the next power of two >= the longest block, at least 16.)
Per (query row, block c) one masked logit row x serves both cases: for rows after c,
x = ordinary keys of c, stabilised by their own max (inner softmax) and the row's gate
logit g = s(landmark of c) enters the running outer max/sum like a single key whose
"value" is the inner-softmax average; for rows inside c, x = causal ordinary keys,
stabilised by the running outer max. One exp, one P@V per block, nothing [T, T] stored
(logits are kept in log2 units so that exp2 can be used). The forward saves
lse_i = log(outer normaliser) per query. Backward, with D_i = dO_i.O_i,
dP_ij = dO_i.v_j and E_ic = sum_{j in c} pi_ij dP_ij (recomputed per block tile):
  own:   ds = P (dP - D_i);   inner: ds = P (dP - E_ic);   gate: ds = G_ic (E_ic - D_i).
dQ is computed per query tile walking the blocks, dK/dV per (block, kv head) walking the
query tiles (all query heads of the GQA group), so no atomics are needed.
With SPLIT (the default launch setting), the (query tile, block) pairs where every row
comes after the block, nearly all of them in a long sequence, run in a loop of their own:
such a block is closed by its landmark, its last key, so its masks are per key alone (no
causal or per-row block-id tests, no landmark flags to load). The forward first takes the
largest gate logit of those blocks (a product of the query tile with their landmark keys,
BLOCK_N at a time), so that loop accumulates against a fixed reference and never rescales its
running sums, which cuts the work per (tile, block) in the forward's main loop (docs/kernels.md
has the sm_90 instruction counts).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

from landmark_cli.kernels._triton import HAVE_TRITON, on_device, tl, triton

MAX_BLOCK_LEN = 128  # longest landmark block the Triton kernel handles (one tile)
LOG2E = 1.4426950408889634
# launch overrides (BLOCK_M, num_warps, num_stages, SPLIT) to sweep
TUNING: dict[str, dict[str, int | bool]] = {"fwd": {}, "bwd": {}}
NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- reference


def _block_ids(is_landmark: torch.Tensor) -> torch.Tensor:
    lm = is_landmark.to(torch.int32)
    return torch.cumsum(lm, dim=-1, dtype=torch.int32) - lm  # [Bt, T]


def _masked_softmax(s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to `mask`; all-masked rows give zeros."""
    s = s.masked_fill(~mask, NEG_INF)
    m = s.amax(-1, keepdim=True).detach().nan_to_num(0.0, neginf=0.0)
    e = torch.exp(s - m)
    return e / e.sum(-1, keepdim=True).clamp_min(1e-30)


def landmark_attention_reference(q, k, v, is_landmark, *, sm_scale=None, local=False, local_blocks=1):
    """Vectorised torch version (materialises [Tq, T] scores, float32); autograd-friendly.

    q may hold only the last Tq <= T positions of the sequence (a step of Tq new tokens
    whose keys k, v [.., T, D] start with earlier context); is_landmark [Bt, T] flags keys."""
    bt, hq, tq, d = q.shape
    t = k.shape[2]
    group = hq // k.shape[1]
    scale = d**-0.5 if sm_scale is None else sm_scale
    k = k.repeat_interleave(group, dim=1).float()
    v = v.repeat_interleave(group, dim=1).float()
    s = (q.float() @ k.transpose(-1, -2)) * scale  # [Bt, H, Tq, T]

    lm = is_landmark.bool()
    blk = _block_ids(lm)
    bi, bj = blk[:, None, t - tq:, None], blk[:, None, None, :]
    lmj = lm[:, None, None, :]
    causal = torch.ones(tq, t, dtype=torch.bool, device=q.device).tril(t - tq)
    own = (bi == bj) & causal & ~lmj
    earlier = (bj < bi) & (bj >= bi - local_blocks) if local else bj < bi
    gate = earlier & lmj
    inner = earlier & ~lmj

    p_outer = _masked_softmax(s, own | gate)
    # inner softmax per (query, key block): group the key axis by block id
    idx = bj.long().expand_as(s)  # a view: no [T, T] index tensor
    s_in = s.masked_fill(~inner, NEG_INF)
    m_blk = torch.full_like(s, NEG_INF).scatter_reduce(-1, idx, s_in.detach(), "amax")
    e = torch.exp(s_in - m_blk.nan_to_num(0.0, neginf=0.0).gather(-1, idx))
    den = torch.zeros_like(s).scatter_add(-1, idx, e).gather(-1, idx)
    pi = e / den.clamp_min(1e-30)
    g_blk = torch.zeros_like(s).scatter_add(-1, idx, p_outer * gate)  # landmark prob per block
    w = p_outer * own + pi * g_blk.gather(-1, idx)
    return (w @ v).to(q.dtype)


def regular_block(is_landmark: torch.Tensor) -> int | None:
    """B when every row has its landmarks exactly at positions p % B == B - 1 (the layout
    of training and of reading a document), else None."""
    t = is_landmark.shape[-1]
    first = is_landmark[0].nonzero()
    if first.numel() == 0:
        return None
    b = int(first[0]) + 1
    pattern = torch.arange(t, device=is_landmark.device) % b == b - 1
    return b if b > 1 and bool((is_landmark.bool() == pattern).all()) else None


def landmark_attention_blocks(q, k, v, block: int, *, sm_scale=None, allowed=None, local=False, local_blocks=1):
    """The reference semantics for the regular layout (a landmark at every position
    p % block == block - 1 of the T keys; q the last Tq <= T positions, like the general
    reference), fast on a CPU (training, reading). With the keys viewed as [blocks, block],
    each key block splits into its ordinary keys and its landmark, so no score needs a
    per-element mask: the inner softmax of a query over block c is a plain softmax over
    c's ordinary keys (computed for every c and weighted by a gate that is zero where c
    may not be read), and the outer softmax runs over the query's own block (a small
    [block, block] score tile per block of queries) and the landmarks alone. Autograd
    differentiates it with fused softmax backwards.

    allowed [Bt, Hq, Tq, blocks] bool (optional): the earlier blocks each query may read
    (its gate and its inner softmax); the others are left out as if they were not there,
    as when only retrieved blocks are in sight. A query's own block is always read.
    local: only the block before a query's own is read (with `allowed`: if allowed),
    scored per block of queries against that block alone; with local_blocks=0, not even
    that one (a plain causal softmax inside each block)."""
    if local and local_blocks not in (0, 1):
        raise ValueError(f"local_blocks must be 0 or 1 here, not {local_blocks}")
    bt, hq, tq, d = q.shape
    t = k.shape[2]
    group = hq // k.shape[1]
    scale = d**-0.5 if sm_scale is None else sm_scale
    nb = -(-t // block)
    b0, front = divmod(t - tq, block)  # first query block; queries padded to whole blocks
    nqb = nb - b0
    nq, pad = nqb * block, nb * block - t  # padded keys sit after every query: causally invisible
    dev = q.device
    k = F.pad(k.repeat_interleave(group, dim=1).float(), (0, 0, 0, pad)).view(bt, hq, nb, block, d)
    v = F.pad(v.repeat_interleave(group, dim=1).float(), (0, 0, 0, pad)).view(bt, hq, nb, block, d)
    qb = F.pad(q.float() * scale, (0, 0, front, pad)).view(bt, hq, nqb, block, d)
    k_in, v_in, k_lm = k[..., :-1, :], v[..., :-1, :], k[..., -1, :]  # ordinary keys, landmarks
    u = torch.arange(block, device=dev)
    own_ok = (u[None, :] <= u[:, None]) & (u[None, :] != block - 1)  # [query u, key u]
    s_own = (qb @ k[:, :, b0:].transpose(-1, -2)).masked_fill_(~own_ok, NEG_INF)
    if local and local_blocks == 0:
        out = s_own.softmax(-1) @ v[:, :, b0:]
        return out.view(bt, hq, nq, d)[:, :, front:front + tq].to(q.dtype)
    bq = (b0 + torch.arange(nq, device=dev) // block)[:, None]  # each query row's block
    if local:  # one earlier block per block of queries: the one before it
        k_in, v_in = (F.pad(x, (0, 0, 0, 0, 1, 0))[:, :, b0:nb] for x in (k_in, v_in))
        s_in = (qb @ k_in.transpose(-1, -2)).view(bt, hq, nq, 1, block - 1)
        s_gate = (qb * F.pad(k_lm, (0, 0, 1, 0))[:, :, b0:nb, None]).sum(-1).view(bt, hq, nq, 1)
        gate_ok = bq >= 1
    else:
        s_in = (qb.flatten(2, 3) @ k_in.flatten(2, 3).transpose(-1, -2)).view(bt, hq, nq, nb, block - 1)
        s_gate = qb.flatten(2, 3) @ k_lm.transpose(-1, -2)
        gate_ok = torch.arange(nb, device=dev) < bq
    if allowed is not None:
        ok = F.pad(allowed.bool(), (0, 0, front, pad))
        gate_ok = gate_ok & (ok.gather(-1, (bq - 1).clamp_min(0).expand(*ok.shape[:-1], 1)) if local else ok)
    p = torch.cat([s_own.view(bt, hq, nq, block), s_gate.masked_fill(~gate_ok, NEG_INF)], -1).softmax(-1)
    p_own, g = p[..., :block].view(bt, hq, nqb, block, block), p[..., block:]
    w_in = s_in.softmax(-1) * g[..., None]  # G_c * pi: zero for blocks not read
    out = p_own @ v[:, :, b0:]
    if local:
        out = out + w_in.view(bt, hq, nqb, block, block - 1) @ v_in
    else:
        out = out + (w_in.flatten(-2) @ v_in.flatten(2, 3)).view_as(out)
    return out.view(bt, hq, nq, d)[:, :, front:front + tq].to(q.dtype)


def landmark_attention_naive(q, k, v, is_landmark, *, sm_scale=None, local=False, local_blocks=1):
    """Per-query loops straight from the definition; only for testing the reference."""
    bt, hq, t, d = q.shape
    group = hq // k.shape[1]
    scale = d**-0.5 if sm_scale is None else sm_scale
    rows = []
    for b in range(bt):
        lm = [bool(x) for x in is_landmark[b]]
        blk = _block_ids(is_landmark[b : b + 1].bool())[0].tolist()
        for h in range(hq):
            qh, kh, vh = q[b, h].float(), k[b, h // group].float(), v[b, h // group].float()
            for i in range(t):
                own = [j for j in range(i + 1) if blk[j] == blk[i] and not lm[j]]
                reach = local_blocks if local else blk[i]
                gates = [j for j in range(i) if lm[j] and blk[i] - reach <= blk[j] < blk[i]]
                if not own and not gates:
                    rows.append(torch.zeros(d, device=q.device))
                    continue
                logits = torch.stack([qh[i] @ kh[j] * scale for j in own + gates])
                p = torch.softmax(logits, dim=0)
                o = sum((p[n] * vh[j] for n, j in enumerate(own)), torch.zeros(d, device=q.device))
                for n, jl in enumerate(gates):
                    members = [j for j in range(jl) if blk[j] == blk[jl] and not lm[j]]
                    if members:
                        pi = torch.softmax(torch.stack([qh[i] @ kh[j] * scale for j in members]), 0)
                        o = o + p[len(own) + n] * (pi[:, None] * vh[members]).sum(0)
                rows.append(o)
    return torch.stack(rows).view(bt, hq, t, d).to(q.dtype)


# ----------------------------------------------------------------------------- Triton


@triton.jit
def _load_kv(K, V, STARTS, b, c, T, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Block c's keys and values in one tile from its start ([BLOCK_N, D], masked past its end)."""
    start = tl.load(STARTS + b * (T + 1) + c)
    end = tl.load(STARTS + b * (T + 1) + c + 1)
    keys = start + tl.arange(0, BLOCK_N)
    key_ok = keys < end
    offs = keys[:, None] * D + tl.arange(0, D)[None, :]
    k = tl.load(K + offs, mask=key_ok[:, None], other=0.0)
    v = tl.load(V + offs, mask=key_ok[:, None], other=0.0)
    return start, end, keys, key_ok, k, v


@triton.jit
def _group_logits(s, rows, keys, key_ok, key_lm, bi, c):
    """Any rows against block c: the value-carrying logits x of each row (-inf elsewhere),
    its gate logit g, where the gate sits in s, and which rows come after the block
    (inner softmax and gate) rather than inside it (causal keys of the outer softmax)."""
    earlier = bi > c
    own = (bi == c)[:, None] & (keys[None, :] <= rows[:, None])
    ordinary = (key_ok & (key_lm == 0))[None, :]
    x = tl.where(ordinary & (earlier[:, None] | own), s, float("-inf"))
    is_gate = (key_lm != 0)[None, :] & earlier[:, None]
    g = tl.max(tl.where(is_gate, s, float("-inf")), 1)
    return x, g, is_gate, earlier


@triton.jit
def _earlier_logits(s, keys, end):
    """Rows all after block c (a closed block: its landmark is its last key): what
    _group_logits gives, with per-key masks only."""
    is_gate = (keys == end - 1)[None, :]
    x = tl.where((keys < end - 1)[None, :], s, float("-inf"))
    g = tl.max(tl.where(is_gate, s, float("-inf")), 1)
    return x, g, is_gate, tl.full([s.shape[0]], 1, tl.int1)


@triton.jit
def _fwd_step(m_i, l_i, acc, x, g, earlier, v, qk_scale, PREC: tl.constexpr):
    """Fold one block into the running outer softmax, from _group_logits' raw logits (the
    scale goes into the exp2's multiply-add)."""
    xm = tl.max(x, 1) * qk_scale
    g = g * qk_scale
    m_new = tl.maximum(m_i, tl.where(earlier, g, xm))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    ref = tl.where(earlier, tl.where(xm == float("-inf"), 0.0, xm), m_safe)
    e = tl.exp2(x * qk_scale - ref[:, None])
    rs = tl.sum(e, 1)
    gate = tl.exp2(g - m_safe)
    row_w = tl.where(earlier, gate / tl.where(rs > 0, rs, 1.0), 1.0)
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.where(earlier, gate, rs)
    p = (e * row_w[:, None]).to(v.dtype)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _probs_and_dscores(x, g, is_gate, earlier, dp, lse, delta, qk_scale):
    """Backward of one (query tile, block) from _group_logits' (or _earlier_logits') x, g,
    is_gate, earlier: the value weights P and the score gradients dS."""
    xm = tl.max(x, 1) * qk_scale
    ref = tl.where(earlier, tl.where(xm == float("-inf"), 0.0, xm), lse)
    e = tl.exp2(x * qk_scale - ref[:, None])  # own rows: final probs; earlier rows: unnormalised pi
    rs = tl.sum(e, 1)
    rs = tl.where(rs > 0, rs, 1.0)
    gate = tl.exp2(g * qk_scale - lse)
    e_blk = tl.sum(e * dp, 1) / rs  # E_ic = sum_j pi_ij dP_ij
    p = e * tl.where(earlier, gate / rs, 1.0)[:, None]
    ds = p * (dp - tl.where(earlier, e_blk, delta)[:, None])
    ds += tl.where(is_gate, (gate * (e_blk - delta))[:, None], 0.0)
    return p, ds


@triton.jit
def _fwd_kernel(Q, K, V, OUT, LSE, IS_LM, BLK, STARTS, T, H, HKV, qk_scale,
                D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
                SPLIT: tl.constexpr):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = pid_bh // H, pid_bh % H
    hk = h // (H // HKV)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    dd = tl.arange(0, D)
    q_off = (pid_bh * T + rows[:, None]) * D + dd[None, :]
    q = tl.load(Q + q_off, mask=row_ok[:, None], other=0.0)
    bi = tl.load(BLK + b * T + rows, mask=row_ok, other=-1)
    K += (b * HKV + hk) * T * D
    V += (b * HKV + hk) * T * D

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    c_lo = 0
    if SPLIT:  # the blocks before every row's own first, in a loop without per-row masks
        c_lo = tl.min(tl.where(row_ok, bi, T), 0)
        # their largest gate logit first (their landmark keys, BLOCK_N per tile): it is the
        # outer softmax's reference for their loop, which then never rescales acc and l_i
        for c0 in range(0, c_lo, BLOCK_N):
            cs = c0 + tl.arange(0, BLOCK_N)
            c_ok = cs < c_lo
            lm_pos = tl.load(STARTS + b * (T + 1) + cs + 1, mask=c_ok, other=1) - 1
            k_lm = tl.load(K + lm_pos[:, None] * D + dd[None, :], mask=c_ok[:, None], other=0.0)
            g_all = tl.dot(q, tl.trans(k_lm), input_precision=PREC)
            m_i = tl.maximum(m_i, tl.max(tl.where(c_ok[None, :], g_all, float("-inf")), 1) * qk_scale)
        for c in range(0, c_lo):
            start, end, keys, key_ok, k, v = _load_kv(K, V, STARTS, b, c, T, D, BLOCK_N)
            s = tl.dot(q, tl.trans(k), input_precision=PREC)
            x, g, is_gate, earlier = _earlier_logits(s, keys, end)
            xm = tl.max(x, 1) * qk_scale
            e = tl.exp2(x * qk_scale - tl.where(xm == float("-inf"), 0.0, xm)[:, None])
            rs = tl.sum(e, 1)
            gate = tl.exp2(g * qk_scale - m_i)
            l_i += gate
            p = (e * (gate / tl.where(rs > 0, rs, 1.0))[:, None]).to(v.dtype)
            acc = tl.dot(p, v, acc, input_precision=PREC)
    for c in range(c_lo, tl.max(bi, 0) + 1):
        start, end, keys, key_ok, k, v = _load_kv(K, V, STARTS, b, c, T, D, BLOCK_N)
        key_lm = tl.load(IS_LM + b * T + keys, mask=key_ok, other=0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        x, g, is_gate, earlier = _group_logits(s, rows, keys, key_ok, key_lm, bi, c)
        m_i, l_i, acc = _fwd_step(m_i, l_i, acc, x, g, earlier, v, qk_scale, PREC)

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    tl.store(OUT + q_off, (acc / l_safe[:, None]).to(OUT.dtype.element_ty), mask=row_ok[:, None])
    lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("inf"))  # log2 units
    tl.store(LSE + pid_bh * T + rows, lse, mask=row_ok)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, IS_LM, BLK, STARTS, T, H, HKV, qk_scale, sm_scale,
                   D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   PREC: tl.constexpr, SPLIT: tl.constexpr):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = pid_bh // H, pid_bh % H
    hk = h // (H // HKV)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    dd = tl.arange(0, D)
    q_off = (pid_bh * T + rows[:, None]) * D + dd[None, :]
    q = tl.load(Q + q_off, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + q_off, mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + pid_bh * T + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * T + rows, mask=row_ok, other=0.0)
    bi = tl.load(BLK + b * T + rows, mask=row_ok, other=-1)
    K += (b * HKV + hk) * T * D
    V += (b * HKV + hk) * T * D

    dq = tl.zeros([BLOCK_M, D], tl.float32)
    c_lo = 0
    if SPLIT:  # as in the forward
        c_lo = tl.min(tl.where(row_ok, bi, T), 0)
        for c in range(0, c_lo):
            start, end, keys, key_ok, k, v = _load_kv(K, V, STARTS, b, c, T, D, BLOCK_N)
            s = tl.dot(q, tl.trans(k), input_precision=PREC)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            p, ds = _probs_and_dscores(*_earlier_logits(s, keys, end), dp, lse, delta, qk_scale)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    for c in range(c_lo, tl.max(bi, 0) + 1):
        start, end, keys, key_ok, k, v = _load_kv(K, V, STARTS, b, c, T, D, BLOCK_N)
        key_lm = tl.load(IS_LM + b * T + keys, mask=key_ok, other=0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        p, ds = _probs_and_dscores(*_group_logits(s, rows, keys, key_ok, key_lm, bi, c), dp, lse,
                                   delta, qk_scale)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    tl.store(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _load_rows(Q, DO, LSE, DELTA, bh, m0, T, D: tl.constexpr, BLOCK_M: tl.constexpr):
    """A tile of query rows of head bh: q, dO, lse, delta."""
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    q_off = (bh * T + rows[:, None]) * D + tl.arange(0, D)[None, :]
    q = tl.load(Q + q_off, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + q_off, mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh * T + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh * T + rows, mask=row_ok, other=0.0)
    return rows, row_ok, q, do, lse, delta


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, IS_LM, BLK, STARTS, T, H, HKV, qk_scale,
                     sm_scale,
                     D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     PREC: tl.constexpr, SPLIT: tl.constexpr):
    c, pid_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # one block, one kv head
    b, hk = pid_bh // HKV, pid_bh % HKV
    group = H // HKV
    dd = tl.arange(0, D)
    kv_base = pid_bh * T * D
    start, end, keys, key_ok, k, v = _load_kv(K + kv_base, V + kv_base, STARTS, b, c, T, D,
                                              BLOCK_N)
    # with SPLIT, the query tiles from the block's end on read it as an earlier block: a loop
    # of their own without per-row masks (first, so that its state is dead in the other)
    m_split = tl.minimum(tl.cdiv(end, BLOCK_M) * BLOCK_M, T) if SPLIT else T
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    for gi in range(0, group):
        bh = b * H + hk * group + gi
        for m0 in range(m_split, T, BLOCK_M):
            rows, row_ok, q, do, lse, delta = _load_rows(Q, DO, LSE, DELTA, bh, m0, T, D, BLOCK_M)
            s = tl.dot(q, tl.trans(k), input_precision=PREC)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            p, ds = _probs_and_dscores(*_earlier_logits(s, keys, end), dp, lse, delta, qk_scale)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
        for m0 in range((start // BLOCK_M) * BLOCK_M, m_split, BLOCK_M):
            rows, row_ok, q, do, lse, delta = _load_rows(Q, DO, LSE, DELTA, bh, m0, T, D, BLOCK_M)
            bi = tl.load(BLK + b * T + rows, mask=row_ok, other=-1)
            # loaded here, not once per program: held across the other loop it costs spills
            key_lm = tl.load(IS_LM + b * T + keys, mask=key_ok, other=0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            p, ds = _probs_and_dscores(*_group_logits(s, rows, keys, key_ok, key_lm, bi, c), dp,
                                       lse, delta, qk_scale)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    kv_off = kv_base + keys[:, None] * D + dd[None, :]
    tl.store(DK + kv_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=key_ok[:, None])
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=key_ok[:, None])


# ----------------------------------------------------------------------------- host side


class _Blocks(NamedTuple):
    is_lm: torch.Tensor  # [Bt, T] int8
    blk: torch.Tensor  # [Bt, T] int32, block id of each position
    starts: torch.Tensor  # [Bt, T + 1] int32, start of block c; padded with T
    n_blocks: int  # most blocks in any batch row
    max_len: int  # longest block


def _blocks(is_landmark: torch.Tensor) -> _Blocks:
    bt, t = is_landmark.shape
    lm = is_landmark.bool()
    blk = _block_ids(lm)
    starts = torch.full((bt, t + 1), t, dtype=torch.int32, device=lm.device)
    is_start = torch.cat([torch.ones_like(lm[:, :1]), lm[:, :-1]], dim=1)
    b_idx, pos = is_start.nonzero(as_tuple=True)
    starts[b_idx, blk[b_idx, pos].long()] = pos.to(torch.int32)
    n_blocks, max_len = int(blk[:, -1].max()) + 1, int((starts[:, 1:] - starts[:, :-1]).max())
    return _Blocks(lm.to(torch.int8).contiguous(), blk.contiguous(), starts, n_blocks, max_len)


def _config(d: int, max_len: int, dtype: torch.dtype, which: str) -> dict:
    """Launch config: one key tile holds the longest block; fp32 tiles are halved to fit
    shared memory (227 KiB on an H100). TUNING[which] overrides, for sweeps."""
    block_n = max(16, triton.next_power_of_2(max_len))
    block_m = 32 if dtype == torch.float32 else 64
    warps = 4 if d <= 64 and block_n <= 64 else 8
    stages = 2
    if which == "fwd" and dtype != torch.float32 and block_n <= 64:
        warps, stages = 4, 3  # best forward setting of the H100 sweep (D=128, 64-token blocks, bf16)
    cfg = dict(D=d, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages,
               PREC="ieee" if dtype == torch.float32 else "tf32", SPLIT=True)
    return {**cfg, **TUNING[which]}


class _LandmarkAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, blocks: _Blocks, sm_scale: float):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        bt, h, t, d = q.shape
        hkv = k.shape[1]
        o = torch.empty_like(q)
        lse = torch.empty(bt * h, t, dtype=torch.float32, device=q.device)
        cfg = _config(d, blocks.max_len, q.dtype, "fwd")
        grid = (triton.cdiv(t, cfg["BLOCK_M"]), bt * h)
        _fwd_kernel[grid](q, k, v, o, lse, blocks.is_lm, blocks.blk, blocks.starts, t, h, hkv,
                          sm_scale * LOG2E, **cfg)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.blocks, ctx.sm_scale = blocks, sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        blocks, sm_scale = ctx.blocks, ctx.sm_scale
        bt, h, t, d = q.shape
        hkv = k.shape[1]
        do = do.contiguous()
        delta = (o.float() * do.float()).sum(-1).view(bt * h, t)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        cfg = _config(d, blocks.max_len, q.dtype, "bwd")
        tables = (blocks.is_lm, blocks.blk, blocks.starts, t, h, hkv, sm_scale * LOG2E, sm_scale)
        _bwd_dq_kernel[(triton.cdiv(t, cfg["BLOCK_M"]), bt * h)](
            q, k, v, do, dq, lse, delta, *tables, **cfg)
        _bwd_dkdv_kernel[(blocks.n_blocks, bt * hkv)](
            q, k, v, do, dk, dv, lse, delta, *tables, **cfg)
        return dq, dk, dv, None, None


def landmark_attention(q, k, v, is_landmark, *, sm_scale=None, impl="auto", local=False, local_blocks=1):
    """Grouped-softmax causal attention (see the module docstring for the exact rule).

    q: [Bt, Hq, T, D]; k, v: [Bt, Hkv, T, D] (RoPE applied; Hq a multiple of Hkv);
    is_landmark: [Bt, T] bool. Returns [Bt, Hq, T, D] in q.dtype, differentiable.
    impl: "auto" (Triton on CUDA when available, else torch), "torch", "triton".
    local: each query reads only its own block and the `local_blocks` (1 or 0) before it
    (torch only: a local layer's few keys per query need no fused kernel).
    """
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', not {impl!r}")
    if local and impl == "triton":
        raise ValueError("landmark_attention kernel: local=True has only the torch implementation")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads is not a multiple of {k.shape[1]} kv heads")
    scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    if impl == "torch" or local or (impl == "auto" and not (HAVE_TRITON and q.is_cuda)):
        block = regular_block(is_landmark)
        if block is not None:
            return landmark_attention_blocks(q, k, v, block, sm_scale=scale, local=local, local_blocks=local_blocks)
        return landmark_attention_reference(q, k, v, is_landmark, sm_scale=scale, local=local,
                                            local_blocks=local_blocks)
    if not HAVE_TRITON:
        raise RuntimeError("impl='triton' needs the triton package (pip install triton)")
    blocks = _blocks(is_landmark.to(q.device))
    d = q.shape[-1]
    problem = None
    if not q.dtype == k.dtype == v.dtype:
        problem = f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
    elif d < 16 or d & (d - 1):
        problem = f"head dim {d} is not a power of two >= 16"
    elif blocks.max_len > MAX_BLOCK_LEN:
        problem = f"a landmark block of {blocks.max_len} tokens is longer than {MAX_BLOCK_LEN}"
    if problem and impl == "triton":
        raise ValueError(f"landmark_attention kernel: {problem}")
    if problem:
        warnings.warn(f"landmark_attention kernel: {problem}; using the torch reference",
                      stacklevel=2)
        return landmark_attention_reference(q, k, v, is_landmark, sm_scale=scale)
    with on_device(q.device):
        return _LandmarkAttention.apply(q, k, v, blocks, scale)
