"""`landmark index`: incremental, crash-safe corpus index, and `landmark ask DIR` (tiny model)."""

import json
import os
import sqlite3

import pytest
from filelock import FileLock
from pdf_fixtures import make_blank_pdf, make_text_pdf
from test_cli import run

from landmark_cli.errors import StoreError
from landmark_cli.index import Indexer, manifest_path
from landmark_cli.model.llama import Llama
from landmark_cli.retrieval.settings import Reading, Settings
from landmark_cli.storage import manifest as manifest_mod
from landmark_cli.storage import store

S = Settings(Reading(block=16, top_k=2, sink=16, window=64, chunk=64))
OPTS = ["--block-size", "16", "--top-k", "2", "--window", "64", "--sink", "16", "--chunk", "64"]


def _text(topic, n=60):
    return "\n".join(f"Line {i}: the {topic} company harbour captain ship {i % 7} launched in year {1870 + i}."
                     for i in range(n))


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "papers"
    (d / "sub").mkdir(parents=True)
    (d / "a.md").write_text(_text("ferry"))
    (d / "sub" / "b.txt").write_text(_text("harbour", 40))
    make_text_pdf(d / "c.pdf", [_text("ship", 15), _text("captain", 15)])
    make_blank_pdf(d / "scanned.pdf")  # no text: recorded as failed, does not stop the run
    (d / ".hidden.md").write_text("not indexed")
    return d


def rows():
    db = sqlite3.connect(manifest_path())
    cols = [c for c in manifest_mod.COLUMNS if c != "indexed_at"]
    out = db.execute(f"SELECT {', '.join(cols)} FROM documents ORDER BY path").fetchall()
    db.close()
    return [dict(zip(cols, r, strict=True)) for r in out]


def states(outcomes):
    return {os.path.basename(o.path): o.state for o in outcomes}


class Boom(Exception):
    pass


def test_index_then_rerun_reads_nothing(tiny, folder, monkeypatch):
    ix = Indexer(tiny, S)
    first = ix.run(folder)
    assert states(first) == {"a.md": "indexed", "b.txt": "indexed", "c.pdf": "indexed", "scanned.pdf": "failed"}
    assert "scanned" in next(o.error for o in first if o.state == "failed")
    assert [r["status"] for r in rows()] == ["ok", "ok", "failed", "ok"]  # a.md, c.pdf, scanned.pdf, sub/b.txt
    before = rows()

    def no_model(*a, **k):
        raise Boom("the model was called on an unchanged folder")
    monkeypatch.setattr(Llama, "embed", no_model)
    monkeypatch.setattr("landmark_cli.index.load_document", no_model)
    again = ix.run(folder)
    assert states(again) == {"a.md": "skipped", "b.txt": "skipped", "c.pdf": "skipped", "scanned.pdf": "failed"}
    assert rows() == before


def test_changed_file_is_read_again_and_its_old_cache_dropped(tiny, folder):
    ix = Indexer(tiny, S)
    ix.run(folder)
    old = {r["path"]: r["store_key"] for r in rows()}
    (folder / "a.md").write_text(_text("lighthouse"))
    out = ix.run(folder)
    assert states(out)["a.md"] == "indexed" and states(out)["b.txt"] == "skipped"
    new = {r["path"]: r["store_key"] for r in rows()}
    a = str(folder / "a.md")
    assert new[a] != old[a]
    assert not (ix.engine.root / old[a]).exists() and (ix.engine.root / new[a]).exists()


def test_interrupted_run_then_rerun_equals_uninterrupted(tiny, folder, tmp_path, monkeypatch):
    ix = Indexer(tiny, S)
    calls = {"n": 0}

    def progress(done, total):  # Ctrl-C in the middle of the second document
        calls["n"] += 1
        if calls["n"] > 1 and done < total and started["docs"] == 2:
            raise KeyboardInterrupt
    started = {"docs": 0}

    def on_start(path, i, n):
        started["docs"] = i + 1
    with pytest.raises(KeyboardInterrupt):
        ix.run(folder, progress=progress, on_start=on_start)
    assert len(rows()) == 1  # only the completed document
    assert not any(".tmp-" in p.name for p in ix.engine.root.iterdir())  # nothing half-written left
    resumed = ix.run(folder)
    assert states(resumed)["a.md"] == "skipped"
    interrupted = rows()

    monkeypatch.setenv("LANDMARK_HOME", str(tmp_path / "other-home"))
    Indexer(tiny, S).run(folder)
    assert rows() == interrupted


def test_appended_file_is_read_from_where_it_changed(tiny, folder, monkeypatch):
    ix = Indexer(tiny, S)
    ix.run(folder)
    (folder / "a.md").write_text(_text("ferry") + "\n" + _text("ferry", 10))
    chunks = []
    real = tiny.model.embed
    monkeypatch.setattr(tiny.model, "embed", lambda ids: chunks.append(len(ids)) or real(ids))
    out = ix.run(folder)
    a = next(o for o in out if o.path.endswith("a.md"))
    assert a.state == "indexed" and "read from there" in a.note
    assert 0 < sum(chunks) < a.tokens / 2


def test_damaged_cache_is_detected_and_rebuilt(tiny, folder):
    ix = Indexer(tiny, S)
    ix.run(folder)
    key = {r["path"]: r["store_key"] for r in rows()}[str(folder / "sub" / "b.txt")]
    kv = ix.engine.root / key / "kv.npy"
    kv.write_bytes(kv.read_bytes()[:-100])
    assert ix.status(folder)[-1].state == "stale"  # sub/b.txt sorts last
    out = ix.run(folder)
    assert states(out)["b.txt"] == "indexed" and states(out)["a.md"] == "skipped"
    assert "damaged" in next(o.note for o in out if o.path.endswith("b.txt"))
    assert store.open_entry(ix.engine.root / key) is not None


def test_second_indexer_on_the_same_folder_is_refused(tiny, folder):
    ix = Indexer(tiny, S)
    with FileLock(ix._lock(folder.resolve()).lock_file):
        with pytest.raises(StoreError, match="already indexing"):
            ix.run(folder)
    assert not manifest_path().exists()  # refused before touching anything


def test_deleted_files_reported_then_pruned(tiny, folder):
    ix = Indexer(tiny, S)
    ix.run(folder)
    key = {r["path"]: r["store_key"] for r in rows()}[str(folder / "a.md")]
    (folder / "a.md").unlink()
    assert states(ix.run(folder))["a.md"] == "deleted"
    assert (ix.engine.root / key).exists()
    assert states(ix.run(folder, prune=True))["a.md"] == "pruned"
    assert not (ix.engine.root / key).exists() and str(folder / "a.md") not in [r["path"] for r in rows()]


def test_other_settings_make_their_own_rows(tiny, folder):
    Indexer(tiny, S).run(folder)
    other = Settings(Reading(block=8, top_k=2, sink=16, window=64, chunk=64))
    assert states(Indexer(tiny, other).run(folder))["a.md"] == "indexed"
    assert len(rows()) == 8


def test_status_lists_ok_new_stale_and_deleted(tiny, folder):
    ix = Indexer(tiny, S)
    ix.run(folder)
    (folder / "a.md").write_text("changed")
    (folder / "sub" / "b.txt").unlink()
    (folder / "d.md").write_text(_text("river", 5))
    got = states(ix.status(folder))
    assert got == {"a.md": "stale", "b.txt": "deleted", "c.pdf": "ok", "d.md": "new", "scanned.pdf": "failed"}


def test_manifest_from_a_newer_version_or_damaged_is_a_clear_error(tiny, folder):
    ix = Indexer(tiny, S)
    ix.run(folder)
    db = sqlite3.connect(manifest_path())
    db.execute(f"PRAGMA user_version = {manifest_mod.SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreError, match="newer landmark"):
        ix.run(folder)
    manifest_path().write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        manifest_path().with_name(manifest_path().name + suffix).unlink(missing_ok=True)
    with pytest.raises(StoreError, match="unreadable"):
        ix.run(folder)


# ---- the CLI ------------------------------------------------------------------------------


def test_cli_index_then_ask_folder(capsys, monkeypatch, tiny_dir, folder):
    code, out, err = run(capsys, monkeypatch, "ask", folder, "Who was the captain?", "--model", tiny_dir, *OPTS)
    assert code == 1 and "is indexed" in err and "landmark index" in err

    code, out, err = run(capsys, monkeypatch, "index", folder, "--model", tiny_dir, *OPTS, "--json")
    assert code == 0, err
    r = json.loads(out)
    assert {os.path.basename(d["path"]): d["state"] for d in r["documents"]}["scanned.pdf"] == "failed"
    assert r["tokens_read"] > 0

    code, out, err = run(capsys, monkeypatch, "ask", folder, "Who was the captain?", "--model", tiny_dir, *OPTS,
                         "--json", "--max-tokens", "4")
    assert code == 0, err
    a = json.loads(out)
    assert a["documents"] == 3 and a["sources"]
    for s in a["sources"]:
        assert s["path"].startswith(str(folder.resolve())) and s["text"]
        assert (s["page"] is not None) == s["path"].endswith(".pdf")

    (folder / "new.md").write_text(_text("island", 20))
    code, out, err = run(capsys, monkeypatch, "ask", folder, "Who?", "--model", tiny_dir, *OPTS, "--max-tokens", "2")
    assert code == 0 and "new.md (new)" in err and "Sources" in out

    code, out, err = run(capsys, monkeypatch, "index", folder, "--model", tiny_dir, *OPTS, "--status")
    assert code == 0 and "new.md" in out and "3 ok, 1 new, 1 failed;" in out


def test_cli_ask_index_flag_and_missing_folder(capsys, monkeypatch, tiny_dir, folder, tmp_path):
    code, out, err = run(capsys, monkeypatch, "ask", folder, "Who?", "--model", tiny_dir, *OPTS, "--index",
                         "--json", "--max-tokens", "2")
    assert code == 0, err
    assert json.loads(out)["documents"] == 3
    code, out, err = run(capsys, monkeypatch, "index", tmp_path / "nowhere", "--model", tiny_dir)
    assert code == 1 and "does not exist" in err


def test_cli_ask_folder_with_a_trained_landmark_model(capsys, monkeypatch, folder, tmp_path):
    """The paper's retrieval across a folder: index with the model's own landmarks, then ask."""
    from tiny import make_tiny_landmark_model

    model = str(make_tiny_landmark_model(tmp_path / "lm"))
    code, out, err = run(capsys, monkeypatch, "index", folder, "--model", model, "--top-k", "2")
    assert code == 0, err
    code, out, err = run(capsys, monkeypatch, "ask", folder, "Who was the captain?", "--model", model, "--top-k",
                         "2", "--json", "--max-tokens", "3")
    assert code == 0, err
    a = json.loads(out)
    assert a["documents"] == 3 and a["sources"]
    assert all(s["path"].startswith(str(folder.resolve())) and s["text"] for s in a["sources"])
