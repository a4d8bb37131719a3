"""Our compact forward against transformers' own forward on tiny random models."""

import pytest
import torch
from tiny import make_tiny_model

from landmark_cli.model.loading import load_model


@pytest.mark.parametrize("tie,heads,kv_heads", [(True, 4, 2), (False, 4, 4), (True, 8, 1)])
def test_logits_match_transformers(tmp_path, tie, heads, kv_heads):
    from transformers import AutoModelForCausalLM

    d = make_tiny_model(tmp_path / "m", tie=tie, heads=heads, kv_heads=kv_heads, seed=heads + kv_heads)
    ours = load_model(str(d))
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = torch.randint(0, ours.model.cfg.vocab_size, (97,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = ref(ids[None]).logits[0]
        got = ours.model.forward(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4


def test_taking_the_weights_fuses_each_layer_out_of_them(tmp_path):
    """Handed over (take=True), the dict gives up every layer tensor as it is fused, so a
    model being loaded is not held twice; by default the caller's dict is left whole."""
    from landmark_cli.model.llama import Llama

    lm = load_model(str(make_tiny_model(tmp_path / "m", tie=False)))
    weights = lm.model.state_dict()
    kept = Llama(lm.model.cfg, weights)
    assert len(weights) == len(lm.model.state_dict())
    taken = Llama(lm.model.cfg, weights, take=True)
    assert sorted(weights) == ["model.embed_tokens.weight", "model.norm.weight"]
    ids = torch.arange(12)
    with torch.inference_mode():
        assert torch.equal(kept.forward(ids), taken.forward(ids))
        assert torch.equal(kept.forward(ids), lm.model.forward(ids))
