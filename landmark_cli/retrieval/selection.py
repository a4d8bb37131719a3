"""Which stored blocks a step reads: the candidate blocks and the ways of choosing among them.

A selection answers, per layer, "which blocks does each KV head read?" as block indices
[Hkv, k] into a store entry:

- `ByRepresentatives`: the top-k blocks by their representatives (mean keys, min/max
  bounds, or trained landmark keys), chosen anew at every layer and step: the paper's
  retrieval.
- `Fixed`: one set of blocks for every layer and step (the question-guided shared
  selection, once `BandScores` has made it).
- `LocalLayers`: a trained model's local layers read the block before the dense keys
  and nothing else; the other layers use an inner selection.

`BandScores` scores every candidate block exactly (the question's best-matching key in
the block) at a few middle layers: the shared selection and the folder selection are
made from it, and so are the sources cited for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from landmark_cli.retrieval.landmarks import block_scores, exact_block_logits, relevance, top_blocks
from landmark_cli.storage.kvformat import Stored


@dataclass(frozen=True)
class Candidates:
    """The blocks an answer may retrieve or cite, from one or more store entries, numbered
    0..N-1 in entry order."""

    doc: torch.Tensor  # [N] which entry
    block: torch.Tensor  # [N] block within that entry
    valid: torch.Tensor  # [N] real tokens in the block (a document's last block may be partial)

    @classmethod
    def of(cls, entries: list, block: int, sink_end: int) -> "Candidates":
        """Every block from the first entry's end of sink and the other entries' first
        document text (their prompt prefix is never a source)."""
        docs, blocks, valid = [], [], []
        for d, e in enumerate(entries):
            nb = e.kv.shape[3]
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


class Selection(Protocol):
    def blocks(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE queries q [H, T, D] of `layer` -> block indices [Hkv, k]."""
        ...


class ByRepresentatives:
    """Per layer and KV head, the top-k of the blocks [first, first + N) by their
    representatives reps [L, Hkv, N, R, D]. With `record`, the block scores [Hkv, N] of
    every layer are kept in `scores` (the question's, for citing sources)."""

    def __init__(self, reps: torch.Tensor, kind: str, first: int, k: int, n_kv_heads: int, record: bool = False):
        self.reps, self.kind, self.first, self.k, self.n_kv_heads = reps, kind, first, k, n_kv_heads
        self.scores: list[torch.Tensor] | None = [] if record else None

    def blocks(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        scores = block_scores(q, self.reps[layer].to(q.device), self.kind, self.n_kv_heads)
        if self.scores is not None:
            self.scores.append(scores)
        return top_blocks(scores, self.k) + self.first


class Fixed:
    """The same blocks [Hkv, k] at every layer."""

    def __init__(self, chosen: torch.Tensor):
        self.chosen = chosen

    def blocks(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        return self.chosen


class LocalLayers:
    """Layers below `n_local` read `local` (the block before the dense keys); the others `inner`."""

    def __init__(self, inner: Selection, n_local: int, local: torch.Tensor):
        self.inner, self.n_local, self.local = inner, n_local, local

    def blocks(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        return self.local if layer < self.n_local else self.inner.blocks(layer, q)


class BandScores:
    """The question's exact block logits (its best-matching key in each block) against every
    candidate, at the scoring layers; `votes()` turns them into one relevance per block:
    softmax over blocks per query, mean over queries, KV heads and scoring layers."""

    def __init__(self, layers: range, candidates: Candidates, entries: list, stores: list[Stored],
                 n_kv_heads: int, question: slice):
        """entries: the store entries the candidates come from; stores: their KV as tensors."""
        self.layers, self.candidates, self.entries, self.stores = layers, candidates, entries, stores
        self.n_kv_heads, self.question = n_kv_heads, question
        self.logits: list[torch.Tensor] = []  # per scoring layer [Hkv, queries, N]

    def observe(self, layer: int, q: torch.Tensor) -> None:
        """Score the candidates with the question's queries of q [H, T, D] if `layer` is a scoring layer."""
        if layer not in self.layers:
            return
        q = q[:, self.question]
        parts = []
        for d, sl, b0 in self.candidates.ranges():
            self.entries[d].verify(layer, 0, range(b0, b0 + sl.stop - sl.start))
            keys = self.stores[d][layer, 0, :, b0:b0 + sl.stop - sl.start]  # a view of the memory map
            parts.append(exact_block_logits(q, keys, self.n_kv_heads, int(self.candidates.valid[sl.stop - 1])))
        self.logits.append(torch.cat(parts, -1))

    def votes(self, first: int | None = None) -> torch.Tensor:
        """Relevance [N] of the first `first` candidates (default: all), normalised among them (on the CPU)."""
        return torch.stack([relevance(lg[..., :first]) for lg in self.logits]).mean((0, 1)).cpu()


class Scoring:
    """`inner`, with `band` observing every layer's queries on the way."""

    def __init__(self, inner: Selection, band: BandScores):
        self.inner, self.band = inner, band

    def blocks(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        self.band.observe(layer, q)
        return self.inner.blocks(layer, q)
