"""`landmark ask`: load a document and a model, read (or load) its KV, answer, cite sources."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from landmark_cli.documents import Document, load_document
from landmark_cli.errors import LandmarkError, StoreError
from landmark_cli.model.loading import LoadedModel
from landmark_cli.prompts import ask_prompt
from landmark_cli.retrieval.engine import Engine
from landmark_cli.retrieval.settings import Settings
from landmark_cli.storage import store
from landmark_cli.storage.store import DamagedEntry


@dataclass
class Source:
    path: str
    block: int
    score: float
    text: str
    page: int | None
    lines: tuple[int, int] | None

    def as_json(self) -> dict:
        return {"path": self.path, "page": self.page, "lines": list(self.lines) if self.lines else None,
                "block": self.block, "score": round(self.score, 6), "text": self.text}


@dataclass
class Result:
    answer: str
    sources: list[Source]
    cached: bool
    model: str
    document_tokens: int
    retrieved_per_step: int
    timings: dict = field(default_factory=dict)
    documents: int = 1
    answer_tokens: int = 0
    runtime: str = ""  # device, dtype and kernels (LoadedModel.runtime)

    def as_json(self) -> dict:
        return {"answer": self.answer, "sources": [s.as_json() for s in self.sources], "cached": self.cached,
                "model": self.model, "runtime": self.runtime, "documents": self.documents,
                "tokens": {"document": self.document_tokens, "retrieved_per_step": self.retrieved_per_step,
                           "answer": self.answer_tokens},
                "timings": {k: round(v, 3) for k, v in self.timings.items()}}


def sources_of(doc: Document, entry, blocks: list[tuple[int, int, float]]) -> list[Source]:
    out = []
    for _, b, score in blocks:
        start, end = (int(x) for x in entry.spans[b])
        if start < 0:
            continue
        page, lines = doc.locate(start, end)
        out.append(Source(path=str(doc.path), block=b, score=score, text=doc.text[start:end].strip(), page=page,
                          lines=lines))
    return out


def _streamer(tokenizer, on_token: Callable[[str], None] | None):
    """(per-token callback, final flush): decode incrementally so multi-token characters print whole."""
    shown = ""
    tokens: list[int] = []

    def stream(tok: int) -> None:
        nonlocal shown
        tokens.append(tok)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if on_token and len(text) > len(shown) and not text.endswith("\ufffd"):
            on_token(text[len(shown):])
            shown = text

    def flush(text: str) -> None:
        if on_token and len(text) > len(shown):
            on_token(text[len(shown):])
    return stream, flush


def check_question(question: str) -> None:
    """A question must say something."""
    if not question.strip():
        raise LandmarkError("the question is empty", 'write it after the document, in quotes: landmark ask FILE "..."')


def ask(lm: LoadedModel, path: str | Path | Document, question: str, settings: Settings, *, max_new_tokens: int = 128,
        on_token: Callable[[str], None] | None = None, progress=None, on_wait=None,
        on_damaged: Callable[[str], None] | None = None, load_s: float = 0.0) -> Result:
    """Answer `question` about the document at `path`; stream answer text through `on_token`.

    A cached reading found damaged while answering is removed, `on_damaged` is told, and
    the document is read again (once): no answer comes from damaged data. `path` may be a
    document already loaded."""
    check_question(question)
    doc = path if isinstance(path, Document) else load_document(path)
    engine = Engine(lm, settings)
    prompt = ask_prompt(lm.tokenizer, doc.text, question)
    for attempt in range(2):
        t0 = time.perf_counter()
        entry, cached = engine.read_locked(prompt.ids, prompt.spans, progress, on_wait, source=str(doc.path))
        index_s = time.perf_counter() - t0
        stream, flush = _streamer(lm.tokenizer, on_token)
        try:
            ans = engine.answer(entry, prompt.suffix, max_new_tokens, lm.stop_ids(), stream,
                                question=prompt.question)
            break
        except DamagedEntry as e:
            store.remove(e.path)
            if attempt or not cached:  # damaged right after it was written
                raise StoreError(f"{e.message}, right after it was written",
                                 f"check the disk that holds {engine.root}") from None
            if on_damaged:
                on_damaged(f"{e.message}: it was removed; reading {doc.path.name} again")
    flush(ans.text)
    return Result(answer=ans.text.strip(), sources=sources_of(doc, entry, ans.sources), cached=cached,
                  model=lm.name, document_tokens=entry.n_tokens, retrieved_per_step=ans.retrieved_per_step,
                  answer_tokens=len(ans.tokens), runtime=lm.runtime(),
                  timings={"load_s": load_s, "index_s": index_s, "answer_s": ans.answer_s,
                           "first_token_s": ans.first_token_s})


def ask_folder(lm: LoadedModel, folder: str | Path, question: str, settings: Settings, *,
               max_new_tokens: int = 128, on_token: Callable[[str], None] | None = None,
               on_left_out: Callable[[list], None] | None = None, load_s: float = 0.0,
               index_s: float = 0.0) -> Result:
    """Answer `question` from every indexed document below `folder` (landmark retrieval across
    all their blocks); sources name the file. Documents not indexed yet are left out and
    reported through `on_left_out`; none indexed at all is an error, and so is a document
    whose cached reading is found damaged (it is removed, to be indexed again)."""
    check_question(question)
    from landmark_cli.index import Indexer

    indexer = Indexer(lm, settings)
    usable, left_out = indexer.ready(folder)
    if not usable:
        raise LandmarkError(f"no document below {folder} is indexed for this model and these settings",
                            f"run `landmark index {folder}` first (same --model and block options), "
                            "or pass --index")
    if left_out and on_left_out:
        on_left_out(left_out)
    rows, entries = [r for r, _ in usable], [e for _, e in usable]
    engine = indexer.engine
    prompt = ask_prompt(lm.tokenizer, "", question)
    t0 = time.perf_counter()
    stream, flush = _streamer(lm.tokenizer, on_token)
    try:
        sess = engine.landmarks.folder_session(engine, entries, capacity=len(prompt.suffix) + max_new_tokens)
        ans = engine.generate(sess, sum(e.n_tokens for e in entries), prompt.suffix, max_new_tokens, lm.stop_ids(),
                              stream, 3, prompt.question, t0)
    except DamagedEntry as e:
        store.remove(e.path)
        damaged = next(r.path for r, entry in usable if entry.path == e.path)
        raise StoreError(f"the cached reading of {damaged} is damaged; it was removed",
                         f"run `landmark index {folder}` to read it again, or ask with --index") from None
    flush(ans.text)
    docs: dict[int, Document] = {}
    sources = []
    for d, b, score in ans.sources:
        if d not in docs:
            docs[d] = load_document(rows[d].path)
        sources += sources_of(docs[d], entries[d], [(d, b, score)])
    return Result(answer=ans.text.strip(), sources=sources, cached=True, model=lm.name,
                  document_tokens=sum(e.n_tokens for e in entries), retrieved_per_step=ans.retrieved_per_step,
                  documents=len(entries),
                  answer_tokens=len(ans.tokens), runtime=lm.runtime(),
                  timings={"load_s": load_s, "index_s": index_s, "answer_s": ans.answer_s,
                           "first_token_s": ans.first_token_s})
