"""`landmark cache`: list, prune least recently used first (never an entry in use), clear,
and the LANDMARK_CACHE_MAX cap (tiny model)."""

import json
import os
import sys

import pytest

from landmark_cli.errors import LandmarkError
from landmark_cli.retrieval.engine import Engine
from landmark_cli.retrieval.settings import Reading, Settings
from landmark_cli.storage import cache, store

SMALL = Settings(Reading(block=16, top_k=2, sink=16, window=64, chunk=64))


def read_three(tiny, root):
    """Three entries of one size, used at times 1000, 2000, 3000 (oldest first); none held."""
    eng = Engine(tiny, SMALL, root=root)
    paths = []
    for i, start in enumerate((2, 3, 4)):
        entry, _ = eng.read(list(range(start, start + 150)), source=f"doc{i}.md")
        paths.append(entry.path)
        del entry
        os.utime(paths[-1] / "meta.json", (1000 * (i + 1), 1000 * (i + 1)))
    return paths


def test_prune_removes_least_recently_used_first_and_never_an_entry_in_use(tiny, tmp_path):
    root = tmp_path / "store"
    oldest, middle, newest = read_three(tiny, root)
    listed = cache.entries(root)
    assert [c.source for c in listed] == ["doc0.md", "doc1.md", "doc2.md"] and all(c.intact for c in listed)
    size = max(c.bytes for c in listed)  # the same but for a byte or two of meta.json
    held = store.open_entry(oldest)  # another reader has it open
    assert [c.in_use for c in cache.entries(root)] == [True, False, False]
    removed = cache.prune(root, int(2.5 * size))
    assert [c.path for c in removed] == [middle]
    assert oldest.exists() and newest.exists() and not middle.exists()
    del held
    assert [c.path for c in cache.prune(root, size)] == [oldest]


def test_clear_keeps_what_is_in_use(tiny, tmp_path):
    root = tmp_path / "store"
    paths = read_three(tiny, root)
    held = store.open_entry(paths[2])
    removed, kept = cache.clear(root)
    assert len(removed) == 2 and [c.path for c in kept] == [paths[2]]
    assert held is not None and [c.path for c in cache.entries(root)] == [paths[2]]


def test_the_cap_applies_after_every_new_reading(tiny, tmp_path, monkeypatch):
    root = tmp_path / "store"
    eng = Engine(tiny, SMALL, root=root)
    first, _ = eng.read(list(range(2, 152)))
    first_path, size = first.path, first.nbytes()
    del first
    monkeypatch.setenv(cache.CAP_VARIABLE, str(int(1.5 * size)))
    second, _ = eng.read(list(range(3, 153)))
    assert not first_path.exists() and second.path.exists()


def test_a_folder_question_after_a_prune_reports_what_is_missing(tiny, tmp_path):
    from landmark_cli.ask import ask_folder
    from landmark_cli.index import Indexer

    folder = tmp_path / "docs"
    folder.mkdir()
    for name, word in (("a.md", "ferry"), ("b.md", "harbour")):
        (folder / name).write_text("\n".join(f"Line {i}: the {word} captain ship year {1870 + i}."
                                             for i in range(40)))
    Indexer(tiny, SMALL).run(folder)
    root = tmp_path / "landmark-home" / "store"
    a = next(c for c in cache.entries(root) if c.source.endswith("a.md"))
    store.remove_unless_held(a.path)
    left = []
    result = ask_folder(tiny, folder, "Who was the captain?", SMALL, max_new_tokens=3, on_left_out=left.extend)
    assert result.documents == 1 and [(os.path.basename(s.path), s.state) for s in left] == [("a.md", "stale")]


def test_sizes_are_read_in_binary_units():
    assert cache.parse_size("20G") == 20 * 2**30 and cache.parse_size("1.5M") == int(1.5 * 2**20)
    assert cache.parse_size("512") == 512 and cache.parse_size("2 GiB") == 2 * 2**30
    with pytest.raises(LandmarkError, match="cannot read the size"):
        cache.parse_size("lots")


def test_cli_cache_list_prune_clear(capsys, monkeypatch, tiny, landmark_home):
    from landmark_cli.cli import main

    read_three(tiny, landmark_home / "store")

    def cli(*args):
        monkeypatch.setattr(sys, "argv", ["landmark", "cache", *args])
        main()
        return capsys.readouterr().out

    listed = json.loads(cli("list", "--json"))
    assert [e["source"] for e in listed["entries"]] == ["doc0.md", "doc1.md", "doc2.md"]
    assert listed["bytes"] == sum(e["bytes"] for e in listed["entries"]) > 0
    largest = max(e["bytes"] for e in listed["entries"])  # the same but for a byte or two of meta.json
    assert "Removed 2 entries" in cli("prune", "--max-size", str(largest))
    assert [e["source"] for e in json.loads(cli("list", "--json"))["entries"]] == ["doc2.md"]
    assert "Removed 1 entries" in cli("clear")
    assert json.loads(cli("list", "--json"))["entries"] == []
