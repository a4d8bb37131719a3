"""`landmark ask`: load a document and a model, read (or load) its KV, answer, cite sources."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout

from .documents import Document, load_document
from .engine import Engine, Settings
from .errors import StoreError
from .models import LoadedModel
from .prompts import ask_prompt

LOCK_TIMEOUT_S = 3600


@dataclass
class Source:
    block: int
    score: float
    text: str
    page: int | None
    lines: tuple[int, int] | None

    def as_json(self) -> dict:
        return {"page": self.page, "lines": list(self.lines) if self.lines else None, "block": self.block,
                "score": round(self.score, 6), "text": self.text}


@dataclass
class Result:
    answer: str
    sources: list[Source]
    cached: bool
    model: str
    document_tokens: int
    retrieved_per_step: int
    timings: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        return {"answer": self.answer, "sources": [s.as_json() for s in self.sources], "cached": self.cached,
                "model": self.model,
                "tokens": {"document": self.document_tokens, "retrieved_per_step": self.retrieved_per_step},
                "timings": {k: round(v, 3) for k, v in self.timings.items()}}


def read_locked(engine: Engine, ids, spans, progress=None, on_wait: Callable[[], None] | None = None):
    """engine.read under a per-entry file lock: a second process waits, then finds the cache."""
    engine.root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(engine.root / f"{engine.key(ids)}.lock"))
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
        return engine.read(ids, spans, progress)
    finally:
        lock.release()


def sources_of(doc: Document, entry, blocks: list[tuple[int, float]]) -> list[Source]:
    out = []
    for b, score in blocks:
        start, end = (int(x) for x in entry.spans[b])
        if start < 0:
            continue
        page, lines = doc.locate(start, end)
        out.append(Source(block=b, score=score, text=doc.text[start:end].strip(), page=page, lines=lines))
    return out


def ask(lm: LoadedModel, path: str | Path, question: str, settings: Settings, *, max_new_tokens: int = 128,
        on_token: Callable[[str], None] | None = None, progress=None, on_wait=None, load_s: float = 0.0) -> Result:
    """Answer `question` about the document at `path`; stream answer text through `on_token`."""
    doc = load_document(path)
    engine = Engine(lm, settings)
    prompt = ask_prompt(lm.tokenizer, doc.text, question)
    t0 = time.perf_counter()
    entry, cached = read_locked(engine, prompt.ids, prompt.spans, progress, on_wait)
    index_s = time.perf_counter() - t0

    shown = ""
    tokens: list[int] = []

    def stream(tok: int) -> None:  # decode incrementally so multi-token characters print whole
        nonlocal shown
        tokens.append(tok)
        text = lm.tokenizer.decode(tokens, skip_special_tokens=True)
        if on_token and len(text) > len(shown) and not text.endswith("\ufffd"):
            on_token(text[len(shown):])
            shown = text

    ans = engine.answer(entry, prompt.suffix, max_new_tokens, lm.stop_ids(), stream, focus=prompt.focus)
    if on_token and len(ans.text) > len(shown):
        on_token(ans.text[len(shown):])
    return Result(answer=ans.text.strip(), sources=sources_of(doc, entry, ans.sources), cached=cached,
                  model=lm.name, document_tokens=entry.n_tokens, retrieved_per_step=ans.retrieved_per_step,
                  timings={"load_s": load_s, "index_s": index_s, "answer_s": ans.answer_s,
                           "first_token_s": ans.first_token_s})
