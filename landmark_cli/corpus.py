"""Answering over many cached documents at once: one landmark selection across all of them.

Every document of an indexed folder has its own store entry, read with the same prompt
prefix. A question attends to

    [sink: the first document's first tokens] [retrieved blocks, from any document] [question, answer]

The blocks are chosen once per question, like the single-document shared selection
(engine.Session): the question is run up to the last layer of the band with per-layer
retrieval over the complete blocks of every document; at the band layers its tokens
score every block of every document by its best-matching key; the best runs of blocks
win. The chosen blocks' real tokens (the padding of a document's last block dropped)
then sit in a dense buffer at contiguous positions, and the question and the answer
attend to that buffer only.

What is read, chosen by measurement on the example library (examples/library.py, 11
documents, 5 questions with the default model): 2 x top_k blocks (16), as runs of
LEAD blocks before and FOLLOW after each best block (256 tokens of coherent text around
a match), documents ordered by their best block, the best one last, nearest the
question. That answered 3/5; 8 blocks as runs of 2: 1/5 in folder order, 3/5 best-last;
40 blocks (the single-document budget with its window): 1/5 and 2/5; runs of 3 (one
block before): 2/5. The small model reads fragments from many documents poorly: fewer,
longer passages help it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from landmark_cli.kernels.retrieval_attention import retrieval_attention
from landmark_cli.kernels.rope import apply_rope

from . import store
from .engine import as_torch
from .landmarks import block_scores, exact_block_logits, relevance, top_blocks, top_runs


LEAD, FOLLOW = 3, 4  # blocks taken before and after each best block


@dataclass(frozen=True)
class Candidates:
    """The retrievable blocks of a corpus, numbered 0..N-1 in corpus order."""

    doc: torch.Tensor  # [N] which entry
    block: torch.Tensor  # [N] block within that entry
    valid: torch.Tensor  # [N] real tokens in the block (a document's last block may be partial)

    @classmethod
    def of(cls, entries: list[store.Entry], block: int, sink_end: int) -> "Candidates":
        docs, blocks, valid = [], [], []
        for d, e in enumerate(entries):
            nb = e.kv.shape[3]
            # the first document's start is the sink; the others' start at their first document text
            first = sink_end // block if d == 0 else next((b for b in range(nb) if e.spans[b, 0] >= 0), nb)
            for b in range(first, nb):
                docs.append(d)
                blocks.append(b)
                valid.append(min(block, e.n_tokens - b * block))
        return cls(torch.tensor(docs, dtype=torch.long), torch.tensor(blocks, dtype=torch.long),
                   torch.tensor(valid, dtype=torch.long))

    def __len__(self) -> int:
        return self.doc.shape[0]

    def ranges(self):
        """(entry, slice of candidate numbers, first block in the entry) per entry."""
        start = 0
        for d in self.doc.unique_consecutive().tolist():
            n = int((self.doc == d).sum())
            yield d, slice(start, start + n), int(self.block[start])
            start += n


class CorpusSession:
    """Attention state for a question over several store entries (see the module docstring)."""

    def __init__(self, engine, entries: list[store.Entry], capacity: int, blocks: int | None = None):
        """blocks: how many to retrieve (default 2 x top_k)."""
        if engine.spec is not None:
            raise ValueError("trained landmark models answer a folder through corpus_trained.TrainedCorpusSession")
        self.e, self.entries = engine, entries
        s, c, m = engine.s, engine.cfg, engine.m
        B = s.block
        self.kv = [as_torch(e.kv) for e in entries]  # [L, 2, Hkv, nb, B, D] memory maps
        self.sink_end = min(s.sink_tokens, entries[0].n_tokens // B * B)
        self.cand = Candidates.of(entries, B, self.sink_end)
        self.complete = torch.nonzero(self.cand.valid == B).flatten()
        self.k = min(2 * s.top_k if blocks is None else blocks, len(self.cand))
        self.k1 = min(self.k, self.complete.shape[0])  # per-layer selection while choosing
        self.reps = torch.cat([torch.from_numpy(entries[d].reps[:, :, b0:b0 + sl.stop - sl.start])
                               for d, sl, b0 in self.cand.ranges()], 2) if len(self.cand) else None
        lo, hi = (round(f * c.n_layers) for f in s.band)
        self.band = range(lo, max(hi, lo + 1))
        self.ret_cos, self.ret_sin = m.rope.tables(self.sink_end + self.k1 * B)
        self.dense = torch.empty(c.n_layers, 2, c.n_kv_heads, self.sink_end + self.k * B + capacity, c.head_dim,
                                 dtype=m.dtype)
        cos, sin = m.rope.at(torch.arange(self.sink_end))
        for layer in range(c.n_layers):
            d = self.kv[0][layer].flatten(2, 3)[:, :, :self.sink_end].to(m.dtype)
            self.dense[layer, 0, :, :self.sink_end] = apply_rope(d[0], cos, sin)
            self.dense[layer, 1, :, :self.sink_end] = d[1]
        self.n_dense = self.sink_end
        self.chosen: torch.Tensor | None = None  # candidate numbers, once chosen
        self.question_scores: torch.Tensor | None = None  # [N] relevance of every candidate
        self.retrieved_per_step = self.sink_end

    # ---- choosing ----------------------------------------------------------------------
    def _gather(self, layer: int, sel: torch.Tensor) -> torch.Tensor:
        """Candidate blocks sel [Hkv, K] of one layer -> [2, Hkv, K, B, D] (a small copy)."""
        out = []
        for h in range(sel.shape[0]):
            out.append(torch.stack([self.kv[int(self.cand.doc[i])][layer, :, h, int(self.cand.block[i])]
                                    for i in sel[h].tolist()], 1))
        return torch.stack(out, 1)

    def _band_logits(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Exact block logits [Hkv, queries, N] of the question against every candidate block."""
        parts = []
        for d, sl, b0 in self.cand.ranges():
            keys = self.kv[d][layer, 0, :, b0:b0 + sl.stop - sl.start]
            parts.append(exact_block_logits(q, keys, self.e.cfg.n_kv_heads, int(self.cand.valid[sl.stop - 1])))
        return torch.cat(parts, -1)

    def _choose(self, x: torch.Tensor, focus: slice) -> None:
        s, c, m = self.e.s, self.e.cfg, self.e.m
        B, T, a = s.block, x.shape[0], self.sink_end
        cos, sin = m.rope.at(torch.arange(T) + self.sink_end + self.k1 * B)
        idx = torch.arange(self.k1).expand(c.n_kv_heads, -1)
        logits = []
        for layer in range(self.band.stop):
            q, k, v = m.qkv(layer, x)
            self.dense[layer, 0, :, a:a + T] = apply_rope(k, cos, sin)
            self.dense[layer, 1, :, a:a + T] = v
            if layer in self.band:
                logits.append(self._band_logits(layer, q[:, focus]))
            scores = block_scores(q, self.reps[layer][:, self.complete], s.rep, c.n_kv_heads)
            sel = self.complete[top_blocks(scores, self.k1)]
            kv = self._gather(layer, sel)
            att = retrieval_attention(apply_rope(q, cos, sin), self.dense[layer, 0, :, :a + T],
                                      self.dense[layer, 1, :, :a + T], kv[0], kv[1], idx,
                                      self.ret_cos, self.ret_sin, self.sink_end)
            x = m.finish(layer, x, att)
        votes = torch.stack([relevance(lg) for lg in logits]).mean((0, 1))
        self.question_scores = votes
        chosen = top_runs(votes, self.k, FOLLOW, group=self.cand.doc, lead=LEAD)
        # documents in the order of their best block, the best one last (nearest the question)
        doc = self.cand.doc[chosen]
        best = {int(d): float(votes[chosen][doc == d].max()) for d in doc.unique()}
        self.chosen = chosen[sorted(range(len(chosen)), key=lambda i: (best[int(doc[i])], int(chosen[i])))]
        self._place(self.chosen)

    def _place(self, chosen: torch.Tensor) -> None:
        """Copy the chosen blocks' real tokens into the dense buffer after the sink."""
        c, m = self.e.cfg, self.e.m
        pieces = [(int(self.cand.doc[i]), int(self.cand.block[i]), int(self.cand.valid[i])) for i in chosen.tolist()]
        n = sum(v for _, _, v in pieces)
        a = self.sink_end
        cos, sin = m.rope.at(torch.arange(a, a + n))
        for layer in range(c.n_layers):
            kv = torch.cat([self.kv[d][layer, :, :, b, :v] for d, b, v in pieces], 2).to(m.dtype)
            self.dense[layer, 0, :, a:a + n] = apply_rope(kv[0], cos, sin)
            self.dense[layer, 1, :, a:a + n] = kv[1]
        self.n_dense = a + n
        self.retrieved_per_step = a + n

    # ---- stepping ----------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, ids: torch.Tensor, focus: slice | None = None) -> torch.Tensor:
        """Feed tokens ids [T]; return the logits after the last one [vocab]."""
        c, m = self.e.cfg, self.e.m
        x = m.embed(ids)
        if self.chosen is None:
            if len(self.cand):
                self._choose(x, focus or slice(None))
            else:
                self.chosen = torch.zeros(0, dtype=torch.long)
        T, a = ids.shape[0], self.n_dense
        b = a + T
        cos, sin = m.rope.at(torch.arange(a, b))
        none = torch.zeros(c.n_kv_heads, 0, dtype=torch.long)
        empty = self.dense.new_zeros(c.n_kv_heads, 0, self.e.s.block, c.head_dim)
        for layer in range(c.n_layers):
            q, k, v = m.qkv(layer, x)
            self.dense[layer, 0, :, a:b] = apply_rope(k, cos, sin)
            self.dense[layer, 1, :, a:b] = v
            att = retrieval_attention(apply_rope(q, cos, sin), self.dense[layer, 0, :, :b],
                                      self.dense[layer, 1, :, :b], empty, empty, none, cos, sin, 0)
            x = m.finish(layer, x, att)
        self.n_dense = b
        return m.logits(x[-1:])[0]

    def sources(self, n: int) -> list[tuple[int, int, float]]:
        """(entry, block, score) of the blocks the question scored highest, best first."""
        if self.question_scores is None or self.question_scores.shape[0] == 0:
            return []
        best = self.question_scores.topk(min(n, self.question_scores.shape[0]))
        return [(int(self.cand.doc[i]), int(self.cand.block[i]), float(v)) for v, i in zip(best.values, best.indices)]

