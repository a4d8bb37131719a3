"""Answering over many cached documents at once: one landmark selection across all of them.

Every document of an indexed folder has its own store entry, read with the same prompt
prefix. A question attends to

    [sink: the first document's first tokens] [retrieved blocks, from any document] [question, answer]

The blocks are chosen once per question, like the single-document shared selection
(session.Session): the question is run up to the last scoring layer with per-layer
retrieval over the complete blocks of every document; at the scoring layers its tokens
score every block of every document by its best-matching key (selection.BandScores);
the best runs of blocks win. The chosen blocks' real tokens (the padding of a
document's last block dropped) then sit in a dense buffer at contiguous positions, and
the question and the answer attend to that buffer only: their cached keys and values
(the default), or read again as text together with the question (`passages="text"`).

What is read: the answer's top_k blocks (by default twice the reading's), as runs of
LEAD blocks before and FOLLOW after each best block (256 tokens of coherent text around
a match), documents ordered by their
best block, the best one last, nearest the question. A small model reads a few long
passages better than many fragments from many documents; the shape and the order were
chosen by measurement on the example library (docs/measurements.md).
"""

from __future__ import annotations

import numpy as np
import torch

from landmark_cli.kernels.retrieval_attention import retrieval_attention
from landmark_cli.kernels.rope import apply_rope
from landmark_cli.retrieval.attention import DenseKV, dense_dtype
from landmark_cli.retrieval.landmarks import block_scores, top_blocks, top_runs
from landmark_cli.retrieval.selection import BandScores, Candidates
from landmark_cli.retrieval.session import AnswerSession, scoring_layers
from landmark_cli.storage import store

LEAD, FOLLOW = 3, 4  # blocks taken before and after each best block


class CorpusSession(AnswerSession):
    """Attention state for a question over several store entries (see the module docstring)."""

    def __init__(self, engine, entries: list[store.Entry], capacity: int, blocks: int | None = None):
        """blocks: how many to retrieve (default: the answer's top_k)."""
        if engine.spec is not None:
            raise ValueError("trained landmark models answer a folder through corpus_trained.TrainedCorpusSession")
        self.engine, self.entries = engine, entries
        self.reading, self.answering, self.model = engine.reading, engine.settings.answer, engine.model
        s, c, m = self.reading, self.model.cfg, self.model
        B = s.block
        self.stores = [e.tensor() for e in entries]  # [L, 2, Hkv, nb, B, D] memory maps
        self.sink_end = min(s.sink_tokens, entries[0].n_tokens // B * B)
        self.candidates = Candidates.of(entries, B, self.sink_end)
        self.complete = torch.nonzero(self.candidates.valid == B).flatten()
        self.k = min(self.answering.top_k if blocks is None else blocks, len(self.candidates))
        self.k_per_layer = min(self.k, self.complete.shape[0])  # per-layer selection while choosing
        self.reps = torch.cat([torch.from_numpy(entries[d].reps[:, :, b0:b0 + sl.stop - sl.start])
                               for d, sl, b0 in self.candidates.ranges()], 2).to(m.device) \
            if len(self.candidates) else None
        self.scoring_layers = scoring_layers(self.answering.band, c.n_layers)
        self.ret_cos, self.ret_sin = m.rope.tables(self.sink_end + self.k_per_layer * B)
        self.dense = DenseKV(c.n_layers, c.n_kv_heads, self.sink_end + self.k * B + capacity, c.head_dim,
                             dense_dtype(m), m.device)
        cos, sin = m.rope.at(torch.arange(self.sink_end))
        entries[0].verify(slice(None), slice(None), range(self.sink_end // B))
        for layer in range(c.n_layers):
            kv = self.stores[0][layer, :, :, :self.sink_end // B].to(m.device, self.dense.kv.dtype).flatten(2, 3)
            self.dense.write(layer, 0, apply_rope(kv[0], cos, sin), kv[1])
        self.dense.length = self.sink_end
        self.chosen: torch.Tensor | None = None  # candidate numbers, once chosen
        self.text: torch.Tensor | None = None  # passages="text": the chosen blocks' token ids, until read
        self.retrieved_per_step = self.sink_end

    # ---- choosing ----------------------------------------------------------------------
    def _gather(self, layer: int, sel: torch.Tensor) -> torch.Tensor:
        """Candidate blocks sel [Hkv, K] of one layer -> [2, Hkv, K, B, D] (a small copy, on the model's device)."""
        for i in sel.unique().tolist():
            self.entries[int(self.candidates.doc[i])].verify(layer, slice(None), int(self.candidates.block[i]))
        out = []
        for h in range(sel.shape[0]):
            out.append(torch.stack([self.stores[int(self.candidates.doc[i])][layer, :, h, int(self.candidates.block[i])]
                                    .to(self.model.device) for i in sel[h].tolist()], 1))
        return torch.stack(out, 1)

    def _choose(self, x: torch.Tensor, question: slice) -> None:
        """Run the question up to the last scoring layer (per-layer retrieval over the
        complete candidates), score every candidate there, keep the best runs of blocks."""
        s, c, m = self.reading, self.model.cfg, self.model
        B, T, start = s.block, x.shape[0], self.sink_end
        cos, sin = m.rope.at(torch.arange(T) + self.sink_end + self.k_per_layer * B)
        idx = torch.arange(self.k_per_layer, device=m.device).expand(c.n_kv_heads, -1)
        band = BandScores(self.scoring_layers, self.candidates, self.entries, self.stores, c.n_kv_heads, question)
        reps = self.reps
        assert reps is not None  # step() chooses only when there are candidates

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            keys, values = self.dense.write(layer, start, apply_rope(k, cos, sin), v)
            band.observe(layer, q)
            scores = block_scores(q, reps[layer][:, self.complete], s.rep, c.n_kv_heads)
            kv = self._gather(layer, self.complete[top_blocks(scores, self.k_per_layer).cpu()])
            return retrieval_attention(apply_rope(q, cos, sin), keys, values, kv[0], kv[1], idx,
                                       self.ret_cos, self.ret_sin, self.sink_end, impl=self.engine.landmarks.impl)

        self.engine.runner(T).run_layers(x, attend, self.scoring_layers.stop)
        votes = self.votes = band.votes()
        chosen = top_runs(votes, self.k, FOLLOW, group=self.candidates.doc, lead=LEAD)
        # documents in the order of their best block, the best one last (nearest the question)
        doc = self.candidates.doc[chosen]
        best = {int(d): float(votes[chosen][doc == d].max()) for d in doc.unique()}
        self.chosen = chosen[sorted(range(len(chosen)), key=lambda i: (best[int(doc[i])], int(chosen[i])))]
        self._place(self.chosen)

    def _place(self, chosen: torch.Tensor) -> None:
        """Copy the chosen blocks' real tokens into the dense buffer after the sink."""
        c, m, cand = self.model.cfg, self.model, self.candidates
        pieces = [(int(cand.doc[i]), int(cand.block[i]), int(cand.valid[i])) for i in chosen.tolist()]
        n = sum(v for _, _, v in pieces)
        start = self.sink_end
        self.retrieved_per_step = start + n
        if self.answering.passages == "text":  # read again with the question, at the first step
            B = self.reading.block
            self.text = torch.cat([torch.from_numpy(self.entries[d].ids[b * B:b * B + v].astype(np.int64))
                                   for d, b, v in pieces])
            return
        for d, b, _ in pieces:
            self.entries[d].verify(slice(None), slice(None), b)
        cos, sin = m.rope.at(torch.arange(start, start + n))
        dtype = self.dense.kv.dtype
        for layer in range(c.n_layers):
            kv = torch.cat([self.stores[d][layer, :, :, b, :v].to(m.device, dtype) for d, b, v in pieces], 2)
            self.dense.write(layer, start, apply_rope(kv[0], cos, sin), kv[1])
        self.dense.length = start + n

    # ---- stepping ----------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, ids: torch.Tensor, question: slice | None = None) -> torch.Tensor:
        m = self.model
        x = m.embed(ids)
        if self.chosen is None:
            if len(self.candidates):
                self._choose(x, question or slice(None))
            else:
                self.chosen = torch.zeros(0, dtype=torch.long)
        if self.text is not None:  # passages="text": the chosen blocks' tokens, then the question
            x, self.text = torch.cat([m.embed(self.text), x]), None
        T, start = x.shape[0], self.dense.length
        cos, sin = m.rope.at(torch.arange(start, start + T))
        logits = self.engine.dense_step(x, self.dense, start, cos, sin)
        self.dense.length = start + T
        return logits
