"""The store's KV formats side by side on the default model: bytes, reading speed, ask time, answers.

    python benchmarks/bench_kv_format.py [--tokens 16k] [--runs 3] [--formats float16,int8] [--json out.json]

One document (the example history and essays, repeated to --tokens) is read once per
format into its own scratch store; then, alternating formats, the answering part of
`ask` (question + 32 answer tokens, no early stop) runs --runs times on each cached
entry. Reports per format: bytes on disk per token (every file of the entry), reading
tokens/s, the median ask time, and whether the greedy answer's tokens equal the first
format's (the baseline), with the share of answer steps whose top token agrees.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_ask import NEW_TOKENS, QUESTION, corpus, first_tokens  # noqa: E402

from landmark_cli.bench.passkey import parse_length  # noqa: E402
from landmark_cli.model.loading import load_model  # noqa: E402
from landmark_cli.prompts import ask_prompt  # noqa: E402
from landmark_cli.retrieval.engine import Engine  # noqa: E402
from landmark_cli.retrieval.session import Session  # noqa: E402
from landmark_cli.retrieval.settings import Reading, Settings  # noqa: E402


def answer_steps(eng: Engine, entry, p) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy answer tokens and the logits of every step (NEW_TOKENS steps, no early stop)."""
    sess = Session(eng, entry, capacity=len(p.suffix) + NEW_TOKENS)
    logits = sess.step(torch.tensor(p.suffix), p.question)
    tokens, all_logits = [], [logits]
    for _ in range(NEW_TOKENS - 1):
        tokens.append(int(logits.argmax()))
        logits = sess.step(torch.tensor(tokens[-1:]))
        all_logits.append(logits)
    tokens.append(int(logits.argmax()))
    return tokens, all_logits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="16k")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--formats", default="float16,int8", help="the first is the baseline")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    lm = load_model("default")
    p = ask_prompt(lm.tokenizer, first_tokens(lm.tokenizer, corpus(), parse_length(args.tokens)), QUESTION)
    formats = args.formats.split(",")
    roots = {f: Path(tempfile.mkdtemp(prefix=f"landmark-kv-{f}-")) for f in formats}
    engines = {f: Engine(lm, Settings(Reading(kv_dtype=f)), root=roots[f]) for f in formats}
    res: dict = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                            f"torch {torch.__version__}", "runtime": lm.runtime(), "document_tokens": len(p.ids),
                 "formats": {}}
    entries = {}
    try:
        for f in formats:
            t0 = time.perf_counter()
            entries[f], _ = engines[f].read(p.ids, p.spans)
            dt = time.perf_counter() - t0
            res["formats"][f] = {"bytes_per_token": round(entries[f].nbytes() / entries[f].n_tokens),
                                 "read_tok_s": round(len(p.ids) / dt, 1)}
            print(f"{f}: read {len(p.ids)} tokens at {len(p.ids) / dt:.0f} tok/s, "
                  f"{entries[f].nbytes() / entries[f].n_tokens:,.0f} bytes per token", flush=True)
        times: dict[str, list[float]] = {f: [] for f in formats}
        for _ in range(args.runs):
            for f in formats:
                t0 = time.perf_counter()
                engines[f].answer(entries[f], p.suffix, max_new_tokens=NEW_TOKENS, question=p.question)
                times[f].append(time.perf_counter() - t0)
        base_tokens, base_logits = answer_steps(engines[formats[0]], entries[formats[0]], p)
        for f in formats:
            tokens, logits = answer_steps(engines[f], entries[f], p)
            same = next((i for i, (a, b) in enumerate(zip(tokens, base_tokens, strict=True)) if a != b), len(tokens))
            r = res["formats"][f]
            r.update(ask_s=round(statistics.median(times[f]), 3), same_answer=tokens == base_tokens,
                     steps_before_first_difference=same,
                     answer=lm.tokenizer.decode(tokens, skip_special_tokens=True),
                     max_logit_diff_first_step=round(float((logits[0] - base_logits[0]).abs().max()), 4))
            print(f"{f}: ask {r['ask_s']:.2f} s (median of {args.runs}); same answer as {formats[0]}: "
                  f"{r['same_answer']} ({same}/{NEW_TOKENS} steps); {r['answer'][:80]!r}", flush=True)
        b = res["formats"][formats[0]]
        for f in formats[1:]:
            r = res["formats"][f]
            r["bytes_vs_baseline"] = round(r["bytes_per_token"] / b["bytes_per_token"], 3)
            r["read_vs_baseline"] = round(r["read_tok_s"] / b["read_tok_s"], 3)
            r["ask_vs_baseline"] = round(r["ask_s"] / b["ask_s"], 3)
    finally:
        for root in roots.values():
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
