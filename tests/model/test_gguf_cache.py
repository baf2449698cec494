"""``model.gguf_cache_dir``: SmolLM2's GGUF converted once into a plain folder, which later loads read instead of the
GGUF, giving the same tokenizer, config and logits; an interrupted conversion leaves nothing a later load would
read."""

import dataclasses
import os
import sys

import pytest
import torch

from seer.checks import ConfigError
from seer.config import compose, validate
from seer.model import loading
from seer.model.config import ModelConfig
from seer.model.loading import gguf_cache, load_causal_lm, load_config, load_tokenizer, materialize, model_id

TEXTS = ["Hello, world!", "def f(x):\n    return x  # ünïcödé", "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>"]
GGUF_READERS = ("load_gguf_checkpoint", "read_gguf_metadata")


@pytest.fixture(scope="module")
def smollm2() -> ModelConfig:
    return validate(compose(["model=smollm2", "model.dtype=float32"])).model


@pytest.fixture(scope="module")
def from_gguf(smollm2):
    return load_config(smollm2), load_tokenizer(smollm2), load_causal_lm(smollm2)


@pytest.fixture(scope="module")
def cached(smollm2, tmp_path_factory) -> ModelConfig:
    cfg = dataclasses.replace(smollm2, gguf_cache_dir=str(tmp_path_factory.mktemp("gguf")))
    gguf_cache(cfg)  # the conversion, reading the GGUF
    return cfg


@pytest.fixture(scope="module")
def from_cache(cached):
    """Config, tokenizer and model of ``cached``, loaded with every GGUF reader of transformers failing."""
    with pytest.MonkeyPatch.context() as patch:
        for module in [m for name, m in sys.modules.items() if name.startswith("transformers")]:
            for reader in GGUF_READERS:
                if reader in vars(module):  # not hasattr: transformers' lazy modules would import on demand
                    patch.setattr(module, reader, lambda *a, **k: pytest.fail("the GGUF was read"))
        yield load_config(cached), load_tokenizer(cached), load_causal_lm(cached)


def test_the_tokenizer_is_the_ggufs(from_gguf, from_cache):
    (_, gguf, _), (_, cache, _) = from_gguf, from_cache
    assert type(cache) is type(gguf) and len(cache) == len(gguf) and cache.get_vocab() == gguf.get_vocab()
    for text in TEXTS:
        assert cache(text).input_ids == gguf(text).input_ids, text
        assert cache.decode(gguf(text).input_ids) == gguf.decode(gguf(text).input_ids)
    assert cache.all_special_tokens == gguf.all_special_tokens
    assert (cache.bos_token_id, cache.eos_token_id, cache.pad_token_id) == \
        (gguf.bos_token_id, gguf.eos_token_id, gguf.pad_token_id)
    assert cache.eos_token == "<|endoftext|>"  # model.eos_token applies on each load


def test_the_config_and_logits_are_the_ggufs(smollm2, cached, from_gguf, from_cache):
    (gguf_config, tokenizer, gguf), (cache_config, _, cache) = from_gguf, from_cache
    for config in (cache_config, cache.config):
        for field in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                      "tie_word_embeddings", "rope_parameters", "bos_token_id", "eos_token_id"):
            assert getattr(config, field) == getattr(gguf_config, field), field
    assert not hasattr(cache.config, "quantization_config") and getattr(cache, "hf_quantizer", None) is None
    assert cache.dtype == gguf.dtype == torch.float32 and not cache.training
    assert cache.config._attn_implementation == "sdpa" and cache.config.use_cache is False
    assert model_id(cached) == model_id(smollm2)
    ids = torch.tensor([tokenizer(TEXTS[2] + TEXTS[1]).input_ids])
    with torch.no_grad():
        assert torch.equal(cache(ids).logits, gguf(ids).logits)


def test_the_cache_keeps_dtype_and_rope_scaling(cached, from_gguf):
    scaled = dataclasses.replace(cached, dtype="bfloat16", rope_scaling={"rope_type": "linear", "factor": 2.0,
                                                                         "original_max_position_embeddings": 8192})
    model = load_causal_lm(scaled)
    assert model.dtype == torch.bfloat16 and model.config.rope_parameters["rope_type"] == "linear"
    assert load_config(scaled).rope_parameters == model.config.rope_parameters
    gguf = from_gguf[2]
    assert torch.equal(model.model.embed_tokens.weight, gguf.model.embed_tokens.weight.bfloat16())


def test_a_meta_load_reads_the_converted_safetensors(cached, from_gguf):
    model = load_causal_lm(cached, "meta")
    assert all(p.is_meta for p in model.parameters())
    materialize(model, "cpu")
    reference = from_gguf[2].state_dict()
    assert model.state_dict().keys() == reference.keys()
    for name, value in model.state_dict().items():
        assert torch.equal(value, reference[name]), name


def test_an_interrupted_conversion_leaves_no_cache(smollm2, tmp_path, monkeypatch):
    def interrupted(cfg, folder):
        open(os.path.join(folder, "config.json"), "w").close()
        raise KeyboardInterrupt

    monkeypatch.setattr(loading, "save_gguf_as_pretrained", interrupted)
    cfg = dataclasses.replace(smollm2, gguf_cache_dir=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        load_config(cfg)
    assert os.listdir(tmp_path) == []


def test_the_cache_is_keyed_by_the_ggufs_path_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "save_gguf_as_pretrained", lambda cfg, folder: None)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    cfg = ModelConfig(name_or_path=str(tmp_path), gguf_file="m.gguf", gguf_cache_dir=str(tmp_path / "cache"))
    first = gguf_cache(cfg)
    assert gguf_cache(cfg) == first and str(gguf) in open(os.path.join(first, loading.GGUF_MARKER)).read()
    os.utime(gguf, ns=(0, 10**9))
    assert gguf_cache(cfg) != first


def test_a_cache_dir_needs_a_gguf():
    with pytest.raises(ConfigError, match="model.gguf_cache_dir='/c': caches a GGUF's conversion"):
        ModelConfig(name_or_path="org/name", gguf_cache_dir="/c")
