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
from landmark_cli.retrieval.attention import DenseKV
from landmark_cli.retrieval.landmarks import block_scores, top_blocks
from landmark_cli.retrieval.selection import Candidates
from landmark_cli.retrieval.session import AnswerSession, Session
from landmark_cli.storage import store


class TrainedCorpusSession(AnswerSession):
    """Attention state for a question over several store entries (see the module docstring)."""

    def __init__(self, engine, entries: list[store.Entry], capacity: int):
        self.engine, self.entries = engine, entries
        self.reading, self.model, self.landmarks = engine.reading, engine.model, engine.landmarks
        s, c, m = self.reading, self.model.cfg, self.model
        B = s.block
        self.stores = [e.tensor() for e in entries]  # [L, 2, Hkv, nb, B, D] memory maps
        # every block from the first document's start and the others' first document text
        self.candidates = Candidates.of(entries, B, 0)
        cand = self.candidates
        # closing landmarks [L, 2, Hkv, D] of the partial blocks, by candidate number
        self.closing = {i: Session(engine, entries[int(cand.doc[i])], capacity=1).close()
                        for i in torch.nonzero(cand.valid < B).flatten().tolist()}
        reps = []
        for d, sl, b0 in cand.ranges():
            n_full = int((cand.valid[sl] == B).sum())
            full = torch.from_numpy(entries[d].reps[:, :, b0:b0 + n_full, 0])  # [L, Hkv, n, D]
            reps.append(full.to(m.device).float())
            reps += [self.closing[i][:, 0, :, None].float() for i in range(sl.start + n_full, sl.stop)]
        self.reps = torch.cat(reps, 2)[:, :, :, None]  # [L, Hkv, N, 1, D] (N >= 1: the first document's start)
        self.k = min(s.top_k_or_default + s.window_tokens // B, len(cand))
        self.top = self.k * B  # the question's first position: every head's blocks end here
        capacity = self.landmarks.stream_length(capacity)  # room for the landmarks among new tokens
        self.dense = DenseKV(c.n_layers, c.n_kv_heads, capacity, c.head_dim, m.dtype, m.device)
        self.dense_flags = torch.zeros(capacity, dtype=torch.bool, device=m.device)
        self.layer_scores: list[torch.Tensor] = []  # per retrieving layer [Hkv, N], the first step's
        self.retrieved_per_step = self.top

    def _blocks(self, layer: int, head: int, chosen: list[int]):
        """The chosen candidates' pre-RoPE keys, values [n, D] and landmark flags [n], end to end."""
        B, m, cand = self.reading.block, self.model, self.candidates
        empty = torch.zeros(0, m.cfg.head_dim, dtype=m.dtype, device=m.device)  # k may be 0 (--top-k 0, no window)
        ks, vs, flags = [empty], [empty], [torch.zeros(0, dtype=torch.bool, device=m.device)]
        for i in chosen:
            d, b, valid = int(cand.doc[i]), int(cand.block[i]), int(cand.valid[i])
            self.entries[d].verify(layer, slice(None), b)
            kv = self.stores[d][layer, :, head, b, :valid].to(m.device, m.dtype)  # [2, valid, D]
            if valid < B:  # a partial block and its closing landmark
                kv = torch.cat([kv, self.closing[i][layer, :, head, None].to(m.dtype)], 1)
            ks.append(kv[0])
            vs.append(kv[1])
            flags.append(torch.arange(kv.shape[1], device=m.device) == kv.shape[1] - 1)
        return torch.cat(ks), torch.cat(vs), torch.cat(flags)

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, question: slice | None = None) -> torch.Tensor:
        """(`question` is unused: trained landmarks are scored by every query token, as in the paper.)"""
        c, m, spec = self.model.cfg, self.model, self.engine.spec
        start = self.dense.length
        ids = torch.tensor(self.landmarks.stream(ids.tolist(), None, start)[0])
        end = start + ids.shape[0]
        self.dense_flags[start:end] = (ids == spec.mem_id).to(m.device)
        cos, sin = m.rope.at(torch.arange(self.top + start, self.top + end))
        g = c.n_heads // c.n_kv_heads

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            keys, values = self.dense.write(layer, start, apply_rope(k, cos, sin), v)
            qr = apply_rope(q, cos, sin)
            local = self.landmarks.local(layer)  # reads its own block and local_blocks before it only
            scores = block_scores(q, self.reps[layer], "landmark", c.n_kv_heads)
            if start == 0 and not local:
                self.layer_scores.append(scores)
            chosen = top_blocks(scores, 0 if local else self.k)
            out = []
            for h in range(c.n_kv_heads):
                rk, rv, rflags = self._blocks(layer, h, chosen[h].tolist())
                rc, rs = m.rope.at(torch.arange(self.top - rk.shape[0], self.top))
                head_keys = torch.cat([apply_rope(rk, rc, rs), keys[h]])
                head_values = torch.cat([rv, values[h]])
                flags = torch.cat([rflags, self.dense_flags[:end]])
                out.append(landmark_attention(qr[None, h * g:(h + 1) * g], head_keys[None, None],
                                              head_values[None, None], flags[None], impl="torch", local=local,
                                              local_blocks=spec.local_blocks)[0])
            return torch.cat(out)

        x = m.run_layers(m.embed(ids), attend)
        if start == 0 and self.layer_scores:
            self.votes = torch.stack(self.layer_scores).mean((0, 1)).cpu()
        self.dense.length = end
        return self.landmarks.mask_logits(self.engine.logits(x[-1]))
