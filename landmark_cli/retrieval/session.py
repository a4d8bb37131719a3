"""Answering sessions: the attention state of one question, fed a step at a time.

Every session (one document: `Session`; a folder: corpus.CorpusSession and
corpus_trained.TrainedCorpusSession) offers the same protocol, `AnswerSession`:
`step(ids, question)` feeds tokens and returns the next token's logits, `sources(n)`
names the blocks the question scored highest, `retrieved_per_step` says how many
document tokens each step attends to.
"""

from __future__ import annotations

import numpy as np
import torch

from landmark_cli.errors import LandmarkError
from landmark_cli.kernels.retrieval_attention import rotated_blocks
from landmark_cli.kernels.rope import apply_rope
from landmark_cli.model.device import stage
from landmark_cli.retrieval.attention import DenseKV, dense_attention, dense_dtype
from landmark_cli.retrieval.landmarks import is_landmark_position, top_runs
from landmark_cli.retrieval.selection import BandScores, ByRepresentatives, Candidates, Fixed, Scoring, Selection
from landmark_cli.storage import store


class AnswerSession:
    """The protocol every answering session follows (see the module docstring)."""

    candidates: Candidates  # the blocks sources may name
    votes: torch.Tensor | None = None  # relevance of candidates [0, len(votes)) to the question
    retrieved_per_step: int = 0  # document tokens attended per step

    def step(self, ids: torch.Tensor, question: slice | None = None) -> torch.Tensor:
        """Feed tokens ids [T]; return the logits after the last one [vocab].
        question: which of these tokens are the question (the first step's; default: all)."""
        raise NotImplementedError

    def sources(self, n: int) -> list[tuple[int, int, float]]:
        """(entry, block, score) of the n blocks the question scored highest, best first."""
        if self.votes is None or self.votes.numel() == 0:
            return []
        best = self.votes.topk(min(n, self.votes.shape[0]))
        return [(int(self.candidates.doc[i]), int(self.candidates.block[i]), float(v))
                for v, i in zip(best.values, best.indices, strict=True)]


def scoring_layers(band: tuple[float, float], n_layers: int) -> range:
    """The layers (fractions of depth `band`) whose exact block scores choose a shared selection."""
    lo, hi = (round(f * n_layers) for f in band)
    return range(lo, max(hi, lo + 1))


class Session(AnswerSession):
    """Continuing one cached document (engine.Engine.answer).

    Per layer, a dense buffer holds the RoPE'd keys and values of the sink, the local
    window (the end of the document) and every token since, at fixed positions: the
    retrieved blocks always occupy positions [sink, sink + k*block), so nothing already
    in the buffer ever moves.

    With `select="shared"` the question is run twice: once with per-layer selection up to
    the last scoring layer, where the question's own tokens score every retrievable block
    by its best-matching key (BandScores) to choose one set of k blocks; then through all
    layers with that set, which the answer keeps to its end: each layer's chosen blocks
    are RoPE'd once into reserved slots of its dense buffer, and every later step is one
    fused attention over that buffer (attention.dense_attention). Mean-key landmarks rank a
    fact planted in natural prose poorly; the exact block maximum at a few middle layers
    ranks it first. With `select="layer"` (and always with trained landmarks) every layer
    and step chooses its own blocks by their representatives, the paper's retrieval."""

    def __init__(self, engine, entry: store.Entry, capacity: int):
        self.engine, self.entry = engine, entry
        self.reading, self.answering = engine.reading, engine.settings.answer
        self.model, self.landmarks = engine.model, engine.landmarks
        self.rereads = self.answering.select == "shared" and self.answering.passages == "text"
        s, c, m = self.reading, self.model.cfg, self.model
        B, n = s.block, entry.n_tokens
        self.store = entry.tensor()  # on disk, memory-mapped: read where the blocks are used
        self.reps = torch.from_numpy(entry.reps).to(m.device)
        window = self.answering.window // B * B
        self.sink_end = min(s.sink_tokens, n // B * B)
        win0 = max(self.sink_end, (n - window) // B * B)
        self.retrievable = slice(self.sink_end // B, win0 // B)  # complete blocks between sink and window
        self.candidates = Candidates.of([entry], B, self.sink_end)  # the retrievable blocks, then the window's
        self.k = min(self.answering.top_k, self.retrievable.stop - self.retrievable.start)
        self.scoring_layers = scoring_layers(self.answering.band, c.n_layers)
        self.ret_cos, self.ret_sin = m.rope.tables(self.sink_end + self.k * B)
        n_dense = self.sink_end + (n - win0)
        self.next_pos = self.sink_end + self.k * B + (n - win0)
        self.stream_len = n  # the stream position of the next token (trained: landmarks included)
        capacity = n_dense + self.landmarks.stream_length(capacity)
        if self.rereads:  # the chosen blocks come back as text, after the sink
            capacity += self.k * B
        if self.next_pos + capacity - n_dense > (limit := c.context):
            raise LandmarkError(f"sink + answer top_k*block + answer window + question and answer = "
                                f"{self.next_pos + capacity - n_dense} tokens exceeds the model's context of "
                                f"{limit} tokens", "lower --answer-top-k, --answer-window or --max-tokens")
        # landmark flags of the dense positions (used by trained landmarks)
        self.dense_flags = is_landmark_position(win0 + torch.arange(capacity, device=m.device), B)
        # where a trained model's local layer finds its previous block: right before the
        # window (RoPE is relative, so a position below 0 is a rotation the other way)
        p = self.sink_end + self.k * B - B + torch.arange(B)
        lc, ls = m.rope.at(p.abs())
        self.local_cos, self.local_sin = lc, ls * torch.where(p < 0, -1.0, 1.0)[:, None].to(ls.device)
        self.first_dense_block = win0 // B
        self.retrieved_per_step = self.sink_end + self.k * B + (n - win0)
        pos = torch.cat([torch.arange(self.sink_end), self.sink_end + self.k * B + torch.arange(n - win0)])
        cos, sin = m.rope.at(pos)
        # the shared selection's blocks take reserved slots of the dense buffer once chosen
        fixes = self.answering.select == "shared" and not self.rereads and self.landmarks.spec is None
        self.dense = DenseKV(c.n_layers, c.n_kv_heads, capacity, c.head_dim,
                             m.dtype if self.landmarks.spec is not None else dense_dtype(m), m.device,
                             reserved=self.k * B if fixes else 0)
        nb = entry.kv.shape[3]
        entry.verify(slice(None), slice(None), np.r_[0:self.sink_end // B, win0 // B:nb])
        dtype = self.dense.kv.dtype
        for layer in range(c.n_layers):
            sink, win = (self.store[layer, :, :, b0:b1].to(m.device, dtype).flatten(2, 3)  # [2, Hkv, tokens, D]
                         for b0, b1 in ((0, self.sink_end // B), (win0 // B, nb)))
            kv = torch.cat([sink, win[:, :, :n - win0]], 2)
            self.dense.write(layer, 0, apply_rope(kv[0], cos, sin), kv[1])
        self.dense.length = n_dense
        self.layer_scores: list[torch.Tensor] = []  # per retrieving layer [Hkv, blocks], the first step's
        self.chosen: torch.Tensor | None = None  # [Hkv, k] the shared selection, once made
        self.placed: set[int] = set()  # the layers whose reserved slots hold the chosen blocks
        self.steps = 0

    def ranker(self, record: bool = False) -> ByRepresentatives:
        """Per-layer top-k of the retrievable blocks by their representatives."""
        return ByRepresentatives(self.reps[:, :, self.retrievable], self.reading.rep, self.retrievable.start,
                                 self.k, self.model.cfg.n_kv_heads, record)

    def per_layer(self, ranker: ByRepresentatives) -> Selection:
        """ranker at the retrieving layers (a trained model's local layers read the block before the window)."""
        return self.landmarks.selection(ranker, self.first_dense_block, self.model.cfg.n_kv_heads)

    def _run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int, selection: Selection,
             layers: int | None = None) -> torch.Tensor:
        """Hidden states x [T, dim] at dense positions [start, start + T) (RoPE tables cos/sin)
        through layers [0, layers), each reading the blocks `selection` picks."""
        end = start + x.shape[0]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            keys, values = self.dense.write(layer, start, apply_rope(k, cos, sin), v)
            sel = selection.blocks(layer, q)
            if self.dense.reserved and sel is self.chosen:  # the same blocks at every step: placed once
                if layer not in self.placed:
                    self._place(layer, sel, x.device)
                return dense_attention(apply_rope(q, cos, sin), *self.dense.joined(layer, end))
            self.entry.verify(layer, slice(None), sel)
            rc, rs = (self.local_cos, self.local_sin) if self.landmarks.local(layer) else (self.ret_cos, self.ret_sin)
            return self.landmarks.attend(layer, apply_rope(q, cos, sin), keys, values, self.dense_flags[:end],
                                         self.store[layer, 0], self.store[layer, 1], sel, rc, rs, self.sink_end)

        return self.engine.runner(x.shape[0]).run_layers(x, attend, layers)

    def _place(self, layer: int, sel: torch.Tensor, device: torch.device) -> None:
        """Check the chosen blocks sel [Hkv, k] of `layer`, then put them, RoPE'd at positions
        [sink_end, sink_end + k*B), in that layer's reserved slots of the dense buffer."""
        self.entry.verify(layer, slice(None), sel)
        ks, vs, ix = stage(self.store[layer, 0], self.store[layer, 1], sel, device)
        self.dense.place(layer, *rotated_blocks(ks, vs, ix, self.ret_cos, self.ret_sin, self.sink_end, device))
        self.placed.add(layer)

    def _choose(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, question: slice) -> None:
        """The shared selection: run the question up to the last scoring layer, where its
        tokens score every candidate block; keep the best runs of blocks."""
        a, c = self.answering, self.model.cfg
        band = BandScores(self.scoring_layers, self.candidates, [self.entry], [self.store], c.n_kv_heads, question)
        self._run(x, cos, sin, self.dense.length, Scoring(self.per_layer(self.ranker()), band),
                  layers=self.scoring_layers.stop)
        n_retrievable = self.retrievable.stop - self.retrievable.start  # the first candidates
        best = top_runs(band.votes(n_retrievable), self.k, a.follow, lead=a.lead, best_last=a.order == "best-last")
        self.chosen = (best + self.retrievable.start).expand(c.n_kv_heads, -1)
        self.votes = band.votes()

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, question: slice | None = None) -> torch.Tensor:
        m = self.model
        ids = torch.tensor(self.landmarks.stream(ids.tolist(), None, self.stream_len)[0])
        self.stream_len += len(ids)
        T, start = ids.shape[0], self.dense.length
        cos, sin = m.rope.at(torch.arange(self.next_pos, self.next_pos + T))
        x = m.embed(ids)
        if self.answering.select == "shared" and self.chosen is None:
            self._choose(x, cos, sin, question or slice(None))
        logits = None
        if self.rereads and self.steps == 0:
            x = self._reread(ids)
        elif self._dense_only():
            logits = self.engine.dense_step(x, self.dense, start, cos, sin)
        elif self.chosen is not None:
            x = self._run(x, cos, sin, start, Fixed(self.chosen))
        else:
            ranker = self.ranker(record=self.steps == 0)
            x = self._run(x, cos, sin, start, self.per_layer(ranker))
            if ranker.scores:  # the question's step: its scores name the sources
                self.layer_scores = ranker.scores
                self.votes = torch.stack(ranker.scores).mean((0, 1)).cpu()
        self.dense.length, self.next_pos, self.steps = self.dense.length + T, self.next_pos + T, self.steps + 1
        return self.landmarks.mask_logits(self.engine.logits(x[-1]) if logits is None else logits)

    def _dense_only(self) -> bool:
        """Whether a step attends to the dense buffer alone: once the shared selection's
        blocks sit in every layer's reserved slots (or there are none), or, with the passages
        read as text, after that first step."""
        if self.chosen is None:
            return False
        if self.rereads:
            return self.steps > 0
        return self.chosen.shape[1] == 0 or len(self.placed) == self.model.cfg.n_layers

    def _reread(self, ids: torch.Tensor) -> torch.Tensor:
        """passages="text": the chosen blocks' tokens (in the chosen order) and the window's,
        read as fresh text right after the sink, then the question `ids`, in one causal
        step; the cached window is dropped and no block is retrieved from here on. Returns
        the hidden states of the question."""
        assert self.chosen is not None  # chosen by the question's first step
        B, win0, n = self.reading.block, self.first_dense_block * self.reading.block, self.entry.n_tokens
        blocks = self.chosen[0].tolist()
        text = [self.entry.ids[b * B:(b + 1) * B] for b in blocks] + [self.entry.ids[win0:n]]
        seq = torch.cat([torch.from_numpy(t.astype(np.int64)) for t in text] + [ids])
        pos = self.sink_end + torch.arange(seq.shape[0])
        cos, sin = self.model.rope.at(pos)
        self.dense.length = self.sink_end
        x = self._run(self.model.embed(seq), cos, sin, self.sink_end, Fixed(self.chosen[:, :0]))  # nothing retrieved
        self.dense.length, self.next_pos = self.sink_end + seq.shape[0] - ids.shape[0], int(pos[-1]) + 1 - ids.shape[0]
        return x[-ids.shape[0]:]

    @torch.inference_mode()
    def close(self) -> torch.Tensor:
        """Trained landmarks, on a fresh session of a stream that ends inside a block: the
        `<landmark>` run after the stream, as if its block ended there (per-layer retrieval,
        grouped softmax, like a landmark read in place). Returns its pre-RoPE key and value
        [layers, 2, Hkv, D]: the partial block's landmark for a folder question."""
        m, start = self.model, self.dense.length
        self.dense_flags[start] = True
        cos, sin = m.rope.at(torch.tensor([self.next_pos]))
        self._run(m.embed(torch.tensor([self.landmarks.spec.mem_id])), cos, sin, start, self.per_layer(self.ranker()))
        k = apply_rope(self.dense.kv[:, 0, :, start:start + 1], cos, -sin)[:, :, 0]  # rotated back: pre-RoPE
        return torch.stack([k, self.dense.kv[:, 1, :, start]], 1)
