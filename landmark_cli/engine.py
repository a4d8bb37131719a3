"""Reading documents into the KV store and answering from it with landmark retrieval.

Every attention step (a chunk of the document while reading, the question, each
generated token) attends to, per layer and KV head:

    [sink: the first `sink` tokens] [k retrieved blocks] [local window] [the step's own tokens]

placed contiguously at positions 0, 1, 2, ... so the model never sees a distance larger
than sink + k*block + window + chunk, whatever the document length. Retrieved blocks are
the top-k by landmark score (landmarks.py) among the complete blocks between the sink
and the window, kept in document order (while answering with the shared selection,
passages of adjacent blocks go best last: Settings.order). Keys are stored pre-RoPE and
rotated at their new positions when attended.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from landmark_cli.kernels.landmark_attention import landmark_attention
from landmark_cli.kernels.retrieval_attention import gather_blocks, retrieval_attention, rotated_blocks
from landmark_cli.kernels.rope import apply_rope

from . import store
from .checkpoint import LandmarkSpec
from .errors import LandmarkError
from .landmarks import (N_REPS, block_reps, block_scores, exact_block_logits, insert_landmarks,
                        is_landmark_position, relevance, top_blocks, top_runs)
from .models import LoadedModel
from .paths import home


@dataclass(frozen=True)
class Settings:
    block: int = 32  # tokens per block (the unit of retrieval)
    top_k: int = 8  # blocks retrieved per layer and KV head at every step
    sink: int = 64  # initial tokens always attended (rounded up to whole blocks)
    window: int = 1024  # local window before each step (rounded down to whole blocks)
    chunk: int = 512  # document tokens per reading step (rounded down to whole blocks)
    rep: str = "mean"  # block representative: mean | minmax
    kv_dtype: str = "float16"  # KV store precision on disk
    # answering only (not part of the store key):
    select: str = "shared"  # "shared": one selection for all layers, made by the band; "layer": per layer and head
    band: tuple[float, float] = (0.55, 0.65)  # layers (fractions of depth) that make the shared selection
    answer_window: int | None = None  # local window while answering (None: same as `window`)
    follow: int = 1  # shared selection: blocks taken after each top block
    order: str = "best-last"  # shared selection: passages "best-last" (nearest the question) or in "document" order
    landmarks: str = "auto"  # "trained": the model's own <landmark> tokens; "free": representatives; auto: trained if the model has them
    top_k_auto: bool = False  # top_k is the default, not the user's: trained landmarks then take TRAINED_TOP_K

    def __post_init__(self):
        if self.block < 1 or self.top_k < 0 or self.sink < 0 or self.window < 0:
            raise ValueError("block must be >= 1; top_k, sink and window >= 0")
        if self.rep not in N_REPS:
            raise ValueError(f"unknown representative {self.rep!r}; choose from {sorted(N_REPS)}")
        if self.select not in ("layer", "shared"):
            raise ValueError(f"unknown selection {self.select!r}; choose layer or shared")
        if self.order not in ("best-last", "document"):
            raise ValueError(f"unknown order {self.order!r}; choose best-last or document")
        if self.landmarks not in ("auto", "trained", "free"):
            raise ValueError(f"unknown landmarks {self.landmarks!r}; choose auto, trained or free")

    def reading(self) -> dict:
        """The settings that shape the stored KV (the store key)."""
        return {k: getattr(self, k) for k in ("block", "top_k", "sink", "window", "chunk", "rep", "kv_dtype")}

    @property
    def sink_tokens(self) -> int:
        return -(-self.sink // self.block) * self.block

    @property
    def window_tokens(self) -> int:
        return self.window // self.block * self.block

    @property
    def chunk_tokens(self) -> int:
        return max(self.block, self.chunk // self.block * self.block, self.sink_tokens)

    def span(self) -> int:
        """Largest position used by one step: what must fit the model's context."""
        return self.sink_tokens + self.top_k * self.block + self.window_tokens + self.chunk_tokens


TRAINED_TOP_K = 4  # blocks per layer and KV head for trained landmarks when --top-k is not given (the paper: 2-5)


def trained_settings(s: Settings, spec: LandmarkSpec) -> Settings:
    """Settings for a trained landmark model, as in the paper: blocks of mem_freq tokens +
    their <landmark>, retrieval by the landmark keys per layer and KV head, no sink, and
    every step inside the training context: k blocks + window + chunk <= train_context
    (the chunk shrinks first, then the window). Without a top_k of the user's
    (top_k_auto), TRAINED_TOP_K blocks, fewer if the training context leaves no room."""
    B = spec.block
    if s.top_k_auto:
        s = replace(s, top_k=min(TRAINED_TOP_K, spec.train_context // B - 1))
    avail = spec.train_context // B * B - s.top_k * B
    if avail < B:
        raise LandmarkError(f"--top-k {s.top_k} blocks of {B} tokens leave no room for a chunk in the model's "
                            f"training context of {spec.train_context} tokens",
                            f"use --top-k {max(spec.train_context // B - 1, 0)} or less")
    chunk = max(B, min(s.chunk // B * B, avail))
    return replace(s, block=B, rep="landmark", select="layer", sink=0, chunk=chunk,
                   window=max(0, min(s.window // B * B, avail - chunk)))


def effective_settings(lm: LoadedModel, s: Settings) -> tuple[Settings, LandmarkSpec | None]:
    """The settings an engine for this model really reads and answers with, and the
    model's trained landmarks when they are used (None: training-free landmarks)."""
    if s.landmarks == "trained" and lm.landmark is None:
        raise LandmarkError(f"{lm.name} has no trained landmarks (a <landmark> token and mem_freq in its config)",
                            "use --landmarks auto or free")
    spec = lm.landmark if s.landmarks != "free" else None
    return (s, None) if spec is None else (trained_settings(s, spec), spec)


@dataclass
class Answer:
    tokens: list[int]
    text: str
    sources: list[tuple[int, int, float]]  # (entry, block, score), best first
    retrieved_per_step: int  # document tokens attended per step (sink + k blocks + window)
    prompt_tokens: int
    answer_s: float
    first_token_s: float


Progress = Callable[[int, int], None]  # (tokens done, tokens total)


def grouped_attention(q, dense_k, dense_v, dense_lm, k_store, v_store, sel, cos, sin, local=False,
                      local_blocks=1) -> torch.Tensor:
    """Trained mode: grouped-softmax attention of queries q [H, T, D] (RoPE'd) over k blocks
    read from the store (sel [Hkv, k] block indices into k_store/v_store [Hkv, N, B, D],
    pre-RoPE; placed at positions [0, k*B) and rotated there by the cos/sin tables) followed
    by dense keys/values [Hkv, L, D] (RoPE'd; the last T are the queries' own) whose
    landmark flags are dense_lm [L]. Every retrieved block ends with its landmark, which
    gates the block's tokens; the torch path of landmark_cli/kernels/landmark_attention does the math.
    local: a local layer of the model (LandmarkSpec.local_layers): each query reads only
    its own block and the `local_blocks` (1 or 0) before it (sel: at most the one block
    right before the dense keys, see local_selection)."""
    hkv, k = sel.shape
    B, D = k_store.shape[2], k_store.shape[3]
    kr = gather_blocks(k_store, sel).reshape(hkv, k * B, D).to(q.dtype)
    vr = gather_blocks(v_store, sel).reshape(hkv, k * B, D).to(q.dtype)
    kr = apply_rope(kr, cos[:k * B], sin[:k * B])
    lm = torch.cat([is_landmark_position(torch.arange(k * B), B), dense_lm])
    keys, vals = torch.cat([kr, dense_k], 1), torch.cat([vr, dense_v], 1)
    return landmark_attention(q[None], keys[None], vals[None], lm[None], impl="torch", local=local,
                              local_blocks=local_blocks)[0]


def local_selection(first_dense: int, n_kv_heads: int, local_blocks: int = 1) -> torch.Tensor:
    """What a local layer reads from the store: the block right before the dense keys (the
    previous block of their first block), or nothing at the document's start or when the
    layer reads its own block only (local_blocks 0). [Hkv, 0 or 1]."""
    prev = torch.tensor([first_dense - 1] if first_dense > 0 and local_blocks else [], dtype=torch.long)
    return prev.expand(n_kv_heads, -1)


def as_torch(a: np.ndarray) -> torch.Tensor:
    """A (possibly read-only, memory-mapped) numpy array as a tensor, without copying."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


class Engine:
    def __init__(self, lm: LoadedModel, settings: Settings = Settings(), root: Path | None = None):
        settings, self.spec = effective_settings(lm, settings)  # spec set: trained mode
        self.lm, self.s = lm, settings
        self.m, self.cfg = lm.model, lm.model.cfg
        self.root = root or home() / "store"
        limit = self.spec.train_context if self.spec else self.cfg.context
        if settings.span() > limit:
            raise LandmarkError(f"sink + top_k*block + window + chunk = {settings.span()} tokens exceeds the "
                                f"model's context of {limit} tokens", "lower --top-k, --window or --chunk")

    def stream(self, ids: list[int], spans: np.ndarray | None = None):
        """The token stream the store holds for ids: in trained mode with a <landmark> after
        every mem_freq tokens (spans get (-1, -1) rows for them)."""
        if self.spec is None:
            return ids, spans
        return insert_landmarks(ids, spans, self.spec.mem_freq, self.spec.mem_id)

    def local(self, layer: int) -> bool:
        """A local layer of a trained landmark model (LandmarkSpec.local_layers): it retrieves nothing."""
        return self.spec is not None and layer < self.spec.local_layers

    # ---- the store -------------------------------------------------------------------
    def key(self, ids: list[int]) -> str:
        digest = store.entry_key({"ids": store._digest(np.asarray(ids, dtype=np.int32))})
        return store.entry_key({"model": self.lm.fingerprint, "settings": self.s.reading(), "ids": digest})

    def lookup(self, ids: list[int]) -> store.Entry | None:
        """The valid cached entry for this token stream, or None (a corrupt one is removed)."""
        path = self.root / self.key(ids)
        if not path.exists():
            return None
        entry = store.open_entry(path)
        if entry is None:
            store.remove(path)
        return entry

    def read(self, ids: list[int], spans: np.ndarray | None = None, progress: Progress | None = None,
             prefix: store.Entry | None = None) -> tuple[store.Entry, bool]:
        """Entry for the token stream `ids` (prompt prefix + document): cached or built now.

        spans [n_tokens, 2]: character span of each token in the document (-1 for prompt tokens).
        prefix: an entry of this engine whose token stream starts like `ids` (an earlier
        version of a document that grew): the reading chunks they share are copied, not read.
        Returns (entry, cached)."""
        entry = self.lookup(ids)
        if entry is not None:
            return entry, True
        store.sweep_temporaries(self.root)
        key, given = self.key(ids), ids
        ids, spans = self.stream(ids, spans)
        s, c = self.s, self.cfg
        n = len(ids)
        nb = -(-n // s.block)
        shape = dict(layers=c.n_layers, kv_heads=c.n_kv_heads, n_blocks=nb, block=s.block,
                     head_dim=c.head_dim, n_reps=N_REPS[s.rep], n_tokens=n)
        w = store.Writer(self.root, key, shape, {"model": self.lm.name, "fingerprint": self.lm.fingerprint,
                                                            "settings": s.reading()}, kv_dtype=s.kv_dtype)
        try:
            w.ids[:] = ids
            if spans is not None:
                for b in range(nb):
                    sp = spans[b * s.block:(b + 1) * s.block]
                    sp = sp[sp[:, 0] >= 0]
                    if len(sp):
                        w.spans[b] = (sp[:, 0].min(), sp[:, 1].max())
            start = self.shared_prefix(prefix, given) if prefix is not None else 0
            if start:
                w.kv[:, :, :, :start // s.block] = prefix.kv[:, :, :, :start // s.block]
                w.reps[:, :, :start // s.block] = prefix.reps[:, :, :start // s.block]
            self._prefill(w, torch.tensor(ids), progress, start)
            path = w.commit()
        except BaseException:
            w.abort()
            raise
        entry = store.open_entry(path)
        if entry is None:
            raise RuntimeError(f"the store entry just written at {path} does not validate")
        return entry, False

    def shared_prefix(self, entry: store.Entry, ids: list[int]) -> int:
        """Tokens at the start of `ids` whose reading `entry` already holds: the whole reading
        chunks of their common prefix (reading a chunk depends only on the tokens up to its end).
        0 if `entry` was read by another model or with other settings. Counted in stream tokens."""
        ids = self.stream(ids)[0]
        meta = entry.meta
        if meta.get("fingerprint") != self.lm.fingerprint or meta.get("settings") != self.s.reading():
            return 0
        n = min(entry.n_tokens, len(ids))
        same = np.asarray(entry.ids[:n]) == np.asarray(ids[:n], dtype=entry.ids.dtype)
        common = n if bool(same.all()) else int(same.argmin())
        return min(common, len(ids) - 1) // self.s.chunk_tokens * self.s.chunk_tokens

    # ---- reading (chunked prefill with retrieval) --------------------------------------
    @torch.inference_mode()
    def _prefill(self, w: store.Writer, ids: torch.Tensor, progress: Progress | None, first: int = 0) -> None:
        """Read ids[first:] chunk by chunk (`first` is a chunk boundary; blocks before it are filled)."""
        s, c, m = self.s, self.cfg, self.m
        B, n = s.block, ids.shape[0]
        kv = as_torch(w.kv)
        last_valid = n - (w.kv.shape[3] - 1) * B
        for start in range(first, n, s.chunk_tokens):
            end = min(start + s.chunk_tokens, n)
            b0, b1 = start // B, -(-end // B)
            sink_end = min(s.sink_tokens, start)
            win0 = max(sink_end, start - s.window_tokens)
            cand = slice(sink_end // B, win0 // B)
            x = m.embed(ids[start:end])
            for layer in range(c.n_layers):
                q, k, v = m.qkv(layer, x)
                # write this chunk's pre-RoPE keys/values into its blocks
                for j, t in enumerate((k, v)):
                    padded = torch.nn.functional.pad(t, (0, 0, 0, (b1 - b0) * B - (end - start)))
                    kv[layer, j, :, b0:b1] = padded.view(c.n_kv_heads, b1 - b0, B, c.head_dim).to(kv.dtype)
                w.reps[layer, :, b0:b1] = block_reps(
                    kv[layer, 0, :, b0:b1], s.rep, valid=last_valid if end == n else None).numpy()
                if self.local(layer):
                    sel = local_selection(win0 // B, c.n_kv_heads, self.spec.local_blocks)
                else:
                    sel = top_blocks(block_scores(q, torch.from_numpy(w.reps[layer, :, cand]), s.rep,
                                                  c.n_kv_heads), s.top_k) + cand.start
                ctx = [kv[layer, :, :, i0 // B:i1 // B].flatten(2, 3) for i0, i1 in ((0, sink_end), (win0, start))]
                x = m.finish(layer, x, self._attend(layer, q, k, v, ctx, sel, sink_end, kv))
            if progress:
                progress(end, n)

    def _attend(self, layer, q, k, v, ctx, sel, sink_end, kv):
        """Attention of one step over sink + retrieved + window (ctx) + its own tokens (k, v)."""
        s, m = self.s, self.m
        (sink, win) = ctx  # each [2, Hkv, tokens, D] pre-RoPE
        T, n_sink, n_win = q.shape[1], sink.shape[2], win.shape[2]
        ret = sel.shape[1] * s.block
        pos = torch.cat([torch.arange(n_sink), torch.arange(n_win + T) + sink_end + ret])
        cos, sin = m.rope.at(pos)
        dk = torch.cat([sink[0].to(k.dtype), win[0].to(k.dtype), k], 1)
        dv = torch.cat([sink[1].to(v.dtype), win[1].to(v.dtype), v], 1)
        ct, st = m.rope.tables(sink_end + ret + 1)
        if self.spec is not None:  # no sink; window and chunk start at block boundaries
            lm = is_landmark_position(torch.arange(n_win + T), s.block)
            return grouped_attention(apply_rope(q, cos[-T:], sin[-T:]), apply_rope(dk, cos, sin), dv, lm,
                                     kv[layer, 0], kv[layer, 1], sel, ct, st, local=self.local(layer),
                                     local_blocks=self.spec.local_blocks)
        return retrieval_attention(apply_rope(q, cos[-T:], sin[-T:]), apply_rope(dk, cos, sin), dv,
                                   kv[layer, 0], kv[layer, 1], sel, ct, st, sink_end)

    # ---- answering ----------------------------------------------------------------------
    @torch.inference_mode()
    def answer(self, entry: store.Entry, suffix: list[int], max_new_tokens: int = 128,
               stop_ids: set[int] = frozenset(), on_token: Callable[[int], None] | None = None,
               n_sources: int = 3, focus: slice | None = None) -> Answer:
        """Continue the cached stream with `suffix` (question + answer cue) and generate greedily.

        focus: the question's tokens within `suffix` (default: all of it)."""
        t0 = time.perf_counter()
        sess = Session(self, entry, capacity=len(suffix) + max_new_tokens)
        return self.generate(sess, entry.n_tokens, suffix, max_new_tokens, stop_ids, on_token, n_sources, focus, t0)

    @torch.inference_mode()
    def generate(self, sess, context_tokens: int, suffix: list[int], max_new_tokens: int,
                 stop_ids: set[int], on_token: Callable[[int], None] | None, n_sources: int,
                 focus: slice | None, t0: float) -> Answer:
        """Greedy decoding in a session (Session, or corpus.CorpusSession) that has read nothing yet."""
        logits = sess.step(torch.tensor(suffix), focus)
        first = time.perf_counter() - t0
        out: list[int] = []
        while len(out) < max_new_tokens:
            tok = int(logits.argmax())
            if tok in stop_ids:
                break
            out.append(tok)
            if on_token:
                on_token(tok)
            if len(out) < max_new_tokens:
                logits = sess.step(torch.tensor([tok]))
        return Answer(tokens=out, text=self.lm.tokenizer.decode(out, skip_special_tokens=True),
                      sources=sess.sources(n_sources), retrieved_per_step=sess.retrieved_per_step,
                      prompt_tokens=context_tokens + len(suffix), answer_s=time.perf_counter() - t0,
                      first_token_s=first)


class Session:
    """Attention state for continuing a cached document, one step (question, token) at a time.

    Per layer, a dense buffer holds the RoPE'd keys and values of the sink, the local
    window (the end of the document) and every token since, at fixed positions: the
    retrieved blocks always occupy positions [sink, sink + k*block), so nothing already
    in the buffer ever moves.

    With `select="shared"` the question is run twice: once with per-layer selection up to
    the last layer of the band, where the question's own tokens (`focus`) score every
    candidate block by its best-matching key (softmax over blocks per query, averaged over
    queries, KV heads and band layers) to choose one set of k blocks; then through all
    layers with that set, which the answer keeps to its end. Mean-key landmarks rank a
    fact planted in natural prose poorly; the exact block maximum at a few middle layers
    ranks it first (benchmarks/needle_ranks.py)."""

    def __init__(self, engine: Engine, entry: store.Entry, capacity: int):
        self.e, self.entry = engine, entry
        s, c, m = engine.s, engine.cfg, engine.m
        B, n = s.block, entry.n_tokens
        self.kv = as_torch(entry.kv)
        self.reps = torch.from_numpy(entry.reps)
        window = s.window_tokens if s.answer_window is None else s.answer_window // B * B
        self.sink_end = min(s.sink_tokens, n // B * B)
        win0 = max(self.sink_end, (n - window) // B * B)
        self.cand = slice(self.sink_end // B, win0 // B)
        self.cited = slice(self.cand.start, entry.kv.shape[3])  # blocks sources may come from (window too)
        self.k = min(s.top_k, self.cand.stop - self.cand.start)
        lo, hi = (round(f * c.n_layers) for f in s.band)
        self.band = range(lo, max(hi, lo + 1))
        self.ret_cos, self.ret_sin = m.rope.tables(self.sink_end + self.k * B)
        self.n_dense = self.sink_end + (n - win0)
        self.next_pos = self.sink_end + self.k * B + (n - win0)
        self.stream_len = n  # trained mode: the stream position of the next token
        if engine.spec is not None:  # room for the landmarks inserted among new tokens
            capacity += capacity // engine.spec.mem_freq + 2
            self.dense_lm = is_landmark_position(win0 + torch.arange(self.n_dense + capacity), B)
            # a local layer's previous block sits right before the window (RoPE is relative,
            # so a position below 0 is a rotation the other way)
            self.local_sel = local_selection(win0 // B, c.n_kv_heads, engine.spec.local_blocks)
            p = self.sink_end + self.k * B - B + torch.arange(B)
            lc, ls = m.rope.at(p.abs())
            self.local_cos, self.local_sin = lc, ls * torch.where(p < 0, -1.0, 1.0)[:, None]
        self.retrieved_per_step = self.sink_end + self.k * B + (n - win0)
        pos = torch.cat([torch.arange(self.sink_end), self.sink_end + self.k * B + torch.arange(n - win0)])
        cos, sin = m.rope.at(pos)
        self.dense = torch.empty(c.n_layers, 2, c.n_kv_heads, self.n_dense + capacity, c.head_dim, dtype=m.dtype)
        for layer in range(c.n_layers):
            flat = self.kv[layer].flatten(2, 3)  # [2, Hkv, nb*B, D] view of the memory map
            d = torch.cat([flat[:, :, :self.sink_end], flat[:, :, win0:n]], 2).to(m.dtype)
            self.dense[layer, 0, :, :self.n_dense] = apply_rope(d[0], cos, sin)
            self.dense[layer, 1, :, :self.n_dense] = d[1]
        self.question_scores: list[torch.Tensor] = []  # per layer [Hkv, blocks], first step
        self.scored = self.cand  # the blocks question_scores cover
        self.shared: torch.Tensor | None = None  # [Hkv, k] the shared selection, once made
        self.rotated: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per layer: its blocks, RoPE'd
        self.steps = 0

    def _per_layer(self, record: list | None):
        def choose(layer: int, q: torch.Tensor) -> torch.Tensor:
            c = self.e.cfg
            scores = block_scores(q, self.reps[layer, :, self.cand], self.e.s.rep, c.n_kv_heads)
            if record is not None:
                record.append(scores)
            return top_blocks(scores, self.k) + self.cand.start
        return choose

    def _layers(self, x, cos, sin, a: int, choose, stop: int | None = None) -> torch.Tensor:
        """Run hidden states x [T, dim] (positions given by cos/sin) through layers [0, stop)."""
        c, m = self.e.cfg, self.e.m
        b = a + x.shape[0]
        for layer in range(c.n_layers if stop is None else stop):
            q, k, v = m.qkv(layer, x)
            self.dense[layer, 0, :, a:b] = apply_rope(k, cos, sin)
            self.dense[layer, 1, :, a:b] = v
            if self.e.spec is not None:
                local = self.e.local(layer)
                sel, rc, rs = (self.local_sel, self.local_cos, self.local_sin) if local else \
                    (choose(layer, q), self.ret_cos, self.ret_sin)
                att = grouped_attention(apply_rope(q, cos, sin), self.dense[layer, 0, :, :b],
                                        self.dense[layer, 1, :, :b], self.dense_lm[:b], self.kv[layer, 0],
                                        self.kv[layer, 1], sel, rc, rs, local=local,
                                        local_blocks=self.e.spec.local_blocks)
                x = m.finish(layer, x, att)
                continue
            sel = choose(layer, q)
            rotated = None
            if sel is self.shared:  # the same blocks at every step: gather and rotate them once
                if layer not in self.rotated:
                    self.rotated[layer] = rotated_blocks(self.kv[layer, 0], self.kv[layer, 1], sel, self.ret_cos,
                                                         self.ret_sin, self.sink_end, x.device)
                rotated = self.rotated[layer]
            att = retrieval_attention(apply_rope(q, cos, sin), self.dense[layer, 0, :, :b],
                                      self.dense[layer, 1, :, :b], self.kv[layer, 0], self.kv[layer, 1],
                                      sel, self.ret_cos, self.ret_sin, self.sink_end, rotated=rotated)
            x = m.finish(layer, x, att)
        return x

    def _band_scorer(self, focus: slice, out: list):
        """Per-layer selection that also scores all candidate blocks exactly at band layers."""
        per_layer = self._per_layer(None)

        def choose(layer: int, q: torch.Tensor) -> torch.Tensor:
            if layer in self.band:
                keys = self.kv[layer, 0, :, self.cited]  # [Hkv, N, B, D] view of the memory map
                valid = self.entry.n_tokens - (self.cited.stop - 1) * self.e.s.block
                out.append(exact_block_logits(q[:, focus], keys, self.e.cfg.n_kv_heads, valid))
            return per_layer(layer, q)
        return choose

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, focus: slice | None = None) -> torch.Tensor:
        """Feed tokens ids [T]; return the logits after the last one [vocab].

        focus: which of these tokens are the question (they make the shared selection)."""
        s, c, m = self.e.s, self.e.cfg, self.e.m
        if self.e.spec is not None:  # landmarks go in as the stream needs them (the model never writes one)
            spec = self.e.spec
            ids = torch.tensor(insert_landmarks(ids.tolist(), None, spec.mem_freq, spec.mem_id, self.stream_len)[0])
            self.stream_len += len(ids)
        T, a = ids.shape[0], self.n_dense
        cos, sin = m.rope.at(torch.arange(self.next_pos, self.next_pos + T))
        x = m.embed(ids)
        if s.select == "shared" and self.shared is None:
            logits: list[torch.Tensor] = []  # per band layer [Hkv, queries, cited blocks]
            self._layers(x, cos, sin, a, self._band_scorer(focus or slice(None), logits), stop=self.band.stop)
            n_cand = self.cand.stop - self.cand.start  # candidates come first among the cited blocks
            votes = torch.stack([relevance(lg[..., :n_cand]) for lg in logits]).mean((0, 1))
            chosen = top_runs(votes, self.k, s.follow, best_last=s.order == "best-last")
            self.shared = (chosen + self.cand.start).expand(c.n_kv_heads, -1)
            self.question_scores, self.scored = [relevance(lg) for lg in logits], self.cited
        if self.shared is not None:
            x = self._layers(x, cos, sin, a, lambda layer, q: self.shared)
        else:
            x = self._layers(x, cos, sin, a, self._per_layer(self.question_scores if self.steps == 0 else None))
        self.n_dense, self.next_pos, self.steps = a + T, self.next_pos + T, self.steps + 1
        logits = m.logits(x[-1:])[0]
        if self.e.spec is not None:  # after a landmark the model predicts the next token (reference convention)
            logits[self.e.spec.mem_id] = float("-inf")
        return logits

    @torch.inference_mode()
    def close(self) -> torch.Tensor:
        """Trained mode, on a fresh session of a stream that ends inside a block: the
        `<landmark>` run after the stream, as if its block ended there (per-layer retrieval,
        grouped softmax, like a landmark read in place). Returns its pre-RoPE key and value
        [layers, 2, Hkv, D]: the partial block's landmark for a folder question."""
        m, a = self.e.m, self.n_dense
        self.dense_lm[a] = True
        cos, sin = m.rope.at(torch.tensor([self.next_pos]))
        self._layers(m.embed(torch.tensor([self.e.spec.mem_id])), cos, sin, a, self._per_layer(None))
        k = apply_rope(self.dense[:, 0, :, a:a + 1], cos, -sin)[:, :, 0]  # rotated back: pre-RoPE
        return torch.stack([k, self.dense[:, 1, :, a]], 1)

    def sources(self, n: int) -> list[tuple[int, int, float]]:
        """(entry 0, block, score) of the blocks the question scored highest (over the layers that made the selection);
        with the shared selection these include the local window, so a short document
        that needs no retrieval is still cited."""
        if not self.question_scores or self.question_scores[0].shape[1] == 0:
            return []
        votes = torch.stack(self.question_scores).mean((0, 1))  # [blocks scored]
        best = votes.topk(min(n, votes.shape[0]))
        return [(0, int(i) + self.scored.start, float(v)) for v, i in zip(best.values, best.indices)]
