"""Retrieval accuracy of the default model: passkey and natural-prose needles.

    python benchmarks/retrieval_eval.py passkey --tokens 32k --seeds 10
    python benchmarks/retrieval_eval.py needles --tokens 32k --full-tokens 4k

Needles: facts planted at 10%, 50% and 90% depth of the essays + company history in
examples/, asked with landmark retrieval on the long version and with full attention
on a short version of the same text (the needle at the same relative depth).
Prints one JSON line per trial and a summary; `--settings` overrides engine settings
(e.g. --settings top_k=8,block=32,rep=minmax).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from landmark_cli.bench import passkey  # noqa: E402
from landmark_cli.bench.passkey_run import full_settings  # noqa: E402
from landmark_cli.model.loading import load_model  # noqa: E402
from landmark_cli.prompts import ask_prompt, raw_prompt  # noqa: E402
from landmark_cli.retrieval.engine import Engine  # noqa: E402
from landmark_cli.retrieval.settings import Answering, Reading, Settings  # noqa: E402

NEEDLES = [  # (fact, question, expected answer keyword)
    ("The secret ingredient in Aunt Miriam's soup is smoked paprika.",
     "What is the secret ingredient in Aunt Miriam's soup?", "paprika"),
    ("The lighthouse keeper's cat was named Biscuit.", "What was the lighthouse keeper's cat named?", "biscuit"),
    ("The code to open the garden gate is 4417.", "What is the code to open the garden gate?", "4417"),
    ("Professor Okafor keeps her spare keys inside a blue teapot.",
     "Where does Professor Okafor keep her spare keys?", "teapot"),
]
DEPTHS = (0.1, 0.5, 0.9)


def haystack_text() -> str:
    parts = [p.read_text() for p in sorted((ROOT / "examples" / "essays").glob("*.md"))]
    parts.append((ROOT / "examples" / "lantern_bay.md").read_text())
    return "\n\n".join(parts)


def plant(tokenizer, text: str, n_tokens: int, fact: str, depth: float) -> str:
    """The first ~n_tokens of text with `fact` inserted at a paragraph break near `depth`."""
    ids = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if len(ids["input_ids"]) < n_tokens:
        raise SystemExit(f"the haystack has only {len(ids['input_ids'])} tokens")
    cut = ids["offset_mapping"][n_tokens - 1][1]
    body = text[:cut]
    at = body.rfind("\n\n", 0, int(len(body) * depth)) + 2 if depth > 0 else 0
    return body[:at] + fact + "\n\n" + body[at:]


def parse_settings(spec: str) -> Settings:
    """'top_k=8,rep=minmax,order=document' -> Settings: Reading's fields, then Answering's
    (`answer_window`, `answer_top_k` for its window and top_k; band is not settable here)."""
    read, answer = {}, {}
    reading_fields = {f.name for f in fields(Reading)}
    for item in filter(None, spec.split(",")):
        k, v = item.split("=")
        value = v if k in ("rep", "kv_dtype", "select", "order") else int(v)
        if k in reading_fields:
            read[k] = value
        else:
            answer[k.removeprefix("answer_")] = value
    return Settings(Reading(**read), Answering(**answer))


def run_passkey(args, lm, settings):
    eng = Engine(lm, settings, root=args.store)
    n, ok = passkey.parse_length(args.tokens), 0
    for seed in range(args.seeds):
        case = passkey.build_for_tokens(lm.tokenizer, n, seed)
        p = raw_prompt(lm.tokenizer, "", case.document, case.question)
        t0 = time.perf_counter()
        entry, cached = eng.read(p.ids, p.spans)
        t1 = time.perf_counter()
        ans = eng.answer(entry, p.suffix, max_new_tokens=8, stop_ids=lm.stop_ids())
        correct = passkey.parse_answer(ans.text) == case.passkey
        ok += correct
        print(json.dumps({"seed": seed, "tokens": len(p.ids) + len(p.suffix), "depth": round(case.depth, 3),
                          "expected": case.passkey, "answer": ans.text.strip(), "correct": correct,
                          "read_s": round(t1 - t0, 1), "cached": cached}), flush=True)
    print(f"passkey {args.tokens}: {ok}/{args.seeds} correct, settings {settings}")


def run_needles(args, lm, settings):

    text = haystack_text()
    eng = Engine(lm, settings, root=args.store)
    n_long = passkey.parse_length(args.tokens)
    n_short = passkey.parse_length(args.full_tokens) if args.full_tokens not in ("", "0") else 0
    full = Engine(lm, full_settings(n_short, lm.model.cfg.context), root=args.store) if n_short else None
    modes = args.modes.split(",")
    rows = []
    for fact, question, key in NEEDLES[: args.needles]:
        for depth in DEPTHS:
            row = {"needle": key, "depth": depth}
            p = ask_prompt(lm.tokenizer, plant(lm.tokenizer, text, n_long, fact, depth), question)
            entry, _ = eng.read(p.ids, p.spans)
            for mode in modes:
                eng.settings = replace(eng.settings, answer=replace(eng.settings.answer, select=mode))
                ans = eng.answer(entry, p.suffix, max_new_tokens=24, stop_ids=lm.stop_ids(), question=p.question)
                row[mode] = ans.text.strip()
                row[f"{mode}_ok"] = key in ans.text.lower()
            if full:
                short = ask_prompt(lm.tokenizer, plant(lm.tokenizer, text, n_short, fact, depth), question)
                entry, _ = full.read(short.ids, short.spans)
                ans = full.answer(entry, short.suffix, max_new_tokens=24, stop_ids=lm.stop_ids())
                row["full"], row["full_ok"] = ans.text.strip(), key in ans.text.lower()
            rows.append(row)
            print(json.dumps(row), flush=True)
    full_ok = [r for r in rows if r.get("full_ok")]
    summary = {f"{m}_correct": sum(r[f"{m}_ok"] for r in rows) for m in modes}
    summary.update({f"{m}_correct_where_full_correct": sum(r[f"{m}_ok"] for r in full_ok) for m in modes})
    summary.update(trials=len(rows), full_correct=len(full_ok), tokens=args.tokens, full_tokens=args.full_tokens,
                   settings=str(settings))
    print(json.dumps(summary))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("task", choices=["passkey", "needles"])
    ap.add_argument("--tokens", default="32k")
    ap.add_argument("--full-tokens", default="4k")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--needles", type=int, default=len(NEEDLES))
    ap.add_argument("--settings", default="")
    ap.add_argument("--modes", default="layer,shared", help="answer-time selections to compare (needles)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--store", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model("default")
    settings = parse_settings(args.settings)
    (run_passkey if args.task == "passkey" else run_needles)(args, lm, settings)


if __name__ == "__main__":
    main()
