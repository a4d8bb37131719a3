"""Answering over several cached documents (corpus.CorpusSession) on the tiny model."""

from dataclasses import replace

import pytest
import torch

from landmark_cli.retrieval.corpus import CorpusSession
from landmark_cli.retrieval.engine import Engine
from landmark_cli.retrieval.landmarks import top_runs
from landmark_cli.retrieval.selection import Candidates
from landmark_cli.retrieval.settings import Answering, Reading, Settings


def _ids(n, vocab, seed=0):
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


EXACT = Settings(Reading(block=8, top_k=64, sink=8, window=16, chunk=32, kv_dtype="float32"))


@pytest.mark.parametrize("passages", ["cached", "text"])
def test_one_document_with_covering_budget_is_full_attention(tiny, tmp_path, passages):
    """Every block retrieved, in order, padding dropped => the corpus path is full causal
    attention, the passages attended as cached or read again as text."""
    ids = _ids(203, tiny.model.cfg.vocab_size)
    doc, suffix = ids[:173], ids[173:]  # 173 = 21 blocks of 8 + 5: a partial last block
    eng = Engine(tiny, replace(EXACT, answer=Answering(passages=passages)), root=tmp_path / "store")
    entry, _ = eng.read(doc)
    sess = CorpusSession(eng, [entry], capacity=64, blocks=64)
    got = sess.step(torch.tensor(suffix))
    assert sess.retrieved_per_step == len(doc)
    seq = list(ids)
    for _ in range(3):
        with torch.inference_mode():
            full = tiny.model.forward(torch.tensor(seq))
        assert (got - full[-1]).abs().max().item() < 1e-4
        tok = int(got.argmax())
        seq.append(tok)
        got = sess.step(torch.tensor([tok]))


def test_small_budget_differs_from_full_attention(tiny, tmp_path):
    ids = _ids(203, tiny.model.cfg.vocab_size)
    eng = Engine(tiny, Settings(Reading(block=8, top_k=2, sink=8, window=16, chunk=32, kv_dtype="float32")),
                 root=tmp_path / "store")
    entry, _ = eng.read(ids[:173])
    sess = CorpusSession(eng, [entry], capacity=64)
    got = sess.step(torch.tensor(ids[173:]))
    assert sess.retrieved_per_step == 8 + 2 * 2 * 8  # sink + 2 x top_k blocks
    with torch.inference_mode():
        full = tiny.model.forward(torch.tensor(ids))
    assert (got - full[-1]).abs().max().item() > 1e-3


def test_candidates_span_every_document_and_sources_name_them(tiny, tmp_path):
    vocab = tiny.model.cfg.vocab_size
    s = Settings(Reading(block=8, top_k=3, sink=8, window=16, chunk=32))
    eng = Engine(tiny, s, root=tmp_path / "store")
    prefix = _ids(5, vocab, seed=9)  # a shared prompt prefix, as the index writes it
    entries = []
    for seed, n in ((1, 100), (2, 61), (3, 130)):
        body = _ids(n, vocab, seed=seed)
        spans = torch.tensor([[-1, -1]] * len(prefix) + [[i, i + 1] for i in range(n)]).numpy()
        entries.append(eng.read(prefix + body, spans)[0])
    cand = Candidates.of(entries, 8, sink_end=8)
    # entry 0 starts after its sink; the others at their first document block (block 0 here)
    assert cand.doc.tolist().count(0) == 14 - 1 and cand.doc.tolist().count(1) == 9
    assert cand.doc.tolist().count(2) == 17
    assert cand.valid[cand.doc == 1][-1] == (5 + 61) - 8 * 8  # partial last block
    sess = CorpusSession(eng, entries, capacity=16)
    sess.step(torch.tensor(_ids(6, vocab, seed=4)))
    src = sess.sources(5)
    assert len(src) == 5 and all(0 <= d < 3 for d, _, _ in src)
    assert all(src[i][2] >= src[i + 1][2] for i in range(4))
    chosen = sess.chosen
    assert len(chosen) == 2 * 3 and sess.retrieved_per_step == 8 + int(cand.valid[chosen].sum())
    # runs stay inside a document; documents come in order of their best block, the best last
    docs = cand.doc[chosen].tolist()
    assert docs == sorted(docs, key=lambda d: max(float(sess.votes[i]) for i in chosen
                                                  if int(cand.doc[i]) == d))
    assert cand.doc[chosen][-1] == cand.doc[int(sess.votes.argmax())]


def test_runs_stop_at_document_boundaries():
    votes = torch.tensor([0.0, 0.0, 9.0, 0.1, 0.2, 0.0])
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    assert top_runs(votes, 2, follow=1).tolist() == [2, 3]
    assert top_runs(votes, 2, follow=1, group=group).tolist() == [2, 4]
    assert top_runs(votes, 3, follow=1, group=group, lead=1).tolist() == [1, 2, 4]
    assert top_runs(votes, 4, follow=0, group=group, lead=3).tolist() == [0, 1, 2, 4]


def test_best_last_orders_passages_by_score_and_keeps_each_in_order():
    votes = torch.tensor([0.1, 0.9, 0.2, 0.0, 0.5, 0.3, 0.0])
    assert top_runs(votes, 4, follow=1).tolist() == [1, 2, 4, 5]  # document order
    assert top_runs(votes, 4, follow=1, best_last=True).tolist() == [4, 5, 1, 2]  # best passage nearest the question
    touching = torch.tensor([0.0, 0.9, 0.0, 0.8, 0.0])
    assert top_runs(touching, 4, follow=1, best_last=True).tolist() == [1, 2, 3, 4]  # adjacent runs are one passage
    assert top_runs(votes, 7, follow=1, best_last=True).tolist() == list(range(7))  # everything: document order
