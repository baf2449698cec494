"""Random-weight bases: built on the meta device and drawn module by module, the same whatever the grouping."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from seer.model.config import ModelConfig
from seer.model.loading import init_random_weights, load_causal_lm

ARCH = {"model_type": "llama", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "initializer_range": 0.05}


def _build(seed: int, device="cpu", **arch):
    torch.manual_seed(seed)
    return load_causal_lm(ModelConfig(random_init=True, architecture={**ARCH, **arch}, dtype="float32"), device)


@pytest.mark.parametrize("tied", [False, True])
def test_drawn_in_groups_in_any_order_equals_drawn_at_once(tied):
    whole = _build(7, tie_word_embeddings=tied)
    assert not any(t.is_meta for t in [*whole.parameters(), *whole.buffers()])
    state = torch.random.get_rng_state()
    grouped = _build(7, "meta", tie_word_embeddings=tied)
    assert all(p.is_meta for p in grouped.parameters())
    for group in [grouped.lm_head, *reversed(grouped.model.layers), grouped.model, grouped]:  # head first: tied
        init_random_weights(grouped, "cpu", group)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is left alone
    assert whole.state_dict().keys() == grouped.state_dict().keys()
    for name, value in whole.state_dict().items():
        assert torch.equal(grouped.state_dict()[name], value), name
    for model in (whole, grouped):
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied


def test_values_follow_the_models_own_initialisation():
    model = _build(3)
    reference = AutoModelForCausalLM.from_config(AutoConfig.for_model(**ARCH))
    for name, value in reference.named_buffers():  # RoPE frequencies
        torch.testing.assert_close(dict(model.named_buffers())[name], value, rtol=0, atol=0)
    layer = model.model.layers[1]
    assert torch.equal(layer.input_layernorm.weight, torch.ones(32))
    for weight in (layer.self_attn.q_proj.weight, layer.mlp.down_proj.weight, model.model.embed_tokens.weight):
        assert abs(weight.mean().item()) < 0.01 and abs(weight.std().item() - 0.05) < 0.01
    # every module its own draw: no two layers alike, and another seed gives other weights
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, layer.self_attn.q_proj.weight)
    assert not torch.equal(_build(4).model.layers[1].self_attn.q_proj.weight, layer.self_attn.q_proj.weight)
