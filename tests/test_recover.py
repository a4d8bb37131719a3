"""`landmark recover` on a tiny model: a diff in the reference format (weight_diff.py of
epfml/landmark-attention) is made from a random "fine-tuned" landmark model, then recovered."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import run
from tiny import make_tiny_model

from landmark_cli.errors import ModelError
from landmark_cli.model.checkpoint import (
    LANDMARK_TOKEN,
    PAD_TOKEN,
    LandmarkSpec,
    add_landmark_tokens,
    landmark_config,
    save_checkpoint,
)
from landmark_cli.training.recover import CHECKSUM_FILE, INDEX_FILE, _inv_freq, recover


def _base(base_dir):
    """The base's tokenizer and weights (float32) with [PAD] and <landmark> added."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    weights = {k: v.float() for k, v in load_file(base_dir / "model.safetensors").items()}
    mem_id = add_landmark_tokens(tok, weights)
    return tok, weights, mem_id


def make_diff(base_dir, tuned_dir, diff_dir, shards: int = 1):
    """A weight diff as the reference's make_diff writes it: tuned - resized base, the tuned
    model's config and tokenizer, and checksum_psum.txt = the sum of the tuned weights."""
    _, resized, _ = _base(base_dir)
    tuned = load_file(tuned_dir / "model.safetensors")
    diff_dir.mkdir(parents=True)
    for f in tuned_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, diff_dir / f.name)
    (diff_dir / CHECKSUM_FILE).write_text(str(sum(t.sum().item() for t in tuned.values())))
    diff = {k: t - resized[k] for k, t in tuned.items()}
    names = sorted(diff)
    if shards == 1:
        save_file(diff, diff_dir / "model.safetensors")
        return diff_dir
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    parts = [names[i::shards] for i in range(shards)]
    for f, part in zip(files, parts, strict=True):
        save_file({k: diff[k] for k in part}, diff_dir / f)
    wmap = {k: f for f, part in zip(files, parts, strict=True) for k in part}
    (diff_dir / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    return diff_dir


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """base (untied, like LLaMA), tuned (landmark tokens added, weights perturbed), diff."""
    root = tmp_path_factory.mktemp("recover")
    base = make_tiny_model(root / "base", tie=False, layers=2, dim=64)
    tok, weights, mem_id = _base(base)
    g = torch.Generator().manual_seed(1)
    tuned_w = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in weights.items()}
    base_cfg = json.loads((base / "config.json").read_text())
    cfg = landmark_config(base_cfg, LandmarkSpec(mem_id, 15, 256), len(tok))
    tuned = save_checkpoint(root / "tuned", cfg, tuned_w, tok)
    return base, tuned, make_diff(base, tuned, root / "diff")


def _same_weights(out, tuned):
    got = {}
    for f in sorted(out.glob("*.safetensors")):
        got.update(load_file(f))
    want = load_file(tuned / "model.safetensors")
    assert set(got) == set(want)
    for k in want:  # (t - b) + b is t up to float32 rounding
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)


def test_recover_rebuilds_the_tuned_model(models, tmp_path):
    from transformers import AutoTokenizer

    from landmark_cli.model.loading import load_model

    base, tuned, diff = models
    out = tmp_path / "out"
    seen = []
    r = recover(base, diff, out, progress=lambda done, total, name: seen.append((done, total)))
    _same_weights(out, tuned)
    assert r.tensors == len(load_file(tuned / "model.safetensors")) and r.dtype == "float32"
    assert abs(r.checksum_got - r.checksum_expected) < 1e-3
    assert seen[-1][0] == seen[-1][1] == r.bytes and len(seen) == r.tensors
    tok, ref = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(tuned)
    for t in (PAD_TOKEN, LANDMARK_TOKEN):
        assert tok.convert_tokens_to_ids(t) == ref.convert_tokens_to_ids(t)
    assert tok.convert_tokens_to_ids(LANDMARK_TOKEN) == r.mem_id == len(tok) - 1
    cfg, want = json.loads((out / "config.json").read_text()), json.loads((tuned / "config.json").read_text())
    assert cfg["model_type"] == "llama_with_landmark" and cfg["torch_dtype"] == "float32"
    assert {k: cfg[k] for k in want if k != "torch_dtype"} == {k: v for k, v in want.items() if k != "torch_dtype"}
    lm = load_model(str(out))
    assert lm.landmark == LandmarkSpec(r.mem_id, 15, 256)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left


def test_sharded_diff_and_half_precision(models, tmp_path):
    base, tuned, _ = models
    diff = make_diff(base, tuned, tmp_path / "diff2", shards=2)
    out = recover(base, diff, tmp_path / "out", dtype="bfloat16").out
    index = json.loads((out / INDEX_FILE).read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(p.name for p in out.glob("*.safetensors"))
    assert len(list(out.glob("*.safetensors"))) == 2
    got = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    want = load_file(tuned / "model.safetensors")
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k].bfloat16()) for k in want)


def test_tampered_diff_is_refused(models, tmp_path):
    base, _, diff = models
    bad = shutil.copytree(diff, tmp_path / "bad")
    w = load_file(bad / "model.safetensors")
    w["model.layers.1.mlp.up_proj.weight"][3, 5] += 0.5
    save_file(w, bad / "model.safetensors")
    with pytest.raises(ModelError, match="checksum") as e:
        recover(base, bad, tmp_path / "out")
    assert "original LLaMA-7B" in str(e.value) and "corrupt" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # nothing half-written


def test_clear_errors(models, tmp_path):
    base, _, diff = models
    with pytest.raises(ModelError, match="already exists"):
        recover(base, diff, base)
    pickled = shutil.copytree(base, tmp_path / "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ModelError, match="convert its .bin weights to safetensors"):
        recover(pickled, diff, tmp_path / "out")
    short = shutil.copytree(diff, tmp_path / "short")
    w = load_file(short / "model.safetensors")
    w["model.norm.weight"] = w["model.norm.weight"][:-1].clone()
    save_file(w, short / "model.safetensors")
    with pytest.raises(ModelError, match=r"model\.norm\.weight: shape \[63\] in the diff, \[64\] in the base"):
        recover(base, short, tmp_path / "out")
    extra = shutil.copytree(diff, tmp_path / "extra")
    save_file({**load_file(extra / "model.safetensors"), "model.extra.weight": torch.zeros(2)},
              extra / "model.safetensors")
    with pytest.raises(ModelError, match="the base has no tensor model.extra.weight"):
        recover(base, extra, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_checksum_warns(models, tmp_path):
    base, _, diff = models
    d = shutil.copytree(diff, tmp_path / "d")
    (d / CHECKSUM_FILE).unlink()
    warnings = []
    r = recover(base, d, tmp_path / "out", warn=warnings.append)
    assert r.checksum_expected is None and any("checksum is skipped" in w for w in warnings)


@pytest.mark.parametrize("buffers_in_diff", [True, False])
def test_reference_rotary_buffers(models, tmp_path, buffers_in_diff):
    """The reference's diff stores rotary inv_freq buffers (zero diffs) and its checksum counts
    them; a base converted today has none, and a diff re-saved today may have lost them."""
    base, tuned, diff = models
    d = shutil.copytree(diff, tmp_path / "d")
    cfg = json.loads((d / "config.json").read_text())
    layers, inv = cfg["num_hidden_layers"], _inv_freq(cfg)
    if buffers_in_diff:
        names = [f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(layers)]
        save_file({**load_file(d / "model.safetensors"), **{n: torch.zeros_like(inv) for n in names}},
                  d / "model.safetensors")
    expected = float((d / CHECKSUM_FILE).read_text()) + layers * inv.sum().item()
    (d / CHECKSUM_FILE).write_text(str(expected))
    recover(base, d, tmp_path / "out")
    _same_weights(tmp_path / "out", tuned)  # the buffers are not written


def test_passkey_check_runs(models, tmp_path):
    from landmark_cli.bench.passkey_run import passkey_check
    from landmark_cli.retrieval.settings import Reading, Settings

    base, _, diff = models
    r = recover(base, diff, tmp_path / "out")
    small = Settings(Reading(block=16, top_k=2, window=64, sink=16, chunk=128))
    correct, trials = passkey_check(r.out, length=512, trials=1, settings=small)
    assert trials == 1 and correct in (0, 1)  # a random tiny model: only that it runs


def test_cli(capsys, monkeypatch, models, tmp_path):
    base, _, diff = models
    code, out, err = run(capsys, monkeypatch, "recover", "--base", base, "--diff", diff, "--out", tmp_path / "o",
                         "--no-check")
    assert code == 0, err
    assert "Recovered" in out and "matches" in out and (tmp_path / "o" / "model.safetensors").is_file()
    code, out, err = run(capsys, monkeypatch, "recover", "--base", tmp_path / "nope", "--diff", diff,
                         "--out", tmp_path / "o2", "--no-check")
    assert code == 1 and out == "" and "Traceback" not in err
    assert err.startswith("Error:") and "does not exist" in err and len(err.strip().splitlines()) <= 2
    assert not (tmp_path / "o2").exists()
