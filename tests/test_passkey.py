"""The passkey benchmark: prompt builder, scoring, exact `full` baseline, the resumable grid, the CLI."""

import json
import sys

import pytest
import torch
from test_cli import run as run_cli

from landmark_cli.bench import passkey as pk
from landmark_cli.bench import passkey_run as run
from landmark_cli.errors import LandmarkError
from landmark_cli.prompts import raw_prompt
from landmark_cli.retrieval.engine import Engine
from landmark_cli.retrieval.session import Session
from landmark_cli.retrieval.settings import Reading, Settings

SMALL = Settings(Reading(block=16, top_k=2, sink=16, window=64, chunk=64))  # retrieval on short prompts


# ---- prompt and scoring ------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_the_needle_is_in_the_prompt_at_its_depth(seed):
    case = pk.build(40, seed)
    assert case.prompt.startswith(pk.TASK) and case.prompt.endswith(pk.QUESTION)
    assert 1 <= case.passkey <= 50000
    needle = pk.needle_line(case.passkey)
    assert case.document.count(needle) == 1
    before = case.document[:case.document.index(needle)].count(pk.FILLER)
    assert case.document.count(pk.FILLER) == 40 and case.depth == before / 40
    again = pk.build(40, seed)
    assert (again.passkey, again.depth, again.prompt) == (case.passkey, case.depth, case.prompt)


def test_seeds_spread_keys_and_depths():
    cases = [pk.build(100, s) for s in range(20)]
    assert len({c.passkey for c in cases}) == 20
    assert min(c.depth for c in cases) < 0.3 and max(c.depth for c in cases) > 0.7


@pytest.mark.parametrize("n", [512, 1000, 2048, 4096, 9000])
def test_prompt_length_is_within_one_percent(tiny, n):
    for seed in range(3):
        case = pk.build_for_tokens(tiny.tokenizer, n, seed)
        got = pk.prompt_tokens(tiny.tokenizer, case)
        assert abs(got - n) <= 0.01 * n, (n, seed, got)
        p = raw_prompt(tiny.tokenizer, "", case.document, case.question)
        assert len(p.ids) + len(p.suffix) == got  # what the grid feeds the model
        assert pk.needle_line(case.passkey) in case.document


@pytest.mark.parametrize("text,expected", [
    (" 12345.", 12345), ("4417. Remember it.", 4417), ("12,345", 12345), (" the key is 7 or 8", 7),
    ("no digits", None), ("", None),
])
def test_parse_answer(text, expected):
    assert pk.parse_answer(text) == expected


@pytest.mark.parametrize("text,n", [("2k", 2048), ("32000", 32000), ("1m", 1 << 20), ("1.5K", 1536), (" 8k ", 8192)])
def test_parse_length(text, n):
    assert pk.parse_length(text) == n


@pytest.mark.parametrize("text", ["abc", "0", "-1", "k", "2x"])
def test_bad_lengths(text):
    with pytest.raises(ValueError):
        pk.parse_length(text)
    with pytest.raises(LandmarkError):
        pk.parse_lengths(f"2k,{text}")


def test_lengths_and_labels():
    assert pk.parse_lengths("2k, 8k,32000") == [2048, 8192, 32000]
    assert [pk.length_label(n) for n in (2048, 1 << 20, 32000, 512)] == ["2k", "1m", "32,000", "512"]


# ---- the full-attention baseline is exact ----------------------------------------------------
@pytest.mark.parametrize("n", [700, "capacity"])
def test_full_settings_are_full_causal_attention(tiny, tmp_path, n):
    """Up to the last document length it accepts (where its chunk shrinks), the engine under
    full_settings gives the logits of a plain causal forward over the whole prompt."""
    ctx, reserve = tiny.model.cfg.context, 20
    n = run.full_capacity(ctx, reserve, chunk=64) if n == "capacity" else n
    ids = torch.randint(3, tiny.model.cfg.vocab_size, (n + 12,), generator=torch.Generator().manual_seed(n)).tolist()
    eng = Engine(tiny, run.full_settings(n, ctx, reserve), root=tmp_path)
    entry, _ = eng.read(ids[:n])
    got = Session(eng, entry, capacity=reserve).step(torch.tensor(ids[n:]))
    with torch.inference_mode():
        full = tiny.model.forward(torch.tensor(ids))[-1]
    assert (got - full).abs().max().item() < 1e-4


def test_full_settings_refuse_prompts_beyond_the_context():
    ctx = 4096
    assert run.full_settings(run.full_capacity(ctx, 20), ctx, 20).read.chunk == 512
    assert run.full_settings(run.full_capacity(ctx, 20, chunk=64), ctx, 20).read.span() <= ctx
    with pytest.raises(LandmarkError, match="exceed the model's context of 4,096 tokens"):
        run.full_settings(ctx - 10, ctx, 20)
    with pytest.raises(LandmarkError, match="too little of the model's context"):
        run.full_settings(run.full_capacity(ctx, 20, chunk=64) + 1, ctx, 20)


# ---- the grid ---------------------------------------------------------------------------
FIELDS = {"method", "length", "tokens", "seed", "depth", "expected", "answer", "correct", "read_tokens", "read_s",
          "read_tok_s", "answer_s", "first_token_s", "retrieved_per_step", "peak_rss_mib", "error", "run"}


def _results(tiny, path, settings=SMALL):
    return run.Results(path, run.grid_meta(tiny, settings))


def test_grid_records_every_trial_on_the_same_prompts(tiny, tmp_path):
    path = tmp_path / "r.json"
    grid = run.Grid([512, 4500], trials=2, methods=["landmark", "full", "truncate"], seed=5)
    records = run.run_grid(tiny, SMALL, grid, _results(tiny, path))
    assert len(records) == 12 and json.loads(path.read_text())["records"] == records
    for r in records:
        assert set(r) >= FIELDS and r["seed"] in (5, 6)
        assert abs(r["tokens"] - r["length"]) <= 0.01 * r["length"]
        assert r["correct"] == (pk.parse_answer(r["answer"] or "") == r["expected"])
    by_prompt = {}
    for r in records:  # every method got the same prompt
        by_prompt.setdefault((r["length"], r["seed"]), set()).add((r["tokens"], r["depth"], r["expected"]))
    assert all(len(v) == 1 for v in by_prompt.values()) and len(by_prompt) == 4
    lm = [r for r in records if r["method"] == "landmark"]
    assert all(r["top_k"] == 2 and r["block"] == 16 and r["error"] is None for r in lm)
    assert all(r["retrieved_per_step"] < r["read_tokens"] for r in lm if r["length"] == 4500)
    # full: the whole prompt up to the context; beyond it a failure with the reason, not a crash
    full = {r["length"]: r for r in records if r["method"] == "full" and r["seed"] == 5}
    assert full[512]["error"] is None and full[512]["retrieved_per_step"] == full[512]["read_tokens"]
    assert full[4500]["correct"] is False and full[4500]["answer"] is None
    assert "exceed the model's context of 4,096 tokens" in full[4500]["error"]
    # truncate: the end of the prompt that fits (question kept)
    tr = {r["length"]: r for r in records if r["method"] == "truncate" and r["seed"] == 5}
    assert tr[512]["dropped"] == 0 and tr[512]["read_tokens"] == full[512]["read_tokens"]
    question = len(tiny.tokenizer(pk.QUESTION, add_special_tokens=False)["input_ids"])
    assert tr[4500]["read_tokens"] + tr[4500]["dropped"] + question == tr[4500]["tokens"]
    assert tr[4500]["read_tokens"] == run.full_capacity(4096, question + run.MAX_NEW_TOKENS)
    assert tr[4500]["dropped"] > 400 and tr[4500]["error"] is None
    meta = json.loads(path.read_text())
    assert meta["model"]["fingerprint"] == tiny.fingerprint and meta["settings"]["landmark"]["top_k"] == 2
    assert {"platform", "cpu", "gpu", "torch"} <= set(meta["runs"][0]["machine"]) and meta["runs"][0]["started"]
    assert not any((run.home() / "passkey-tmp").iterdir())  # the trials' KV stores are gone


def test_sharing_the_filler_prefix_changes_nothing_but_the_reading(tiny, tmp_path):
    grid = run.Grid([1500], trials=3, methods=["landmark", "full"], seed=11)
    plain = run.run_grid(tiny, SMALL, grid, _results(tiny, tmp_path / "a.json"), share_prefix=False)
    shared = run.run_grid(tiny, SMALL, grid, _results(tiny, tmp_path / "b.json"))
    keep = ("method", "seed", "tokens", "depth", "answer", "correct", "read_tokens", "retrieved_per_step")
    assert [{k: r[k] for k in keep} for r in shared] == [{k: r[k] for k in keep} for r in plain]
    assert all(r["reused_tokens"] == 0 for r in plain)
    assert any(r["reused_tokens"] > 0 for r in shared if r["method"] == "landmark")
    assert any(r["reused_tokens"] > 0 for r in shared if r["method"] == "full")
    assert not any((run.home() / "passkey-tmp").iterdir())  # the shared prefixes are gone too


def test_the_grid_resumes_where_it_stopped(tiny, tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    grid = run.Grid([512], trials=3, methods=["landmark", "full"])
    calls = []
    real = run.run_trial

    def interrupted(lm, settings, trial, *a, **k):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(trial)
        return real(lm, settings, trial, *a, **k)

    monkeypatch.setattr(run, "run_trial", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run.run_grid(tiny, SMALL, grid, _results(tiny, path))
    saved = json.loads(path.read_text())["records"]  # every finished trial is on disk
    assert [(r["method"], r["seed"]) for r in saved] == [("landmark", 0), ("full", 0), ("landmark", 1)]
    monkeypatch.setattr(run, "run_trial", real)

    ran = []
    monkeypatch.setattr(run, "run_trial", lambda lm, s, t, *a, **k: ran.append(t) or real(lm, s, t, *a, **k))
    records = run.run_grid(tiny, SMALL, grid, _results(tiny, path))
    assert [(t.method, t.seed) for t in ran] == [("full", 1), ("landmark", 2), ("full", 2)]
    assert records[:3] == saved and len(records) == 6
    data = json.loads(path.read_text())
    assert [r["run"] for r in data["records"]] == [0, 0, 0, 1, 1, 1] and len(data["runs"]) == 2
    ran.clear()
    run.run_grid(tiny, SMALL, grid, _results(tiny, path))
    assert ran == []  # nothing left to do


def test_a_results_file_of_other_settings_or_model_is_refused(tiny, tmp_path):
    path = tmp_path / "r.json"
    run.run_grid(tiny, SMALL, run.Grid([512], 1, ["full"]), _results(tiny, path))
    before = path.read_text()
    other = Settings(Reading(block=16, top_k=3, sink=16, window=64, chunk=64))
    with pytest.raises(LandmarkError, match=r"made with other settings: .*top_k=2 \(this run: 3\)"):
        _results(tiny, path, other)
    meta = run.grid_meta(tiny, SMALL)
    meta["model"]["fingerprint"] = "0" * 16
    with pytest.raises(LandmarkError, match="another model: .*this run"):
        run.Results(path, meta)
    assert path.read_text() == before
    path.write_text("{not json")
    with pytest.raises(LandmarkError, match="not a passkey results file"):
        _results(tiny, path)


def test_grid_arguments_are_checked():
    with pytest.raises(LandmarkError, match="unknown method"):
        run.Grid([2048], 1, ["landmark", "rag"])
    with pytest.raises(LandmarkError, match="at least 512"):
        run.Grid([100], 1, ["full"])


# ---- report -----------------------------------------------------------------------------
def _rec(method, length, correct, error=None, **kw):
    base = dict(method=method, length=length, tokens=length, seed=0, correct=correct, error=error,
                retrieved_per_step=None if error else 1000, read_tok_s=None if error else 200.0,
                answer_s=None if error else 1.5, peak_rss_mib=None if error else 2048.0)
    return {**base, **kw}


RECORDS = [_rec("landmark", 2048, True), _rec("landmark", 2048, False), _rec("full", 2048, True),
           _rec("full", 2048, True), _rec("landmark", 8192, True), _rec("full", 8192, False, "exceeds the context")]


def test_summary_counts_refusals_as_failures():
    rows = {(r["length"], r["method"]): r for r in pk.summarize(RECORDS)}
    assert rows[2048, "landmark"]["accuracy"] == 0.5 and rows[2048, "full"]["accuracy"] == 1.0
    assert rows[8192, "full"]["accuracy"] == 0.0 and rows[8192, "full"]["refused"] == 1
    assert rows[8192, "full"]["read_tok_s"] is None and rows[8192, "landmark"]["read_tok_s"] == 200.0
    assert [(r["length"], r["method"]) for r in pk.summarize(RECORDS)][:2] == [(2048, "landmark"), (2048, "full")]


def test_table_has_a_row_per_length_and_a_column_per_method():
    from rich.console import Console

    console = Console(width=120, record=True)
    console.print(pk.table(RECORDS))
    text = console.export_text()
    assert "landmark" in text and "full" in text and "truncate" not in text
    assert "50% (1/2)" in text and "100% (2/2)" in text and "refused" in text
    assert "2k" in text and "8k" in text and "200 tok/s" in text and "2.00 GiB" in text and "reading speed" in text


def test_plot_is_a_png(tmp_path):
    pk.plot(RECORDS, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- CLI --------------------------------------------------------------------------------
def test_cli_runs_records_and_resumes(capsys, monkeypatch, tiny_dir, tmp_path):
    out_json = tmp_path / "pk.json"
    args = ["passkey", "--model", tiny_dir, "--lengths", "512", "--trials", "2", "--methods", "landmark,full",
            "--top-k", "2", "--block-size", "16", "--json", out_json]
    code, out, err = run_cli(capsys, monkeypatch, *args)
    assert code == 0, err
    data = json.loads(out_json.read_text())
    assert sorted((r["method"], r["seed"]) for r in data["records"]) == [
        ("full", 0), ("full", 1), ("landmark", 0), ("landmark", 1)]
    assert data["model"]["name"] == str(tiny_dir) and data["settings"]["landmark"]["block"] == 16
    assert "landmark" in out and "full" in out and "512" in out and any(f"({k}/2)" in out for k in range(3))
    assert "4 trials to run" in err and "[1/4] 512 landmark seed 0:" in err  # plain lines: stderr is no terminal
    code, out, err = run_cli(capsys, monkeypatch, *args, "--trials", "3")
    assert code == 0 and "2 trials to run (4 already recorded)" in err
    assert len(json.loads(out_json.read_text())["records"]) == 6
    code, _, err = run_cli(capsys, monkeypatch, *args[:-4], "--top-k", "3", "--block-size", "16", "--json", out_json)
    assert code == 1 and "Error:" in err and "top_k=2 (this run: 3)" in err and "Traceback" not in err


def test_cli_without_matplotlib_says_what_to_install_before_running(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    code, out, err = run_cli(capsys, monkeypatch, "passkey", "--model", "no/such-model", "--plot", tmp_path / "p.png")
    assert code == 1 and out == "" and err.startswith("Error:")
    assert "pip install 'landmark[plot]'" in err and "unknown model" not in err  # checked before loading a model


@pytest.mark.parametrize("args,expect", [
    (["--device", "cuda"], "cuda"), (["--device", "tpu"], "unknown device"), (["--methods", "full,rag"], "rag"),
    (["--lengths", "2k,lots"], "not a length"), (["--lengths", "100"], "at least 512"),
])
def test_cli_argument_errors(capsys, monkeypatch, args, expect):
    code, out, err = run_cli(capsys, monkeypatch, "passkey", "--model", "no/such-model", *args)
    assert code == 1 and out == "" and err.startswith("Error:") and expect in err.lower()
    assert "unknown model" not in err and "Traceback" not in err
