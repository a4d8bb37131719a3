"""Speed and memory of `landmark ask` on the default model, against transformers in-process.

    python benchmarks/bench_ask.py [--long 32k] [--short 4k] [--runs 3] [--dtype auto] [--json out.json]

Reports (medians of --runs where repeated):
  - reading (indexing) tokens/s at the short and long length, and a plain transformers
    forward pass over the same short document (ratio);
  - ask latency (question + 32 answer tokens) on the cached short vs long document (ratio;
    target <= 1.3);
  - answer tokens/s while generating, beside transformers' own `generate`;
  - peak RSS and KV bytes on disk per token.

--dtype is the CLI's (mixed, the CPU's auto: float32 activations, the matrices in
bfloat16 for reading and float16 for answering where this CPU is faster so); transformers
always runs in float32.

    python benchmarks/bench_ask.py --vs-llama-cpp [--dtypes float32,mixed,bfloat16] [--kernels auto,torch]
                                  [--runs 3]

times llama.cpp instead, side by side with ours for each --dtypes and --kernels (auto: the
native answer step, kernels/cpu_step.c; torch: PyTorch's layer loop), each in a process of
its own (its peak RSS is its own): prompt tokens/s at --prompts (0.5k, 2k, 8k tokens of
the same text; ours: reading it into an empty store) and decode tokens/s (32 tokens after
the 0.5k prompt; ours: answer steps on the cached reading), medians of --runs, the same
threads, ratios to llama.cpp. llama.cpp runs the GGUF file the default model is converted
from, through llama-cpp-python, which is not a dependency. Build it once, outside the
project's environment, and point the benchmark at it:

    pip install --no-deps --target ~/.cache/landmark/llama-cpp llama-cpp-python diskcache  # compiles llama.cpp
    python benchmarks/bench_ask.py --vs-llama-cpp --llama-cpp-path ~/.cache/landmark/llama-cpp

Without it that part is skipped with a message.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from landmark_cli.bench.passkey import parse_length  # noqa: E402
from landmark_cli.model.loading import default_gguf, load_in, resolve_dir  # noqa: E402
from landmark_cli.prompts import ask_prompt  # noqa: E402
from landmark_cli.retrieval.engine import Engine  # noqa: E402
from landmark_cli.retrieval.session import Session  # noqa: E402
from landmark_cli.retrieval.settings import Settings  # noqa: E402

QUESTION = "Which company bought the Lantern Bay Ferry Company in 1998?"
NEW_TOKENS = 32


def corpus() -> str:
    parts = [(ROOT / "examples" / "lantern_bay.md").read_text()]
    parts += [p.read_text() for p in sorted((ROOT / "examples" / "essays").glob("*.md"))]
    return "\n\n".join(parts)


def first_tokens(tokenizer, text: str, n: int) -> str:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    while len(enc["input_ids"]) < n:  # repeat the corpus for lengths beyond it
        text = text + "\n\n" + text
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return text[: enc["offset_mapping"][n - 1][1]]


def timed(fn, runs: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def decode_rate(eng: Engine, entry, suffix: list[int]) -> float:
    """Answer tokens/s of our decoder: NEW_TOKENS steps after the question, no early stop."""
    sess = Session(eng, entry, capacity=len(suffix) + NEW_TOKENS)
    logits = sess.step(torch.tensor(suffix))
    t0 = time.perf_counter()
    for _ in range(NEW_TOKENS):
        logits = sess.step(logits.argmax().view(1))
    return NEW_TOKENS / (time.perf_counter() - t0)


def peak_rss_mib() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def prompt_ids(tokenizer, n: int) -> list[int]:
    """The first n tokens of the benchmark's text (both systems tokenize it alike: the same vocabulary)."""
    return tokenizer(first_tokens(tokenizer, corpus(), n), add_special_tokens=False)["input_ids"][:n]


def worker_llama_cpp(args) -> dict:
    """llama.cpp on the default model's GGUF: prompt tokens/s per length, decode tokens/s."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    lengths = [parse_length(x) for x in args.prompts.split(",")]
    threads = torch.get_num_threads()
    llm = Llama(model_path=str(default_gguf()), n_ctx=max(lengths) + 2 * NEW_TOKENS, n_threads=threads,
                n_threads_batch=threads, n_batch=512, verbose=False)
    tok = AutoTokenizer.from_pretrained(resolve_dir("default"))  # the tokenizer alone: RSS is llama.cpp's
    out: dict = {"system": "llama.cpp", "threads": threads, "prompt_tok_s": {}}
    for n in lengths:
        ids, times = prompt_ids(tok, n), []
        for _ in range(args.runs):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(ids)
            times.append(time.perf_counter() - t0)
        out["prompt_tok_s"][str(n)] = round(n / statistics.median(times), 1)
    rates = []
    for _ in range(args.runs):
        gen = llm.generate(prompt_ids(tok, lengths[0]), temp=0.0, reset=True)
        next(gen)  # the prompt, and the first token
        t0 = time.perf_counter()
        for _ in range(NEW_TOKENS):
            next(gen)
        rates.append(NEW_TOKENS / (time.perf_counter() - t0))
    out["decode_tok_s"] = round(statistics.median(rates), 1)
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def worker_landmark(args) -> dict:
    """Ours in --dtype: reading tokens/s per length (into an empty store), decode tokens/s."""
    lm = load_in("default", args.dtype, kernels=args.kernels)
    lengths = [parse_length(x) for x in args.prompts.split(",")]
    out: dict = {"system": f"landmark --dtype {args.dtype} --kernels {args.kernels}", "runtime": lm.runtime(),
                 "threads": torch.get_num_threads(), "prompt_tok_s": {}}
    warm = prompt_ids(lm.tokenizer, 600)
    with tempfile.TemporaryDirectory(prefix="landmark-bench-") as scratch:
        Engine(lm, Settings(), root=Path(scratch) / "warm").read(warm)  # first-call costs
        entry, eng = None, None
        for n in lengths:
            ids, times = prompt_ids(lm.tokenizer, n), []
            for r in range(args.runs):
                e = Engine(lm, Settings(), root=Path(scratch) / f"{n}-{r}")
                t0 = time.perf_counter()
                got, _ = e.read(ids)
                times.append(time.perf_counter() - t0)
                if n == lengths[0] and r == 0:
                    entry, eng = got, e
            out["prompt_tok_s"][str(n)] = round(n / statistics.median(times), 1)
        assert entry is not None and eng is not None
        suffix = prompt_ids(lm.tokenizer, 16)  # a short continuation of the cached reading, then 32 steps
        out["decode_tok_s"] = round(statistics.median(decode_rate(eng, entry, suffix) for _ in range(args.runs)), 1)
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def side_by_side(args) -> None:
    """llama.cpp and ours for each of --dtypes, each in a child process of this script."""
    env = dict(os.environ)
    if args.llama_cpp_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(args.llama_cpp_path).expanduser()),
                                                          env.get("PYTHONPATH")]))
    common = ["--prompts", args.prompts, "--runs", str(args.runs)]
    rows = []
    found = subprocess.run([sys.executable, "-c", "import llama_cpp"], env=env, capture_output=True).returncode == 0
    if not found:
        print("llama-cpp-python is not importable: llama.cpp skipped (see this script's docstring to build it)",
              flush=True)
    ours = [("landmark", d, k) for d in args.dtypes.split(",") for k in args.kernels.split(",")]
    for worker, dtype, kernels in ([("llama_cpp", "-", "-")] if found else []) + ours:
        cmd = [sys.executable, __file__, "--worker", worker, "--dtype", dtype, "--kernels", kernels, *common]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{worker} {dtype} failed:\n{done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0] if found else None
    lengths = list(rows[0]["prompt_tok_s"])
    head = ["system"] + [f"prompt {int(n):,} tok/s" for n in lengths] + ["decode tok/s", "peak RSS MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    def cell(value: float, ref: float | None) -> str:
        return f"{value:,.0f}" + (f" ({value / ref:.2f}x)" if ref else "")

    for r in rows:
        ref = base if base is not None and r is not base else None
        cells = [cell(r["prompt_tok_s"][n], ref["prompt_tok_s"][n] if ref else None) for n in lengths]
        cells += [cell(r["decode_tok_s"], ref["decode_tok_s"] if ref else None), f"{r['peak_rss_mib']:,}"]
        lines.append(f"| {r.get('runtime', r['system'])} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + (f"\n\n{platform.processor() or platform.machine()}, {rows[0]['threads']} threads, "
                                f"torch {torch.__version__}; medians of {args.runs} runs; in brackets: ratio to "
                                "llama.cpp (higher is faster).")
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "table": table}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--short", default="4k")
    ap.add_argument("--long", default="32k")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dtype", default="auto", help="auto | mixed | float32 | bfloat16 | float16 (landmark's)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--vs-llama-cpp", action="store_true", help="llama.cpp side by side (see the docstring)")
    ap.add_argument("--llama-cpp-path", default=None, help="where llama-cpp-python is installed (--target)")
    ap.add_argument("--dtypes", default="float32,mixed,bfloat16", help="ours, beside llama.cpp")
    ap.add_argument("--kernels", default="auto", help="ours: auto (the native answer step where it builds) | "
                    "torch; a list beside llama.cpp (each with every --dtypes)")
    ap.add_argument("--prompts", default="0.5k,2k,8k", help="prompt lengths beside llama.cpp")
    ap.add_argument("--worker", choices=["llama_cpp", "landmark"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.worker:
        print(json.dumps((worker_llama_cpp if args.worker == "llama_cpp" else worker_landmark)(args)))
        return
    if args.vs_llama_cpp:
        side_by_side(args)
        return
    lm = load_in("default", args.dtype, kernels=args.kernels)
    tok = lm.tokenizer
    settings = Settings()
    roots: list[Path] = []  # scratch stores, removed at the end

    def fresh_engine() -> Engine:
        roots.append(Path(tempfile.mkdtemp(prefix="landmark-bench-")))
        return Engine(lm, settings, root=roots[-1])

    eng = fresh_engine()
    text = corpus()
    res: dict = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
                 "runtime": lm.runtime(),
                 "settings": dataclasses.asdict(settings)}

    entries = {}
    warm = ask_prompt(tok, first_tokens(tok, text, 600), QUESTION)  # first-call costs (allocations, threads)
    fresh_engine().read(warm.ids, warm.spans)
    for name in ("short", "long"):
        n = parse_length(getattr(args, name))
        p = ask_prompt(tok, first_tokens(tok, text, n), QUESTION)
        runs = args.runs if name == "short" else 1  # the long read once: minutes per run
        times = []
        for r in range(runs):  # each run into an empty store (a second read would be cached)
            e = eng if r == 0 else fresh_engine()
            t0 = time.perf_counter()
            entry, _ = e.read(p.ids, p.spans)
            times.append(time.perf_counter() - t0)
            if r == 0:
                entries[name] = (entry, p)
        dt = statistics.median(times)
        res[f"read_{name}"] = {"tokens": len(p.ids), "seconds": round(dt, 2), "tok_s": round(len(p.ids) / dt, 1),
                               "runs": runs}
        print(f"read {name}: {len(p.ids)} tokens in {dt:.1f}s = {len(p.ids) / dt:.0f} tok/s", flush=True)

    from transformers import AutoModelForCausalLM

    gguf = default_gguf()
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    short_ids = torch.tensor(entries["short"][1].ids)[None]
    with torch.inference_mode():
        hf_s, _ = timed(lambda: hf(short_ids, use_cache=False, logits_to_keep=1), args.runs)
    res["transformers_forward_short_tok_s"] = round(short_ids.shape[1] / hf_s, 1)
    res["read_vs_transformers_short"] = round(res["read_short"]["tok_s"] / res["transformers_forward_short_tok_s"], 2)
    print(f"transformers forward over the short document: {short_ids.shape[1] / hf_s:.0f} tok/s", flush=True)

    for name, (entry, p) in entries.items():
        sec, _ = timed(lambda entry=entry, p=p: eng.answer(entry, p.suffix, max_new_tokens=NEW_TOKENS,
                                                           question=p.question), args.runs)
        res[f"ask_{name}_s"] = round(sec, 3)
        print(f"ask on cached {name} ({entry.n_tokens} tokens): {sec:.2f}s", flush=True)
    res["ask_long_over_short"] = round(res["ask_long_s"] / res["ask_short_s"], 3)

    entry, p = entries["long"]
    rates = [decode_rate(eng, entry, p.suffix) for _ in range(args.runs)]
    res["answer_tok_s"] = round(statistics.median(rates), 1)
    prompt = torch.tensor(p.suffix)[None]
    with torch.inference_mode():
        hf.generate(prompt, max_new_tokens=4, do_sample=False)
        gen_s, _ = timed(lambda: hf.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                             do_sample=False), args.runs)
    res["transformers_generate_tok_s"] = round(NEW_TOKENS / gen_s, 1)
    res["kv_bytes_per_token"] = round(entry.nbytes() / entry.n_tokens)
    res["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    for r in roots:
        shutil.rmtree(r, ignore_errors=True)
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
