"""Peak memory of `landmark ask` with a 1B-class model, for each --dtype.

    python benchmarks/bench_memory.py [--dtypes float32,auto,bfloat16,float16] [--json out.json]

No 1B checkpoint can be downloaded here, so the model is TinyLlama-1.1B's shape (22
layers, 2,048 wide, 32 query and 4 KV heads, 5,632-wide MLP, untied embeddings) with the
default model's tokenizer (a 49,152-token vocabulary: 1.17B parameters) and random
weights, written once as float32 safetensors under LANDMARK_HOME/bench-models. Memory
does not depend on the weights' values. Each dtype runs `landmark ask --model DIR
--dtype D` in a process of its own, on a ~400-token document read into a fresh store,
with a 16-token answer, twice: the first run converts the weights where the dtype needs
it (kept under that LANDMARK_HOME), the second loads them as converted. Reported for the
second process: its peak anonymous memory (what must
fit in RAM), its peak resident set (which also counts the pages of the memory-mapped
weights file while they are mapped: the kernel can drop those), and the weights' bytes
by arithmetic (docs/usage.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from landmark_cli.model.loading import resolve_dir  # noqa: E402
from landmark_cli.paths import home  # noqa: E402

SHAPE = {"hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
         "intermediate_size": 5632, "max_position_embeddings": 2048, "tie_word_embeddings": False}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
QUESTION = "Who founded the Lantern Bay Ferry Company?"
# runs a command and prints, after its output, its peak RSS and its peak anonymous memory
# (KiB; sampled every 20 ms from /proc): pages of a memory-mapped file count in the RSS
# while mapped, but the kernel can drop them, so the anonymous peak is what must fit in RAM
WATCH = """import resource, subprocess, sys, time
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
anon = 0
while p.poll() is None:
    try:
        status = open(f"/proc/{p.pid}/status").read()
        anon = max(anon, int(status.split("RssAnon:")[1].split()[0]))
    except (OSError, IndexError):
        pass
    time.sleep(0.02)
out, err = p.communicate()
sys.stdout.write(out); sys.stderr.write(err)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, anon)
sys.exit(p.returncode)
"""


def build_model(out: Path) -> Path:
    """The random 1.17B model directory (made once)."""
    if (out / "model.safetensors").is_file():
        return out
    from safetensors.torch import save_file

    src = resolve_dir("default")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(SHAPE, head_dim=SHAPE["hidden_size"] // SHAPE["num_attention_heads"],
               _model_name_or_path="random weights, TinyLlama-1.1B's shape (landmark bench_memory)")
    d, f, v, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02

    w = {"model.embed_tokens.weight": rand(v, d), "lm_head.weight": rand(v, d), "model.norm.weight": torch.ones(d)}
    for i in range(L):
        p = f"model.layers.{i}."
        w.update({p + "self_attn.q_proj.weight": rand(d, d), p + "self_attn.k_proj.weight": rand(kv, d),
                  p + "self_attn.v_proj.weight": rand(kv, d), p + "self_attn.o_proj.weight": rand(d, d),
                  p + "mlp.gate_proj.weight": rand(f, d), p + "mlp.up_proj.weight": rand(f, d),
                  p + "mlp.down_proj.weight": rand(d, f), p + "input_layernorm.weight": torch.ones(d),
                  p + "post_attention_layernorm.weight": torch.ones(d)})
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(w, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, tmp / name)
    tmp.rename(out)
    return out


def parameters(model: Path) -> tuple[int, int]:
    """(all parameters, those in the projection matrices and the LM head)."""
    from safetensors import safe_open

    total = matrices = 0
    with safe_open(str(model / "model.safetensors"), "pt") as f:
        for k in f.keys():
            n = f.get_slice(k).get_shape()
            size = n[0] * (n[1] if len(n) > 1 else 1)
            total += size
            matrices += size if (k.endswith("proj.weight") or k == "lm_head.weight") else 0
    return total, matrices


def ask_once(model: Path, doc: Path, dtype: str, scratch: Path) -> dict:
    """`landmark ask` in a process of its own (LANDMARK_HOME scratch, its store emptied
    first): its peak RSS and anonymous memory, answer and timings."""
    shutil.rmtree(scratch / "store", ignore_errors=True)
    env = {**os.environ, "LANDMARK_HOME": str(scratch)}
    cmd = [sys.executable, "-c", WATCH, sys.executable, "-c", "from landmark_cli.cli import main; main()", "ask",
           str(doc), QUESTION, "--model", str(model), "--dtype", dtype, "--max-tokens", "16", "--json"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"--dtype {dtype} failed:\n{done.stderr[-2000:]}")
    lines = done.stdout.strip().splitlines()
    res, (peak_kib, anon_kib) = json.loads(lines[-2]), (int(x) for x in lines[-1].split())
    return {"dtype": dtype, "runtime": res["runtime"], "peak_rss_mib": round(peak_kib / 1024),
            "peak_anon_mib": round(anon_kib / 1024), "document_tokens": res["tokens"]["document"],
            "timings": res["timings"], "wall_s": round(time.perf_counter() - t0, 1)}


def run_one(model: Path, doc: Path, dtype: str) -> dict:
    """Two asks on a fresh LANDMARK_HOME: the first converts the weights where the dtype
    needs it (kept in LANDMARK_HOME/models/converted); the second, reported, loads them
    as converted. Both read the document into an empty store."""
    with tempfile.TemporaryDirectory(prefix="landmark-mem-") as scratch:
        first = ask_once(model, doc, dtype, Path(scratch))
        row = ask_once(model, doc, dtype, Path(scratch))
        return {**row, "first_load_s": first["timings"]["load_s"], "first_peak_anon_mib": first["peak_anon_mib"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="float32,auto,bfloat16,float16")
    ap.add_argument("--chars", type=int, default=1800, help="characters of examples/lantern_bay.md to read")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    model = build_model(home() / "bench-models" / "tinyllama-shape-random")
    total, matrices = parameters(model)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        doc = Path(d) / "lantern_bay_start.md"
        doc.write_text((ROOT / "examples" / "lantern_bay.md").read_text()[:args.chars])
        for dtype in args.dtypes.split(","):
            rows.append(run_one(model, doc, dtype))
            print(json.dumps(rows[-1]), flush=True)
    size = {"float32": 4, "bfloat16": 2, "float16": 2}
    lines = ["| --dtype | runs as | weights by arithmetic | peak anonymous memory | peak RSS (mapped file too) "
             "| load (first, converting) |", "|---|---|---|---|---|---|"]
    for r in rows:
        kinds = r["runtime"].split(", ")[1:-1]  # e.g. ["bfloat16"] or ["bfloat16 reading", "float16 answering"]
        if len(kinds) == 1:
            weights = size[kinds[0]] * total
        else:  # float32 embeddings and norms, one copy of the matrices per dtype
            weights = 4 * (total - matrices) + matrices * sum(size[k.split()[0]] for k in kinds)
        lines.append(f"| {r['dtype']} | {r['runtime']} | {weights / 2**30:.1f} GiB | "
                     f"{r['peak_anon_mib'] / 1024:.1f} GiB | {r['peak_rss_mib'] / 1024:.1f} GiB | "
                     f"{r['timings']['load_s']:.1f} s ({r['first_load_s']:.1f} s) |")
    table = "\n".join(lines) + (f"\n\n{platform.machine()}, {os.cpu_count()} CPUs, "
                                f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, "
                                f"torch {torch.__version__}; {total / 1e9:.2f}B parameters "
                                f"({matrices / 1e9:.2f}B in the matrices and LM head), random weights of "
                                f"TinyLlama-1.1B's shape; a {rows[0]['document_tokens']}-token document.")
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "parameters": total, "matrix_parameters": matrices,
                                         "table": table}, indent=1))


if __name__ == "__main__":
    main()
