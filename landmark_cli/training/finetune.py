"""`landmark finetune`: the paper's recipe on any LLaMA-family model.

Add `<landmark>` (and `[PAD]`, as the reference does; new embedding rows = the mean of
the others), cut the training text into windows of `context // (block + 1)` blocks, put
a landmark after every `block` tokens, and train next-token prediction over the whole
stream (landmarks included, the reference's `include_landmark_in_loss`; with `loss_on`,
only over the answers that follow a marker, such as "Answer:") with the grouped
softmax (landmark_cli/kernels/landmark_attention: the fused Triton kernel on CUDA, the torch
reference elsewhere). AdamW, linear warm-up then cosine decay, gradient accumulation.

The output directory is a checkpoint in the reference format (checkpoint.py) that
`landmark ask` loads in trained mode. Every `save_every` steps it is rewritten
atomically together with the training state (optimizer moments, step, random state),
so an interrupted run resumes from the last save with the same command.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from landmark_cli.errors import LandmarkError
from landmark_cli.model.checkpoint import (
    LandmarkSpec,
    add_landmark_tokens,
    landmark_config,
    landmark_id,
    read_config,
    write_dir,
)
from landmark_cli.model.device import resolve_device
from landmark_cli.model.llama import Llama, LlamaConfig

STATE_FILE, STATE_META = "train_state.safetensors", "train_state.json"


@dataclass(frozen=True)
class TrainConfig:
    block_size: int = 50  # ordinary tokens per landmark block (mem_freq)
    context: int = 512  # training context in tokens, landmarks included
    steps: int = 1000  # optimizer steps
    batch: int = 8  # sequences per micro-batch
    accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-4
    warmup: int = 50  # steps of linear warm-up
    min_lr: float = 0.1  # the cosine ends at min_lr * lr
    weight_decay: float = 0.1  # on matrices only
    grad_clip: float = 1.0
    seed: int = 0
    save_every: int = 200
    local_layers: int = 0  # the first N layers read only their own block and local_blocks before it (not the paper's)
    local_blocks: int = 1  # earlier blocks a local layer reads: 1 (the previous one) or 0 (none)
    loss_on: str = ""  # train only on the text after each occurrence of this marker to its line's end ("": all)

    def __post_init__(self):
        for name in ("block_size", "context", "steps", "batch", "accum", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1")
        if self.local_layers < 0:
            raise ValueError("local-layers must be at least 0")
        if self.local_blocks not in (0, 1):
            raise ValueError("local-blocks must be 0 or 1")
        if not (self.lr > 0 and 0 <= self.min_lr <= 1 and self.warmup >= 0):
            raise ValueError("lr must be > 0, warmup >= 0")

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.min_lr + (1 - self.min_lr) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))

    @property
    def blocks(self) -> int:
        return self.context // (self.block_size + 1)


@dataclass
class StepInfo:
    step: int
    steps: int
    loss: float
    lr: float
    tokens_per_s: float
    model: Llama | None = None  # the model being trained (for a caller's own checks; do not modify)
    spec: LandmarkSpec | None = None


def load_base(model_dir: Path, block_size: int, context: int, local_layers: int = 0, local_blocks: int = 1):
    """Weights, tokenizer and config of the base model, with <landmark> added if missing.
    Returns (Llama in float32, tokenizer, config dict to save, LandmarkSpec)."""
    import logging

    from transformers import AutoTokenizer

    from landmark_cli.model.loading import check_config, fingerprint, read_weights, weights_files

    logging.getLogger("transformers").setLevel(logging.ERROR)
    cfg, spec = read_config(model_dir)
    check_config(cfg, str(model_dir))
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    files = weights_files(model_dir)
    # a half-precision checkpoint is read as it is (no converted copy kept on disk), then
    # copied to float32: trained in place, so never views of the files' memory maps
    held = read_weights(files, fingerprint(files), torch.float32, torch.device("cpu"))
    weights = {k: v.to(torch.float32, copy=True) for k, v in held.items()}
    mem_id = landmark_id(tok)
    if spec is not None and mem_id is not None:
        if spec.mem_freq != block_size:
            raise LandmarkError(f"{model_dir} was trained with blocks of {spec.mem_freq} tokens, not {block_size}",
                                f"pass --block-size {spec.mem_freq} to continue its training")
    else:
        mem_id = add_landmark_tokens(tok, weights)
    spec = LandmarkSpec(mem_id, block_size, context, local_layers, local_blocks)
    cfg.vocab_size = len(tok)
    lm = Llama(LlamaConfig.from_hf(cfg), weights, take=True)
    if local_layers > lm.cfg.n_layers:
        raise LandmarkError(f"--local-layers {local_layers}: {model_dir} has only {lm.cfg.n_layers} layers")
    return lm, tok, landmark_config(cfg.to_dict(), spec, len(tok)), spec


def corpus_tokens(folder: Path, tokenizer, progress: Callable[[str], None] = lambda s: None,
                  loss_on: str = "") -> tuple[np.ndarray, np.ndarray | None]:
    """Every PDF/TXT/MD under `folder` through the document loaders, tokenized and
    joined with the end-of-text token. Unreadable files are skipped with a message.
    Returns (tokens, trained): with `loss_on`, `trained` marks the tokens the loss is taken
    on (answer_tokens); without, it is None (every token)."""
    from landmark_cli.documents import find_documents, load_document
    from landmark_cli.errors import DocumentError

    files = find_documents(folder)
    if not files:
        raise LandmarkError(f"no PDF, .txt or .md files under {folder}", "point --data at a folder of documents")
    if loss_on and not getattr(tokenizer, "is_fast", False):
        raise LandmarkError("--loss-on needs a fast (Rust) tokenizer, to map the marked text to tokens",
                            "use a model whose folder has tokenizer.json, or leave --loss-on out")
    eos = tokenizer.eos_token_id
    parts: list[np.ndarray] = []
    marks: list[np.ndarray] = []
    for f in files:
        try:
            text = load_document(f).text
        except DocumentError as e:
            progress(f"skipping {f}: {e}")
            continue
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=bool(loss_on))
        ids = enc["input_ids"] + ([eos] if eos is not None else [])
        parts.append(np.asarray(ids, dtype=np.int64))
        if loss_on:
            marks.append(answer_tokens(text, enc["offset_mapping"], loss_on, eos is not None))
    if not parts:
        raise LandmarkError(f"none of the {len(files)} files under {folder} could be read")
    if not loss_on:
        return np.concatenate(parts), None
    trained = np.concatenate(marks)
    if not trained.any():
        raise LandmarkError(f"--loss-on {loss_on!r}: no text under {folder} follows that marker",
                            "check the marker's spelling and case, or leave --loss-on out")
    return np.concatenate(parts), trained


def answer_tokens(text: str, offsets: list[tuple[int, int]], marker: str, eos: bool) -> np.ndarray:
    """Which tokens of `text` (their character offsets) lie after an occurrence of `marker`
    and before the end of its line; one more entry for the end-of-text token when `eos`,
    marked if such a span reaches the end of the text (the model learns to stop there)."""
    starts = np.asarray([a for a, _ in offsets], dtype=np.int64)  # ascending
    out = np.zeros(len(offsets) + eos, dtype=bool)
    tail = len(text.rstrip())  # a span ending at or after this reaches the end of the text
    at = text.find(marker)
    while at >= 0:
        begin = at + len(marker)
        end = text.find("\n", begin)
        end = len(text) if end < 0 else end
        out[np.searchsorted(starts, begin):np.searchsorted(starts, end)] = True
        if eos and end >= tail:
            out[-1] = True
        at = text.find(marker, end)
    return out


def sample_batch(tokens: np.ndarray, cfg: TrainConfig, spec: LandmarkSpec, gen: torch.Generator,
                 trained: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[batch, blocks * (block_size + 1)] random windows of the corpus, a landmark after
    every block_size tokens (so every row ends with a landmark); and with `trained`, the
    same windows of it (False at the landmarks), else None."""
    n = cfg.blocks * cfg.block_size
    starts = torch.randint(0, len(tokens) - n + 1, (cfg.batch,), generator=gen).tolist()

    def windows(a: np.ndarray, landmark) -> torch.Tensor:
        rows = torch.from_numpy(np.stack([a[s:s + n] for s in starts])).view(cfg.batch, cfg.blocks, cfg.block_size)
        return torch.cat([rows, torch.full((cfg.batch, cfg.blocks, 1), landmark, dtype=rows.dtype)], -1).flatten(1)

    return windows(tokens, spec.mem_id), None if trained is None else windows(trained, False)


def loss_of(model: Llama, batch: torch.Tensor, spec: LandmarkSpec,
            trained: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the stream (landmarks included), or over the
    targets `trained` marks."""
    logits = model.forward(batch[:, :-1], is_landmark=batch[:, :-1] == spec.mem_id, local_layers=spec.local_layers,
                           local_blocks=spec.local_blocks)
    ce = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none")
    if trained is None:
        return ce.mean()
    w = trained[:, 1:].flatten().to(ce.dtype)
    return (ce * w).sum() / w.sum().clamp_min(1)


def _optimizer(params: list[torch.Tensor], cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


def _save(out: Path, model: Llama, tok, config: dict, opt, step: int, gen: torch.Generator, cfg: TrainConfig,
          losses: list[float]) -> None:
    from safetensors.torch import save_file

    def fill(tmp: Path) -> None:
        weights = {k: v.cpu() for k, v in model.state_dict().items()}
        if config.get("tie_word_embeddings"):
            weights.pop("lm_head.weight", None)
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tok.save_pretrained(tmp)
        state = {"rng": gen.get_state()}
        for i, p in enumerate(model.parameters()):
            st = opt.state.get(p)
            if st:
                state[f"m.{i}"], state[f"v.{i}"] = st["exp_avg"].cpu(), st["exp_avg_sq"].cpu()
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / STATE_FILE)
        (tmp / STATE_META).write_text(json.dumps({"step": step, "config": asdict(cfg), "losses": losses}) + "\n")

    write_dir(out, fill)


def _resume(out: Path, model: Llama, opt, gen: torch.Generator, cfg: TrainConfig) -> tuple[int, list[float]]:
    from safetensors.torch import load_file

    meta = json.loads((out / STATE_META).read_text())
    same = {k: v for k, v in {**asdict(TrainConfig()), **meta["config"]}.items() if k != "save_every"}
    if same != {k: v for k, v in asdict(cfg).items() if k != "save_every"}:
        raise LandmarkError(f"{out} holds a run with other settings ({meta['config']})",
                            "resume with the same options, or pass --restart to train from the base model again")
    state = load_file(out / STATE_FILE)
    gen.set_state(state["rng"])
    for i, p in enumerate(model.parameters()):
        if f"m.{i}" in state:
            opt.state[p] = {"step": torch.tensor(float(meta["step"])), "exp_avg": state[f"m.{i}"].to(p.device),
                            "exp_avg_sq": state[f"v.{i}"].to(p.device)}
    return int(meta["step"]), list(meta["losses"])


def finetune(base: str, data: str | Path, out: str | Path, cfg: TrainConfig = TrainConfig(), *,
             device: str = "cpu", restart: bool = False, on_step: Callable[[StepInfo], bool | None] | None = None,
             progress: Callable[[str], None] = lambda s: None) -> dict:
    """Train `base` (a --model value) on the documents under `data`; write OUT. Returns a summary.
    on_step is called after every optimizer step; a true return ends the run there (its
    checkpoint is written; the summary says `stopped_early`)."""
    from landmark_cli.model.loading import resolve_dir

    out = Path(out).expanduser()
    dev = resolve_device(device)
    if cfg.blocks < 2:
        raise LandmarkError(f"--context {cfg.context} holds fewer than 2 blocks of {cfg.block_size} + 1 tokens",
                            "raise --context or lower --block-size")
    resuming = not restart and (out / STATE_META).is_file()
    src = out if resuming else resolve_dir(base, progress)
    model, tok, config, spec = load_base(src, cfg.block_size, cfg.context, cfg.local_layers, cfg.local_blocks)
    tokens, trained = corpus_tokens(Path(data).expanduser(), tok, progress, cfg.loss_on)
    need = cfg.blocks * cfg.block_size
    if len(tokens) < need:
        raise LandmarkError(f"the documents under {data} hold {len(tokens):,} tokens, fewer than one training "
                            f"window of {need:,}", "add text or lower --context")
    model = model.to(dev)  # fp32 master weights; bf16 autocast on a GPU
    params = model.parameters()
    for p in params:
        p.requires_grad_(True)
    opt = _optimizer(params, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, losses = _resume(out, model, opt, gen, cfg) if resuming else (0, [])
    if resuming:
        progress(f"resuming {out} at step {step}/{cfg.steps}")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    t_start, tokens_seen = time.perf_counter(), 0
    while step < cfg.steps:
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step)
        total = 0.0
        for _ in range(cfg.accum):
            batch, mask = sample_batch(tokens, cfg, spec, gen, trained)
            with amp:
                loss = loss_of(model, batch.to(dev), spec, None if mask is None else mask.to(dev)) / cfg.accum
            loss.backward()
            total += loss.item()
            tokens_seen += batch.numel()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        losses.append(round(total, 5))
        stop = bool(on_step and on_step(StepInfo(step, cfg.steps, total, cfg.lr_at(step - 1),
                                                 cfg.batch * cfg.accum * cfg.context / (time.perf_counter() - t0),
                                                 model, spec)))
        if stop or step % cfg.save_every == 0 or step == cfg.steps:
            _save(out, model, tok, config, opt, step, gen, cfg, losses)
        if stop:
            break
    elapsed = time.perf_counter() - t_start
    return {"out": str(out), "steps": step, "stopped_early": step < cfg.steps,
            "first_loss": losses[0] if losses else None,
            "last_loss": float(np.mean(losses[-10:])) if losses else None, "seconds": elapsed,
            "tokens": tokens_seen, "mem_id": spec.mem_id, "block_size": cfg.block_size, "context": cfg.context}
