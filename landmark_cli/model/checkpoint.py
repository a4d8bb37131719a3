"""Trained landmark checkpoints in the reference format (epfml/landmark-attention).

A LLaMA checkpoint whose config.json has `model_type: llama_with_landmark` plus
`mem_id` (the id of the `<landmark>` token), `mem_freq` (ordinary tokens per block) and
`train_context_length`, and whose tokenizer has `[PAD]` and `<landmark>` added (in that
order) after the base vocabulary. Our own extension, written by `landmark finetune
--local-layers N` only: `landmark_local_layers: N`, the first N layers read only their
own block and the `landmark_local_blocks` (1, or 0) blocks before it (no retrieval; the
reference code ignores both keys; a missing `landmark_local_blocks` means 1).
transformers does not know that model type, so the config is read here and turned into
a plain LlamaConfig for everything else.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from landmark_cli.errors import ModelError

LANDMARK_TOKEN = "<landmark>"
PAD_TOKEN = "[PAD]"
MODEL_TYPE = "llama_with_landmark"
LANDMARK_KEYS = ("mem_id", "mem_freq", "train_context_length", "include_landmark_in_loss", "landmark_local_layers",
                 "landmark_local_blocks")
EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")


@dataclass(frozen=True)
class LandmarkSpec:
    mem_id: int  # token id of <landmark>
    mem_freq: int  # ordinary tokens per block (a block occupies mem_freq + 1 positions)
    train_context: int  # context length the model was fine-tuned at
    local_layers: int = 0  # the first N layers read only their own block and the local_blocks before it
    local_blocks: int = 1  # 1: the previous block; 0: none (the layer reads its own block only)

    @property
    def block(self) -> int:
        return self.mem_freq + 1

    def as_config(self) -> dict:
        out = {"mem_id": self.mem_id, "mem_freq": self.mem_freq, "train_context_length": self.train_context}
        if not self.local_layers:
            return out
        return {**out, "landmark_local_layers": self.local_layers, "landmark_local_blocks": self.local_blocks}


def read_config(d: Path):
    """config.json of a model directory -> (transformers config, LandmarkSpec or None)."""
    from transformers import AutoConfig, LlamaConfig

    try:
        raw = json.loads((d / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read the config of {d}: {e}".splitlines()[0]) from e
    spec = None
    if raw.get("mem_freq"):
        try:
            spec = LandmarkSpec(int(raw["mem_id"]), int(raw["mem_freq"]),
                                int(raw.get("train_context_length") or 512), int(raw.get("landmark_local_layers") or 0),
                                int(raw.get("landmark_local_blocks", 1)))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"{d}: config has mem_freq but no valid mem_id ({e})",
                             "a landmark checkpoint needs mem_id, mem_freq and train_context_length") from e
        if spec.local_blocks not in (0, 1):
            raise ModelError(f"{d}: landmark_local_blocks is {spec.local_blocks}, not 0 or 1",
                             "fix config.json or retrain with landmark finetune --local-blocks 0|1")
    if raw.get("model_type") == MODEL_TYPE:
        plain = {k: v for k, v in raw.items() if k not in LANDMARK_KEYS + ("model_type", "transformers_version")}
        cfg = LlamaConfig(**plain)
        # reported as such; everything else treats it as llama. transformers declares model_type
        # a ClassVar, but an instance attribute shadows it as intended here.
        cfg.model_type = MODEL_TYPE  # type: ignore[misc]
        return cfg, spec
    try:
        return AutoConfig.from_pretrained(d, local_files_only=True), spec
    except Exception as e:
        raise ModelError(f"cannot read the config of {d}: {e}".splitlines()[0]) from e


def landmark_id(tokenizer) -> int | None:
    """The id of <landmark> in this tokenizer, or None."""
    tid = tokenizer.convert_tokens_to_ids(LANDMARK_TOKEN)
    if not isinstance(tid, int) or tid < 0 or tid == tokenizer.unk_token_id:
        return None
    return tid


def add_landmark_tokens(tokenizer, weights: dict[str, torch.Tensor]) -> int:
    """Add [PAD] then <landmark> to the tokenizer (as the reference does) and resize the
    input and output embeddings to the new vocabulary, the new rows set to the mean of the
    existing ones. Modifies both in place; returns the id of <landmark>."""
    before = len(tokenizer)
    added = tokenizer.add_special_tokens({"pad_token": PAD_TOKEN, "additional_special_tokens": [LANDMARK_TOKEN]})
    n = len(tokenizer)
    for name in EMBEDDINGS:
        w = weights.get(name)
        if w is None:
            continue
        old = w[:min(before, w.shape[0])]
        mean = old.float().mean(0, keepdim=True).to(w.dtype)
        weights[name] = torch.cat([old, mean.expand(n - old.shape[0], -1)]) if added else w[:n]
    mem_id = landmark_id(tokenizer)
    assert mem_id is not None
    return mem_id


def landmark_config(base: dict, spec: LandmarkSpec, vocab_size: int) -> dict:
    """A reference-format config.json dict from a base LLaMA config dict."""
    cfg = {k: v for k, v in base.items() if k not in LANDMARK_KEYS + ("transformers_version",)}
    cfg.update(spec.as_config(), model_type=MODEL_TYPE, architectures=["LlamaForCausalLM"], vocab_size=vocab_size)
    return cfg


def write_dir(out: Path, fill) -> Path:
    """Build a model directory atomically: fill(tmp) writes into a temporary directory
    beside `out`, which is renamed to `out` only when complete. An existing `out` is
    replaced only after the new one is complete."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        fill(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_checkpoint(out: Path, config: dict, weights: dict[str, torch.Tensor], tokenizer) -> Path:
    """Write config.json, model.safetensors and the tokenizer to `out` (atomically)."""
    from safetensors.torch import save_file

    def fill(tmp: Path) -> None:
        tied = config.get("tie_word_embeddings", False)
        state = {k: v.detach().contiguous().cpu() for k, v in weights.items() if not (tied and k == "lm_head.weight")}
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tokenizer.save_pretrained(tmp)

    return write_dir(out, fill)
