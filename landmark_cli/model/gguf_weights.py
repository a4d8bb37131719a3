"""A LLaMA-family GGUF file's tensors under their Hugging Face names, read from its memory map.

A GGUF model's weights are read from its own file, never from a float32 copy of it
(loading.read_weights keeps what it reads here, in the dtypes in use, for the next load).
Each tensor is read where the file keeps it, and

- tensors in the two group formats the native answer step reads (q4_1, q8_0: see
  model/blocks.py, whose layout is ggml's) are handed over packed, as the file holds them,
  or unpacked with `blocks.unpack`;
- every other type (float32, float16, bfloat16, the k-quants, ...) is dequantized to
  float32 by the gguf package.

llama.cpp's converter reorders the rows of the query and key projections (its RoPE
pairs a head's dimensions as (0, 1), (2, 3), ... where Hugging Face's pairs (i, i + D/2));
`rows_to_hf` puts them back, which for packed rows is a reordering of whole rows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from landmark_cli.errors import ModelError
from landmark_cli.model import blocks

GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
          "output.weight": "lm_head.weight"}
LAYER = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
         "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
         "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
SKIPPED = ("rope_freqs.weight",)  # llama3's RoPE factors: the config's rope scaling gives them
PACKED_TYPES = {"Q4_1": "q4_1", "Q8_0": "q8_0"}


def hf_name(name: str) -> str | None:
    """A GGUF tensor name -> its Hugging Face name; None for a tensor the model does not use."""
    if name in GLOBAL:
        return GLOBAL[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in LAYER and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{LAYER[parts[2]]}.weight"
    if name in SKIPPED:
        return None
    raise ModelError(f"unexpected tensor {name!r} in the GGUF file", "landmark runs LLaMA-family GGUF models")


def rows_to_hf(rows: int, heads: int) -> torch.Tensor:
    """The row order that takes a GGUF query or key projection ([heads * D, dim], `heads`
    of them) back to Hugging Face's: within each head, GGUF row 2j is HF row j and GGUF
    row 2j + 1 is HF row j + D/2."""
    half = rows // heads // 2
    return torch.arange(rows).reshape(heads, half, 2).transpose(1, 2).reshape(rows)


def read_gguf(path: Path, cast: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
              packed: bool = False) -> dict[str, torch.Tensor]:
    """The model's tensors from GGUF file `path`, by Hugging Face name, as float32 tensors
    passed through `cast`; with `packed`, those the file holds in a packed format stay
    packed (uint8 rows, blocks.PACKED)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        arch = reader.fields["general.architecture"].contents()
        n_heads = int(reader.fields[f"{arch}.attention.head_count"].contents())
        kv = reader.fields.get(f"{arch}.attention.head_count_kv")
        heads = {"q_proj": n_heads, "k_proj": int(kv.contents()) if kv is not None else n_heads}
    except Exception as e:  # gguf raises several types for a damaged file
        raise ModelError(f"cannot read GGUF file {path}: {e}".splitlines()[0],
                         "the file may be incomplete: download it again") from None
    out = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            continue
        cols = int(t.shape[0])
        if t.tensor_type.name in PACKED_TYPES:
            w = torch.from_numpy(np.array(t.data)).reshape(int(t.shape[-1]), -1)
        else:
            w = _dequantized(path, t)
        proj = name.split(".")[-2]
        if proj in heads:
            w = w[rows_to_hf(w.shape[0], heads[proj])]
        if w.dtype == blocks.PACKED and not packed:
            w = blocks.unpack(w, cols)
        out[name] = w if w.dtype == blocks.PACKED else cast(w)
    return out


def _dequantized(path: Path, t) -> torch.Tensor:
    """A tensor of any other type as float32, in the shape Hugging Face gives it."""
    from gguf import dequantize

    try:
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
    except NotImplementedError as e:
        raise ModelError(f"{path}: tensor {t.name} is of type {t.tensor_type.name}, which the gguf package "
                         "cannot read", "use a GGUF file of another quantization") from e
    return torch.from_numpy(w.copy()).reshape([int(n) for n in reversed(t.shape)])
