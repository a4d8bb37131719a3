"""`landmark recover`: rebuild the paper's fine-tuned LLaMA-7B from LLaMA and the weight diff.

The Landmark Attention authors released their fine-tuned LLaMA-7B as a weight diff
(epfml/landmark-attention-llama7b-wdiff, made by llama/weight_diff.py of
epfml/landmark-attention): a checkpoint in the reference format (checkpoint.py) whose
weights are `tuned - base`, where base is the original LLaMA-7B after `[PAD]` and
`<landmark>` were added to its vocabulary (new embedding rows: the mean of the others),
plus checksum_psum.txt, the sum of all tuned weights.

Recovery adds the two tensor by tensor in float32: both are read lazily (safetensors
only, never pickles) and every output tensor is written as soon as it is computed, so
memory holds about one tensor at a time. The model is built in a temporary directory and
moved to OUT only once the sum of its weights matches the checksum.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from landmark_cli.errors import LandmarkError, ModelError
from landmark_cli.model.checkpoint import EMBEDDINGS, add_landmark_tokens, landmark_id, read_config, write_dir

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}  # safetensors' names
CHECKSUM_FILE = "checksum_psum.txt"
INDEX_FILE = "model.safetensors.index.json"
ROPE_BUFFER = ".rotary_emb.inv_freq"  # saved by the reference's transformers; recomputed by loaders today
BASE_HINT = ("the base must be the original LLaMA-7B in Hugging Face format (Meta's weights converted with "
             "transformers' convert_llama_weights_to_hf.py), with safetensors weights and no pad token")
DIFF_HINT = "the diff files may be incomplete or corrupt: download them again"


@dataclass
class RecoverResult:
    out: Path
    tensors: int  # tensors written
    bytes: int  # bytes of weights written
    dtype: str  # of the written weights
    mem_id: int  # id of <landmark>
    checksum_expected: float | None  # None: the diff has no checksum_psum.txt
    checksum_got: float  # sum of the recovered float32 weights (float64 accumulation)


class Weights:
    """The tensors of a model directory, read lazily: one or more safetensors files, or
    shards listed in model.safetensors.index.json."""

    def __init__(self, d: Path, role: str, hint: str):
        from safetensors import safe_open

        self.role, self.hint, self._open = role, hint, safe_open
        self._handles: dict[Path, safe_open] = {}
        index = d / INDEX_FILE
        if index.is_file():
            try:
                wmap = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ModelError(f"cannot read {index}: {e}".splitlines()[0], hint) from None
            missing = sorted({f for f in wmap.values() if not (d / f).is_file()})
            if missing:
                raise ModelError(f"{d}: shard {missing[0]} listed in {INDEX_FILE} is missing", hint)
            self.files = {name: d / f for name, f in wmap.items()}
            return
        files = sorted(d.glob("*.safetensors"))
        if not files:
            pickled = [p for pattern in ("*.bin", "*.pth", "*.pt") for p in d.glob(pattern)]
            raise ModelError(f"no safetensors weights in the {role} directory {d}",
                             f"convert its {pickled[0].suffix} weights to safetensors first: pickled weights are "
                             "never loaded, for safety" if pickled else hint)
        self.files = {name: f for f in files for name in self._file(f).keys()}

    def _file(self, f: Path):
        if f not in self._handles:
            try:
                self._handles[f] = self._open(f, framework="pt")
            except Exception as e:  # a truncated or garbled file
                raise ModelError(f"cannot read {f}: {e}".splitlines()[0], self.hint) from None
        return self._handles[f]

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def shards(self) -> list[list[str]]:
        """Tensor names grouped by file, in file order."""
        groups: dict[Path, list[str]] = {}
        for name, f in self.files.items():
            groups.setdefault(f, []).append(name)
        return [groups[f] for f in sorted(groups)]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file(self.files[name]).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        """A float32 copy (the file's tensor is a view of its memory map: never modify it)."""
        try:
            return self._file(self.files[name]).get_tensor(name).to(torch.float32)
        except ModelError:
            raise
        except Exception as e:
            raise ModelError(f"cannot read tensor {name} of the {self.role}: {e}".splitlines()[0], self.hint) from None


class ShardWriter:
    """A safetensors file written one tensor at a time: its header (names, dtypes, shapes,
    offsets) is known before any tensor is computed, so nothing is held until the end."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype):
        header: dict[str, dict[str, object]] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape in entries:
            n = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data aligned to 8 bytes, as safetensors writes it
        self.order, self.dtype, self.nbytes = [name for name, _ in entries], dtype, offset
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, t: torch.Tensor) -> None:
        assert name == self.order.pop(0), "tensors must come in header order"
        self.f.write(t.to(self.dtype).contiguous().view(-1).view(torch.uint8).numpy().data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()
        if exc[0] is None and self.order:
            raise AssertionError(f"tensors not written: {self.order}")


def _dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in ST_DTYPES:
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise LandmarkError(f"unknown dtype {dtype!r}", f"choose from {', '.join(DTYPES)}")


def _tokenizer(d: Path, role: str):
    from transformers import AutoTokenizer

    logging.getLogger("transformers").setLevel(logging.ERROR)  # as models.py: no warnings about model_type
    try:
        return AutoTokenizer.from_pretrained(d, local_files_only=True)
    except Exception as e:
        raise ModelError(f"cannot load the tokenizer of the {role} {d}: {e}".splitlines()[0],
                         BASE_HINT if role == "base" else DIFF_HINT) from None


def _inv_freq(raw: dict) -> torch.Tensor:
    """The rotary inverse frequencies of a LLaMA config, computed as the reference's model does."""
    head_dim = raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]
    theta = raw.get("rope_theta") or 10000.0
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))


def _expected_checksum(diff: Path, warn) -> float | None:
    path = diff / CHECKSUM_FILE
    if not path.is_file():
        warn(f"{path} not found: the recovered weights cannot be checked (the checksum is skipped)")
        return None
    try:
        return float(path.read_text().strip())
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read the checksum {path}: {e}".splitlines()[0], DIFF_HINT) from None


def recover(base, diff, out, *, dtype=None, progress=lambda done, total, name: None,
            warn=lambda message: None) -> RecoverResult:
    """Rebuild the fine-tuned landmark model from the `base` LLaMA directory and the weight
    `diff` directory into `out` (which must not exist, or be an empty directory).

    dtype: of the written weights, "float32" (default: what the diff holds, lossless),
    "float16" or "bfloat16"; the sum checked is always that of the float32 weights, before
    any cast. Memory: the two resized embeddings, then one tensor at a time.
    progress(done_bytes, total_bytes, tensor_name) is called after each tensor is written;
    warn(message) for what the caller should see but does not stop recovery."""
    base, diff, out = (Path(p).expanduser() for p in (base, diff, out))
    out_dtype = _dtype(dtype)
    dtype_name = str(out_dtype).removeprefix("torch.")
    for role, d, hint in (("base", base, BASE_HINT), ("diff", diff, "pass the weight diff directory")):
        if not d.is_dir():
            raise ModelError(f"the {role} {d} {'is not a directory' if d.exists() else 'does not exist'}", hint)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ModelError(f"{out} already exists", "choose another --out, or remove it first")
    cfg, spec = read_config(diff)
    raw_cfg = json.loads((diff / "config.json").read_text())  # readable: read_config read it
    if spec is None:
        raise ModelError(f"{diff} is not a landmark weight diff: its config.json has no mem_id and mem_freq",
                         "pass the diff directory (epfml/landmark-attention-llama7b-wdiff, as safetensors)")
    expected = _expected_checksum(diff, warn)
    dw, bw = Weights(diff, "diff", DIFF_HINT), Weights(base, "base", BASE_HINT)

    # The base as the diff was made against: [PAD] and <landmark> added, embeddings resized.
    tok = _tokenizer(base, "base")
    resized = {name: bw.get(name) for name in EMBEDDINGS if name in bw}
    mem_id = add_landmark_tokens(tok, resized)
    if mem_id != spec.mem_id or len(tok) != cfg.vocab_size:
        raise ModelError(f"the base tokenizer with [PAD] and <landmark> added has {len(tok):,} tokens, <landmark> "
                         f"= {mem_id}; the diff expects {cfg.vocab_size:,} tokens, <landmark> = {spec.mem_id}",
                         BASE_HINT)
    try:
        diff_tok = _tokenizer(diff, "diff")
    except ModelError as e:
        warn(f"{e.message}; the base tokenizer with the tokens added is written instead")
    else:
        if landmark_id(diff_tok) != mem_id or len(diff_tok) != len(tok):
            raise ModelError(f"the diff's tokenizer ({len(diff_tok):,} tokens, <landmark> = {landmark_id(diff_tok)}) "
                             f"disagrees with the base tokenizer plus the added tokens", BASE_HINT)

    # Check every tensor against the base before any work; plan one output shard per diff shard.
    # The reference's rotary buffers count in the checksum but are not written (loaders recompute them).
    plan: list[tuple[list[str], list[tuple[str, tuple[int, ...]]]]] = []
    for names in dw.shards():
        entries = []
        for name in names:
            shape = dw.shape(name)
            if name.endswith(ROPE_BUFFER):
                want = tuple(bw.shape(name)) if name in bw else tuple(_inv_freq(raw_cfg).shape)
            elif name in resized:
                want = tuple(resized[name].shape)
            elif name in bw:
                want = bw.shape(name)
            else:
                raise ModelError(f"the base has no tensor {name} (the diff has one)", BASE_HINT)
            if shape != want:
                raise ModelError(f"tensor {name}: shape {list(shape)} in the diff, {list(want)} in the base", BASE_HINT)
            if not name.endswith(ROPE_BUFFER):
                entries.append((name, shape))
        if entries:
            plan.append((names, entries))
    total = sum(math.prod(s) for _, entries in plan for _, s in entries) * out_dtype.itemsize
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < total * 1.01:
        raise ModelError(f"{out.parent} has {free / 2**30:,.1f} GiB free; the recovered model needs "
                         f"{total / 2**30:,.1f} GiB", "free some space, or pass --dtype bfloat16 (half the size)")

    got, done, has_rope = 0.0, 0, any(name.endswith(ROPE_BUFFER) for name in dw.files)

    def recovered(name: str) -> torch.Tensor:
        if name in resized:
            b = resized.pop(name)
        elif name in bw:
            b = bw.get(name)
        else:  # a rotary buffer the base does not store
            b = _inv_freq(raw_cfg)
        return dw.get(name) + b

    def fill(tmp: Path) -> None:
        nonlocal got, done
        files = (["model.safetensors"] if len(plan) == 1 else
                 [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
        weight_map = {}
        for fname, (names, entries) in zip(files, plan, strict=True):
            with ShardWriter(tmp / fname, entries, out_dtype) as w:
                for name in names:
                    t = recovered(name)
                    got += t.sum(dtype=torch.float64).item()
                    if name.endswith(ROPE_BUFFER):
                        continue
                    w.write(name, t)
                    weight_map[name] = fname
                    done += t.numel() * out_dtype.itemsize
                    progress(done, total, name)
                    del t
        if expected is not None:
            _check_sum(expected, got, has_rope, raw_cfg)
        if len(files) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        dtype_keys = {k: dtype_name for k in ("torch_dtype", "dtype") if k == "torch_dtype" or k in raw_cfg}
        (tmp / "config.json").write_text(json.dumps({**raw_cfg, **dtype_keys}, indent=2, sort_keys=True) + "\n")
        tok.save_pretrained(tmp)

    write_dir(out, fill)
    return RecoverResult(out=out, tensors=sum(len(e) for _, e in plan), bytes=total, dtype=dtype_name,
                         mem_id=mem_id, checksum_expected=expected, checksum_got=got)


def _check_sum(expected: float, got: float, has_rope: bool, raw_cfg: dict) -> None:
    """The reference checks |sum - expected| <= 1e-2. The expected value was summed tensor by
    tensor in float32, which for 7B weights (summing to about 5e4) can be off by more than
    that, so the tolerance grows with the sum: 1e-6 of it (0.05 for LLaMA-7B)."""
    tol = max(1e-2, 1e-6 * abs(expected))
    if abs(got - expected) <= tol:
        return
    if not has_rope:  # a diff re-saved by a newer transformers lost the rotary buffers the checksum counts
        rope = raw_cfg.get("num_hidden_layers", 0) * _inv_freq(raw_cfg).sum(dtype=torch.float64).item()
        if abs(got + rope - expected) <= tol:
            return
    raise ModelError(f"the recovered weights fail the checksum: they sum to {got:.4f}, {CHECKSUM_FILE} says "
                     f"{expected:.4f}; nothing was written",
                     f"{BASE_HINT}; or {DIFF_HINT}")
