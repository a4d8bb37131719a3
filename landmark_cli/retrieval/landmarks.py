"""Training-free landmarks: block representatives, block scoring, top-k selection.

A block's representative stands in for its keys (all pre-RoPE, so a score does not
depend on where the block sits in the document):

- "mean":   the mean key of the block; score = q . mean.
- "minmax": per-channel min and max of the keys (Quest); score = sum_d max(q_d min_d,
  q_d max_d), an upper bound of q . k over the block.
- "landmark": trained landmark models only: the key of the block's last token, its
  `<landmark>`, which the model learned to make stand for the block; score = q . key.

Scores of one query chunk are turned into one block ranking per KV head: a softmax over
the candidate blocks for every query (and every query head of the GQA group), then the
mean over queries. Normalising per query keeps one loud query from deciding alone.
Trained landmarks take the maximum over queries instead, as the reference implementation
does: a landmark's score is the attention the model itself would give it.
"""

from __future__ import annotations

import numpy as np
import torch

N_REPS = {"mean": 1, "minmax": 2, "landmark": 1}


def block_reps(k: torch.Tensor, kind: str, valid: int | None = None) -> torch.Tensor:
    """k [Hkv, nb, B, D] pre-RoPE keys -> representatives [Hkv, nb, R, D] (float32).

    `valid` = number of real tokens in the last block (the rest is padding)."""
    k = k.float()
    if valid is not None and valid < k.shape[2]:
        last = block_reps(k[:, -1:, :valid], kind)
        return torch.cat([block_reps(k[:, :-1], kind), last], 1) if k.shape[1] > 1 else last
    if kind == "mean":
        return k.mean(2, keepdim=True)
    if kind == "minmax":
        return torch.stack([k.amin(2), k.amax(2)], 2)
    if kind == "landmark":
        return k[:, :, -1:]
    raise ValueError(f"unknown representative {kind!r}; choose from {sorted(N_REPS)}")


def block_logits(q: torch.Tensor, reps: torch.Tensor, kind: str) -> torch.Tensor:
    """q [Hkv, M, D] (queries grouped by KV head), reps [Hkv, N, R, D] -> raw scores [Hkv, M, N]."""
    if kind in ("mean", "landmark"):
        return q @ reps[:, :, 0].transpose(1, 2)
    if kind == "minmax":
        lo, hi = reps[:, :, 0], reps[:, :, 1]  # [Hkv, N, D]
        qe = q[:, :, None, :]  # [Hkv, M, 1, D]
        return torch.maximum(qe * lo[:, None], qe * hi[:, None]).sum(-1)
    raise ValueError(f"unknown representative {kind!r}")


def group_queries(q: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """q [H, T, D] -> [Hkv, G*T, D]: the queries of each KV head's group of query heads."""
    H, T, D = q.shape
    return q.reshape(n_kv_heads, (H // n_kv_heads) * T, D)


def block_scores(q: torch.Tensor, reps: torch.Tensor, kind: str, n_kv_heads: int) -> torch.Tensor:
    """Pre-RoPE queries q [H, T, D] vs reps [Hkv, N, R, D] -> block relevance [Hkv, N] (sums to 1)."""
    if reps.shape[1] == 0:
        return reps.new_zeros(n_kv_heads, 0)
    qg = group_queries(q.float(), n_kv_heads)
    p = (block_logits(qg, reps.float(), kind) * q.shape[-1] ** -0.5).softmax(-1)
    return p.amax(1) if kind == "landmark" else p.mean(1)


def top_blocks(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [Hkv, N] -> indices [Hkv, min(k, N)] of the best blocks, in document order."""
    k = min(k, scores.shape[1])
    if k == scores.shape[1]:
        return torch.arange(k, device=scores.device).expand(scores.shape[0], k).contiguous()
    return scores.topk(k, dim=-1).indices.sort(-1).values


def exact_block_logits(q: torch.Tensor, keys: torch.Tensor, n_kv_heads: int, valid_last: int | None = None,
                       chunk: int = 1024) -> torch.Tensor:
    """Block logits from the blocks' own keys: logit(query, block) = max over its keys of q . k.

    q [H, T, D] pre-RoPE queries; keys [Hkv, N, B, D] pre-RoPE keys (e.g. a memory-mapped
    layer of the store) -> [Hkv, G*T, N]; `valid_last` = real tokens in the last block (the
    rest is padding, never a match). Reads every key of the layer, so it is used only at a
    few layers, once per question."""
    qg = group_queries(q.float(), n_kv_heads) * q.shape[-1] ** -0.5  # [Hkv, M, D]
    n = keys.shape[1]
    if n == 0:
        return qg.new_zeros(n_kv_heads, qg.shape[1], 0)
    out = torch.cat([torch.einsum("hmd,hnbd->hmnb", qg, keys[:, i:i + chunk].to(qg.device).float()).amax(-1)
                     for i in range(0, n, chunk)], -1)
    if valid_last is not None and valid_last < keys.shape[2]:
        out[..., -1] = torch.einsum("hmd,hbd->hmb", qg, keys[:, -1, :valid_last].to(qg.device).float()).amax(-1)
    return out


def relevance(logits: torch.Tensor) -> torch.Tensor:
    """[Hkv, M, N] logits -> [Hkv, N]: softmax over blocks per query, mean over queries."""
    return logits.softmax(-1).mean(1)


def top_runs(votes: torch.Tensor, k: int, follow: int, group: torch.Tensor | None = None,
             lead: int = 0, best_last: bool = False) -> torch.Tensor:
    """k block indices from scores votes [N]: the best blocks, each with up to `lead` blocks
    before it and `follow` blocks after it (the text around a matching sentence often holds
    the answer), in document order. group [N]: which document each block belongs to; a run
    never crosses into another one.

    best_last: order the passages instead by their best score, the best one last (nearest
    the question); a passage is a maximal run of adjacent chosen blocks and keeps its own
    order, so choosing every block still gives document order."""
    n = votes.shape[0]
    k = min(k, n)
    chosen: list[int] = []
    for b in votes.argsort(descending=True).tolist():
        for j in [b] + list(range(b - 1, b - lead - 1, -1)) + list(range(b + 1, b + follow + 1)):
            if not 0 <= j < n or (group is not None and group[j] != group[b]):
                continue
            if j not in chosen and len(chosen) < k:
                chosen.append(j)
        if len(chosen) >= k:
            break
    chosen.sort()
    if best_last:
        runs: list[list[int]] = []
        for j in chosen:
            if runs and j == runs[-1][-1] + 1 and (group is None or group[j] == group[runs[-1][-1]]):
                runs[-1].append(j)
            else:
                runs.append([j])
        runs.sort(key=lambda r: float(votes[r].max()))
        chosen = [j for r in runs for j in r]
    return torch.tensor(chosen, dtype=torch.long)


def insert_landmarks(ids: list[int], spans, mem_freq: int, mem_id: int, pos: int = 0):
    """Trained landmarks: a `mem_id` token after every `mem_freq` tokens of a stream, so
    that stream position p holds a landmark exactly when p % (mem_freq + 1) == mem_freq.
    pos: the stream position of ids[0] (to continue a stream). spans [n, 2] (or None) get
    a (-1, -1) row per landmark. Returns (ids, spans)."""
    B = mem_freq + 1
    out, keep = [], []
    for i, t in enumerate(ids):
        out.append(t)
        keep.append(i)
        if (pos + len(out)) % B == mem_freq:
            out.append(mem_id)
            keep.append(-1)
    if spans is not None:
        idx = np.asarray(keep)
        spans = np.where(idx[:, None] >= 0, np.asarray(spans)[np.maximum(idx, 0)], -1)
    return out, spans


def is_landmark_position(positions: torch.Tensor, block: int) -> torch.Tensor:
    """Trained landmarks: which stream positions hold a <landmark> (blocks of `block` positions)."""
    return positions % block == block - 1
