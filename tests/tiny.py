"""A tiny randomly initialised LLaMA (with a real fast tokenizer) for unit tests."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("the pass key is remember it grass green sky blue sun yellow here we go there and back again "
         "what who when where which year ferry company harbour captain ship launched founded in of a to").split()


def make_tiny_model(path: Path, *, vocab: int = 320, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                    dim: int = 64, context: int = 4096, tie: bool = True, seed: int = 0,
                    model_type: str = "llama") -> Path:
    """Write a random LlamaForCausalLM + byte-level BPE tokenizer to `path` (safetensors)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    corpus = [" ".join(WORDS)] * 4 + ["0123456789 . , ? ! : ; - \n"] * 4
    bpe.train_from_iterator(corpus, vocab_size=vocab - 2, min_frequency=1, special_tokens=["<s>", "</s>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=dim, intermediate_size=dim * 2, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=context,
                      rope_theta=10000.0, tie_word_embeddings=tie, bos_token_id=0, eos_token_id=1)
    cfg.model_type = model_type if model_type != "llama" else cfg.model_type
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger weights than the default init, so attention patterns are not flat
        for n, p in model.named_parameters():
            if "proj" in n:
                p.mul_(4.0)
    model.save_pretrained(path, safe_serialization=True)
    return path


def make_tiny_landmark_model(path: Path, *, mem_freq: int = 7, train_context: int = 256, local_layers: int = 0,
                             local_blocks: int = 1, **kw) -> Path:
    """A tiny model in the reference landmark format: [PAD] and <landmark> added to the
    tokenizer (embedding rows = mean), config with mem_id, mem_freq, train_context_length
    (and landmark_local_layers, landmark_local_blocks when local_layers > 0)."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from landmark_cli.model.checkpoint import LandmarkSpec, add_landmark_tokens, landmark_config, save_checkpoint

    base = make_tiny_model(path.with_name(path.name + "-base"), **kw)
    tok = AutoTokenizer.from_pretrained(base)
    weights = load_file(base / "model.safetensors")
    mem_id = add_landmark_tokens(tok, weights)
    spec = LandmarkSpec(mem_id, mem_freq, train_context, local_layers, local_blocks)
    cfg = landmark_config(json.loads((base / "config.json").read_text()), spec, vocab_size=len(tok))
    return save_checkpoint(path, cfg, weights, tok)


GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def make_tiny_gguf(hf_dir: Path, path: Path) -> dict[str, torch.Tensor]:
    """The tiny model `hf_dir` as llama.cpp would write it to a GGUF file: the embeddings in
    q8_0, layer matrices in q4_1 except the value projections in float16 and the output
    projections in q5_0 (a type read through the gguf package), norms in float32,
    the query and key rows in GGUF's order, the byte-level BPE tokenizer in GGUF's fields.
    Returns the weights the file holds, in Hugging Face names and order, as float32."""
    import json

    import gguf
    from safetensors.torch import load_file

    from landmark_cli.model import blocks

    cfg = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_vocab_size(cfg["vocab_size"])
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if t in ("<s>", "</s>") else gguf.TokenType.NORMAL for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    held = {}
    for name, t in load_file(hf_dir / "model.safetensors").items():
        if name == "model.embed_tokens.weight":
            gname, kind = "token_embd.weight", "q8_0"
        elif name == "model.norm.weight":
            gname, kind = "output_norm.weight", "f32"
        else:
            _, _, i, *rest = name.split(".")
            part = ".".join(rest[:-1])
            gname, kind = f"blk.{i}.{GGUF_NAMES[part]}.weight", "f32" if t.dim() == 1 else "q4_1"
            kind = {"self_attn.v_proj": "f16", "self_attn.o_proj": "q5_0"}.get(part, kind)
        if kind == "f32":
            data, held[name] = t.float().numpy(), t.float()
        elif kind == "f16":
            data, held[name] = t.half().numpy(), t.half().float()
        elif kind == "q5_0":
            q5 = gguf.GGMLQuantizationType.Q5_0
            data = gguf.quants.quantize(t.float().numpy(), q5)
            held[name] = torch.from_numpy(gguf.quants.dequantize(data, q5).copy())
        else:
            packed = blocks.PACKERS[kind](t)
            data, held[name] = packed.numpy(), blocks.unpack(packed, t.shape[1])
        if name.endswith(("q_proj.weight", "k_proj.weight")):  # llama.cpp's row order for its RoPE
            n = heads if "q_proj" in name else kv_heads
            order = torch.arange(t.shape[0]).reshape(n, 2, -1).transpose(1, 2).reshape(-1)
            data = data[order.numpy()]
        raw = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_1": gguf.GGMLQuantizationType.Q4_1,
               "q5_0": gguf.GGMLQuantizationType.Q5_0}.get(kind)
        w.add_tensor(gname, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held
