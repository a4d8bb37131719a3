"""The CLI in-process, on the tiny model: output contract, caching, and one-line errors."""

import json
import sys

import pytest

from landmark_cli.cli import main

DOC = "\n".join(f"Line {i}: the ferry company harbour captain ship {i % 7} launched in year {1870 + i}."
                for i in range(1, 120))


def run(capsys, monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["landmark", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture
def doc(tmp_path):
    p = tmp_path / "notes.md"
    p.write_text(DOC)
    return p


def test_ask_json_contract_and_cache(capsys, monkeypatch, tiny_dir, doc):
    args = ["ask", doc, "Who was the captain?", "--model", tiny_dir, "--json", "--max-tokens", "5",
            "--block-size", "16", "--top-k", "2", "--window", "64", "--sink", "16", "--chunk", "64"]
    code, out, err = run(capsys, monkeypatch, *args)
    assert code == 0, err
    r = json.loads(out)  # exactly one JSON object on stdout
    assert set(r) >= {"answer", "sources", "cached", "model", "tokens", "timings"}
    assert r["cached"] is False and r["model"] == str(tiny_dir)
    assert r["tokens"]["document"] > 1000 and r["tokens"]["retrieved_per_step"] < r["tokens"]["document"]
    assert set(r["timings"]) >= {"load_s", "index_s", "answer_s"}
    assert r["sources"], "sources come from the retrieved blocks"
    for s in r["sources"]:
        assert s["page"] is None and 1 <= s["lines"][0] <= s["lines"][1] <= 119
        assert s["text"] and s["text"].split()[0] in DOC
    code, out2, _ = run(capsys, monkeypatch, *args)
    r2 = json.loads(out2)
    assert code == 0 and r2["cached"] is True and r2["answer"] == r["answer"]


def test_ask_streams_text_then_sources(capsys, monkeypatch, tiny_dir, doc):
    code, out, err = run(capsys, monkeypatch, "ask", doc, "Which ship?", "-m", tiny_dir, "--max-tokens", "3",
                          "--chunk", "128", "--window", "128")
    assert code == 0, err
    assert "Sources" in out and "lines " in out
    assert "document tokens" in err


@pytest.mark.parametrize("name,content,expect", [
    ("missing.pdf", None, "no such file"),
    (".", None, "directory"),
    ("x.docx", b"PK\x03\x04", "not supported"),
    ("empty.txt", b"", "empty"),
    ("bin.txt", bytes(range(256)) * 4, "binary"),
])
def test_bad_documents_get_one_line_errors(capsys, monkeypatch, tmp_path, name, content, expect):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    code, out, err = run(capsys, monkeypatch, "ask", path, "question?")
    assert code == 1 and out == ""
    assert err.startswith("Error:") and expect in err.lower()
    assert "Traceback" not in err


def test_unknown_model(capsys, monkeypatch, doc):
    code, _, err = run(capsys, monkeypatch, "ask", doc, "q?", "--model", "no/such-model")
    assert code == 1 and "unknown model" in err and "Traceback" not in err


def test_settings_that_do_not_fit_the_context(capsys, monkeypatch, tiny_dir, doc):
    code, _, err = run(capsys, monkeypatch, "ask", doc, "q?", "-m", tiny_dir, "--top-k", "500")
    assert code == 1 and "context" in err


def test_pickled_checkpoints_are_refused(capsys, monkeypatch, tmp_path, doc, tiny_dir):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text((tiny_dir / "config.json").read_text())
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    code, _, err = run(capsys, monkeypatch, "ask", doc, "q?", "-m", d)
    assert code == 1 and "safetensors" in err
