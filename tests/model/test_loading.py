"""Bases built on the meta device and given their weights module by module (drawn, or read from safetensors files),
the same whatever the grouping, as sharded runs do."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from seer.model.config import ModelConfig
from seer.model.loading import load_causal_lm, materialize

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
        materialize(grouped, "cpu", group)
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


def _saved(tmp_path, **save_options):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**ARCH))
    model.save_pretrained(tmp_path, **save_options)
    return model


@pytest.mark.parametrize("shards", ["1 file", "several files"])
def test_a_stored_model_is_read_group_by_group(tmp_path, shards):
    reference = _saved(tmp_path, **({"max_shard_size": "40KB"} if shards == "several files" else {}))
    assert (len(list(tmp_path.glob("*.safetensors"))) > 1) == (shards == "several files")
    torch.manual_seed(5)  # the seed plays no part in stored weights
    model = load_causal_lm(ModelConfig(name_or_path=str(tmp_path), dtype="float32"), "meta")
    assert all(p.is_meta for p in model.parameters())
    for group in [*reversed(model.model.layers), model.model, model]:
        materialize(model, "cpu", group)
    assert model.state_dict().keys() == reference.state_dict().keys()
    for name, value in reference.state_dict().items():  # weights from the files, RoPE buffers from the config
        assert torch.equal(model.state_dict()[name], value), name


def test_a_stored_model_the_files_do_not_hold_whole_loads_on_the_cpu(tmp_path, caplog):
    reference = _saved(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = load_causal_lm(ModelConfig(name_or_path=str(tmp_path), dtype="float32"), "meta")
    assert "do not hold model.layers.1.mlp.up_proj.weight" in caplog.text
    assert not hasattr(model, "seer_weights") and not any(p.is_meta for p in model.parameters())
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight,
                               reference.model.layers[0].self_attn.q_proj.weight)


def test_a_stored_model_without_safetensors_loads_on_the_cpu(tmp_path, caplog):
    reference = _saved(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    model = load_causal_lm(ModelConfig(name_or_path=str(tmp_path), dtype="float32"), "meta")
    assert "has no safetensors files" in caplog.text
    assert not any(p.is_meta for p in model.parameters()) and model.device.type == "cpu"
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
