"""Which layers, heads and question tokens find the passage a question needs?

    python experiments/selection_ranks.py --cases technical,prose:16k,prose:64k   # scores (~55 MB) to LANDMARK_HOME
    python experiments/selection_ranks.py --analyse ~/.cache/landmark/experiments/selection_ranks.npz

For each question of benchmarks/qa_cases.py (the Bash manual, planted prose facts), on the
cached reading that `landmark ask` makes (default reading settings; read first if absent),
the question is run through every layer as the shared selection runs it, and at every
layer and KV head the question's exact block logits (its best-matching key in each block)
score every block. Kept per question: per layer and head, the block relevance the engine
uses (softmax over blocks per query, mean over queries), the same for the question's last
token only, and the best logit over the queries; and the blocks that hold the evidence.

`--analyse` ranks the evidence blocks under ways of combining those scores (the engine's
band of layers, every band of four layers, the last token, the best logit) and counts, on
the tuning and held-out halves, the questions whose evidence is in the top 3 (the cited
sources) and in the 16 blocks the default answer attends (runs around the best blocks).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from qa_cases import FACTS, prose_cases, technical_cases  # noqa: E402
from qa_eval import locate  # noqa: E402

from landmark_cli.bench.passkey import parse_length  # noqa: E402
from landmark_cli.documents import load_document  # noqa: E402
from landmark_cli.model.loading import load_in  # noqa: E402
from landmark_cli.paths import home  # noqa: E402
from landmark_cli.prompts import ask_prompt  # noqa: E402
from landmark_cli.retrieval.engine import Engine  # noqa: E402
from landmark_cli.retrieval.landmarks import relevance, top_runs  # noqa: E402
from landmark_cli.retrieval.selection import BandScores, Scoring  # noqa: E402
from landmark_cli.retrieval.session import Session, scoring_layers  # noqa: E402
from landmark_cli.retrieval.settings import Answering, Settings  # noqa: E402


def evidence_blocks(spans: np.ndarray, start: int, end: int, first: int) -> list[int]:
    """Candidate numbers of the blocks (character spans [blocks, 2]) overlapping characters [start, end)."""
    return [int(b) - first for b in np.nonzero((spans[:, 0] < end) & (spans[:, 1] > start))[0]]


@torch.inference_mode()
def scores_of(engine: Engine, lm, text: str, question: str):
    """Per-layer, per-head block scores of `question` over the cached reading of `text`;
    also the first candidate's block, the prompt and the store entry."""
    prompt = ask_prompt(lm.tokenizer, text, question)
    entry, _ = engine.read(prompt.ids, prompt.spans)
    s = Session(engine, entry, capacity=len(prompt.suffix) + 8)
    c = lm.model.cfg
    band = BandScores(range(c.n_layers), s.candidates, [entry], [s.store], c.n_kv_heads, prompt.question)
    ids = torch.tensor(prompt.suffix)
    cos, sin = lm.model.rope.at(torch.arange(s.next_pos, s.next_pos + len(ids)))
    s._run(lm.model.embed(ids), cos, sin, s.dense.length, Scoring(s.per_layer(s.ranker()), band))
    g = c.n_heads // c.n_kv_heads
    mean = torch.stack([relevance(lg) for lg in band.logits])  # [L, Hkv, N]
    last = torch.stack([lg.unflatten(1, (g, -1))[:, :, -1].softmax(-1).mean(1) for lg in band.logits])
    best = torch.stack([lg.amax(1) for lg in band.logits])
    out = {"mean": mean.numpy(), "last": last.numpy(), "best": best.numpy()}
    return out, s.candidates.block[0].item(), prompt, entry


def collect(args) -> None:
    lm = load_in("default", "float32")
    engine = Engine(lm, Settings(answer=Answering()))
    data = home() / "qa-eval"
    cases = []
    for name in args.cases.split(","):
        if name == "technical":
            cases += technical_cases(data)
        else:
            cases += prose_cases(lm.tokenizer, data, [parse_length(name.split(":")[1])], sets=1)
    arrays: dict[str, np.ndarray] = {}
    meta = []
    for case in cases:
        doc = load_document(case.path)
        for i, q in enumerate(case.questions):
            out, first, prompt, entry = scores_of(engine, lm, doc.text, q.text)
            planted = {question: fact for fact, question, _ in FACTS}  # prose: the planted sentence
            ev = q.evidence[0] if q.evidence else planted.get(q.text, q.keys[0])
            start = locate(doc.text, ev)
            gold = evidence_blocks(np.asarray(entry.spans), start, start + len(ev), first) if start >= 0 else []
            tag = f"{case.name}|{i}"
            for k, v in out.items():
                arrays[f"{tag}|{k}"] = v.astype(np.float32)
            arrays[f"{tag}|gold"] = np.asarray(gold, dtype=np.int64)
            meta.append(f"{tag}|{q.half}|{q.text}")
            top = int(out["mean"][16:20].mean((0, 1)).argmax())
            print(f"{case.name:>18} {q.half:4} gold {gold} top {top}  {q.text}", flush=True)
    arrays["meta"] = np.asarray(meta)
    np.savez_compressed(args.out, **arrays)


def analyse(path: Path) -> None:
    z = np.load(path, allow_pickle=False)
    meta = [m.split("|") for m in z["meta"]]
    n_layers = z[f"{meta[0][0]}|{meta[0][1]}|mean"].shape[0]
    default = scoring_layers(Answering().band, n_layers)

    def combine(tag: str, kind: str, layers, heads=slice(None)) -> np.ndarray:
        a = z[f"{tag}|{kind}"][list(layers)][:, heads]
        if kind == "best":  # logits: rank within each layer and head, then average the ranks
            a = a.argsort(-1).argsort(-1).astype(np.float32)
        return a.mean((0, 1))

    configs = {"engine band (mean)": ("mean", default)}
    configs["engine band, last token"] = ("last", default)
    configs["engine band, best logit"] = ("best", default)
    for lo in range(0, n_layers - 3, 2):
        configs[f"layers {lo}-{lo + 3} (mean)"] = ("mean", range(lo, lo + 4))
    configs["all layers (mean)"] = ("mean", range(n_layers))
    print(f"{'scores':<28} " + "  ".join(f"{c:>22}" for c in sorted({m[0] for m in meta})))
    for name, (kind, layers) in configs.items():
        cells = []
        for case in sorted({m[0] for m in meta}):
            row = {"tune": [0, 0, 0], "held": [0, 0, 0]}
            for m in (m for m in meta if m[0] == case):
                tag = f"{m[0]}|{m[1]}"
                gold = set(z[f"{tag}|gold"].tolist())
                votes = combine(tag, kind, layers)
                order = np.argsort(-votes)
                runs = set(top_runs(torch.from_numpy(votes), 16, 2, lead=1).tolist())
                row[m[2]][0] += bool(gold & set(order[:3].tolist()))
                row[m[2]][1] += bool(gold & runs)
                row[m[2]][2] += 1
            cells.append(" ".join(f"{h[0]}{r[0]}/{r[1]}/{r[2]}" for h, r in row.items()))
        print(f"{name:<28} " + "  ".join(f"{c:>22}" for c in cells))
    print("cells: t(uning) and h(eld-out): questions with evidence in the top 3 / in the 16 attended blocks"
          " / questions")
    print("\nrank of the best evidence block under the engine's band (1 = first):")
    for m in meta:
        tag = f"{m[0]}|{m[1]}"
        votes = combine(tag, "mean", default)
        rank = min(int((votes > votes[g]).sum()) + 1 for g in z[f"{tag}|gold"].tolist())
        print(f"  {m[0]:>18} {m[2]:4} {rank:5}  {m[3]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="technical,prose:16k,prose:64k")
    ap.add_argument("--out", type=Path, default=None, help="default: LANDMARK_HOME/experiments/selection_ranks.npz")
    ap.add_argument("--analyse", type=Path)
    args = ap.parse_args()
    if args.analyse:
        analyse(args.analyse)
        return
    args.out = args.out or home() / "experiments" / "selection_ranks.npz"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    collect(args)


if __name__ == "__main__":
    main()
