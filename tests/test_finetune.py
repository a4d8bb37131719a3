"""`landmark finetune`: the loss falls, the checkpoint loads in trained mode, runs resume exactly."""

import json
import random
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import run

from landmark_cli.ask import ask
from landmark_cli.errors import LandmarkError
from landmark_cli.model.checkpoint import LandmarkSpec
from landmark_cli.model.loading import load_model
from landmark_cli.retrieval.landmarks import insert_landmarks
from landmark_cli.retrieval.settings import Reading, Settings
from landmark_cli.training.finetune import STATE_META, TrainConfig, finetune

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import trained_facts  # noqa: E402

CFG = TrainConfig(block_size=7, context=64, steps=20, batch=4, lr=3e-3, warmup=3, save_every=10)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    trained_facts.write_corpus(folder, 200, seed=0, pool=trained_facts.names(50))
    return folder


def test_loss_falls_and_checkpoint_loads(tiny_dir, corpus, tmp_path):
    out = tmp_path / "model"
    r = finetune(str(tiny_dir), corpus, out, CFG)
    losses = json.loads((out / STATE_META).read_text())["losses"]
    assert len(losses) == 20 and sum(losses[-5:]) / 5 < 0.8 * losses[0]
    lm = load_model(str(out))
    assert lm.landmark is not None and lm.landmark.mem_freq == 7 and lm.landmark.train_context == 64
    assert r["mem_id"] == lm.landmark.mem_id
    doc = tmp_path / "doc.txt"
    doc.write_text(trained_facts.long_document(__import__("random").Random(0), trained_facts.names(50), 2, 60)[0])
    res = ask(lm, doc, "What is the code of Kite?", Settings(Reading(top_k=2)), max_new_tokens=4)
    assert res.retrieved_per_step <= 64 and res.document_tokens > 64  # the document is beyond the context


def test_local_layers_are_trained_saved_and_read_so(tiny_dir, corpus, tmp_path):
    """finetune --local-layers 1: the checkpoint says so (landmark_local_layers), loads with
    it, and its loss is the local forward's; resuming with other local layers is refused."""
    from dataclasses import replace

    from landmark_cli.training.finetune import load_base, loss_of, sample_batch

    cfg = replace(CFG, steps=4, save_every=4, local_layers=1)
    finetune(str(tiny_dir), corpus, tmp_path / "m", cfg)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["landmark_local_layers"] == 1
    lm = load_model(str(tmp_path / "m"))
    assert lm.landmark.local_layers == 1
    model, _, _, spec = load_base(tmp_path / "m", 7, 64, 1)
    batch, _ = sample_batch(__import__("numpy").arange(5000) % 300, cfg, spec, torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = batch[:, :-1]
        local = model.forward(x, is_landmark=x == spec.mem_id, local_layers=1)
        full = model.forward(x, is_landmark=x == spec.mem_id)
        want = torch.nn.functional.cross_entropy(local.flatten(0, 1), batch[:, 1:].flatten())
        torch.testing.assert_close(loss_of(model, batch, spec), want)
    assert not torch.allclose(local, full)
    with pytest.raises(LandmarkError, match="other settings"):
        finetune(str(tiny_dir), corpus, tmp_path / "m", replace(cfg, steps=8, local_layers=0))


def test_own_block_local_layers_are_trained_saved_and_read_so(tiny_dir, corpus, tmp_path):
    """finetune --local-layers 1 --local-blocks 0: the checkpoint says so, loads with it, and
    its loss is that of a first layer reading its own block only; a config with another
    value is refused with a clear error."""
    from dataclasses import replace

    from landmark_cli.training.finetune import load_base, loss_of, sample_batch

    cfg = replace(CFG, steps=4, save_every=4, local_layers=1, local_blocks=0)
    finetune(str(tiny_dir), corpus, tmp_path / "m", cfg)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (config["landmark_local_layers"], config["landmark_local_blocks"]) == (1, 0)
    assert load_model(str(tmp_path / "m")).landmark.local_blocks == 0
    model, _, _, spec = load_base(tmp_path / "m", 7, 64, 1, 0)
    batch, _ = sample_batch(__import__("numpy").arange(5000) % 300, cfg, spec, torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = batch[:, :-1]
        own = model.forward(x, is_landmark=x == spec.mem_id, local_layers=1, local_blocks=0)
        previous = model.forward(x, is_landmark=x == spec.mem_id, local_layers=1)
        want = torch.nn.functional.cross_entropy(own.flatten(0, 1), batch[:, 1:].flatten())
        torch.testing.assert_close(loss_of(model, batch, spec), want)
    assert not torch.allclose(own, previous)
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "landmark_local_blocks": 2}))
    with pytest.raises(LandmarkError, match="landmark_local_blocks is 2"):
        load_model(str(tmp_path / "m"))
    with pytest.raises(ValueError, match="local-blocks"):
        replace(cfg, local_blocks=2)


def test_loss_on_trains_on_the_marked_answers_only(tiny_dir, corpus, tmp_path):
    """--loss-on MARKER: the loss is the mean over the tokens after each marker up to the
    end of its line (and the end-of-text token where that line ends the document); the
    setting is part of a resumable run's identity; a marker found nowhere is refused."""
    from dataclasses import replace

    from landmark_cli.training.finetune import answer_tokens, corpus_tokens, load_base, loss_of, sample_batch

    tok = load_model(str(tiny_dir)).tokenizer
    text = "Question: one?\nAnswer: yes it is.\nQuestion: two?\nAnswer: no"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    marked = answer_tokens(text, enc["offset_mapping"], "Answer:", eos=True)
    assert len(marked) == len(enc["input_ids"]) + 1 and marked[-1]  # the last answer ends the text
    assert tok.decode([i for i, m in zip(enc["input_ids"], marked, strict=False) if m]) == " yes it is. no"
    assert not answer_tokens(text + "\nmore", enc["offset_mapping"], "Answer:", eos=True)[-1]
    tokens, trained = corpus_tokens(corpus, tok, loss_on="Answer:")
    assert trained.shape == tokens.shape and 0 < trained.mean() < 0.2
    first = tokens[:list(tokens).index(tok.eos_token_id) + 1]
    assert tok.decode(first[trained[:len(first)]]).startswith(" The code of ") and trained[len(first) - 1]
    assert corpus_tokens(corpus, tok)[1] is None

    cfg = replace(CFG, steps=4, save_every=4, loss_on="Answer:")
    finetune(str(tiny_dir), corpus, tmp_path / "m", cfg)
    model, _, _, spec = load_base(tmp_path / "m", 7, 64)
    batch, mask = sample_batch(tokens, replace(cfg, batch=16), spec, torch.Generator().manual_seed(1), trained)
    assert mask[:, 1:].any() and not mask[batch == spec.mem_id].any()
    with torch.no_grad():
        logits = model.forward(batch[:, :-1], is_landmark=batch[:, :-1] == spec.mem_id)
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
        torch.testing.assert_close(loss_of(model, batch, spec, mask), ce[mask[:, 1:].flatten()].mean())
    with pytest.raises(LandmarkError, match="other settings"):
        finetune(str(tiny_dir), corpus, tmp_path / "m", replace(cfg, steps=8, loss_on=""))
    with pytest.raises(LandmarkError, match="no text under .* follows that marker"):
        finetune(str(tiny_dir), corpus, tmp_path / "n", replace(cfg, loss_on="Réponse:"))


def test_interrupted_run_resumes_exactly(tiny_dir, corpus, tmp_path):
    whole = tmp_path / "whole"
    finetune(str(tiny_dir), corpus, whole, CFG)

    def stop_at_13(info):
        if info.step == 13:
            raise KeyboardInterrupt

    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        finetune(str(tiny_dir), corpus, part, CFG, on_step=stop_at_13)
    assert json.loads((part / STATE_META).read_text())["step"] == 10  # the last save survives
    finetune(str(tiny_dir), corpus, part, CFG)
    a, b = load_file(whole / "model.safetensors"), load_file(part / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(LandmarkError, match="other settings"):
        finetune(str(tiny_dir), corpus, part, TrainConfig(block_size=7, context=64, steps=20, batch=2))


def test_on_step_can_end_a_run_early_and_it_resumes_exactly(tiny_dir, corpus, tmp_path):
    """A true on_step ends the run after that step with its checkpoint written; the step
    info carries the model being trained and its landmark spec; a later run resumes from
    there to the same weights as an uninterrupted run."""
    seen = []

    def stop_at_7(info):
        seen.append((info.model, info.spec))
        return info.step == 7

    part = tmp_path / "part"
    r = finetune(str(tiny_dir), corpus, part, CFG, on_step=stop_at_7)
    assert (r["steps"], r["stopped_early"], len(seen)) == (7, True, 7)
    assert json.loads((part / STATE_META).read_text())["step"] == 7
    model, spec = seen[-1]
    assert spec.mem_freq == CFG.block_size and model.parameters()[0].requires_grad
    assert finetune(str(tiny_dir), corpus, part, CFG)["stopped_early"] is False
    whole = finetune(str(tiny_dir), corpus, tmp_path / "whole", CFG)
    a, b = load_file(Path(whole["out"]) / "model.safetensors"), load_file(part / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_near_lookup_probe(tmp_path):
    """trained_facts.near_lookup: the share of its probe prompts (each a fact in the
    query's own block or the one before, then its question and "The code of X is") for
    which the model writes the code next; checked with two stand-in models, one that
    copies the last number in sight and one that never does."""
    pool = trained_facts.names(50)
    words = tmp_path / "words"  # every word the probe writes, for trained_facts' word-level tokenizer
    words.mkdir()
    (words / "all.txt").write_text(" ".join([*trained_facts.FILLER, *pool, *map(str, range(10, 100)),
                                             trained_facts.training_document(random.Random(0), pool)]))
    tok = load_model(str(trained_facts.make_base(tmp_path / "base", [words], dim=32, layers=1, heads=2, kv_heads=2,
                                                 seed=0))).tokenizer
    vocab = tok.get_vocab()
    prompts = trained_facts.near_prompts(tok, 12, 0, pool)
    spec = LandmarkSpec(mem_id=len(vocab), mem_freq=31, train_context=256, local_layers=1, local_blocks=1)
    numbers = torch.tensor([t.lstrip("Ġ▁").isdigit() for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
                           + [False])

    class Copier:
        def __init__(self, copies: bool):
            self.copies = copies

        def parameters(self):
            return [torch.zeros(1)]

        def forward(self, x, is_landmark, local_layers, local_blocks):
            assert (local_layers, local_blocks) == (1, 1) and is_landmark.sum() == len(x) // 32
            last = x[numbers[x]][-1] if self.copies else x[0]
            return torch.nn.functional.one_hot(last, len(numbers)).float()[None].expand(len(x), -1)

    for ids, code_id in prompts:  # the fact lies in the query's own block or the one before
        stream = insert_landmarks(ids, None, spec.mem_freq, spec.mem_id)[0]
        assert stream.count(code_id) == 1 and len(stream) // 32 - stream.index(code_id) // 32 <= 1
    assert trained_facts.near_lookup(Copier(True), spec, prompts) == 1.0
    assert trained_facts.near_lookup(Copier(False), spec, prompts) == 0.0


def test_cli_finetune_and_errors(tiny_dir, corpus, tmp_path, capsys, monkeypatch):
    out = tmp_path / "m"
    code, stdout, stderr = run(capsys, monkeypatch, "finetune", "--model", tiny_dir, "--data", corpus, "--out", out,
                               "--block-size", 7, "--context", 64, "--steps", 3, "--batch", 2)
    assert code == 0, stderr
    assert "Trained 3 steps" in stdout and (out / "config.json").is_file()
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama_with_landmark"
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, stderr = run(capsys, monkeypatch, "finetune", "--model", tiny_dir, "--data", empty, "--out",
                          tmp_path / "x")
    assert code == 1 and "no PDF, .txt or .md files" in stderr
    code, _, stderr = run(capsys, monkeypatch, "finetune", "--model", tiny_dir, "--data", corpus, "--out",
                          tmp_path / "y", "--context", 8)
    assert code == 1 and "fewer than 2 blocks" in stderr
    code, stdout, stderr = run(capsys, monkeypatch, "finetune", "--model", tiny_dir, "--data", corpus, "--out",
                               tmp_path / "a", "--block-size", 7, "--context", 64, "--steps", 2, "--batch", 2,
                               "--loss-on", "Answer:")
    assert code == 0 and "Trained 2 steps" in stdout, stderr
    assert json.loads((tmp_path / "a" / STATE_META).read_text())["config"]["loss_on"] == "Answer:"


def test_lookup_probe_measures_the_answer_tokens(tmp_path):
    import lookup_probe

    ids = [30, 9, 7, 30] + [1] * 8 + [30]  # a code before "Answer" (9), one after it, one 9 tokens after
    assert lookup_probe.answer_flags(ids, answer=9, codes={30}) == [0, 0, 0, 1] + [0] * 9
    out = tmp_path / "curve.json"
    assert lookup_probe.main(["--steps", "4", "--every", "2", "--docs", "60", "--dim", "32", "--context", "64",
                              "--block", "7", "--batch", "4", "--json", str(out)]) == 0
    curve = json.loads(out.read_text())["curve"]
    assert [r["step"] for r in curve] == [2, 4]
    assert all(r["answers"] > 0 and r["answer_loss"] > 1.0 for r in curve)  # 4 steps learn no lookup
    small = ["--steps", "2", "--every", "2", "--docs", "60", "--dim", "32", "--context", "64", "--block", "7",
             "--batch", "4"]
    assert lookup_probe.main([*small, "--save", str(tmp_path / "m1")]) == 0  # a curriculum: save, then go on
    before = load_file(tmp_path / "m1" / "model.safetensors")
    assert lookup_probe.main([*small, "--init", str(tmp_path / "m1"), "--gap", "2", "--retrieve", "1",
                              "--local-layers", "1", "--save", str(tmp_path / "m2")]) == 0
    after = load_file(tmp_path / "m2" / "model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    assert load_model(str(tmp_path / "m2")).landmark.mem_freq == 7


def test_retrieval_in_the_loop_reads_only_the_sampled_blocks(tiny):
    """lookup_probe --retrieve/--local-layers: with every block allowed the forward is the
    model's grouped-softmax forward; sampling picks only earlier blocks, as many as asked,
    and follows the landmark scores; a local layer reads only the previous block."""
    import lookup_probe

    m, block, t = tiny.model, 5, 23
    vocab = m.w["model.embed_tokens.weight"].shape[0]
    ids = torch.randint(0, vocab, (2, t), generator=torch.Generator().manual_seed(0))
    is_lm = (torch.arange(t) % block == block - 1).expand(2, t)
    with torch.no_grad():
        full = m.forward(ids, is_landmark=is_lm)
        assert torch.allclose(lookup_probe.retrieval_forward(m, ids, block, 99, 0), full, atol=1e-5)
        assert not torch.allclose(lookup_probe.retrieval_forward(m, ids, block, 1, 1), full, atol=1e-3)
    earlier = torch.arange(5)[None] < (torch.arange(t) // block)[:, None]  # [t, blocks]
    q, k = torch.randn(2, 2, t, 8), torch.randn(2, 1, t, 8)
    picked = lookup_probe.sampled_blocks(q, k, block, 2, local=False)
    assert (picked <= earlier).all() and (picked.sum(-1) == earlier.sum(-1).clamp(max=2)).all()
    local = lookup_probe.sampled_blocks(q, k, block, 2, local=True)
    assert (local.sum(-1) == (torch.arange(t) >= block).int()).all() and (local <= earlier).all()
    q[:] = 1.0
    k[:, :, 2 * block - 1] = 20.0  # block 1's landmark outscores every other by far
    best = lookup_probe.sampled_blocks(q, k, block, 1, local=False)
    assert best[..., 2 * block:, 1].all() and (best.sum(-1) == earlier.sum(-1).clamp(max=1)).all()


def test_numbered_filler_and_landmark_ranks(corpus, tmp_path, capsys):
    import random

    import landmark_ranks

    rng, pool = random.Random(0), trained_facts.names(50)
    numbered = trained_facts.filler_sentences(rng, 20, 1.0)
    assert all(10 <= int(w.strip(".")) <= 99 for s in numbered for w in s.split() if w.strip(".").isdigit())
    assert all(any(w.isdigit() for w in s.split()) for s in numbered)
    assert not any(c.isdigit() for s in trained_facts.filler_sentences(rng, 20, 0.0) for c in s)
    for _ in range(20):  # --gap: the last N sentences before the questions are filler
        doc = trained_facts.training_document(rng, pool, trained_facts.Style(gap=5, filler=8))
        body = doc.split("Document:\n")[1].split("\n\nQuestion")[0]
        assert "The code of" in body and not any("code" in s for s in body.split(". ")[-5:])
    text, codes = trained_facts.long_document(rng, pool, 1, 30, numbers=0.5)
    assert text.count("The code of") == 1 and sum(w.strip(".").isdigit() for w in text.split()) > 5

    base = trained_facts.make_base(tmp_path / "base", [corpus], dim=32, layers=2, heads=2, kv_heads=2, seed=0)
    finetune(str(base), corpus, tmp_path / "m", TrainConfig(block_size=7, context=64, steps=2, batch=2))
    lm = load_model(str(tmp_path / "m"))
    stream, code_id = landmark_ranks.fact_stream(lm, random.Random(1), trained_facts.names(500)[:50], 64, 0.0)
    r = landmark_ranks.ranks(lm, stream, code_id)
    assert r is not None
    per_layer, _, n_blocks = r
    assert len(per_layer) == 2 and all(len(h) == 2 and all(0 <= x < n_blocks for x in h) for h in per_layer)
    assert landmark_ranks.main([str(tmp_path / "m"), "--trials", "3"]) == 0
    assert "layer 1 head 1" in capsys.readouterr().out


def test_trained_facts_stages_with_a_local_layer(tmp_path):
    """experiments/trained_facts.py end to end, shortened: a plan of three `landmark finetune`
    stages, each from the previous checkpoint, the last on far facts, several per document,
    with a local first layer that in the last stage reads its own block only and a loss on
    the answers only; one file per training document; the result records every stage and
    the final checkpoint is the one asked."""
    out = tmp_path / "r.json"
    assert trained_facts.main(["--work", str(tmp_path / "w"), "--stage", "3:3e-3", "--stage", "2:2e-3",
                               "--stage", "2:2e-3:gap=3,facts=2-3,local_blocks=0,loss_on=Answer:",
                               "--local-layers", "1",
                               "--train-docs", "80",
                               "--docs", "1", "--tokens", "150", "--dim", "32", "--batch", "2", "--context", "64",
                               "--block-size", "7", "--top-k", "2", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [(s["steps"], s["lr"], s["gap"], s["facts"], s["local_blocks"], s["loss_on"])
            for s in r["train"]["stages"]] == [(3, 3e-3, 0, [1, 1], 1, ""), (2, 2e-3, 0, [1, 1], 1, ""),
                                               (2, 2e-3, 3, [2, 3], 0, "Answer:")]
    assert json.loads((tmp_path / "w" / "model3" / STATE_META).read_text())["config"]["loss_on"] == "Answer:"
    assert r["questions"] == 1 and r["records"][0]["stream_tokens"] > 64  # asked beyond the training context
    assert len(list((tmp_path / "w" / "corpus").glob("*.txt"))) == 80
    far = sorted((tmp_path / "w" / "corpus_gap3_facts2-3").glob("*.txt"))  # the plan's other style
    assert len(far) == 80
    for doc in far:
        body, qa = doc.read_text().split("Document:\n")[1].split("\n\nQuestion", 1)
        assert "The code of" in body and not any("code" in s for s in body.split(". ")[-3:])
        assert 2 <= len(set(re.findall(r"The code of (\w+)", body))) == qa.count("Question") + 1 <= 3
    spec = load_model(str(tmp_path / "w" / "model3")).landmark
    assert (spec.local_layers, spec.local_blocks) == (1, 0)
    assert (load_model(str(tmp_path / "w" / "model2")).landmark.local_blocks) == 1
    again = tmp_path / "again.json"  # --eval-only asks the trained model again, and writes a file only when told
    assert trained_facts.main(["--eval-only", str(tmp_path / "w" / "model3"), "--work", str(tmp_path / "w"),
                               "--docs", "1", "--tokens", "150", "--top-k", "2", "--json", str(again)]) == 0
    answers = [[(x["name"], x["answer"], x["truncated_answer"]) for x in d["records"]]
               for d in (json.loads(again.read_text()), r)]
    assert answers[0] == answers[1]
    assert str(trained_facts.Stage.parse("5:2e-3:facts=1-3,gap=2")) == "5:0.002:gap=2,facts=1-3"
    assert str(trained_facts.Stage.parse("5:2e-3:numbers=0.3,gap=2")) == "5:0.002:gap=2,numbers=0.3"
    assert str(trained_facts.Stage.parse("5:2e-3:local_blocks=0")) == "5:0.002:local_blocks=0"
    assert str(trained_facts.Stage.parse("5:2e-3:until=0.5")) == "5:0.002:until=0.5"
    assert trained_facts.Stage.parse("5:2e-3:local_blocks=0,loss_on=Answer:").loss_on == "Answer:"
    assert str(trained_facts.Stage.parse("5:2e-3:loss_on=")) == "5:0.002:loss_on="
    for bad in ("3:fast", "3:3e-3:12", "3:3e-3:facts=0", "3:3e-3:size=2", "3:3e-3:gap=-1", "3:3e-3:numbers=2",
                "3:3e-3:local_blocks=2", "3:3e-3:until=0", "3:3e-3:until=1.5"):
        with pytest.raises(SystemExit):
            trained_facts.main(["--stage", bad])
