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
