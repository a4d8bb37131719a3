"""The corpus manifest: which documents are indexed, with which model and settings, where.

One SQLite database per store (`LANDMARK_HOME/manifest.sqlite`, WAL mode) with a row per
(document path, model fingerprint, reading settings). The KV caches themselves are store
entries (store.py); a row points at one. A row is written only when its document is
complete (status "ok") or has failed (status "failed", with the error), each in its own
transaction, so an interrupted run never leaves a partial document marked complete.

The schema is versioned with SQLite's `user_version`; MIGRATIONS[i] takes version i to
i + 1, so an older manifest is upgraded in place and a newer one is refused.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, fields
from pathlib import Path

from landmark_cli.errors import StoreError

MIGRATIONS = [
    """
    CREATE TABLE documents (
        path        TEXT NOT NULL,     -- absolute path of the file
        fingerprint TEXT NOT NULL,     -- model fingerprint (models.py)
        settings    TEXT NOT NULL,     -- reading settings as canonical JSON (engine.Settings.reading)
        model       TEXT NOT NULL,     -- the model as the user named it
        sha256      TEXT NOT NULL,     -- of the file's bytes
        size        INTEGER NOT NULL,
        mtime       REAL NOT NULL,
        tokens      INTEGER,           -- tokens in the store entry (prompt prefix + document)
        blocks      INTEGER,
        store_key   TEXT,              -- the store entry (LANDMARK_HOME/store/<store_key>)
        status      TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
        error       TEXT,
        indexed_at  REAL NOT NULL,
        PRIMARY KEY (path, fingerprint, settings)
    )
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass
class Row:
    path: str
    fingerprint: str
    settings: str
    model: str
    sha256: str
    size: int
    mtime: float
    tokens: int | None
    blocks: int | None
    store_key: str | None
    status: str
    error: str | None
    indexed_at: float


COLUMNS = [f.name for f in fields(Row)]


def settings_key(reading: dict) -> str:
    return json.dumps(reading, sort_keys=True)


class Manifest:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(path, timeout=30, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA busy_timeout=30000")
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise StoreError(f"the index manifest {path} is unreadable ({e})",
                             f"delete {path} and run `landmark index` again (cached documents are kept)") from None

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"the index manifest {self.path} was written by a newer landmark "
                             f"(schema {version}, this one knows {SCHEMA_VERSION})", "upgrade landmark")
        for v in range(version, SCHEMA_VERSION):
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                if self.db.execute("PRAGMA user_version").fetchone()[0] == v:  # not done by a concurrent process
                    self.db.execute(MIGRATIONS[v])
                    self.db.execute(f"PRAGMA user_version = {v + 1}")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Manifest":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def put(self, row: Row) -> None:
        """Insert or replace one row, atomically."""
        with self.db:
            self.db.execute(f"INSERT OR REPLACE INTO documents ({', '.join(COLUMNS)}) "
                            f"VALUES ({', '.join('?' * len(COLUMNS))})", [getattr(row, c) for c in COLUMNS])

    def get(self, path: str, fingerprint: str, settings: str) -> Row | None:
        cur = self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM documents WHERE path=? AND fingerprint=? "
                              "AND settings=?", (path, fingerprint, settings))
        found = cur.fetchone()
        return Row(*found) if found else None

    def under(self, root: Path, fingerprint: str, settings: str) -> list[Row]:
        """Rows of documents inside the folder `root` (any depth), sorted by path."""
        prefix = str(root).rstrip("/") + "/"
        cur = self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM documents WHERE fingerprint=? AND settings=? "
                              "AND substr(path, 1, ?) = ? ORDER BY path",
                              (fingerprint, settings, len(prefix), prefix))
        return [Row(*r) for r in cur.fetchall()]

    def delete(self, path: str, fingerprint: str, settings: str) -> None:
        with self.db:
            self.db.execute("DELETE FROM documents WHERE path=? AND fingerprint=? AND settings=?",
                            (path, fingerprint, settings))

    def references(self, store_key: str) -> int:
        return self.db.execute("SELECT count(*) FROM documents WHERE store_key=?", (store_key,)).fetchone()[0]

