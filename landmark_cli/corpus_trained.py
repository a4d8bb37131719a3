"""Answering over many cached documents with a trained landmark model (the paper's method).

At every step (the question, then each generated token) every layer and KV head picks
its top-k blocks among the blocks of *all* the documents, by the attention its queries
give the blocks' `<landmark>` keys, exactly as the single-document session does within
one document, and attends to

    [its k retrieved blocks, end to end] [question, answer: a fresh stream with a
                                          <landmark> after every mem_freq tokens]

with the grouped softmax (each retrieved block's landmark gates its tokens). The blocks
of one head sit right before the question, so the relative positions are those of one
contiguous stream, as in training; k is the single-document budget (top_k plus the
window's blocks: a folder question has no local window of its own).

A document's stream usually ends inside a block, after its last landmark. Such a
partial block is closed here: the `<landmark>` token is run once after the cached
stream (Session.close), as if the block ended there, and the partial block with that
landmark is a candidate like any complete one. The store is not changed, so `ask FILE`
and `index` keep sharing its entries.
"""

from __future__ import annotations

import torch

from landmark_cli.kernels.landmark_attention import landmark_attention
from landmark_cli.kernels.rope import apply_rope

from . import store
from .corpus import Candidates
from .engine import Session, as_torch
from .landmarks import block_scores, insert_landmarks, top_blocks


class TrainedCorpusSession:
    """Attention state for a question over several store entries (see the module docstring)."""

    def __init__(self, engine, entries: list[store.Entry], capacity: int):
        self.e, self.entries = engine, entries
        s, c, m, spec = engine.s, engine.cfg, engine.m, engine.spec
        B = s.block
        self.kv = [as_torch(e.kv) for e in entries]  # [L, 2, Hkv, nb, B, D] memory maps
        # every block from the first document's start and the others' first document text
        self.cand = Candidates.of(entries, B, 0)
        # closing landmarks [L, 2, Hkv, D] of the partial blocks, by candidate number
        self.closing = {i: Session(engine, entries[int(self.cand.doc[i])], capacity=1).close()
                        for i in torch.nonzero(self.cand.valid < B).flatten().tolist()}
        reps = []
        for d, sl, b0 in self.cand.ranges():
            n_full = int((self.cand.valid[sl] == B).sum())
            reps.append(torch.from_numpy(entries[d].reps[:, :, b0:b0 + n_full, 0]).float())  # [L, Hkv, n, D]
            reps += [self.closing[i][:, 0, :, None].float() for i in range(sl.start + n_full, sl.stop)]
        self.reps = torch.cat(reps, 2)[:, :, :, None]  # [L, Hkv, N, 1, D] (N >= 1: the first document's start)
        self.k = min(s.top_k + s.window_tokens // B, len(self.cand))
        self.top = self.k * B  # the question's first position: every head's blocks end here
        capacity += capacity // spec.mem_freq + 2  # room for the landmarks inserted among new tokens
        self.dense = torch.empty(c.n_layers, 2, c.n_kv_heads, capacity, c.head_dim, dtype=m.dtype)
        self.dense_lm = torch.zeros(capacity, dtype=torch.bool)
        self.n_dense = 0
        self.question_scores: list[torch.Tensor] = []  # per layer [Hkv, N], first step
        self.retrieved_per_step = self.top

    def _blocks(self, layer: int, head: int, chosen: list[int]):
        """The chosen candidates' pre-RoPE keys, values [n, D] and landmark flags [n], end to end."""
        B, m = self.e.s.block, self.e.m
        empty = torch.zeros(0, self.e.cfg.head_dim, dtype=m.dtype)  # k may be 0 (--top-k 0, no window)
        ks, vs, lms = [empty], [empty], [torch.zeros(0, dtype=torch.bool)]
        for i in chosen:
            d, b, valid = int(self.cand.doc[i]), int(self.cand.block[i]), int(self.cand.valid[i])
            kv = self.kv[d][layer, :, head, b, :valid].to(m.dtype)  # [2, valid, D]
            if valid < B:  # a partial block and its closing landmark
                kv = torch.cat([kv, self.closing[i][layer, :, head, None].to(m.dtype)], 1)
            ks.append(kv[0])
            vs.append(kv[1])
            lms.append(torch.arange(kv.shape[1]) == kv.shape[1] - 1)
        return torch.cat(ks), torch.cat(vs), torch.cat(lms)

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, focus: slice | None = None) -> torch.Tensor:
        """Feed tokens ids [T]; return the logits after the last one [vocab]. (`focus` is
        unused: trained landmarks are scored by every query token, as in the paper.)"""
        c, m, spec = self.e.cfg, self.e.m, self.e.spec
        ids = torch.tensor(insert_landmarks(ids.tolist(), None, spec.mem_freq, spec.mem_id, self.n_dense)[0])
        T, a = ids.shape[0], self.n_dense
        b = a + T
        self.dense_lm[a:b] = ids == spec.mem_id
        cos, sin = m.rope.at(torch.arange(self.top + a, self.top + b))
        g = c.n_heads // c.n_kv_heads
        x = m.embed(ids)
        for layer in range(c.n_layers):
            q, k, v = m.qkv(layer, x)
            self.dense[layer, 0, :, a:b] = apply_rope(k, cos, sin)
            self.dense[layer, 1, :, a:b] = v
            qr = apply_rope(q, cos, sin)
            out = []
            local = layer < spec.local_layers  # reads its own block and local_blocks before it only
            scores = block_scores(q, self.reps[layer], "landmark", c.n_kv_heads)
            if a == 0 and not local:
                self.question_scores.append(scores)
            chosen = top_blocks(scores, 0 if local else self.k)
            for h in range(c.n_kv_heads):
                rk, rv, rlm = self._blocks(layer, h, chosen[h].tolist())
                rc, rs = m.rope.at(torch.arange(self.top - rk.shape[0], self.top))
                keys = torch.cat([apply_rope(rk, rc, rs), self.dense[layer, 0, h, :b]])
                vals = torch.cat([rv, self.dense[layer, 1, h, :b]])
                lm = torch.cat([rlm, self.dense_lm[:b]])
                out.append(landmark_attention(qr[None, h * g:(h + 1) * g], keys[None, None], vals[None, None],
                                              lm[None], impl="torch", local=local,
                                              local_blocks=spec.local_blocks)[0])
            x = m.finish(layer, x, torch.cat(out))
        self.n_dense = b
        logits = m.logits(x[-1:])[0]
        logits[spec.mem_id] = float("-inf")  # the model never writes a landmark
        return logits

    def sources(self, n: int) -> list[tuple[int, int, float]]:
        """(entry, block, score) of the blocks the question's landmark attention scored
        highest (mean over layers and KV heads), best first."""
        if not self.question_scores:
            return []
        votes = torch.stack(self.question_scores).mean((0, 1))
        best = votes.topk(min(n, votes.shape[0]))
        return [(int(self.cand.doc[i]), int(self.cand.block[i]), float(v)) for v, i in zip(best.values, best.indices)]
