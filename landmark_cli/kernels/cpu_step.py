"""The answer step on the CPU as one native call: cpu_step.c, compiled on first use.

An answer token is one row of activations through every matrix of the model. PyTorch
runs a layer as some twenty operations, each with its own dispatch and, for the
matrix-vector products, a half-precision copy of the activations; for a small model the
calls cost as much as the arithmetic. `CpuStep` runs the step (every layer, the final
norm, the LM head) in one call of a C function that streams each matrix once, in its own
dtype (float32, float16, bfloat16, or packed in groups as GGUF files pack them:
model/blocks.py), with float32 activations and attention.

The library is built with the system C compiler for this machine (`-march=native`:
AVX-512, or AVX2 with F16C and FMA) and kept under LANDMARK_HOME/native, named by a hash
of the source, the compiler and the CPU. Where it cannot be built (no compiler, another
architecture) `for_model` returns None and the engine runs the step with PyTorch; the
two agree to float32 rounding (tests/test_cpu_step.py).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from landmark_cli.paths import home

SOURCE = Path(__file__).with_name("cpu_step.c")
WTYPES = {"float32": 0, "float16": 1, "bfloat16": 2, "q8_0": 3, "q4_1": 4}  # cpu_step.c's W_F32 .. W_Q4_1
LAYER_TENSORS = ("attn_norm", "qkv", "o", "mlp_norm", "gate_up", "down")  # cpu_step.c's P_* order
# compiled with fast math (vectorised exp), linked without it: a shared library linked
# with -ffast-math would switch the whole process's denormals to zero when loaded
COMPILE = ("-O3", "-ffast-math", "-fopenmp", "-fPIC", "-c")
LINK = ("-shared", "-fopenmp")
LIBS = ("-lmvec", "-lm")


class Shape(ctypes.Structure):
    """cpu_step.c's Shape: the model's dimensions, the threads, the dense buffer's strides."""
    _fields_ = [("dim", ctypes.c_int32), ("n_layers", ctypes.c_int32), ("n_heads", ctypes.c_int32),
                ("n_kv_heads", ctypes.c_int32), ("head_dim", ctypes.c_int32), ("ffn_dim", ctypes.c_int32),
                ("vocab", ctypes.c_int32), ("eps", ctypes.c_float),
                ("threads", ctypes.c_int32), ("layer_stride", ctypes.c_int64), ("value_stride", ctypes.c_int64),
                ("head_stride", ctypes.c_int64)]


_loaded: dict[str, ctypes.CDLL | None] = {}  # per process: library path -> the library (None: cannot be built)


def compiler() -> str | None:
    """The C compiler: $CC, else cc or gcc on the PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cpu_id() -> str:
    """What -march=native compiles for: the CPU's model and flags (Linux), else the platform."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))


@functools.lru_cache(maxsize=None)
def _build_key(cc: str, march: str) -> str:
    """A hash of the source, the compiler (and its version), the CPU and the flags: worked
    out once per process, since every engine looks the library up."""
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), cc.encode(), version.encode(), _cpu_id().encode(), " ".join(COMPILE).encode(),
                 march.encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def library_path(cc: str, march: str = "native") -> Path:
    """Where the library for this source, compiler, CPU and -march is kept."""
    return home() / "native" / f"cpu_step-{_build_key(cc, march)}.so"


def build(path: Path, cc: str, march: str = "native") -> bool:
    """Compile the library to `path` (atomically: a killed build leaves nothing that looks
    built). False, with a `.failed` marker beside it so that later runs do not retry,
    where this compiler cannot build it for this CPU."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".build-") as tmp:
        obj, lib = Path(tmp) / "cpu_step.o", Path(tmp) / "cpu_step.so"
        for cmd in ([cc, f"-march={march}", *COMPILE, str(SOURCE), "-o", str(obj)],
                    [cc, *LINK, str(obj), "-o", str(lib), *LIBS]):
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as e:
                done = subprocess.CompletedProcess(cmd, 1, "", str(e))
            if done.returncode != 0:
                path.with_suffix(".failed").write_text(" ".join(cmd) + "\n" + done.stderr)
                return False
        os.replace(lib, path)
    return True


def library(march: str = "native") -> ctypes.CDLL | None:
    """The compiled step for this machine, built if need be; None where it cannot be.
    march: the instruction set, this CPU's by default (the tests build haswell's too:
    the AVX2 path)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not SOURCE.exists() or (cc := compiler()) is None:
        return None
    path = library_path(cc, march)
    key = str(path)
    if key not in _loaded:
        lib = None
        if path.exists() or (not path.with_suffix(".failed").exists() and build(path, cc, march)):
            try:
                lib = ctypes.CDLL(key)
            except OSError:  # damaged: built again next time
                path.unlink(missing_ok=True)
        if lib is not None:
            lib.landmark_cpu_step.restype = None
            lib.landmark_cpu_step.argtypes = [ctypes.POINTER(Shape)] + [ctypes.c_void_p] * 6 + [ctypes.c_int64] + [
                ctypes.c_void_p] * 4
            lib.landmark_cpu_logits.restype = None
            lib.landmark_cpu_logits.argtypes = [ctypes.POINTER(Shape)] + [ctypes.c_void_p] * 6
        _loaded[key] = lib
    return _loaded[key]


class CpuStep:
    """One answer token through `model` (its layers, final norm and LM head) over a dense
    buffer of keys and values, in one native call."""

    def __init__(self, lib: ctypes.CDLL, model):
        c = model.cfg
        self.model, self.fn, self.head = model, lib.landmark_cpu_step, lib.landmark_cpu_logits
        self.shape = Shape(dim=c.dim, n_layers=c.n_layers, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
                           head_dim=c.head_dim, ffn_dim=c.ffn_dim, vocab=c.vocab_size, eps=c.norm_eps)
        ptrs = [L[name].data_ptr() for L in model.layers for name in LAYER_TENSORS]
        self.layers = (ctypes.c_void_p * len(ptrs))(*ptrs)
        types = [WTYPES[f] for f in model.matrix_formats()]  # in cpu_step.c's T_* order, then the LM head
        self.wtypes = (ctypes.c_int32 * len(types))(*types)
        self.final_norm = model.w["model.norm.weight"]
        self.scratch = torch.empty(0)

    def logits(self, x: torch.Tensor, kv: torch.Tensor, slot: int, cos: torch.Tensor,
               sin: torch.Tensor) -> torch.Tensor:
        """The token's embedding x [dim] at RoPE row cos/sin [head_dim]; kv: the dense buffer
        [layers, 2, Hkv, slots, D] (float32), where the token's key and value are written at
        `slot` and slots [0, slot] are attended to. Returns the next token's logits [vocab]."""
        c, s = self.model.cfg, self.shape
        if kv.dtype != torch.float32 or not kv.is_contiguous() or slot >= kv.shape[3]:
            raise ValueError("the native step needs a contiguous float32 buffer with room for the token")
        s.threads = torch.get_num_threads()
        need = c.dim + (2 * c.n_heads + 2 * c.n_kv_heads) * c.head_dim + 3 * c.ffn_dim + c.n_heads * (slot + 1) + \
            s.threads * c.n_heads * (c.head_dim + 2)
        if self.scratch.numel() < need:
            self.scratch = torch.empty(2 * need)
        s.layer_stride, s.value_stride, s.head_stride = kv.stride(0), kv.stride(1), kv.stride(2)
        x = x.to(torch.float32, copy=True).contiguous()
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        out = torch.empty(c.vocab_size)
        self.fn(ctypes.byref(s), self.layers, self.wtypes, self.final_norm.data_ptr(), self.model.lm_head.data_ptr(),
                x.data_ptr(), kv.data_ptr(), slot, cos.data_ptr(), sin.data_ptr(), self.scratch.data_ptr(),
                out.data_ptr())
        return out

    def logits_of(self, x: torch.Tensor) -> torch.Tensor:
        """The logits [vocab] of a hidden state x [dim]: the final norm and the LM head (a
        question's last token, which the layer loop ran)."""
        c, s = self.model.cfg, self.shape
        s.threads = torch.get_num_threads()
        x = x.to(torch.float32).contiguous()
        h, out = torch.empty(c.dim), torch.empty(c.vocab_size)
        self.head(ctypes.byref(s), self.wtypes, self.final_norm.data_ptr(), self.model.lm_head.data_ptr(),
                  x.data_ptr(), h.data_ptr(), out.data_ptr())
        return out


def for_model(model) -> CpuStep | None:
    """The native step for `model` where it can run: on the CPU, float32 activations and
    norms, contiguous matrices in formats it reads, and a compiler that builds it here."""
    c = model.cfg
    if model.device.type != "cpu" or model.dtype != torch.float32 or c.n_heads % c.n_kv_heads or c.head_dim % 2:
        return None
    tensors = [L[name] for L in model.layers for name in LAYER_TENSORS] + [model.lm_head, model.w["model.norm.weight"]]
    norms = [L[n] for L in model.layers for n in ("attn_norm", "mlp_norm")] + [model.w["model.norm.weight"]]
    if not all(t.is_contiguous() for t in tensors) or any(t.dtype != torch.float32 for t in norms):
        return None
    if any(f not in WTYPES for f in model.matrix_formats()):
        return None
    lib = library()
    return CpuStep(lib, model) if lib is not None else None
