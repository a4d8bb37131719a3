"""--device, --dtype and --kernels: resolution, one-line errors, and the GPU's staging path run on the CPU."""

import json

import numpy as np
import pytest
import torch
from test_cli import DOC, run
from tiny import make_tiny_landmark_model

from landmark_cli.errors import LandmarkError
from landmark_cli.model import device
from landmark_cli.model.blocks import PACKED
from landmark_cli.model.device import check_kernels, resolve_device, resolve_dtypes, stage
from landmark_cli.model.loading import load_model
from landmark_cli.retrieval.engine import Engine
from landmark_cli.retrieval.session import Session
from landmark_cli.retrieval.settings import Answering, Reading, Settings

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
CPU = torch.device("cpu")


def test_resolution():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else CPU)
    assert resolve_dtypes("auto", CPU) == resolve_dtypes("mixed", CPU)
    assert resolve_dtypes("mixed", CPU).dtype == torch.float32  # activations: float32
    assert resolve_dtypes("mixed", CPU).read in (torch.float32, torch.bfloat16)  # measured
    # packed where the native answer step runs, else measured
    assert resolve_dtypes("mixed", CPU).answer in (torch.float32, torch.float16, PACKED)
    assert resolve_dtypes("mixed", CPU, kernels="torch").answer in (torch.float32, torch.float16)
    # a named dtype on the CPU is the matrices' format; the activations stay float32
    assert resolve_dtypes("bfloat16", CPU) == (torch.float32, torch.bfloat16, torch.bfloat16)
    assert check_kernels("torch", CPU) == "torch"
    for bad in (lambda: resolve_device("tpu"), lambda: resolve_device("gpu!"), lambda: resolve_dtypes("half", CPU),
                lambda: check_kernels("cuda", CPU), lambda: check_kernels("triton", CPU)):
        with pytest.raises(LandmarkError):
            bad()


@no_cuda
def test_cuda_without_cuda_is_one_line(capsys, monkeypatch, tmp_path, tiny_dir):
    doc = tmp_path / "notes.md"
    doc.write_text(DOC)
    for args in (["ask", doc, "Who?", "--model", tiny_dir, "--device", "cuda"],
                 ["index", tmp_path, "--model", tiny_dir, "--device", "cuda:1"],
                 ["passkey", "--model", tiny_dir, "--lengths", "1k", "--trials", "1", "--device", "cuda"]):
        code, out, err = run(capsys, monkeypatch, *args)
        assert code != 0 and "CUDA is not available" in err, err
        assert len(err.strip().splitlines()) <= 2 and "Traceback" not in err


def test_bfloat16_on_the_cpu_end_to_end(capsys, monkeypatch, tmp_path, tiny_dir):
    doc = tmp_path / "notes.md"
    doc.write_text(DOC)
    args = ["ask", doc, "Who was the captain?", "--model", tiny_dir, "--json", "--max-tokens", "4", "--block-size",
            "16", "--top-k", "2", "--window", "64", "--sink", "16", "--chunk", "64", "--device", "cpu",
            "--dtype", "bfloat16", "--kernels", "torch"]
    for cached in (False, True):
        code, out, err = run(capsys, monkeypatch, *args)
        assert code == 0, err
        r = json.loads(out)
        assert r["cached"] is cached and r["tokens"]["answer"] >= 1 and r["sources"]


@pytest.fixture
def bf16_dir(tiny_dir, tmp_path):
    """The tiny model as a bfloat16 checkpoint (as most published ones are)."""
    import shutil

    from safetensors.torch import load_file, save_file

    half_dir = tmp_path / "bf16"
    shutil.copytree(tiny_dir, half_dir)
    (f,) = half_dir.glob("*.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    return half_dir


def test_a_named_dtype_on_the_cpu_keeps_the_checkpoint_and_float32_activations(bf16_dir, landmark_home):
    """`--dtype bfloat16` on the CPU with a bfloat16 checkpoint: the matrices are the file's
    (nothing converted, nothing widened to float32), the norms and the looked-up
    embedding rows float32, so the forward runs in float32 between the matrices and
    matches a float32 model that holds the same bfloat16-rounded matrices."""
    from landmark_cli.model.loading import load_in

    half_dir = bf16_dir
    lm = load_in(str(half_dir), "bfloat16", CPU)
    m = lm.model
    assert lm.reader is None and m.dtype == torch.float32 and m.matrix_dtype == torch.bfloat16
    assert m.layers[0]["attn_norm"].dtype == torch.float32 and m.embed(torch.tensor([5])).dtype == torch.float32
    assert lm.dtypes() == "bfloat16"
    assert not (landmark_home / "models" / "converted").exists()  # read as stored
    wide = load_model(str(half_dir), dtype=torch.float32).model  # the same numbers, widened
    x = torch.arange(3, 43)
    with torch.inference_mode():
        want, got = wide.forward(x), m.forward(x)
    assert got.dtype == torch.float32
    assert (got - want).abs().max().item() < 2e-2 * want.abs().max().item()


def test_mixed_precision_reads_a_half_precision_checkpoint_as_it_is(bf16_dir, landmark_home):
    """The CPU's auto on a bfloat16 checkpoint: documents are read by the file's own
    matrices, the answering copy is converted from them, and no float32 copy of the
    model is written; the activations are float32."""
    lm = load_model(str(bf16_dir), dtype=torch.float32, read_dtype=torch.bfloat16, answer_dtype=torch.float16)
    assert (lm.reading_model.matrix_dtype, lm.model.matrix_dtype) == (torch.bfloat16, torch.float16)
    assert lm.reading_model.dtype == lm.model.dtype == torch.float32
    kept = [f.name for f in (landmark_home / "models" / "converted").glob("*.safetensors")]
    assert len(kept) == 1 and "bfloat16-float16-matrices" in kept[0]
    wide = load_model(str(bf16_dir), dtype=torch.float32).model
    for name, t in lm.reading_model.matrices().items():
        assert torch.equal(t.float(), wide.matrices()[name]), name


def test_finetuning_a_half_precision_checkpoint_writes_no_float32_copy(bf16_dir, landmark_home):
    from landmark_cli.training.finetune import load_base

    model, *_ = load_base(bf16_dir, block_size=8, context=64)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not (landmark_home / "models" / "converted").exists()


def test_model_to_another_dtype_keeps_the_weights(tiny_dir):
    lm = load_model(str(tiny_dir), dtype=torch.float32)
    half = lm.model.to(dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.device == CPU and lm.model.to(CPU) is lm.model
    for name, w in lm.model.state_dict().items():
        assert torch.equal(half.state_dict()[name], w.to(torch.bfloat16)), name


def test_stage_gathers_the_selected_blocks(monkeypatch):
    store = torch.randn(3, 10, 4, 8)
    idx = torch.tensor([[1, 5], [0, 9], [7, 7]])
    ks, vs, got = stage(store, store * 2, idx, CPU)
    assert ks is store and torch.equal(got, idx)  # already where it is read: in place
    monkeypatch.setenv("LANDMARK_STAGE", "1")
    ks, vs, got = stage(store, store * 2, idx, CPU)
    assert ks.shape == (3, 2, 4, 8) and torch.equal(got, torch.arange(2).expand(3, 2))
    for h in range(3):
        assert torch.equal(ks[h], store[h, idx[h]]) and torch.equal(vs[h], 2 * store[h, idx[h]])


def _staged_and_in_place(lm, settings, ids, n_doc, root, monkeypatch) -> None:
    """Read ids[:n_doc] and answer ids[n_doc:] plus 3 greedy tokens, once with the blocks
    read in place and once staged (LANDMARK_STAGE=1): the logits agree at every step."""

    def answer(staged: bool) -> list[torch.Tensor]:
        monkeypatch.setenv("LANDMARK_STAGE", "1" if staged else "0")
        eng = Engine(lm, settings, root=root / f"store-{staged}")
        entry, cached = eng.read(ids[:n_doc])
        assert not cached
        sess = Session(eng, entry, capacity=64)
        out = [sess.step(torch.tensor(ids[n_doc:]))]
        for _ in range(3):
            out.append(sess.step(torch.tensor([int(out[-1].argmax())])))
        return out

    for a, b in zip(answer(False), answer(True), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # a trained model's <landmark> logit is -inf in both


@pytest.mark.parametrize("select, passages", [("layer", "cached"), ("shared", "cached"), ("shared", "text")])
def test_staged_blocks_answer_exactly_as_blocks_read_in_place(tiny, tmp_path, monkeypatch, select, passages):
    """The GPU's path (every retrieved block gathered and copied before attention, while
    reading and answering) gives the logits of the CPU's (blocks read in place from the
    memory-mapped store), step by step."""
    ids = torch.randint(3, tiny.model.cfg.vocab_size, (230,), generator=torch.Generator().manual_seed(1)).tolist()
    settings = Settings(Reading(block=8, top_k=3, sink=8, window=16, chunk=32, kv_dtype="float32"),
                        Answering(select=select, passages=passages))
    _staged_and_in_place(tiny, settings, ids, 190, tmp_path, monkeypatch)


def test_staged_blocks_with_trained_landmarks(tmp_path, monkeypatch):
    """The same for a trained landmark model with a local first layer (grouped softmax,
    per-layer retrieval, the block before the window staged for the local layer)."""
    lm = load_model(str(make_tiny_landmark_model(tmp_path / "m", local_layers=1)))
    ids = torch.randint(3, 300, (260,), generator=torch.Generator().manual_seed(2)).tolist()
    settings = Settings(Reading(top_k=2, window=16, chunk=32, kv_dtype="float32"))
    _staged_and_in_place(lm, settings, ids, 230, tmp_path, monkeypatch)


def test_a_store_read_in_one_dtype_answers_in_another(tiny_dir, tmp_path):
    """The store's format does not depend on where or in what precision it was read."""
    ids = list(range(3, 203))
    settings = Settings(Reading(block=8, top_k=3, sink=8, window=16, chunk=32))
    half = Engine(load_model(str(tiny_dir), dtype=torch.bfloat16), settings, root=tmp_path / "store")
    full = Engine(load_model(str(tiny_dir)), settings, root=tmp_path / "store")
    entry, cached = half.read(ids)
    assert not cached and full.read(ids)[1] is True
    assert full.answer(full.read(ids)[0], [5, 6, 7], max_new_tokens=2).tokens


def test_the_cpu_matrix_dtypes_are_measured_once_and_kept(monkeypatch, landmark_home):
    calls = []

    def fake(dtype, rows, n=4096, runs=9):
        calls.append(dtype)
        one_row = {torch.float32: 10.0, torch.float16: 2.0}
        chunk = {torch.float32: 10.0, torch.bfloat16: 9.0}  # not clearly faster: float32 reads
        return (one_row if rows == 1 else chunk)[dtype]

    monkeypatch.setattr(device, "_matmul_ms", fake)
    assert device.cpu_matrix_dtypes() == (torch.float32, torch.float16) and len(calls) == 4
    assert device.cpu_matrix_dtypes() == (torch.float32, torch.float16) and len(calls) == 4  # kept
    kept = json.loads((landmark_home / device.CPU_DTYPE_FILE).read_text())
    assert [(v["read"], v["answer"]) for v in kept.values()] == [("float32", "float16")]


def test_reading_and_answering_in_two_dtypes(tiny_dir, tmp_path):
    """--dtype mixed on a CPU that answers faster in float16: documents are read by the
    float32 weights (the same store as reading in float32 alone), answers come from float16
    copies of the matrices, sharing the embeddings and norms, with float32 activations and
    logits close to the reader's."""
    split = load_model(str(tiny_dir), dtype=torch.float32, answer_dtype=torch.float16)
    reader, answer = split.reading_model, split.model
    assert reader.matrix_dtype == torch.float32 and answer.matrix_dtype == torch.float16
    assert answer.dtype == torch.float32 and answer.w is reader.w
    assert "float32 reading, float16 answering" in split.runtime()
    x = torch.randint(0, answer.cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        exact, got = reader.forward(x), answer.forward(x)
    assert got.dtype == torch.float32
    assert 0 < (got - exact).abs().max().item() < 1e-2 * exact.abs().max().item()
    ids = list(range(3, 203))
    settings = Settings(Reading(block=8, top_k=3, sink=8, window=16, chunk=32, kv_dtype="float32"))
    a, _ = Engine(split, settings, root=tmp_path / "a").read(ids)
    b, _ = Engine(load_model(str(tiny_dir)), settings, root=tmp_path / "b").read(ids)
    assert np.array_equal(np.asarray(a.kv), np.asarray(b.kv))
    answer = Engine(split, settings, root=tmp_path / "a").answer(a, [5, 6, 7], max_new_tokens=3)
    assert answer.tokens


def test_converted_weights_are_kept_once_and_used_as_converted(tiny_dir, landmark_home):
    """A float32 checkpoint used in bfloat16, and the CPU's float16 answering matrices, are
    converted on the first load and read from LANDMARK_HOME/models/converted afterwards,
    with the same numbers; a damaged converted file is removed and converted again."""
    kept = landmark_home / "models" / "converted"
    first = load_model(str(tiny_dir), dtype=torch.bfloat16)
    files = sorted(kept.glob("*.safetensors"))
    assert len(files) == 1 and "bfloat16" in files[0].name
    again = load_model(str(tiny_dir), dtype=torch.bfloat16)
    assert again.model.dtype == torch.bfloat16
    for a, b in zip(first.model.parameters(), again.model.parameters(), strict=True):
        assert torch.equal(a, b)
    split = load_model(str(tiny_dir), dtype=torch.float32, answer_dtype=torch.float16)
    matrices = next(kept.glob("*-float32-float16-matrices-*.safetensors"))
    split_again = load_model(str(tiny_dir), dtype=torch.float32, answer_dtype=torch.float16)
    for name, t in split.model.matrices().items():
        assert t.dtype == torch.float16 and torch.equal(t, split_again.model.matrices()[name])
    assert load_model(str(tiny_dir)).model is not None  # float32 as stored: nothing converted
    assert len(list(kept.glob("*.safetensors"))) == 2
    matrices.write_bytes(matrices.read_bytes()[:100])  # truncated: unreadable
    repaired = load_model(str(tiny_dir), dtype=torch.float32, answer_dtype=torch.float16)
    assert matrices.stat().st_size > 100
    for name, t in split.model.matrices().items():
        assert torch.equal(t, repaired.model.matrices()[name])


def test_weights_that_cannot_be_kept_are_still_used(tiny_dir, landmark_home, monkeypatch):
    """A full disk (or a read-only LANDMARK_HOME) does not stop a converted model from running."""
    import safetensors.torch

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    lm = load_model(str(tiny_dir), dtype=torch.bfloat16)
    assert lm.model.dtype == torch.bfloat16
    assert not list((landmark_home / "models" / "converted").glob("*"))


def test_reading_and_answering_matrices_in_their_own_dtypes(tiny_dir):
    """The CPU's mixed precision on a CPU with bfloat16 arithmetic: float32 activations
    throughout, bfloat16 matrices for reading, float16 matrices for answering, the
    embeddings and norms shared, and no float32 copy of the matrices kept."""
    lm = load_model(str(tiny_dir), dtype=torch.float32, read_dtype=torch.bfloat16, answer_dtype=torch.float16)
    reader, answer = lm.reading_model, lm.model
    assert (reader.matrix_dtype, answer.matrix_dtype) == (torch.bfloat16, torch.float16)
    assert reader.dtype == answer.dtype == torch.float32 and reader.w is answer.w
    assert "bfloat16 reading, float16 answering" in lm.runtime()
    exact = load_model(str(tiny_dir)).model
    x = torch.randint(0, answer.cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = exact.forward(x)
        for m in (reader, answer):
            got = m.forward(x)
            assert got.dtype == torch.float32
            assert 0 < (got - want).abs().max().item() < 3e-2 * want.abs().max().item()
    only_reading = load_model(str(tiny_dir), dtype=torch.float32, read_dtype=torch.bfloat16)
    assert only_reading.reader is None and only_reading.model.matrix_dtype == torch.bfloat16
