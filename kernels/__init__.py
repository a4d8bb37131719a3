"""Attention kernels for landmark: Triton fast paths, each with a plain-torch reference.

    kernels.rope                 rope_tables, apply_rope (Hugging Face LLaMA convention)
    kernels.retrieval_attention  retrieval_attention: few queries over dense context +
                                 blocks read in place from the KV store (decode/answer)
    kernels.landmark_attention   landmark_attention: grouped-softmax causal attention,
                                 forward and backward (training, trained-mode reading)

Import from the submodules (`from kernels.rope import apply_rope`): this package does not
re-export, so that `kernels.landmark_attention` always names the module. Triton is
optional: without it, or on CPU, `impl="auto"` runs the torch reference.
"""
