"""How fast does a small LLaMA learn the in-context lookup that trained_facts.py needs?

    python experiments/lookup_probe.py                     # 2 layers, dim 64, one head of 64
    python experiments/lookup_probe.py --dim 128 --heads 2 --kv-heads 2 --steps 1000
    python experiments/lookup_probe.py --train-facts 3-8 --code-only --filler 10 --steps 4000
                                                           # several facts: the name must match too
    python experiments/lookup_probe.py --block 0           # ordinary causal attention
    python experiments/lookup_probe.py --retrieve 2 --local-layers 1
                                                           # retrieval in the loop (below)

Trains a randomly initialised model on the training documents of trained_facts.py (the
same Style options) the way `landmark finetune` does (its batches, optimizer and
schedule; next-token loss on every token; the grouped softmax when --block > 0) and
every --every steps prints the mean loss on the *answer* tokens alone: the code in each
answer (alone or in the restated fact), which only the fact in the same document
predicts (chance: ln 90 = 4.50 nats; a learned lookup: near 0). The overall loss hides
this: it falls as the model learns the templates, while the answers can stay at chance.
Use it to try model shapes, learning rates and corpora before a `trained_facts.py`
run, or on a GPU (--device cuda).

Retrieval in the loop (not the paper's recipe; an experiment): with --retrieve N each
query of a layer reads, besides its own block, only N earlier blocks sampled without
replacement from its own gate distribution (pre-RoPE landmark scores, as `landmark ask`
ranks blocks; Gumbel top-N), so that a landmark that does not stand for its block costs
the answer in training as it does at 8k. --local-layers L: the first L layers read only
the previous block (a first-layer landmark key is the same for every block, so it cannot
retrieve).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import trained_facts  # noqa: E402

from landmark_cli.kernels.landmark_attention import landmark_attention_blocks  # noqa: E402
from landmark_cli.kernels.rope import apply_rope  # noqa: E402
from landmark_cli.model.checkpoint import LandmarkSpec  # noqa: E402
from landmark_cli.training.finetune import TrainConfig, _optimizer, _save, load_base, sample_batch  # noqa: E402


def answer_flags(ids: list[int], answer: int, codes: set[int]) -> list[int]:
    """1 where a token is the code that answers a question (a code at most 8 tokens after
    "Answer": the code alone, or the fact restated), else 0."""
    return [int(t in codes and answer in ids[max(0, i - 8):i]) for i, t in enumerate(ids)]


def sampled_blocks(q: torch.Tensor, k: torch.Tensor, block: int, n: int, local: bool) -> torch.Tensor:
    """Pre-RoPE q [Bt, H, T, D], k [Bt, Hkv, T, D] of a regular landmark layout (blocks of
    `block` positions, the landmark last) -> allowed [Bt, H, T, blocks]: the earlier blocks
    each query reads. local: the previous block only; else n blocks sampled without
    replacement from the query's softmax over the earlier blocks' landmark scores."""
    bt, h, t, d = q.shape
    nb = -(-t // block)
    bi = torch.arange(t, device=q.device)[:, None] // block
    c = torch.arange(nb, device=q.device)[None]
    if local:
        return (c == bi - 1).expand(bt, h, t, nb)
    lk = k.repeat_interleave(h // k.shape[1], 1)[:, :, block - 1::block]
    lk = F.pad(lk, (0, 0, 0, nb - lk.shape[2]))  # a last block without its landmark is never earlier
    g = ((q.float() @ lk.float().transpose(-1, -2)) * d**-0.5).masked_fill(~(c < bi), float("-inf"))
    gumbel = -torch.log(-torch.log(torch.rand_like(g).clamp(1e-9, 1 - 1e-9)))
    pick = (g + gumbel).topk(min(n, nb), -1).indices
    return torch.zeros_like(g, dtype=torch.bool).scatter_(-1, pick, True) & (c < bi)


def retrieval_forward(model, ids: torch.Tensor, block: int, n: int, local_layers: int) -> torch.Tensor:
    """The grouped-softmax forward over ids [Bt, T] (a landmark at every p % block ==
    block - 1) with each layer reading only the blocks sampled_blocks allows (n = 0: all
    earlier blocks, except in the local layers) -> logits [Bt, T, vocab]."""
    x = model.embed(ids)
    cos, sin = (t.to(x.device) for t in model.rope.tables(ids.shape[-1]))
    for i in range(model.cfg.n_layers):
        q, k, v = model.qkv(i, x)
        local = i < local_layers
        with torch.no_grad():
            allowed = sampled_blocks(q, k, block, n, local) if n or local else None
        a = landmark_attention_blocks(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, block, allowed=allowed)
        x = model.finish(i, x, a)
    return model.logits(x)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=250, help="report every N steps (mean over those steps)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--block", type=int, default=31, help="landmark block size; 0: ordinary causal attention")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--retrieve", type=int, default=0,
                    help="retrieval in the loop: each query reads N sampled earlier blocks (0: all)")
    ap.add_argument("--local-layers", type=int, default=0,
                    help="first N layers read only their own and the previous block (landmark finetune --local-layers)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--names", type=int, default=500)
    ap.add_argument("--docs", type=int, default=20000, help="training documents")
    trained_facts.style_args(ap)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the curve here")
    ap.add_argument("--init", metavar="DIR", help="start from this model (a --save of an earlier probe: a "
                    "curriculum) instead of a random one; --dim/--layers/--heads are then its own")
    ap.add_argument("--save", metavar="DIR", help="write the model there at every report (the checkpoint format "
                    "of `landmark finetune`, for `landmark ask` and landmark_ranks.py)")
    a = ap.parse_args(argv)
    if (a.retrieve or a.local_layers) and not a.block:
        ap.error("--retrieve and --local-layers need landmark blocks (--block > 0)")
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="lookup-probe-") as tmp:
        curve = probe(a, Path(tmp))
    if a.json:
        from landmark_cli.bench.passkey_run import machine

        Path(a.json).write_text(json.dumps({"machine": machine(), "args": vars(a), "curve": curve}, indent=1) + "\n")
    return 0


def probe(a, work: Path) -> list[dict]:
    torch.manual_seed(a.seed)  # the sampled retrieval's draws (make_base seeds it again for a fresh model)
    pool = trained_facts.names(a.names)
    style = trained_facts.style_of(a)
    trained_facts.write_corpus(work / "corpus", a.docs, a.seed, pool, style)
    base = Path(a.init) if a.init else trained_facts.make_base(
        work / "base", [work / "corpus"], dim=a.dim, layers=a.layers, heads=a.heads, kv_heads=a.kv_heads, seed=a.seed)
    block = a.block or 64  # with --block 0 the landmark token is added but never inserted
    model, tok, config, spec = load_base(base, block, a.context, a.local_layers)
    answer = tok.convert_tokens_to_ids("Answer")
    codes = set(tok.convert_tokens_to_ids([str(c) for c in range(trained_facts.CODES[0], trained_facts.CODES[1] + 1)]))
    rng = random.Random(a.seed)
    ids: list[int] = []
    flags: list[int] = []
    for _ in range(a.docs):
        d = tok(trained_facts.training_document(rng, pool, style), add_special_tokens=False)["input_ids"]
        d.append(tok.eos_token_id)
        ids += d
        flags += answer_flags(d, answer, codes)
    # one array holding both, so that sample_batch cuts the same windows from each
    stream = np.asarray(ids, dtype=np.int64) * 2 + np.asarray(flags, dtype=np.int64)
    # --block 0: one block holding the whole window, so no landmark is inserted before its end
    block_size, context = (a.block, a.context) if a.block else (a.context, a.context + 1)
    cfg = TrainConfig(block_size=block_size, context=context, steps=a.steps, batch=a.batch, lr=a.lr,
                      warmup=min(100, a.steps // 10 + 1), seed=a.seed)
    fill = LandmarkSpec(spec.mem_id * 2, block_size, context)  # landmarks as (id, flag 0) in the packed stream
    if a.device != "cpu":
        from landmark_cli.model.llama import Llama

        model = Llama(model.cfg, {k: v.to(a.device) for k, v in model.w.items()})
    params = model.parameters()
    for p in params:
        p.requires_grad_(True)
    opt = _optimizer(params, cfg)
    gen = torch.Generator().manual_seed(a.seed)
    curve, window, t0 = [], [], time.perf_counter()
    print(f"{sum(p.numel() for p in params) / 1e6:.2f}M parameters; "
          f"chance on an answer: {math.log(len(codes)):.2f} nats", flush=True)
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = cfg.lr_at(step)
        raw = sample_batch(stream, cfg, fill, gen)[0]
        if not a.block:
            raw = raw[:, :-1]  # drop the one landmark at the end
        x, flag = (raw // 2).to(a.device), (raw % 2).bool().to(a.device)
        lm = x[:, :-1] == spec.mem_id if a.block else None
        if a.retrieve:
            logits = retrieval_forward(model, x[:, :-1], block_size + 1, a.retrieve, a.local_layers)
        else:
            logits = model.forward(x[:, :-1], is_landmark=lm, local_layers=a.local_layers)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten(), reduction="none").view_as(x[:, 1:])
        loss = ce.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        window.append((loss.item(), ce[flag[:, 1:]].sum().item(), int(flag[:, 1:].sum())))
        if (step + 1) % a.every == 0 or step + 1 == cfg.steps:
            n = sum(w[2] for w in window)
            row = {"step": step + 1, "loss": round(sum(w[0] for w in window) / len(window), 4),
                   "answer_loss": round(sum(w[1] for w in window) / max(n, 1), 4), "answers": n,
                   "seconds": round(time.perf_counter() - t0, 1)}
            curve.append(row)
            window = []
            print(f"step {row['step']}: loss {row['loss']:.3f}, answer loss {row['answer_loss']:.3f} "
                  f"({n} answers), {row['seconds']:.0f} s", flush=True)
            if a.save:
                _save(Path(a.save), model, tok, config, opt, step + 1, gen, cfg, [r["loss"] for r in curve])
    return curve


if __name__ == "__main__":
    sys.exit(main())
