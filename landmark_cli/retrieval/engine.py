"""Reading documents into the KV store and answering from it with landmark retrieval.

Every attention step (a chunk of the document while reading, the question, each
generated token) attends to, per layer and KV head:

    [sink: the first `sink` tokens] [k retrieved blocks] [local window] [the step's own tokens]

placed contiguously at positions 0, 1, 2, ... so the model never sees a distance larger
than sink + k*block + window + chunk, whatever the document length. Retrieved blocks are
the top-k by landmark score (landmarks.py) among the complete blocks between the sink
and the window, kept in document order (while answering with the shared selection,
passages of adjacent blocks go best last: Answering.order). Keys are stored pre-RoPE and
rotated at their new positions when attended.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Collection

import numpy as np
import torch
from filelock import FileLock, Timeout

from landmark_cli.errors import LandmarkError, StoreError
from landmark_cli.kernels import cpu_step
from landmark_cli.kernels.rope import apply_rope
from landmark_cli.model.llama import Llama
from landmark_cli.model.loading import LoadedModel
from landmark_cli.paths import home
from landmark_cli.retrieval.attention import DenseKV, dense_attention, landmark_kind
from landmark_cli.retrieval.landmarks import N_REPS, block_reps, is_landmark_position
from landmark_cli.retrieval.selection import ByRepresentatives
from landmark_cli.retrieval.settings import Answering, Settings, effective_settings
from landmark_cli.storage import cache, store

LOCK_TIMEOUT_S = 3600  # how long a second process waits for another reading the same document


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
MIN_REPEAT = 4  # tokens: a shorter run said twice may be the answer itself ("no, no")


def repeated_tail(tokens: list[int]) -> int:
    """Length m of a run of at least MIN_REPEAT tokens that `tokens` ends with twice in a row
    ("The answer is: 5. The answer is: 5."), or 0."""
    n = len(tokens)
    for m in range(MIN_REPEAT, n // 2 + 1):
        if tokens[n - m:] == tokens[n - 2 * m:n - m]:
            return m
    return 0


class Engine:
    """Reads token streams into the store and answers from it, for one model and one set of settings."""

    def __init__(self, loaded: LoadedModel, settings: Settings | None = None, root: Path | None = None):
        settings, self.spec = effective_settings(loaded, settings or Settings())  # spec set: trained landmarks
        self.loaded, self.settings, self.reading = loaded, settings, settings.read
        self.model = loaded.model  # answers
        self.reader = loaded.reading_model  # reads documents (another dtype on the CPU's --dtype auto)
        self.landmarks = landmark_kind(self.spec, loaded.kernels)
        # answer tokens over a dense buffer in one native call on the CPU (--kernels torch: never)
        self.native = cpu_step.for_model(self.model) if self.spec is None and loaded.kernels != "torch" else None
        self.root = Path(root) if root else home() / "store"
        store.sweep_temporaries(self.root)  # what a killed reader left behind
        limit = self.spec.train_context if self.spec else self.model.cfg.context
        if self.reading.span() > limit:
            raise LandmarkError(f"sink + top_k*block + window + chunk = {self.reading.span()} tokens exceeds the "
                                f"model's context of {limit} tokens", "lower --top-k, --window or --chunk")

    def runner(self, tokens: int) -> Llama:
        """The weights a step of `tokens` tokens runs on: an answer step (one token, which
        streams every matrix once) on the answering copy; a question (several tokens: more
        arithmetic per byte) on the reading one, whose matrices are in the dtype this device
        does arithmetic fastest in (float16 has no fast CPU path for more than one row)."""
        return self.reader if tokens > 1 else self.model

    def dense_step(self, x: torch.Tensor, dense: DenseKV, start: int, cos: torch.Tensor,
                   sin: torch.Tensor) -> torch.Tensor:
        """Hidden states x [T, dim] at positions [start, start + T) of `dense` (RoPE rows
        cos/sin [T, D]), attending to that buffer alone (its reserved slots included):
        returns the logits after the last token [vocab]. One token runs as one native call
        where the CPU step is built (cpu_step), otherwise through the layer loop."""
        T = x.shape[0]
        if T == 1 and self.native is not None:
            return self.native.logits(x[0], dense.kv, dense.reserved + start, cos[0], sin[0])

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            dense.write(layer, start, apply_rope(k, cos, sin), v)
            return dense_attention(apply_rope(q, cos, sin), *dense.joined(layer, start + T))

        return self.logits(self.runner(T).run_layers(x, attend)[-1])

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The next token's logits [vocab] from the last hidden state x [dim] (the answering
        copy's LM head: natively where the CPU step is built, since that copy may be packed)."""
        if self.native is not None:
            return self.native.logits_of(x)
        return self.model.logits(x[None])[0]

    def stream(self, ids: list[int], spans: np.ndarray | None = None):
        """The token stream the store holds for ids: with trained landmarks, a <landmark>
        after every mem_freq tokens (spans get (-1, -1) rows for them)."""
        return self.landmarks.stream(ids, spans)

    def answer_with(self, answering: Answering) -> None:
        """Answer from now on with other answer-time settings (what is read is unchanged)."""
        self.settings = effective_settings(self.loaded, replace(self.settings, answer=answering))[0]

    # ---- the store -------------------------------------------------------------------
    def key(self, ids: list[int]) -> str:
        digest = store.entry_key({"ids": store.digest(np.asarray(ids, dtype=np.int32))})
        return store.entry_key({"model": self.loaded.fingerprint, "settings": self.reading.key(), "ids": digest})

    def lookup(self, ids: list[int]) -> store.Entry | None:
        """The valid cached entry for this token stream, or None (a corrupt one is removed)."""
        path = self.root / self.key(ids)
        if not path.exists():
            return None
        entry = store.open_entry(path)
        if entry is None:
            store.remove(path)
        else:
            store.touch(path)
        return entry

    def read(self, ids: list[int], spans: np.ndarray | None = None, progress: Progress | None = None,
             prefix: store.Entry | None = None, source: str | None = None) -> tuple[store.Entry, bool]:
        """Entry for the token stream `ids` (prompt prefix + document): cached or built now.

        spans [n_tokens, 2]: character span of each token in the document (-1 for prompt tokens).
        prefix: an entry of this engine whose token stream starts like `ids` (an earlier
        version of a document that grew): the reading chunks they share are copied, not read.
        source: the document's path, recorded for `landmark cache list`.
        Returns (entry, cached). After a new entry the store is pruned to LANDMARK_CACHE_MAX."""
        entry = self.lookup(ids)
        if entry is not None:
            return entry, True
        key, given = self.key(ids), ids
        ids, spans = self.stream(ids, spans)
        s, c = self.reading, self.model.cfg
        n = len(ids)
        nb = -(-n // s.block)
        shape = dict(layers=c.n_layers, kv_heads=c.n_kv_heads, n_blocks=nb, block=s.block,
                     head_dim=c.head_dim, n_reps=N_REPS[s.rep], n_tokens=n)
        w = store.Writer(self.root, key, shape, {"model": self.loaded.name, "fingerprint": self.loaded.fingerprint,
                                                 "settings": s.key(), "source": source}, kv_dtype=s.kv_dtype)
        try:
            w.ids[:] = ids
            if spans is not None:
                for b in range(nb):
                    sp = spans[b * s.block:(b + 1) * s.block]
                    sp = sp[sp[:, 0] >= 0]
                    if len(sp):
                        w.spans[b] = (sp[:, 0].min(), sp[:, 1].max())
            start = self.shared_prefix(prefix, given) if prefix is not None else 0
            if prefix is not None and start:
                prefix.verify(slice(None), slice(None), range(start // s.block))
                w.copy_from(prefix, start // s.block)
            self._prefill(w, torch.tensor(ids), progress, start)
            path = w.commit()
        except BaseException:
            w.abort()
            raise
        entry = store.open_entry(path)
        if entry is None:
            raise RuntimeError(f"the store entry just written at {path} does not validate")
        cache.apply_cap(self.root)  # the new entry is held, so never pruned here
        return entry, False

    def read_locked(self, ids: list[int], spans: np.ndarray | None = None, progress: Progress | None = None,
                    on_wait: Callable[[], None] | None = None, prefix: store.Entry | None = None,
                    source: str | None = None):
        """`read` under a per-entry file lock: a second process waits (on_wait is told),
        then finds the cache."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.root / f"{self.key(ids)}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if on_wait:
                on_wait()
            try:
                lock.acquire(timeout=LOCK_TIMEOUT_S)
            except Timeout:
                raise StoreError("another landmark process has been reading this document for an hour",
                                 "wait for it to finish or stop it") from None
        try:
            return self.read(ids, spans, progress, prefix, source)
        finally:
            lock.release()

    def shared_prefix(self, entry: store.Entry, ids: list[int]) -> int:
        """Tokens at the start of `ids` whose reading `entry` already holds: the whole reading
        chunks of their common prefix (reading a chunk depends only on the tokens up to its end).
        0 if `entry` was read by another model or with other settings. Counted in stream tokens."""
        ids = self.stream(ids)[0]
        meta = entry.meta
        if meta.get("fingerprint") != self.loaded.fingerprint or meta.get("settings") != self.reading.key():
            return 0
        n = min(entry.n_tokens, len(ids))
        same = np.asarray(entry.ids[:n]) == np.asarray(ids[:n], dtype=entry.ids.dtype)
        common = n if bool(same.all()) else int(same.argmin())
        return min(common, len(ids) - 1) // self.reading.chunk_tokens * self.reading.chunk_tokens

    # ---- reading (chunked prefill with retrieval) --------------------------------------
    @torch.inference_mode()
    def _prefill(self, w: store.Writer, ids: torch.Tensor, progress: Progress | None, first: int = 0) -> None:
        """Read ids[first:] chunk by chunk (`first` is a chunk boundary; blocks before it are filled)."""
        n = ids.shape[0]
        reps = torch.from_numpy(w.reps).to(self.reader.device)  # the representatives where the model runs
        for start in range(first, n, self.reading.chunk_tokens):
            end = min(start + self.reading.chunk_tokens, n)
            self._read_chunk(w, reps, ids[start:end], start, n)
            if progress:
                progress(end, n)

    def _read_chunk(self, w: store.Writer, reps: torch.Tensor, chunk: torch.Tensor, start: int, n: int) -> None:
        """Read the tokens chunk at stream positions [start, start + len(chunk)) of a stream of n.

        The chunk attends to [sink] [top-k blocks by representative, per layer and KV head,
        among the complete blocks between sink and window] [window] [itself]; its pre-RoPE
        keys and values and its blocks' representatives go into the entry being written
        (reps: the entry's representatives on the model's device, kept alongside)."""
        s, m = self.reading, self.reader
        B, end = s.block, start + chunk.shape[0]
        store_kv = w.tensor()
        b0, b1 = start // B, -(-end // B)
        last_valid = n - (w.kv.shape[3] - 1) * B if end == n else None  # real tokens in the stream's last block
        sink_end = min(s.sink_tokens, start)
        win0 = max(sink_end, start - s.window_tokens)
        retrievable = slice(sink_end // B, win0 // B)
        ranker = ByRepresentatives(reps[:, :, retrievable], s.rep, retrievable.start, s.top_k_or_default,
                                   m.cfg.n_kv_heads)
        selection = self.landmarks.selection(ranker, win0 // B, m.cfg.n_kv_heads)

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            for j, t in enumerate((k, v)):  # this chunk's pre-RoPE keys and values, into its blocks
                padded = torch.nn.functional.pad(t, (0, 0, 0, (b1 - b0) * B - (end - start)))
                w.put(layer, j, b0, padded.view(m.cfg.n_kv_heads, b1 - b0, B, -1))
            stored = store_kv[layer, 0, :, b0:b1].to(k.device)  # the keys as stored (rounded, or int8 decoded)
            reps[layer, :, b0:b1] = block_reps(stored, s.rep, valid=last_valid)
            w.reps[layer, :, b0:b1] = reps[layer, :, b0:b1].cpu().numpy()
            sel = selection.blocks(layer, q)
            return self._attend_chunk(layer, q, k, v, store_kv[layer], sel, sink_end, win0, start)

        m.run_layers(m.embed(chunk), attend)

    def _attend_chunk(self, layer, q, k, v, layer_kv, sel, sink_end, win0, start) -> torch.Tensor:
        """Attention of one reading chunk (q, k, v pre-RoPE) over the sink [0, sink_end), the
        blocks sel of layer_kv [2, Hkv, N, B, D] (kvformat.Stored), the window [win0, start) and itself, placed
        contiguously from position 0."""
        s, m = self.reading, self.reader
        sink, win = (layer_kv[:, :, i0 // s.block:i1 // s.block].to(k.device, k.dtype).flatten(2, 3)
                     for i0, i1 in ((0, sink_end), (win0, start)))
        T, n_sink, n_win = q.shape[1], sink.shape[2], win.shape[2]
        ret = sel.shape[1] * s.block
        pos = torch.cat([torch.arange(n_sink), torch.arange(n_win + T) + sink_end + ret])
        cos, sin = m.rope.at(pos)
        dk = torch.cat([sink[0], win[0], k], 1)
        dv = torch.cat([sink[1], win[1], v], 1)
        ct, st = m.rope.tables(sink_end + ret + 1)
        flags = is_landmark_position(torch.arange(n_win + T), s.block)  # trained: no sink; the window starts a block
        return self.landmarks.attend(layer, apply_rope(q, cos[-T:], sin[-T:]), apply_rope(dk, cos, sin), dv, flags,
                                     layer_kv[0], layer_kv[1], sel, ct, st, sink_end)

    # ---- answering ----------------------------------------------------------------------
    @torch.inference_mode()
    def answer(self, entry: store.Entry, suffix: list[int], max_new_tokens: int = 128,
               stop_ids: Collection[int] = (), on_token: Callable[[int], None] | None = None,
               n_sources: int = 3, question: slice | None = None) -> Answer:
        """Continue the cached stream with `suffix` (question + answer cue) and generate greedily.

        question: the question's tokens within `suffix` (default: all of it)."""
        from landmark_cli.retrieval.session import Session

        t0 = time.perf_counter()
        session = Session(self, entry, capacity=len(suffix) + max_new_tokens)
        return self.generate(session, entry.n_tokens, suffix, max_new_tokens, stop_ids, on_token, n_sources,
                             question, t0)

    @torch.inference_mode()
    def generate(self, session, context_tokens: int, suffix: list[int], max_new_tokens: int,
                 stop_ids: Collection[int], on_token: Callable[[int], None] | None, n_sources: int,
                 question: slice | None, t0: float) -> Answer:
        """Greedy decoding in an answering session (session.AnswerSession) that has read nothing yet."""
        logits = session.step(torch.tensor(suffix), question)
        first = time.perf_counter() - t0
        out: list[int] = []
        while len(out) < max_new_tokens:
            tok = int(logits.argmax())
            if tok in stop_ids:
                break
            out.append(tok)
            if repeat := repeated_tail(out):  # greedy decoding has begun a loop: what follows repeats too
                del out[-repeat:]
                break
            if on_token:
                on_token(tok)
            if len(out) < max_new_tokens:
                logits = session.step(torch.tensor([tok]))
        text = self.loaded.tokenizer.decode(out, skip_special_tokens=True)  # one sequence in, one string out
        return Answer(tokens=out, text=str(text),
                      sources=session.sources(n_sources), retrieved_per_step=session.retrieved_per_step,
                      prompt_tokens=context_tokens + len(suffix), answer_s=time.perf_counter() - t0,
                      first_token_s=first)
