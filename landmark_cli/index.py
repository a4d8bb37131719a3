"""`landmark index DIR`: read every document below a folder into the store, incrementally.

For each PDF/TXT/MD file below the folder the manifest (manifest.py) says whether it is
already indexed with this model and these reading settings: a file with the same
content hash and an intact store entry is skipped without touching the model; a new or
changed file is read (engine.Engine.read, under the per-entry file lock of `ask`); a
file that cannot be read (encrypted, scanned, corrupt, empty) is recorded as failed
with its error and the run goes on. Rows are committed one document at a time, so Ctrl-C
or a kill loses at most the document being read, and the next run resumes. One indexer
per folder at a time: a second one is refused with a clear message.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout

from landmark_cli.documents import find_documents, load_document
from landmark_cli.errors import LandmarkError, StoreError
from landmark_cli.model.loading import LoadedModel
from landmark_cli.paths import home
from landmark_cli.prompts import document_prompt
from landmark_cli.retrieval.engine import Engine
from landmark_cli.retrieval.settings import Settings
from landmark_cli.storage import store
from landmark_cli.storage.manifest import Manifest, Row, settings_key
from landmark_cli.storage.store import DamagedEntry


def manifest_path() -> Path:
    return home() / "manifest.sqlite"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Outcome:
    path: str
    state: str  # run: indexed | skipped | failed | deleted | pruned;  status: ok | stale | new | failed | deleted
    tokens: int | None = None
    seconds: float = 0.0
    error: str | None = None
    note: str = ""
    nbytes: int = 0  # size of the store entry on disk


class Indexer:
    """Index folders for one model and one set of reading settings."""

    def __init__(self, lm: LoadedModel, settings: Settings, store_root: Path | None = None):
        self.lm, self.settings = lm, settings
        self.engine = Engine(lm, settings, root=store_root)
        # the settings as the engine reads with them (trained models adjust them)
        self.key = (lm.fingerprint, settings_key(self.engine.reading.key()))

    def _lock(self, folder: Path) -> FileLock:
        locks = home() / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        return FileLock(str(locks / f"index-{hashlib.sha256(str(folder).encode()).hexdigest()[:20]}.lock"))

    def entry(self, row: Row) -> store.Entry | None:
        return store.open_entry(self.engine.root / row.store_key) if row.store_key else None

    # ---- one run -----------------------------------------------------------------------
    def run(self, folder: str | Path, *, prune: bool = False,
            on_start: Callable[[Path, int, int], None] | None = None,
            progress: Callable[[int, int], None] | None = None,
            on_done: Callable[[Outcome], None] | None = None) -> list[Outcome]:
        """Index `folder`; returns one outcome per file (and per deleted file)."""
        folder = Path(folder).expanduser().resolve()
        files = find_documents(folder)
        lock = self._lock(folder)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise StoreError(f"another `landmark index` is already indexing {folder}",
                             "wait for it to finish (or stop it), then run this again") from None
        try:
            with Manifest(manifest_path()) as man:
                outcomes = []
                for i, path in enumerate(files):
                    if on_start:
                        on_start(path, i, len(files))
                    outcome = self._one(man, path, progress)
                    outcomes.append(outcome)
                    if on_done:
                        on_done(outcome)
                present = {str(p) for p in files}
                for row in man.under(folder, *self.key):
                    if row.path not in present:
                        outcomes.append(Outcome(row.path, "pruned" if prune else "deleted", row.tokens))
                        if prune:
                            self._drop(man, row)
                return outcomes
        finally:
            lock.release()

    def _one(self, man: Manifest, path: Path, progress) -> Outcome:
        t0 = time.perf_counter()
        stat = path.stat()
        sha = file_sha256(path)
        row = man.get(str(path), *self.key)
        note = ""
        if row is not None and row.sha256 == sha:
            if row.status == "failed":
                return Outcome(str(path), "failed", error=row.error, note="unchanged since it failed")
            if self.entry(row) is not None:
                return Outcome(str(path), "skipped", row.tokens, note="unchanged")
            note = "cache was missing or damaged: read again"
        elif row is not None:
            note = "changed: read again"

        def record(status: str, error: str | None = None, tokens: int | None = None, blocks: int | None = None,
                   store_key: str | None = None) -> Row:
            """This file's manifest row, indexed now."""
            return Row(path=str(path), fingerprint=self.key[0], settings=self.key[1], model=self.lm.name, sha256=sha,
                       size=stat.st_size, mtime=stat.st_mtime, tokens=tokens, blocks=blocks, store_key=store_key,
                       status=status, error=error, indexed_at=time.time())

        try:
            doc = load_document(path)
        except LandmarkError as e:
            man.put(record("failed", e.message))
            return Outcome(str(path), "failed", error=e.message)
        except Exception as e:  # noqa: BLE001 - a damaged file of any kind is recorded, not fatal
            msg = f"could not read {path.name}: {type(e).__name__}: {e}"
            man.put(record("failed", msg))
            return Outcome(str(path), "failed", error=msg)
        prompt = document_prompt(self.lm.tokenizer, doc.text)
        previous = self.entry(row) if row is not None and row.status == "ok" else None
        if previous is not None and self.engine.shared_prefix(previous, prompt.ids):
            note = f"changed after token {self.engine.shared_prefix(previous, prompt.ids):,}: read from there"
        try:
            entry, cached = self.engine.read_locked(prompt.ids, prompt.spans, progress, prefix=previous,
                                                    source=str(path))
        except DamagedEntry as e:  # the previous version's reading: drop it and read from the start
            store.remove(e.path)
            note = "cache was damaged: read again"
            entry, cached = self.engine.read_locked(prompt.ids, prompt.spans, progress, source=str(path))
        man.put(record("ok", tokens=entry.n_tokens, blocks=int(entry.kv.shape[3]), store_key=entry.path.name))
        if row is not None and row.store_key and row.store_key != entry.path.name \
                and man.references(row.store_key) == 0:
            store.remove(self.engine.root / row.store_key)  # the previous version's cache
        return Outcome(str(path), "indexed", entry.n_tokens, time.perf_counter() - t0,
                       note=note or ("cache reused" if cached else ""))

    def _drop(self, man: Manifest, row: Row) -> None:
        man.delete(row.path, *self.key)
        if row.store_key and man.references(row.store_key) == 0:
            store.remove(self.engine.root / row.store_key)

    # ---- status ------------------------------------------------------------------------
    def status(self, folder: str | Path) -> list[Outcome]:
        """What is indexed below `folder`, what is stale or new, what failed, what was deleted."""
        folder = Path(folder).expanduser().resolve()
        files = find_documents(folder)
        with Manifest(manifest_path()) as man:
            rows = {r.path: r for r in man.under(folder, *self.key)}
        out = []
        for path in files:
            row = rows.pop(str(path), None)
            out.append(self._state(path, row)[0])
        out += [Outcome(r.path, "deleted", r.tokens) for r in rows.values()]
        return sorted(out, key=lambda o: o.path)

    def _state(self, path: Path, row: Row | None) -> tuple[Outcome, store.Entry | None]:
        """The file's state, and its validated store entry when it is "ok"."""
        if row is None:
            return Outcome(str(path), "new"), None
        if file_sha256(path) != row.sha256:
            return Outcome(str(path), "stale", row.tokens, note="changed since it was indexed"), None
        if row.status == "failed":
            return Outcome(str(path), "failed", error=row.error), None
        entry = self.entry(row)
        if entry is None:
            return Outcome(str(path), "stale", row.tokens, note="cache missing or damaged"), None
        return Outcome(str(path), "ok", row.tokens, nbytes=entry.nbytes()), entry

    def ready(self, folder: str | Path) -> tuple[list[tuple[Row, store.Entry]], list[Outcome]]:
        """For asking: (row, entry) of every document below `folder` that is indexed and
        current, and the documents left out because they are new, changed or damaged."""
        folder = Path(folder).expanduser().resolve()
        files = find_documents(folder)
        with Manifest(manifest_path()) as man:
            rows = {r.path: r for r in man.under(folder, *self.key)}
        usable: list[tuple[Row, store.Entry]] = []
        left_out: list[Outcome] = []
        for path in files:
            row = rows.get(str(path))
            state, entry = self._state(path, row)
            if row is not None and entry is not None:  # _state has an entry only for a row
                usable.append((row, entry))
            elif state.state != "failed":  # a file known to be unreadable is not news
                left_out.append(state)
        return usable, left_out
