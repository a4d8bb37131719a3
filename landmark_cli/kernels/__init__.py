"""Attention kernels for landmark: Triton fast paths, each with a plain-torch reference.

    rope                 rope_tables, apply_rope (Hugging Face LLaMA convention)
    retrieval_attention  retrieval_attention: few queries over dense context + blocks
                         read in place from the KV store (decode/answer)
    landmark_attention   landmark_attention: grouped-softmax causal attention, forward
                         and backward (training, trained-mode reading)
    cpu_step             an answer token through the whole model in one native call on
                         the CPU (cpu_step.c, compiled on first use; PyTorch where it
                         cannot be built)

They live inside `landmark_cli` because the top-level import name `kernels` belongs to
Hugging Face's `kernels` distribution, which transformers requires. Import from the
submodules (`from landmark_cli.kernels.rope import apply_rope`): this package does not
re-export, so that `landmark_cli.kernels.landmark_attention` always names the module.
Triton is optional: without it, or on CPU, `impl="auto"` runs the torch reference.
"""
