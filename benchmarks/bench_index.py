"""Speed of `landmark index` on the example library, and question latency over it.

    python benchmarks/bench_index.py [--runs 3] [--json out.json]

Builds the example library (examples/library.py: 11 documents, ~65k tokens, a 77-page
PDF among them) in a temporary folder with a fresh LANDMARK_HOME, then reports:
  - `landmark index` tokens/s on the cold library, and the time of a second run over the
    unchanged folder (which must read nothing);
  - the latency of one question (first token and 24 answer tokens) over the whole folder
    versus over a single small document (an essay of ~3k tokens, cached), medians of --runs,
    in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

QUESTION = "When was the Apache License, Version 2.0 published?"
SMALL = "essays/04_on_libraries.md"
NEW_TOKENS = 24


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-index-"))
    os.environ["LANDMARK_HOME"] = str(work / "home")
    # the default model is converted once per LANDMARK_HOME: reuse the user's conversion
    user_models = Path(os.environ.get("BENCH_MODELS", Path.home() / ".cache" / "landmark" / "models"))
    if user_models.is_dir():
        (work / "home").mkdir()
        os.symlink(user_models, work / "home" / "models")

    import library

    from landmark_cli.ask import ask, ask_folder
    from landmark_cli.index import Indexer
    from landmark_cli.model.loading import load_model
    from landmark_cli.retrieval.settings import Settings

    lib = library.build(work / "library")
    lm = load_model("default")
    settings = Settings()
    indexer = Indexer(lm, settings)
    done = {"tokens": 0}
    t0 = time.perf_counter()
    outcomes = indexer.run(lib, on_done=lambda o: done.update(tokens=done["tokens"] + (o.tokens or 0)))
    index_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = indexer.run(lib)
    rerun_s = time.perf_counter() - t0
    assert all(o.state == "skipped" for o in again), "the second run read documents"

    def timed(fn):
        r = fn()
        return r.timings["answer_s"], r.timings["first_token_s"], r

    folder_runs = [timed(lambda: ask_folder(lm, lib, QUESTION, settings, max_new_tokens=NEW_TOKENS))
                   for _ in range(args.runs)]
    ask(lm, lib / SMALL, QUESTION, settings, max_new_tokens=1)  # read (cache) the small document first
    small_runs = [timed(lambda: ask(lm, lib / SMALL, QUESTION, settings, max_new_tokens=NEW_TOKENS))
                  for _ in range(args.runs)]

    def med(rs, i):
        return statistics.median(r[i] for r in rs)

    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "documents": len(outcomes), "indexed": sum(o.state == "indexed" for o in outcomes),
        "failed": sum(o.state == "failed" for o in outcomes),
        "tokens": done["tokens"], "index_s": round(index_s, 1), "index_tok_s": round(done["tokens"] / index_s, 1),
        "rerun_s": round(rerun_s, 2),
        "ask_folder_s": round(med(folder_runs, 0), 2), "ask_folder_first_token_s": round(med(folder_runs, 1), 2),
        "ask_small_s": round(med(small_runs, 0), 2), "ask_small_first_token_s": round(med(small_runs, 1), 2),
        "folder_over_small": round(med(folder_runs, 0) / med(small_runs, 0), 2),
        "folder_answer": folder_runs[0][2].answer,
        "folder_sources": [(os.path.relpath(s.path, lib), s.page) for s in folder_runs[0][2].sources],
        "small_document_tokens": small_runs[0][2].document_tokens,
        "retrieved_per_step_folder": folder_runs[0][2].retrieved_per_step,
        "retrieved_per_step_small": small_runs[0][2].retrieved_per_step,
        "runs": args.runs,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
