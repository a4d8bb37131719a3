"""Trained landmark models: reference-format loading and trained-mode inference."""

import numpy as np
import pytest
import torch
from tiny import make_tiny_landmark_model

from landmark_cli.errors import LandmarkError
from landmark_cli.model.loading import load_model
from landmark_cli.retrieval.engine import Engine
from landmark_cli.retrieval.landmarks import insert_landmarks
from landmark_cli.retrieval.settings import Reading, Settings


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return load_model(str(make_tiny_landmark_model(tmp_path_factory.mktemp("lm") / "model")))


@pytest.fixture(scope="module", params=[(0, 1), (1, 1), (1, 0)], ids=["paper", "local-first-layer", "own-block"])
def trained_any(request, tmp_path_factory):
    """The paper's layout, and models whose first layer reads only its own and the previous
    block, or its own block alone."""
    local_layers, local_blocks = request.param
    d = make_tiny_landmark_model(tmp_path_factory.mktemp("lm") / "model", local_layers=local_layers,
                                 local_blocks=local_blocks)
    lm = load_model(str(d))
    assert (lm.landmark.local_layers, lm.landmark.local_blocks) == request.param
    return lm


def test_reference_format_loads(trained):
    spec = trained.landmark
    assert spec is not None and spec.mem_freq == 7 and spec.train_context == 256
    assert trained.tokenizer.convert_ids_to_tokens(spec.mem_id) == "<landmark>"
    assert trained.tokenizer.pad_token == "[PAD]" and trained.tokenizer.pad_token_id == spec.mem_id - 1
    emb = trained.model.w["model.embed_tokens.weight"]
    torch.testing.assert_close(emb[spec.mem_id], emb[:spec.mem_id - 1].mean(0))  # mean-initialised rows


def test_insert_landmarks_continues_a_stream():
    ids, spans = insert_landmarks(list(range(10)), [[i, i + 1] for i in range(10)], 3, 99)
    assert ids == [0, 1, 2, 99, 3, 4, 5, 99, 6, 7, 8, 99, 9]
    assert spans[3].tolist() == [-1, -1] and spans[4].tolist() == [3, 4]
    more, _ = insert_landmarks([10, 11, 12], None, 3, 99, pos=len(ids))
    assert ids + more == insert_landmarks(list(range(13)), None, 3, 99)[0]


@pytest.mark.parametrize("n_doc", [77, 84])  # ends mid-block / right after a landmark
def test_trained_mode_equals_full_grouped_forward(trained_any, tmp_path, n_doc):
    """Document within the training context, k covering every block: chunked reading with
    retrieval, then answering token by token, gives the logits of the full grouped forward
    (with local layers: theirs too)."""
    trained = trained_any
    spec = trained.landmark
    eng = Engine(trained, Settings(Reading(top_k=16, chunk=32, window=0, kv_dtype="float32")), root=tmp_path)
    assert (eng.reading.block, eng.reading.rep, eng.reading.sink, eng.reading.chunk_tokens) == (8, "landmark", 0, 32)
    g = torch.Generator().manual_seed(n_doc)
    doc = torch.randint(2, spec.mem_id - 1, (n_doc,), generator=g).tolist()
    suffix = torch.randint(2, spec.mem_id - 1, (9,), generator=g).tolist()
    entry, cached = eng.read(doc)
    assert not cached and entry.n_tokens == len(insert_landmarks(doc, None, 7, spec.mem_id)[0])

    from landmark_cli.retrieval.session import Session

    sess = Session(eng, entry, capacity=32)
    got = [sess.step(torch.tensor(suffix)), sess.step(torch.tensor([5])), sess.step(torch.tensor([6]))]
    for i, logits in enumerate(got):
        seq = doc + suffix + [5, 6][:i]
        stream = torch.tensor(insert_landmarks(seq, None, 7, spec.mem_id)[0])
        full = trained.model.forward(stream, is_landmark=stream == spec.mem_id, local_layers=spec.local_layers,
                                     local_blocks=spec.local_blocks)
        want = full[-1].clone()
        want[spec.mem_id] = float("-inf")  # a landmark is never generated
        torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("local_blocks", [1, 0])
def test_all_local_layers_read_without_retrieval(tmp_path, local_blocks):
    """A model whose every layer is local needs no retrieval: with --top-k 0 and no window,
    reading and answering still give the full forward's logits (each step's previous
    block comes from the store, or nothing at all for layers that read their own block only)."""
    from landmark_cli.retrieval.session import Session

    lm = load_model(str(make_tiny_landmark_model(tmp_path / "m", local_layers=2, local_blocks=local_blocks)))
    spec = lm.landmark
    eng = Engine(lm, Settings(Reading(top_k=0, chunk=32, window=0, kv_dtype="float32")), root=tmp_path / "store")
    g = torch.Generator().manual_seed(1)
    doc = torch.randint(2, spec.mem_id - 1, (300,), generator=g).tolist()  # longer than the training context
    suffix = torch.randint(2, spec.mem_id - 1, (5,), generator=g).tolist()
    entry, _ = eng.read(doc)
    logits = Session(eng, entry, capacity=8).step(torch.tensor(suffix))
    stream = torch.tensor(insert_landmarks(doc + suffix, None, 7, spec.mem_id)[0])
    want = lm.model.forward(stream, is_landmark=stream == spec.mem_id, local_layers=2,
                            local_blocks=local_blocks)[-1].clone()
    want[spec.mem_id] = float("-inf")
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)


def test_trained_settings_fit_the_training_context(trained, tmp_path):
    eng = Engine(trained, Settings(Reading(top_k=8)), root=tmp_path)  # defaults: chunk 512, window 1024
    assert eng.reading.span() <= 256 and eng.reading.chunk_tokens == 256 - 8 * 8 and eng.reading.window == 0
    with pytest.raises(LandmarkError, match="training context"):
        Engine(trained, Settings(Reading(top_k=40)), root=tmp_path)
    free = Engine(trained, Settings(Reading(top_k=2), landmarks="free"), root=tmp_path)
    assert free.spec is None and free.reading.block == 32


def test_default_top_k_fits_a_trained_model(tmp_path):
    """Without --top-k, a trained model retrieves TRAINED_TOP_K blocks, fewer when its
    training context holds fewer (here 8 blocks of 31 + landmark: the default 8 would
    leave no room); an explicit --top-k 8 is still refused, and training-free landmarks
    keep 8."""
    from dataclasses import replace

    from landmark_cli.retrieval.settings import TRAINED_TOP_K

    lm = load_model(str(make_tiny_landmark_model(tmp_path / "m", mem_freq=31, train_context=256)))
    auto = Settings()  # no --top-k: the default for the kind of landmark
    assert Engine(lm, auto, root=tmp_path).reading.top_k == TRAINED_TOP_K == 4
    small = load_model(str(make_tiny_landmark_model(tmp_path / "s", mem_freq=31, train_context=96)))
    assert Engine(small, auto, root=tmp_path).reading.top_k == 2
    with pytest.raises(LandmarkError, match="no room"):
        Engine(lm, Settings(Reading(top_k=8)), root=tmp_path)
    assert Engine(lm, replace(auto, landmarks="free"), root=tmp_path).reading.top_k == 8


def test_landmarks_trained_needs_a_landmark_model(tiny, tmp_path):
    with pytest.raises(LandmarkError, match="no trained landmarks"):
        Engine(tiny, Settings(landmarks="trained"), root=tmp_path)


@pytest.mark.parametrize("n_doc", [75, 77])  # ends inside a block (closed by a landmark) / right after one
def test_folder_session_equals_full_grouped_forward(trained, tmp_path, n_doc):
    """`ask DIR` with a trained model, one document, k covering every block: the folder
    session gives the logits of the full grouped forward over the document's stream, ended
    by a landmark, then the question as a fresh stream."""
    from landmark_cli.retrieval.corpus_trained import TrainedCorpusSession

    spec = trained.landmark
    eng = Engine(trained, Settings(Reading(top_k=16, chunk=32, window=0, kv_dtype="float32")), root=tmp_path)
    g = torch.Generator().manual_seed(n_doc)
    doc = torch.randint(2, spec.mem_id - 1, (n_doc,), generator=g).tolist()
    suffix = torch.randint(2, spec.mem_id - 1, (9,), generator=g).tolist()
    entry, _ = eng.read(doc)
    sess = TrainedCorpusSession(eng, [entry], capacity=32)
    assert len(sess.closing) == (n_doc % 7 != 0)
    got = [sess.step(torch.tensor(suffix)), sess.step(torch.tensor([5])), sess.step(torch.tensor([6]))]
    stream = insert_landmarks(doc, None, 7, spec.mem_id)[0]
    stream += [spec.mem_id] * (stream[-1] != spec.mem_id)
    for i, logits in enumerate(got):
        seq = torch.tensor(stream + insert_landmarks(suffix + [5, 6][:i], None, 7, spec.mem_id)[0])
        want = trained.model.forward(seq, is_landmark=seq == spec.mem_id)[-1].clone()
        want[spec.mem_id] = float("-inf")
        torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)


def test_folder_question_retrieves_across_documents_within_budget(trained, tmp_path):
    """Several documents, a small budget: each head reads k blocks (partial ones closed),
    never more than the training context, and the sources name blocks of the documents."""
    from landmark_cli.retrieval.corpus_trained import TrainedCorpusSession

    spec = trained.landmark
    eng = Engine(trained, Settings(Reading(top_k=3, window=0)), root=tmp_path)
    g = torch.Generator().manual_seed(0)
    entries = [eng.read(torch.randint(2, spec.mem_id - 1, (n,), generator=g).tolist(),
                        np.stack([np.arange(n), np.arange(1, n + 1)], 1))[0] for n in (40, 61, 90)]
    sess = TrainedCorpusSession(eng, entries, capacity=16)
    assert len(sess.candidates) == sum(-(-e.n_tokens // 8) for e in entries) and len(sess.closing) == 3
    logits = sess.step(torch.tensor([3, 4, 5, 6]))
    assert torch.isfinite(logits[:spec.mem_id]).all() and logits[spec.mem_id] == float("-inf")
    assert sess.k == 3 and sess.retrieved_per_step == 24 <= spec.train_context
    src = sess.sources(5)
    assert len(src) == 5 and {d for d, _, _ in src} <= {0, 1, 2}
    assert all(0 <= b < entries[d].kv.shape[3] for d, b, _ in src)
