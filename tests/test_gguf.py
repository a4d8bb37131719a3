"""A GGUF model is used from its own file: its tensors under Hugging Face's names and row
order, packed groups kept packed for answering, nothing widened to float32 on disk."""

import shutil

import pytest
import torch
from tiny import make_tiny_gguf

from landmark_cli.errors import ModelError
from landmark_cli.model import blocks
from landmark_cli.model.llama import Llama
from landmark_cli.model.loading import GGUF_LINK, load_in, load_model, resolve_dir


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, tiny_dir):
    """(path of the tiny model written as a GGUF file, the weights it holds as float32)."""
    path = tmp_path_factory.mktemp("gguf") / "tiny.Q4_1.gguf"
    return path, make_tiny_gguf(tiny_dir, path)


def test_a_gguf_model_runs_on_exactly_the_weights_its_file_holds(gguf_file, tiny_dir, landmark_home):
    """Names, llama.cpp's query/key row order, q8_0 / q4_1 / q5_0 / float16 / float32 tensors:
    the model read from the file computes what a model built from the file's weights in
    Hugging Face's layout computes, with the same tokenizer; its directory links to the
    file and holds no weights of its own."""
    path, held = gguf_file
    lm = load_model(str(path))
    want = Llama(lm.model.cfg, held)
    ids = torch.arange(3, 60)
    with torch.inference_mode():
        assert torch.equal(lm.model.forward(ids), want.forward(ids))
    hf = load_model(str(tiny_dir))
    text = "the captain of the ferry company launched a ship in the harbour"
    assert lm.tokenizer.encode(text) == hf.tokenizer.encode(text)
    d = resolve_dir(str(path))
    assert (d / GGUF_LINK).resolve() == path.resolve() and not list(d.glob("*.safetensors"))


def test_answering_keeps_the_files_groups_and_reading_gets_its_own_copy(gguf_file, landmark_home):
    """The CPU's auto: the answering matrices are the file's q4_1 / q8_0 groups (the float16
    value projection fused with q4_1 keys, and the q5_0 output projection: float16), the
    reading copy bfloat16 or float32,
    and what is kept on disk is smaller than one float32 copy of the matrices."""
    path, held = gguf_file
    lm = load_in(str(path), "auto", kernels="auto")
    fp32 = load_model(str(path))
    ids = torch.arange(3, 60)
    with torch.inference_mode():
        want = fp32.model.forward(ids)
        for m in (lm.model, lm.reading_model):
            assert (m.forward(ids) - want).abs().max().item() < 2e-2 * want.abs().max().item()
    if lm.model.matrix_dtype == blocks.PACKED:  # the native answer step is built here
        formats = lm.model.matrix_formats()
        assert formats[-1] == "q8_0" and set(formats) == {"float16", "q4_1", "q8_0"}
        gate_up = lm.model.layers[0]["gate_up"]
        assert torch.equal(blocks.unpack(gate_up, 64), torch.cat([held["model.layers.0.mlp.gate_proj.weight"],
                                                                 held["model.layers.0.mlp.up_proj.weight"]]))
    float32_matrices = sum(t.numel() * 4 for t in fp32.model.matrices().values())
    kept = [f for f in (landmark_home / "models" / "converted").glob("*") if "-float32-v" not in f.name]
    assert sum(f.stat().st_size for f in kept) < 1.2 * float32_matrices


def test_finetuning_starts_from_a_gguf_models_weights(gguf_file, landmark_home):
    from landmark_cli.training.finetune import load_base

    path, held = gguf_file
    model, tok, config, spec = load_base(resolve_dir(str(path)), block_size=8, context=64)
    w = model.state_dict()
    for name, t in held.items():
        if name != "model.embed_tokens.weight":  # grown by <landmark>
            assert torch.equal(w[name], t), name
    assert torch.equal(w["model.embed_tokens.weight"][: len(held["model.embed_tokens.weight"])],
                       held["model.embed_tokens.weight"])


def test_a_damaged_gguf_file_is_a_clear_error(gguf_file, tmp_path):
    path, _ = gguf_file
    cut = tmp_path / "cut.gguf"
    data = path.read_bytes()
    for damaged in (data[: len(data) // 2], b"GGUF" + bytes(60)):
        cut.write_bytes(damaged)
        with pytest.raises(ModelError) as e:
            load_model(str(cut))
        assert "cut.gguf" in str(e.value) and "\n" not in str(e.value)


def test_what_older_versions_kept_is_removed_when_a_model_is_first_prepared(gguf_file, landmark_home):
    from landmark_cli.model.loading import CONVERT_VERSION

    path, _ = gguf_file
    models = landmark_home / "models"
    d = resolve_dir(str(path))
    old_dir = d.with_name(d.name.replace(f"-v{CONVERT_VERSION}", "-v1"))
    old_dir.mkdir()
    (old_dir / "model.safetensors").write_bytes(b"old")
    (models / "converted").mkdir()
    old_file = models / "converted" / "0123456789abcdef-float16-matrices-v1.safetensors"
    old_file.write_bytes(b"old")
    other = models / "another-0123456789abcdef-v1"  # another model: left alone
    other.mkdir()
    shutil.rmtree(d)
    assert resolve_dir(str(path)) == d
    assert not old_dir.exists() and not old_file.exists() and other.exists()
