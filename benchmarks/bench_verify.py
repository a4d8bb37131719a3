"""What checking the store's block checksums costs a question on a cached document.

    python benchmarks/bench_verify.py [--tokens 32k] [--runs 5] [--dtype auto] [--json out.json]

Reads a document of --tokens tokens (the example history and essays) with the default
model (in the CLI's --dtype) once, then times `ask`'s answering part (question + 32 answer tokens) on the
cached entry, alternating runs with the block checks on (as shipped: every block the
question reads is checked once, on a freshly opened entry) and off (Entry.verify made a
no-op). Prints the medians, their ratio and the bytes checked.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_ask import QUESTION, corpus, first_tokens  # noqa: E402

from landmark_cli.bench.passkey import parse_length  # noqa: E402
from landmark_cli.bench.passkey_run import machine  # noqa: E402
from landmark_cli.model.loading import load_in  # noqa: E402
from landmark_cli.prompts import ask_prompt  # noqa: E402
from landmark_cli.retrieval.engine import Engine  # noqa: E402
from landmark_cli.storage import store  # noqa: E402

NEW_TOKENS = 32


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="32k")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dtype", default="auto", help="the CLI's --dtype")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    lm = load_in("default", args.dtype)
    n = parse_length(args.tokens)
    prompt = ask_prompt(lm.tokenizer, first_tokens(lm.tokenizer, corpus(), n), QUESTION)
    with tempfile.TemporaryDirectory() as tmp:
        eng = Engine(lm, root=Path(tmp))
        t0 = time.perf_counter()
        eng.read(prompt.ids, prompt.spans)
        print(f"read {len(prompt.ids):,} tokens in {time.perf_counter() - t0:.0f} s", flush=True)
        checked = store.Entry.verify
        times: dict[str, list[float]] = {"on": [], "off": []}
        blocks_checked = 0
        for _ in range(args.runs):
            for mode in ("on", "off"):
                store.Entry.verify = checked if mode == "on" else (lambda *a, **k: None)  # type: ignore[method-assign]
                entry = eng.lookup(prompt.ids)  # freshly opened: nothing checked yet
                assert entry is not None
                t0 = time.perf_counter()
                eng.answer(entry, prompt.suffix, max_new_tokens=NEW_TOKENS, question=prompt.question)
                times[mode].append(time.perf_counter() - t0)
                if mode == "on":
                    blocks_checked = int(entry.verified.sum())
        store.Entry.verify = checked  # type: ignore[method-assign]
        L, _, H, N, B, D = entry.kv.shape
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    block_bytes = H * B * D * entry.kv.itemsize + (0 if entry.scales is None else H * D * entry.scales.itemsize)
    result = {
        "machine": {**machine(), "torch_threads": torch.get_num_threads()}, "runtime": lm.runtime(),
        "kv_dtype": entry.meta["kv_dtype"],
        "document_tokens": len(prompt.ids), "runs": args.runs, "answer_tokens": NEW_TOKENS,
        "answer_s_checked": round(on, 3), "answer_s_unchecked": round(off, 3), "ratio": round(on / off, 3),
        "blocks_checked": blocks_checked, "blocks_in_entry": L * 2 * N,
        "mib_checked": round(blocks_checked * block_bytes / 2**20, 1),
        "times": {k: [round(t, 3) for t in v] for k, v in times.items()},
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
