"""The native answer step (landmark_cli/kernels/cpu_step.c) against PyTorch's layer loop."""

import copy
import dataclasses
import platform

import pytest
import torch

from landmark_cli.kernels import cpu_step
from landmark_cli.model import blocks
from landmark_cli.model.device import resolve_dtypes
from landmark_cli.model.llama import MATRICES
from landmark_cli.model.loading import load_model
from landmark_cli.retrieval.engine import Engine
from landmark_cli.retrieval.session import Session
from landmark_cli.retrieval.settings import Answering, Reading, Settings

# where it must build: this project's machines and CI (x86-64 with a C compiler)
BUILDS = platform.machine().lower() in ("x86_64", "amd64") and cpu_step.compiler() is not None
needs_build = pytest.mark.skipif(not BUILDS, reason="the native step is built on x86-64 with a C compiler")
SETTINGS = Settings(Reading(block=8, top_k=4, sink=8, window=16, chunk=32), Answering(top_k=4))


def _ids(n, vocab, seed=0):
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _answer(lm, kernels, root, tokens=None, steps=8, native=None):
    """Logits of a question and `steps` answer tokens (teacher-forced on `tokens` when
    given, else greedy) over a 160-token document; and the engine (whose native step is
    `native` when given)."""
    lm = dataclasses.replace(lm, kernels=kernels)
    ids = _ids(190, lm.model.cfg.vocab_size)
    eng = Engine(lm, SETTINGS, root=root)
    if native is not None:
        eng.native = native
    entry, _ = eng.read(ids[:160])
    sess = Session(eng, entry, capacity=64)
    out = [sess.step(torch.tensor(ids[160:]))]
    for i in range(steps):
        tok = tokens[i] if tokens is not None else int(out[-1].argmax())
        out.append(sess.step(torch.tensor([tok])))
    return torch.stack(out), eng


def _as_if_from_gguf(lm):
    """lm with its layer matrices rounded to q4_1 groups and its embedding / LM head to
    q8_0 groups (what a model converted from a GGUF file holds), answering from them packed."""
    m = lm.model
    exact = copy.copy(m)
    exact.layers = [{k: blocks.unpack(blocks.pack_q4_1(v), v.shape[1]) if k in MATRICES else v for k, v in L.items()}
                    for L in m.layers]
    exact.w = {**m.w, "model.embed_tokens.weight": blocks.unpack(blocks.pack_q8_0(m.lm_head), m.cfg.dim)}
    exact.lm_head = exact.w["model.embed_tokens.weight"]
    return dataclasses.replace(lm, model=exact.with_matrices(blocks.PACKED), reader=exact)


@needs_build
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2),
                                        (blocks.PACKED, 1e-5)])
def test_native_answers_like_the_layer_loop(tiny_dir, tmp_path, dtype, tol):
    """Answer steps with the matrices in each format the step reads: the same logits as the
    PyTorch path to that format's rounding (PyTorch rounds the activations to the
    matrices' dtype first, the native step keeps them in float32; packed groups hold the
    weights exactly), the same top token."""
    if dtype == blocks.PACKED:
        lm = _as_if_from_gguf(load_model(str(tiny_dir)))
        assert set(lm.model.matrix_formats()[:-1]) == {"q4_1"} and lm.model.matrix_formats()[-1] == "q8_0"
        ref_lm = dataclasses.replace(lm, model=lm.reader, reader=None)  # the same weights in float32
    else:
        lm = ref_lm = load_model(str(tiny_dir), answer_dtype=None if dtype == torch.float32 else dtype)
    ref, eng_ref = _answer(ref_lm, "torch", tmp_path / "a")
    tokens = ref[:-1].argmax(-1).tolist()
    got, eng = _answer(lm, "auto", tmp_path / "b", tokens=tokens[:8])
    assert eng_ref.native is None and eng.native is not None
    scale = ref.abs().max()
    assert ((got - ref).abs().max() / scale).item() < tol
    assert got.argmax(-1).tolist() == ref.argmax(-1).tolist()


@needs_build
def test_the_avx2_build_matches_this_cpus(tiny, tmp_path):
    """The AVX2 + F16C path (laptops without AVX-512), built for haswell, runs here too
    and gives the same logits as this CPU's build."""
    ref, _ = _answer(tiny, "auto", tmp_path / "a")
    lib = cpu_step.library("haswell")
    assert lib is not None
    got, _ = _answer(tiny, "auto", tmp_path / "b", tokens=ref[:-1].argmax(-1).tolist(),
                     native=cpu_step.CpuStep(lib, tiny.model))
    assert (got - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


def test_without_a_compiler_the_layer_loop_answers(tiny, tmp_path, monkeypatch, landmark_home):
    """No C compiler: the engine answers through PyTorch, the same tokens, and the failed
    build is remembered instead of tried on every run."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    ref, _ = _answer(tiny, "torch", tmp_path / "a")
    got, eng = _answer(tiny, "auto", tmp_path / "b")
    assert eng.native is None
    assert got.argmax(-1).tolist() == ref.argmax(-1).tolist()
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert list((landmark_home / "native").glob("*.failed")) and not list((landmark_home / "native").glob("*.so"))


@needs_build
def test_a_damaged_library_is_built_again(landmark_home):
    """A library file that does not load (a damaged disk, a copied home) is removed: this
    run answers through PyTorch, the next builds it again. (An instruction set no other
    test loads: a library this process has mapped must not be overwritten under it.)"""
    path = cpu_step.library_path(cpu_step.compiler(), "x86-64-v3")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a shared library")
    assert cpu_step.library("x86-64-v3") is None and not path.exists()
    cpu_step._loaded.clear()
    assert cpu_step.library("x86-64-v3") is not None and path.exists()


def test_packed_groups_give_their_weights_back():
    """q8_0 and q4_1 round each group of 32 to its own scale (and offset); `exact` packs a
    matrix only in a format that gives every weight back bit for bit, the smallest first."""
    w = torch.randn(6, 96) * torch.logspace(-3, 2, 96)  # groups of very different magnitude
    w[2, 32:64] = 0.0
    g = w.reshape(6, 3, 32)
    steps = {"q8_0": g.abs().amax(-1, keepdim=True) / 127,
             "q4_1": (g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / 15}
    for pack, size, name in ((blocks.pack_q8_0, 34, "q8_0"), (blocks.pack_q4_1, 20, "q4_1")):
        p = pack(w)
        assert p.dtype == blocks.PACKED and p.shape == (6, 3 * size)
        back = blocks.unpack(p, 96)
        assert ((back - w).reshape(6, 3, 32).abs() <= steps[name] * 0.51 + 1e-12).all()  # half a step
        assert (back[2, 32:64] == 0).all()
    assert blocks.exact(w) is None and blocks.convert(w, blocks.PACKED, 96).dtype == torch.float16
    for pack, name in ((blocks.pack_q4_1, "q4_1"), (blocks.pack_q8_0, "q8_0")):
        held = blocks.unpack(pack(w), 96)  # weights a GGUF file held in this format
        p = blocks.exact(held)
        assert p is not None and blocks.format_of(p, 96) == name and torch.equal(blocks.unpack(p, 96), held)
        # packed weights convert without passing through floats of their own
        assert blocks.convert(p, blocks.PACKED, 96) is p
        assert torch.equal(blocks.convert(p, torch.bfloat16, 96), held.to(torch.bfloat16))
    mixed = blocks.cat_rows([blocks.pack_q4_1(w), blocks.pack_q8_0(w[:2])], 96)  # formats differ: floats
    assert mixed.dtype == torch.float32 and mixed.shape == (8, 96)
    assert blocks.cat_rows([blocks.pack_q4_1(w), blocks.pack_q4_1(w[:2])], 96).dtype == blocks.PACKED


def test_auto_answers_packed_only_through_the_native_step(monkeypatch, tmp_path):
    cpu = torch.device("cpu")
    if BUILDS:
        assert resolve_dtypes("auto", cpu).answer == blocks.PACKED
    assert resolve_dtypes("auto", cpu, kernels="torch").answer != blocks.PACKED
    assert resolve_dtypes("float32", cpu).answer == torch.float32
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert resolve_dtypes("auto", cpu).answer != blocks.PACKED
