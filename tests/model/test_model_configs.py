"""conf/model/qwen2_5_coder_0_5b.yaml: Qwen2.5-Coder-0.5B-Instruct from the hub, or a local GGUF given as overrides."""

import pytest
from omegaconf import OmegaConf

from seer.checks import ConfigError, build
from seer.config import compose
from seer.model.config import ModelConfig
from seer.model.loading import load_config, model_id, resolve_model_path


def _model(overrides=()):
    return build(ModelConfig, "model", OmegaConf.to_container(
        compose(["model=qwen2_5_coder_0_5b", *overrides], "eval").model, resolve=True))


def test_qwen_coder_composes_with_its_shape():
    model = _model()
    assert model.name_or_path == "Qwen/Qwen2.5-Coder-0.5B-Instruct" and model.gguf_file is None
    config = load_config(build(ModelConfig, "model", {**vars(model), "random_init": True}))
    assert (config.model_type, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == \
        ("qwen2", 24, 14, 2)
    assert config.hidden_size // config.num_attention_heads == 64 and config.max_position_embeddings == 32768
    assert config.tie_word_embeddings


def test_qwen_coder_from_a_local_gguf():
    model = _model(["model.name_or_path=/root/models/qwen05", "model.gguf_file=qwen05.gguf"])
    assert model_id(model) == "/root/models/qwen05/qwen05.gguf"
    with pytest.raises(ConfigError, match=r"model.name_or_path='/nowhere/qwen05': no such folder"):
        resolve_model_path(_model(["model.name_or_path=/nowhere/qwen05", "model.gguf_file=qwen05.gguf"]))
