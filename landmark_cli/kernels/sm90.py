"""Compile a Triton kernel for an H100 (sm_90) on a machine without one, and read its code.

Needs triton with its NVIDIA backend (the PyPI wheel bundles ptxas, nvdisasm and
cuobjdump); no GPU and no CUDA driver. Run it without TRITON_INTERPRET=1.

    compile_sm90(fn, dict(constexprs, num_warps=4, num_stages=2), landmark_types("bf16"),
                 aligned=("T",))
    census(compiled) -> {"registers", "stack", "shared", "loops": [per-loop counts]}

The launch specialisation is the JIT's for well-aligned data: every pointer argument is
taken as 16-byte aligned, and the integer arguments named in `aligned` as multiples of 16
(the JIT checks each value at launch; without these hints loads are not vectorised).
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_OPCODE = re.compile(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"BRA `\((\.L_x_\d+)\)")


def landmark_types(ty: str = "bf16") -> dict:
    """Argument types of landmark_attention's kernels with ty ("bf16", "fp16", "fp32")
    tensors."""
    types = {n: "*" + ty for n in ("Q", "K", "V", "OUT", "DO", "DQ", "DK", "DV")}
    types.update(LSE="*fp32", DELTA="*fp32", IS_LM="*i8", BLK="*i32", STARTS="*i32",
                 qk_scale="fp32", sm_scale="fp32")
    return types


def retrieval_types(ty: str = "fp16") -> dict:
    """Argument types of retrieval_attention's kernels (float32 RoPE tables)."""
    types = {n: "*" + ty for n in ("Q", "KD", "VD", "KS", "VS", "LMK", "OUT")}
    types.update(IDX="*i64", COS="*fp32", SIN="*fp32", PART="*fp32", LSE="*fp32", sm_scale="fp32")
    return types


def compile_sm90(fn, launch: dict, types: dict, aligned=()):
    """fn compiled for sm_90. launch: its constexpr arguments plus num_warps and num_stages
    (a kernel module's launch config; keys fn does not take are ignored); types: argument
    name -> Triton type ("*bf16", "fp32", ...), "i32" where not named."""
    sig = {n: "constexpr" if n in launch else types.get(n, "i32") for n in fn.arg_names}
    hinted = [n for n in fn.arg_names if sig[n].startswith("*") or n in aligned]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in hinted}
    consts = {(fn.arg_names.index(n),): v for n, v in launch.items() if n in fn.arg_names}
    src = ASTSource(fn, sig, consts, attrs)
    options = dict(num_warps=launch.get("num_warps", 4), num_stages=launch.get("num_stages", 3))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def _tool(name: str, *args: str) -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return subprocess.run([path, *args], capture_output=True, text=True, check=True).stdout


def _loops(sass: str) -> list[dict]:
    """Each innermost loop of the machine code (a backward branch to a label), in code
    order: its instructions per iteration (per thread), how many are matrix multiplies (HGMMA/HMMA), special-function
    ops (MUFU: exp2, reciprocal) and local-memory spill accesses (LDL/STL)."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, ln in enumerate(lines) if (m := _LABEL.match(ln))}
    spans = sorted((labels[m.group(1)], i) for i, ln in enumerate(lines)
                   if (m := _BRANCH.search(ln)) and labels.get(m.group(1), i) < i)
    out = []
    for a, b in spans:
        if any(a <= c and d <= b and (c, d) != (a, b) for c, d in spans):
            continue  # an outer loop: its inner loops are counted
        ops = collections.Counter(op.group(1) for ln in lines[a:b + 1] if (op := _OPCODE.match(ln)))
        if sum(ops.values()) < 8:  # the end-of-kernel spin
            continue
        out.append(dict(instructions=sum(ops.values()), mma=ops["HGMMA"] + ops["HMMA"],
                        mufu=ops["MUFU"], spill=ops["LDL"] + ops["STL"], ops=dict(ops)))
    return out


def census(compiled) -> dict:
    """Registers, spill stack and shared memory per thread block, and the loops' counts."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = _tool("nvdisasm", "-c", path)
        usage = _tool("cuobjdump", "-res-usage", path)
    res = dict(re.findall(r"(REG|STACK):(\d+)", usage))
    return dict(registers=int(res["REG"]), stack=int(res["STACK"]),
                shared=compiled.metadata.shared, loops=_loops(sass))
