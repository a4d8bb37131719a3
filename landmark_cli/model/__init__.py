"""The LLaMA-family model: our forward pass (llama), loading a model from disk (loading),
and the trained-landmark checkpoint format (checkpoint)."""
