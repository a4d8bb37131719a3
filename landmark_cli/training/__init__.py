"""Training landmarks into a model (finetune) and rebuilding the paper's LLaMA-7B (recover)."""
