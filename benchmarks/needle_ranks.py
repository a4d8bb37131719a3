"""Which layers and KV heads retrieve? Rank of a planted needle's block under each head's scores.

    python benchmarks/needle_ranks.py --tokens 8k --trials 12 [--rep mean]

Plants synthetic facts ("The <thing> of <name> is <value>.") at random depths of the
essays in examples/, reads each prompt with landmark retrieval, asks for the fact, and
records for every (layer, KV head) the rank of the needle's block among the candidate
blocks under that head's question scores. Prints recall@k per layer/head and the best
heads, and writes them as JSON (--out) for the engine's shared selection.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from landmark_cli.bench.passkey import parse_length  # noqa: E402
from landmark_cli.model.loading import load_model  # noqa: E402
from landmark_cli.prompts import ask_prompt  # noqa: E402
from landmark_cli.retrieval.engine import Engine  # noqa: E402
from landmark_cli.retrieval.session import Session  # noqa: E402
from landmark_cli.retrieval.settings import Answering, Reading, Settings  # noqa: E402

THINGS = ["favourite colour", "secret password", "home town", "lucky number", "pet's name", "first car"]
NAMES = ["Ingrid Castellano", "Tomasz Weller", "Amara Quist", "Dmitri Halloway", "Yusuf Brennagh", "Lena Orvik"]
VALUES = ["turquoise", "marmalade", "Valparaiso", "4831", "Pickwick", "a green Fiat", "Halvorsen", "7702"]


def essays() -> str:
    return "\n\n".join(p.read_text() for p in sorted((ROOT / "examples" / "essays").glob("*.md")))


def trial(lm, text, n_tokens, rng):
    thing, name, value = rng.choice(THINGS), rng.choice(NAMES), rng.choice(VALUES)
    fact = f"The {thing} of {name} is {value}."
    enc = lm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    body = text[: enc["offset_mapping"][min(n_tokens, len(enc["input_ids"])) - 1][1]]
    at = body.rfind("\n\n", 0, int(len(body) * rng.uniform(0.05, 0.95))) + 2
    doc = body[:at] + fact + "\n\n" + body[at:]
    return doc, f"What is the {thing} of {name}?", value, (at, at + len(fact))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="8k")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--rep", default="mean")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    lm = load_model("default")
    eng = Engine(lm, Settings(Reading(rep=args.rep), Answering(select="layer")))
    rng, text = random.Random(0), essays()
    hits = None
    for t in range(args.trials):
        doc, question, value, (c0, c1) = trial(lm, text, parse_length(args.tokens), rng)
        p = ask_prompt(lm.tokenizer, doc, question)
        entry, _ = eng.read(p.ids, p.spans)
        sess = Session(eng, entry, capacity=len(p.suffix) + 1)
        sess.step(torch.tensor(p.suffix))
        spans = torch.from_numpy(entry.spans[sess.retrievable])
        needle = ((spans[:, 0] < c1) & (spans[:, 1] > c0)).nonzero().flatten()
        if needle.numel() == 0:
            print(f"trial {t}: needle is not among the candidate blocks (in the window or sink)")
            continue
        scores = torch.stack(sess.layer_scores)  # [L, Hkv, N]
        best_needle = scores[:, :, needle].amax(-1, keepdim=True)
        rank = (scores > best_needle).sum(-1)  # [L, Hkv]: 0 = top
        hits = (rank < args.k).float() if hits is None else hits + (rank < args.k).float()
        print(f"trial {t}: {scores.shape[-1]} candidates, needle rank per layer (best head): "
              f"{rank.amin(1).tolist()}", flush=True)
    recall = hits / args.trials
    print(f"\nrecall@{args.k} per layer (mean over KV heads):",
          [round(x, 2) for x in recall.mean(1).tolist()])
    order = recall.flatten().argsort(descending=True)
    best = [(int(i) // recall.shape[1], int(i) % recall.shape[1], round(float(recall.flatten()[i]), 2))
            for i in order[:12]]
    print("best (layer, kv head, recall):", best)
    if args.out:
        args.out.write_text(json.dumps({"tokens": args.tokens, "k": args.k, "rep": args.rep,
                                        "recall": recall.tolist(), "best": best}, indent=1))


if __name__ == "__main__":
    main()
