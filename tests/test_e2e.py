"""End-to-end on the real default model (SmolLM2-135M-Instruct) and real text. Slow: a few minutes.

The tests that answer run in the CLI's `--dtype auto`, or in LANDMARK_TEST_DTYPE when it is
set (float32, bfloat16, float16, mixed): `LANDMARK_TEST_DTYPE=float16 pytest -m e2e`. The
parity tests compare against float32 whatever it is."""

import json
import os
import sys

import pytest

from landmark_cli.bench import passkey
from landmark_cli.cli import main
from landmark_cli.prompts import raw_prompt
from landmark_cli.retrieval.engine import Engine
from landmark_cli.retrieval.settings import Settings

pytestmark = pytest.mark.e2e
DTYPE = os.environ.get("LANDMARK_TEST_DTYPE", "auto")  # --dtype of the tests that answer


@pytest.fixture(scope="module")
def home(default_home):
    return default_home


@pytest.fixture(scope="module")
def default_model(home):
    from landmark_cli.model.loading import load_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LANDMARK_HOME", str(home))
        yield load_model("default")


@pytest.fixture(scope="module")
def answering_model(home):
    """The default model as `landmark ask --dtype DTYPE` loads it."""
    from landmark_cli.model.loading import load_in

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LANDMARK_HOME", str(home))
        yield load_in("default", DTYPE)


def cli_args(*args) -> list[str]:
    """argv of a `landmark` command that loads the model, in the tests' --dtype."""
    return ["landmark", *map(str, args), "--dtype", DTYPE]


def test_passkey_at_four_times_the_context(answering_model, tmp_path):
    """The paper's passkey prompt at 32k tokens (4x SmolLM2's 8k context) is answered correctly."""
    lm = answering_model
    case = passkey.build_for_tokens(lm.tokenizer, 32 * 1024, seed=7)
    p = raw_prompt(lm.tokenizer, "", case.document, case.question)
    assert len(p.ids) > 4 * lm.model.cfg.context * 0.99
    eng = Engine(lm, Settings(), root=tmp_path)
    entry, cached = eng.read(p.ids, p.spans)
    ans = eng.answer(entry, p.suffix, max_new_tokens=8)
    assert passkey.parse_answer(ans.text) == case.passkey, ans.text
    assert ans.retrieved_per_step < 2048  # fixed cost per step, far below the document


def test_ask_pdf_cites_the_page_then_answers_from_cache(home, monkeypatch, capsys):
    """`landmark ask` on the 77-page example PDF: right answer, right page; the second ask reads nothing."""
    monkeypatch.setenv("LANDMARK_HOME", str(home))
    q = "In what year was the company's first steamer, the Marigold, launched?"
    results = []
    for _ in range(2):
        monkeypatch.setattr(sys, "argv", cli_args("ask", "examples/lantern_bay.pdf", q, "--json", "--max-tokens", 24))
        main()
        results.append(json.loads(capsys.readouterr().out))
    first, second = results
    assert "1873" in first["answer"]
    assert first["cached"] is False and second["cached"] is True
    assert second["timings"]["index_s"] < first["timings"]["index_s"] / 10
    assert first["tokens"]["document"] > 20000
    pages = {s["page"] for s in first["sources"]}
    assert 9 in pages and all(isinstance(p, int) for p in pages)


# questions whose answers sit in different documents of the example library (examples/library.py)
LIBRARY_QUESTIONS = [  # (question, file, answer keyword, where: PDF page or a word of the cited text)
    ("Which company bought the Lantern Bay Ferry Company in 1998?", "lantern_bay.pdf", "northshore", 75),
    ("What is the date of version 3 of the GNU General Public License?", "licenses/GPL-3.txt", "2007", "29 June"),
]


def test_folder_index_then_questions_across_documents(home, monkeypatch, capsys, tmp_path_factory):
    """`landmark index` on 11 real documents (~65k tokens, two PDFs among them), then
    questions answered from different documents, citing the right file (and page)."""
    sys.path.insert(0, "examples")
    import library

    monkeypatch.setenv("LANDMARK_HOME", str(home))  # shares the PDF's cache with the test above
    lib = library.build(tmp_path_factory.mktemp("library"))

    def cli(*args):
        monkeypatch.setattr(sys, "argv", cli_args(*args))
        main()
        return json.loads(capsys.readouterr().out)

    first = cli("index", lib, "--json")
    assert {d["state"] for d in first["documents"]} <= {"indexed"} and len(first["documents"]) == 11
    assert sum(d["tokens"] for d in first["documents"]) > 60000
    assert {d["state"] for d in cli("index", lib, "--json")["documents"]} == {"skipped"}
    for question, expected_file, keyword, where in LIBRARY_QUESTIONS:
        r = cli("ask", lib, question, "--json", "--max-tokens", "24")
        assert keyword in r["answer"].lower(), (question, r["answer"])
        cited = [s for s in r["sources"] if s["path"] == str(lib.resolve() / expected_file)]
        assert cited, (question, [s["path"] for s in r["sources"]])
        if isinstance(where, int):
            assert where in [s["page"] for s in cited], (question, r["sources"])
        else:
            assert any(where in " ".join(s["text"].split()) for s in cited), (question, r["sources"])


def test_forward_matches_transformers_on_the_default_model(default_model):
    """Our compact forward, on the weights read from the default model's GGUF file, vs
    transformers' forward on the same file as transformers reads it (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    from landmark_cli.model.loading import default_gguf

    gguf = default_gguf()
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = torch.tensor(default_model.tokenizer("The Lantern Bay Ferry Company was founded in")["input_ids"])
    with torch.inference_mode():
        diff = (default_model.model.forward(ids) - ref(ids[None]).logits[0]).abs().max().item()
    assert diff < 1e-3


def _lantern_ids(tokenizer, n):
    from pathlib import Path

    import torch

    text = (Path(__file__).resolve().parents[1] / "examples" / "lantern_bay.md").read_text()
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:n])


def test_float16_answers_pick_the_float32_token(default_model):
    """Where the native answer step cannot run, `--dtype auto` answers on the CPU with
    float16 matrices and float32 activations (if that is faster): over 3,072 tokens of real
    text its top next token is float32's at >= 99% of positions."""
    import torch

    ids = _lantern_ids(default_model.tokenizer, 3072)
    half = default_model.model.with_matrices(torch.float16)
    with torch.inference_mode():
        same = [(default_model.model.forward(w).argmax(-1) == half.forward(w).argmax(-1)).float()
                for w in ids.split(1536)]
    assert torch.cat(same).mean().item() >= 0.99


def test_the_default_model_answers_from_its_gguf_groups(default_model):
    """The default model's weights come from a GGUF file (4-bit q4_1 layers, an 8-bit q8_0
    embedding): packed again from float32 they are every weight exactly, in 36% of float16's bytes, and
    the native step decoding 2,048 tokens of real text one at a time picks float32's top
    next token at >= 99% of positions."""
    import torch

    from landmark_cli.kernels import cpu_step
    from landmark_cli.model.blocks import PACKED
    from landmark_cli.retrieval.attention import DenseKV

    m = default_model.model
    packed = m.with_matrices(PACKED)
    formats = packed.matrix_formats()
    assert set(formats[:-1]) == {"q4_1"} and formats[-1] == "q8_0"
    size = sum(t.numel() * t.element_size() for t in packed.matrices().values())
    assert size < 0.4 * sum(t.numel() * 2 for t in m.matrices().values())
    step = cpu_step.for_model(packed)
    if step is None:
        pytest.skip("the native step is not built on this machine")
    ids = _lantern_ids(default_model.tokenizer, 2048)
    c = m.cfg
    dense = DenseKV(c.n_layers, c.n_kv_heads, len(ids), c.head_dim, torch.float32)
    cos, sin = m.rope.tables(len(ids))
    with torch.inference_mode():
        ref = m.forward(ids).argmax(-1)
        got = torch.stack([step.logits(m.embed(ids[i:i + 1])[0], dense.kv, i, cos[i], sin[i]).argmax()
                           for i in range(len(ids))])
    assert (got == ref).float().mean().item() >= 0.99


def test_a_fact_planted_in_prose_beyond_the_context(default_model, home, monkeypatch, capsys, tmp_path):
    """Four one-sentence facts planted at 20/40/60/80% of 10k tokens of the essays and the
    company history of examples/ (beyond the model's 8,192-token context); one of them is
    asked with the default answer settings: the answer and the top cited source hold it.
    (8 cached blocks with the reading's 1,024-token window answer "in a small stack of
    folded paper maps".)"""
    from pathlib import Path

    text = "\n\n".join([p.read_text() for p in sorted(Path("examples/essays").glob("*.md"))]
                       + [Path("examples/lantern_bay.md").read_text()])
    enc = default_model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    body = text[:enc["offset_mapping"][10000][1]]
    facts = ["The harbour master's parrot was called Admiral Pickles.",
             "The winning entry at the Greywick pie contest was a rhubarb and ginger pie.",
             "The spare key to the boathouse is hidden under a green flowerpot.",
             "Miss Trelawney's violin was made in Cremona in 1742."]
    pieces, prev = [], 0
    for fact, depth in zip(facts, (0.2, 0.4, 0.6, 0.8), strict=True):
        cut = body.rfind("\n\n", 0, int(len(body) * depth)) + 2
        pieces += [body[prev:cut], fact + "\n\n"]
        prev = cut
    doc = tmp_path / "prose.txt"
    doc.write_text("".join(pieces) + body[prev:])
    monkeypatch.setenv("LANDMARK_HOME", str(home))
    monkeypatch.setattr(sys, "argv", cli_args("ask", doc, "Where is the spare key to the boathouse hidden?", "--json",
                                              "--max-tokens", 24))
    main()
    r = json.loads(capsys.readouterr().out)
    assert r["tokens"]["document"] > 8192
    assert "flowerpot" in r["answer"].lower(), r["answer"]
    assert "flowerpot" in r["sources"][0]["text"], r["sources"]
