"""The store catches damage where it is read and cleans up after killed readers (tiny model)."""

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import numpy as np
import pytest
import torch

from landmark_cli.ask import ask
from landmark_cli.retrieval.engine import Engine
from landmark_cli.retrieval.session import Session
from landmark_cli.retrieval.settings import Answering, Reading, Settings
from landmark_cli.storage import store

SMALL = Settings(Reading(block=16, top_k=2, sink=16, window=64, chunk=64))
DOC = "\n".join(f"Line {i}: the ferry company harbour captain ship {i % 7} launched in year {1870 + i}."
                for i in range(1, 60))


def overwrite_block(entry: store.Entry, layer: int, part: int, block: int, what: str = "kv") -> None:
    """Random bytes over one block's keys (part 0) or values (part 1) of the first KV head,
    in place: the file keeps its size, so only a checksum can tell. what: "kv" (the values
    or int8 codes) or "scales" (an int8 entry's scales of that block)."""
    a = entry.kv if what == "kv" else entry.scales
    assert a is not None
    L, _, H, N = a.shape[:4]
    row = int(np.prod(a.shape[4:])) * a.itemsize  # bytes of one block of one head
    start = a.offset + (((layer * 2 + part) * H) * N + block) * row
    with open(entry.path / f"{what}.npy", "r+b") as f:
        f.seek(start)
        f.write(np.random.default_rng(0).bytes(row))


def the_entry(home) -> store.Entry:
    (path,) = [p for p in (home / "store").iterdir() if p.is_dir()]
    entry = store.open_entry(path)
    assert entry is not None
    return entry


@pytest.mark.parametrize("kv_dtype, what", [("float16", "kv"), ("int8", "kv"), ("int8", "scales")])
def test_damage_in_a_block_a_question_reads_is_caught_and_the_document_read_again(tiny, tmp_path, landmark_home,
                                                                                 kv_dtype, what):
    doc = tmp_path / "notes.md"
    doc.write_text(DOC)
    settings = replace(SMALL, read=replace(SMALL.read, kv_dtype=kv_dtype))
    first = ask(tiny, doc, "Who was the captain?", settings, max_new_tokens=4)
    entry = the_entry(landmark_home)
    overwrite_block(entry, layer=0, part=0, block=entry.kv.shape[3] - 1, what=what)  # in the window: always read
    assert store.open_entry(entry.path) is not None  # sizes and small arrays still look fine
    warnings = []
    again = ask(tiny, doc, "Who was the captain?", settings, max_new_tokens=4, on_damaged=warnings.append)
    assert len(warnings) == 1 and "damaged" in warnings[0]
    assert again.cached is False and again.answer == first.answer  # read again, not answered from damage
    assert ask(tiny, doc, "Who was the captain?", settings, max_new_tokens=4).cached is True


def test_damage_in_a_block_never_read_costs_nothing(tiny, tmp_path):
    ids = torch.randint(2, tiny.model.cfg.vocab_size, (600,), generator=torch.Generator().manual_seed(3)).tolist()
    eng = Engine(tiny, SMALL, root=tmp_path / "store")
    entry, _ = eng.read(ids[:580])
    session = Session(eng, entry, capacity=32)
    want = session.step(torch.tensor(ids[580:]))
    unread = next(b for b in range(session.retrievable.start, session.retrievable.stop)
                  if b not in session.chosen[0].tolist())
    overwrite_block(entry, layer=0, part=1, block=unread)  # values: read only if the block is chosen
    fresh = store.open_entry(entry.path)
    session = Session(eng, fresh, capacity=32)
    torch.testing.assert_close(session.step(torch.tensor(ids[580:])), want)
    assert not fresh.verified[0, 1, unread]
    assert fresh.verified[session.scoring_layers[0], 0, unread]  # its keys were scored, its values never read


def test_a_folder_question_reports_a_damaged_document(tiny, tmp_path):
    from landmark_cli.ask import ask_folder
    from landmark_cli.errors import StoreError
    from landmark_cli.index import Indexer

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.md").write_text(DOC)
    Indexer(tiny, SMALL).run(folder)
    entry = the_entry(tmp_path / "landmark-home")
    overwrite_block(entry, layer=0, part=0, block=0)  # the sink of the first document
    with pytest.raises(StoreError, match=r"a\.md is damaged; it was removed"):
        ask_folder(tiny, folder, "Who was the captain?", SMALL, max_new_tokens=4)
    assert not entry.path.exists()
    ready, left_out = Indexer(tiny, SMALL).ready(folder)
    assert not ready and [s.state for s in left_out] == ["stale"]


def test_a_killed_reader_leaves_nothing_behind(tiny_dir, tiny, tmp_path):
    root = tmp_path / "store"
    script = textwrap.dedent(f"""
        import os, signal
        from landmark_cli.model.loading import load_model
        from landmark_cli.retrieval.engine import Engine
        from landmark_cli.retrieval.settings import Reading, Settings
        eng = Engine(load_model({str(tiny_dir)!r}), Settings(Reading(block=16, top_k=2, sink=16, window=64,
                                                                     chunk=64)), root={str(root)!r})
        def die(done, total):
            os.kill(os.getpid(), signal.SIGKILL)
        eng.read(list(range(2, 300)), None, die)
    """)
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == -9
    assert [p.name for p in root.iterdir() if ".tmp-" in p.name]  # what the killed reader left
    Engine(tiny, SMALL, root=root)  # the next command on the store
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]


def test_a_live_writer_is_left_alone(tmp_path):
    shape = dict(layers=1, kv_heads=1, n_blocks=1, block=4, head_dim=2, n_reps=1, n_tokens=4)
    w = store.Writer(tmp_path, "k", shape, {})
    store.sweep_temporaries(tmp_path)
    assert w.tmp.exists()
    w.abort()
    assert not w.tmp.exists()


def test_block_checksums_see_any_one_changed_word():
    blocks = np.random.default_rng(1).standard_normal((2, 3, 4, 8)).astype(np.float16)
    sums = store.block_checksums(blocks)
    for h, b, t, d in [(0, 0, 0, 0), (1, 2, 3, 7), (0, 1, 2, 5)]:
        changed = blocks.copy()
        changed.view(np.uint16)[h, b, t, d] ^= 1  # one bit of one value
        got = store.block_checksums(changed)
        assert got[b] != sums[b] and np.array_equal(np.delete(got, b), np.delete(sums, b))


def test_empty_question_is_refused(tiny, tmp_path):
    from landmark_cli.errors import LandmarkError

    doc = tmp_path / "notes.md"
    doc.write_text(DOC)
    with pytest.raises(LandmarkError, match="the question is empty"):
        ask(tiny, doc, "  \n", Settings(answer=Answering()))


def test_entries_of_an_earlier_format_are_removed(tiny, tmp_path):
    root = tmp_path / "store"
    eng = Engine(tiny, SMALL, root=root)
    entry, _ = eng.read(list(range(2, 100)))
    meta = json.loads((entry.path / "meta.json").read_text())
    (entry.path / "meta.json").write_text(json.dumps({**meta, "format": store.FORMAT_VERSION - 1}))
    Engine(tiny, SMALL, root=root)
    assert not entry.path.exists() and not list(root.glob("*.trash-*"))


def test_a_non_finite_int8_scale_is_found():
    scales = np.ones((2, 4, 8), dtype=np.float16)
    scales[1, 2, 5] = np.inf
    codes = np.zeros((2, 4, 3, 8), dtype=np.int8)
    assert store.part_damaged(codes, scales).tolist() == [False, False, True, False]


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_non_finite_blocks_are_found(dtype):
    blocks = np.random.default_rng(2).standard_normal((2, 4, 4, 8)).astype(dtype)
    assert not store.non_finite(blocks).any()
    blocks[1, 2, 3, 7], blocks[0, 0, 1, 1] = np.inf, np.nan
    assert store.non_finite(blocks).tolist() == [True, False, True, False]
