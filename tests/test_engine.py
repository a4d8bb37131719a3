"""Landmark retrieval on a tiny random model: exactness, cache behaviour, store integrity."""

import numpy as np
import pytest
import torch

from landmark_cli.errors import LandmarkError
from landmark_cli.retrieval.engine import Engine
from landmark_cli.retrieval.session import Session
from landmark_cli.retrieval.settings import Answering, Reading, Settings
from landmark_cli.storage import store


def _ids(n, vocab, seed=0):
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("select, passages", [("layer", "cached"), ("shared", "cached"), ("shared", "text")])
@pytest.mark.parametrize("answer_window", [None, 0, 8, 40])
def test_covering_k_equals_full_attention(tiny, tmp_path, select, passages, answer_window):
    """k covering every block + a document inside the context => same logits as full causal
    attention, whatever the answer's window (the blocks it leaves are retrieved, in order),
    and whether the passages are attended as cached or read again as text."""
    ids = _ids(203, tiny.model.cfg.vocab_size)
    doc, suffix = ids[:170], ids[170:]
    eng = Engine(tiny, Settings(Reading(block=8, top_k=64, sink=8, window=16, chunk=32, kv_dtype="float32"),
                                Answering(select=select, window=answer_window, passages=passages)),
                 root=tmp_path / "store")
    entry, cached = eng.read(doc)
    assert not cached
    sess = Session(eng, entry, capacity=64)
    got = sess.step(torch.tensor(suffix))
    with torch.inference_mode():
        full = tiny.model.forward(torch.tensor(ids))
    assert (got - full[-1]).abs().max().item() < 1e-4
    # and it stays exact while generating
    seq = list(ids)
    for _ in range(4):
        tok = int(got.argmax())
        seq.append(tok)
        got = sess.step(torch.tensor([tok]))
        with torch.inference_mode():
            full = tiny.model.forward(torch.tensor(seq))
        assert (got - full[-1]).abs().max().item() < 1e-4


@pytest.mark.parametrize("select", ["layer", "shared"])
def test_small_k_differs_from_full_attention(tiny, tmp_path, select):
    """Sanity check of the test above: with few retrieved blocks the result is not full attention."""
    ids = _ids(203, tiny.model.cfg.vocab_size)
    eng = Engine(tiny, Settings(Reading(block=8, top_k=1, sink=8, window=16, chunk=32, kv_dtype="float32"),
                                Answering(select=select)), root=tmp_path / "store")
    entry, _ = eng.read(ids[:170])
    got = Session(eng, entry, capacity=64).step(torch.tensor(ids[170:]))
    with torch.inference_mode():
        full = tiny.model.forward(torch.tensor(ids))
    assert (got - full[-1]).abs().max().item() > 1e-3


def test_second_read_is_cached_and_does_no_prefill(tiny, tmp_path, monkeypatch):
    ids = _ids(300, tiny.model.cfg.vocab_size, seed=3)
    eng = Engine(tiny, Settings(Reading(block=8, top_k=2, sink=8, window=16, chunk=32)), root=tmp_path / "store")
    first, cached = eng.read(ids)
    assert not cached
    monkeypatch.setattr(Engine, "_prefill", lambda *a, **k: pytest.fail("prefill on a cached document"))
    again, cached = eng.read(ids)
    assert cached and again.path == first.path
    a1 = eng.answer(first, ids[:5], max_new_tokens=4)
    a2 = eng.answer(again, ids[:5], max_new_tokens=4)
    assert a1.tokens == a2.tokens


@pytest.mark.parametrize("damage, kv_dtype", [("truncate_kv", "float16"), ("flip_reps", "float16"),
                                             ("bad_meta", "float16"), ("missing_ids", "float16"),
                                             ("truncate_kv", "int8"), ("truncate_scales", "int8"),
                                             ("missing_scales", "int8")])
def test_corrupted_entry_is_detected_and_rebuilt(tiny, tmp_path, damage, kv_dtype):
    ids = _ids(150, tiny.model.cfg.vocab_size, seed=4)
    eng = Engine(tiny, Settings(Reading(block=8, top_k=2, sink=8, window=16, chunk=32, kv_dtype=kv_dtype)),
                 root=tmp_path / "store")
    entry, _ = eng.read(ids)
    path, expected = entry.path, np.array(entry.kv)
    del entry
    if damage.startswith("truncate"):
        file = path / f"{damage.split('_')[1]}.npy"
        with open(file, "r+b") as f:
            f.truncate(file.stat().st_size - 100)
    elif damage == "missing_scales":
        (path / "scales.npy").unlink()
    elif damage == "flip_reps":
        raw = bytearray((path / "reps.npy").read_bytes())
        raw[-7] ^= 0xFF
        (path / "reps.npy").write_bytes(bytes(raw))
    elif damage == "bad_meta":
        (path / "meta.json").write_text("{not json")
    else:
        (path / "ids.npy").unlink()
    assert store.open_entry(path) is None
    rebuilt, cached = eng.read(ids)
    assert not cached
    np.testing.assert_array_equal(np.array(rebuilt.kv), expected)


def test_interrupted_read_leaves_no_valid_entry(tiny, tmp_path, monkeypatch):
    ids = _ids(200, tiny.model.cfg.vocab_size, seed=5)
    eng = Engine(tiny, Settings(Reading(block=8, top_k=2, sink=8, window=16, chunk=32)), root=tmp_path / "store")

    def interrupt(done, total):
        if done > 64:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        eng.read(ids, progress=interrupt)
    assert eng.lookup(ids) is None
    assert not any(p for p in (tmp_path / "store").iterdir() if ".tmp-" in p.name)
    entry, cached = eng.read(ids)
    assert not cached and entry.n_tokens == 200


def test_settings_must_fit_the_context(tiny):
    with pytest.raises(LandmarkError, match="context"):
        Engine(tiny, Settings(Reading(block=64, top_k=64, window=1024, chunk=512)))


def test_shared_selection_is_one_set_of_blocks_for_every_layer(tiny, tmp_path):
    ids = _ids(400, tiny.model.cfg.vocab_size, seed=6)
    eng = Engine(tiny, Settings(Reading(block=8, top_k=3, sink=8, window=16, chunk=32), Answering(select="shared")),
                 root=tmp_path / "store")
    entry, _ = eng.read(ids[:380])
    sess = Session(eng, entry, capacity=32)
    sess.step(torch.tensor(ids[380:]))
    assert sess.chosen.shape == (tiny.model.cfg.n_kv_heads, eng.settings.answer.top_k) and sess.k == 6  # 2 x 3
    assert (sess.chosen == sess.chosen[0]).all()
    assert sess.retrievable.start <= int(sess.chosen.min()) and int(sess.chosen.max()) < sess.retrievable.stop
    cited = [b for _, b, _ in sess.sources(3)]
    assert all(sess.retrievable.start <= b < entry.kv.shape[3] for b in cited)  # retrieved or in the window


def test_a_document_inside_the_window_is_still_cited(tiny, tmp_path):
    ids = _ids(60, tiny.model.cfg.vocab_size, seed=9)
    eng = Engine(tiny, Settings(Reading(block=8, top_k=3, sink=8, window=64, chunk=32)), root=tmp_path / "store")
    entry, _ = eng.read(ids)
    ans = eng.answer(entry, ids[:6], max_new_tokens=2)
    assert ans.sources and all(d == 0 and 1 <= b < entry.kv.shape[3] for d, b, _ in ans.sources)


def test_reading_settings_alone_make_the_store_key(tiny, tmp_path):
    ids = _ids(100, tiny.model.cfg.vocab_size, seed=7)
    base = Settings(Reading(block=8, top_k=2, sink=8, window=16, chunk=32))
    same = Settings(Reading(block=8, top_k=2, sink=8, window=16, chunk=32), Answering(select="shared", window=8))
    other = Settings(Reading(block=8, top_k=3, sink=8, window=16, chunk=32))

    def key(s):
        return Engine(tiny, s, root=tmp_path).key(ids)

    assert key(base) == key(same) != key(other)


def test_second_process_on_the_same_document_waits_then_gives_up_clearly(tiny, tmp_path, monkeypatch):
    from filelock import FileLock

    from landmark_cli.errors import StoreError
    from landmark_cli.retrieval import engine

    ids = _ids(120, tiny.model.cfg.vocab_size, seed=8)
    eng = Engine(tiny, Settings(Reading(block=8, top_k=2, sink=8, window=16, chunk=32)), root=tmp_path / "store")
    eng.root.mkdir(parents=True)
    other = FileLock(str(eng.root / f"{eng.key(ids)}.lock"))  # another reader holds the document
    other.acquire()
    waited = []
    monkeypatch.setattr(engine, "LOCK_TIMEOUT_S", 0.3)
    with pytest.raises(StoreError, match="another landmark process"):
        eng.read_locked(ids, None, on_wait=lambda: waited.append(True))
    assert waited == [True] and eng.lookup(ids) is None
    other.release()
    entry, cached = eng.read_locked(ids, None)
    assert not cached and entry.n_tokens == 120


def test_padding_of_the_last_block_never_matches():
    from landmark_cli.retrieval.landmarks import exact_block_logits

    keys = torch.randn(1, 2, 4, 8)
    keys[:, 1, 2:] = 0.0  # padding of a half-full last block
    q = torch.full((1, 1, 8), -1.0)
    keys[:, 1, :2] = 1.0  # real keys of the last block score -8 each
    got = exact_block_logits(q, keys, 1, valid_last=2)
    assert got[0, 0, 1] < -1.0  # padding (score 0) ignored
    assert exact_block_logits(q, keys, 1)[0, 0, 1] == 0.0  # without the mask the padding wins


@pytest.mark.parametrize("kv_dtype", ["float16", "int8"])
def test_reading_from_a_shared_prefix_equals_reading_everything(tiny, tmp_path, monkeypatch, kv_dtype):
    """A document that grew is read from where it differs: same store contents, fewer chunks read."""
    vocab = tiny.model.cfg.vocab_size
    old = _ids(150, vocab, seed=5)
    new = old[:110] + _ids(90, vocab, seed=6)  # differs from token 110: chunks [0, 96) are shared
    s = Settings(Reading(block=8, top_k=2, sink=8, window=16, chunk=32, kv_dtype=kv_dtype))
    full, _ = Engine(tiny, s, root=tmp_path / "a").read(new)
    eng = Engine(tiny, s, root=tmp_path / "b")
    donor, _ = eng.read(old)
    assert eng.shared_prefix(donor, new) == 96
    assert Engine(tiny, Settings(Reading(block=8, top_k=3, sink=8, window=16, chunk=32)),
                  root=tmp_path / "b").shared_prefix(donor, new) == 0  # other settings: nothing shared
    chunks = []
    real = tiny.model.embed
    monkeypatch.setattr(tiny.model, "embed", lambda ids: chunks.append(len(ids)) or real(ids))
    grown, cached = eng.read(new, prefix=donor)
    assert not cached and sum(chunks) == len(new) - 96
    for name in ("kv", "scales", "reps", "ids"):
        assert np.array_equal(getattr(grown, name), getattr(full, name)), name


def test_answer_settings_change_what_is_attended_not_what_is_read(tiny, tmp_path):
    """The answer's window and top_k shape each step; the store entry is the same."""
    ids = _ids(400, tiny.model.cfg.vocab_size, seed=5)
    eng = Engine(tiny, Settings(Reading(block=8, top_k=2, sink=8, window=32, chunk=32), Answering(window=32, top_k=2)),
                 root=tmp_path / "store")
    entry, _ = eng.read(ids[:380])
    assert Session(eng, entry, capacity=32).retrieved_per_step == 8 + 2 * 8 + (380 - 376 // 8 * 8 + 32)
    eng.answer_with(Answering(window=8, top_k=6))
    again, cached = eng.read(ids[:380])
    assert cached and again.path == entry.path
    sess = Session(eng, entry, capacity=32)
    assert sess.k == 6 and sess.retrieved_per_step == 8 + 6 * 8 + (380 - (380 - 8) // 8 * 8)
    sess.step(torch.tensor(ids[380:]))
    assert sess.chosen.shape[1] == 6


def test_an_answer_beyond_the_context_is_refused(tiny, tmp_path):
    ids = _ids(900, tiny.model.cfg.vocab_size, seed=4)
    eng = Engine(tiny, Settings(Reading(block=8, top_k=2, sink=8, window=16, chunk=32)), root=tmp_path / "store")
    entry, _ = eng.read(ids)
    Session(eng, entry, capacity=8)
    with pytest.raises(LandmarkError, match="answer top_k"):
        Session(eng, entry, capacity=tiny.model.cfg.context)  # room for the question and the answer


@pytest.mark.parametrize("tokens, repeat", [
    ([1, 2, 3, 4, 5, 6, 7], 0),
    ([9, 1, 2, 3, 4, 1, 2, 3, 4], 4),  # "The answer is: 4. The answer is: 4."
    ([1, 2, 3, 1, 2, 3], 0),  # too short to call a loop
    ([5, 5, 5, 5, 5, 5, 5, 5], 4),
])
def test_repeated_tail(tokens, repeat):
    from landmark_cli.retrieval.engine import repeated_tail

    assert repeated_tail(tokens) == repeat


def test_generation_stops_where_it_starts_repeating(tiny, tmp_path, monkeypatch):
    """A session whose greedy answer loops stops after the first round, without the repeat."""
    from landmark_cli.retrieval import engine as engine_mod

    loop = [11, 12, 13, 14, 15]

    class Looping:
        sources, retrieved_per_step, n = (lambda self, n: []), 0, 0

        def step(self, ids, question=None):
            logits = torch.zeros(tiny.model.cfg.vocab_size)
            logits[loop[self.n % len(loop)]] = 1
            self.n += 1
            return logits

    eng = Engine(tiny, Settings(Reading(block=8, top_k=2, sink=8, window=16, chunk=32)), root=tmp_path / "store")
    ans = eng.generate(Looping(), 0, [3, 4], 64, (), None, 3, None, 0.0)
    assert ans.tokens == loop and engine_mod.MIN_REPEAT <= len(loop)
