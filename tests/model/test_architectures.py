"""Architectures beyond the four families of test_attention.py, as tiny random models: the gates get each one's pre-RoPE
Q and K wherever its Q/K norm sits (over the whole projection: OLMo-2; per head after the heads' transpose: Apertus,
EXAONE-4; with a weight per head: Cohere), models whose attention seer cannot stand in for are refused before
anything runs (capped logits, RoPE per layer type, learned sinks, a fused QKV projection), and windowed layers
(sliding, chunked) run through seer while their keys fit the window and are refused beyond it, in the model and in
the CLIs' pre-flight; sparse decode refuses windowed models."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from seer.checks import ConfigError
from seer.gates.config import GateConfig
from seer.model import attach_gates, freeze_base_model, gates
from seer.model.attention import attention_windows, prepare_model
from seer.model.config import ModelConfig
from seer.preflight import check_length, model_shape
from seer.sparsity.config import SparsityConfig
from seer.sparsity.selectors import Oracle

COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
              pad_token_id=2)
GATE = GateConfig(block_size=16, hidden_size=24, k_pool=["max", "min"])

# where each family's Q/K norm sits: its output as the model computes it -> [B, heads, N, D]
NORM_LAYOUTS = {
    "qwen3": lambda x, heads: x.transpose(1, 2),  # per head, on [B, N, heads, D]
    "olmo2": lambda x, heads: x.unflatten(-1, (heads, -1)).transpose(1, 2),  # over the whole projection
    "apertus": lambda x, heads: x,  # per head, after the transpose to [B, heads, N, D]
    "exaone4": lambda x, heads: x,
    "cohere": lambda x, heads: x.transpose(1, 2),  # per head with a weight per head, on [B, N, heads, D]
}
NORM_OPTIONS = {"cohere": {"use_qk_norm": True}}


def _model(model_type: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**COMMON, **overrides})
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type", sorted(NORM_LAYOUTS))
def test_the_gates_see_each_familys_normed_pre_rope_qk(model_type):
    options = NORM_OPTIONS.get(model_type, {})
    model, plain = _model(model_type, **options), _model(model_type, **options)
    for layer in model.model.layers:  # norm weights off 1, so a norm left out or misapplied shows
        for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
            torch.nn.init.normal_(norm.weight, mean=1.0, std=0.5)
    plain.load_state_dict(model.state_dict())
    seen = {}
    for i, layer in enumerate(plain.model.layers):
        for which in ("q", "k"):
            getattr(layer.self_attn, f"{which}_norm").register_forward_hook(
                lambda _m, _a, out, key=(i, which): seen.__setitem__(key, out.detach()))
    ctx = attach_gates(model, GATE)
    freeze_base_model(model)
    ids = torch.randint(3, 300, (2, 70))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits)  # dense mode changes nothing
    records = []
    with ctx.running("distill", consumer=records.append), torch.no_grad():
        model.model(ids)
    assert [r.layer_idx for r in records] == [0, 1]
    heads = {"q": COMMON["num_attention_heads"], "k": COMMON["num_key_value_heads"]}
    for rec in records:
        q, k = (NORM_LAYOUTS[model_type](seen[(rec.layer_idx, w)], heads[w]) for w in ("q", "k"))
        assert q.shape[:3] == (2, heads["q"], 70) and k.shape[:3] == (2, heads["k"], 70)
        torch.testing.assert_close(rec.logits, gates(model)[rec.layer_idx](q, k))


@pytest.mark.parametrize("model_type,why", [
    ("gemma2", "gemma2 caps its attention logits \\(attn_logit_softcapping=50.0\\), which seer's attention does not"),
    ("gemma3_text", "gemma3_text has RoPE settings per layer type \\(full_attention, sliding_attention\\)"),
    ("gpt_oss", "GptOssForCausalLM's attention learns sink logits \\(`sinks`, layers \\[0, 1\\]\\)"),
    ("phi3", "Phi3ForCausalLM has no attention layers with q_proj/k_proj/layer_idx"),
])
def test_attention_seer_cannot_stand_in_for_is_refused(model_type, why):
    model = _model(model_type)
    with pytest.raises(ValueError, match=why):
        prepare_model(model, 16)
    assert getattr(model, "seer_context", None) is None
    if model_type in ("gemma2", "gemma3_text"):  # from the config alone: the CLIs refuse before loading a model
        arch = dict(model_type=model_type, **COMMON)
        with pytest.raises(ConfigError, match="model: random-" + why.split(" ")[0]):
            model_shape(ModelConfig(random_init=True, architecture=arch))


def test_windowed_layers_run_sparse_within_their_window_and_are_refused_beyond_it():
    model, plain = _model("mistral", sliding_window=48), _model("mistral", sliding_window=48)
    ctx = prepare_model(model, 16)
    sparse = SparsityConfig(method="topk", target_density=0.5, dense_last_rows=0)
    short, long = torch.randint(3, 300, (1, 45)), torch.randint(3, 300, (1, 70))
    with ctx.running("sparse", selector=Oracle(), sparsity=sparse), torch.no_grad():
        out = model(short).logits
        assert set(ctx.densities()) == {0, 1} and all(d < 1 for d in ctx.densities().values())
        assert (out - plain(short).logits).abs().max() > 1e-4  # the selection really dropped blocks
        with pytest.raises(ValueError, match="layer 0 attends within a window of 48 tokens \\(sliding or chunked\\), "
                                             "which seer's block selection does not model; 70 keys exceed it"):
            model(long)
    with torch.no_grad():  # dense mode: the model's own windowed attention, at any length
        torch.testing.assert_close(model(long).logits, plain(long).logits)


def test_attention_windows_read_layer_types_sliding_and_chunked():
    cfg = AutoConfig.for_model("mistral", **COMMON, sliding_window=4096)  # no layer_types: every layer
    assert attention_windows(cfg) == {0: (4096, False), 1: (4096, False)}
    assert attention_windows(AutoConfig.for_model("mistral", **COMMON, sliding_window=None)) == {}
    cfg = AutoConfig.for_model("qwen2", **COMMON, use_sliding_window=False, sliding_window=4096)
    assert attention_windows(cfg) == {}
    cfg = AutoConfig.for_model("exaone4", **COMMON, sliding_window=1024,
                               layer_types=["sliding_attention", "full_attention"])
    assert attention_windows(cfg) == {0: (1024, False)}
    cfg = AutoConfig.for_model("llama4_text", **{**COMMON, "num_hidden_layers": 4}, attention_chunk_size=8192)
    assert attention_windows(cfg) == {0: (8192, True), 1: (8192, True), 2: (8192, True)}


def test_the_pre_flight_refuses_lengths_beyond_a_window():
    arch = dict(model_type="mistral", **COMMON, sliding_window=512)
    shape = model_shape(ModelConfig(random_init=True, architecture=arch))
    assert shape["window"] == 512
    check_length("data.seq_len=512", 512, shape, None)
    with pytest.raises(ConfigError, match="data.seq_len=1024: longer than the model's attention window of 512 tokens "
                                          "\\(sliding or chunked\\)"):
        check_length("data.seq_len=1024", 1024, shape, None)
    assert model_shape(ModelConfig(random_init=True, architecture=dict(arch, sliding_window=None)))["window"] is None


FAMILIES = ["apertus", "cohere", "exaone4", "gemma", "glm", "granite", "helium", "mixtral", "olmo2", "phi", "qwen2_moe",
            "qwen3_moe", "smollm3", "stablelm", "starcoder2"]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_more_families_run_dense_and_sparse_through_seer(model_type):
    """Gates attached change nothing in dense mode; a dense budget gives the model's own outputs; top-k at 0.3 keeps
    fewer blocks and changes them."""
    model, plain = _model(model_type), _model(model_type)
    ctx = attach_gates(model, GATE)
    ids = torch.randint(3, 300, (1, 70))
    with torch.no_grad():
        want = plain(ids).logits
        torch.testing.assert_close(model(ids).logits, want)
        with ctx.running("sparse", sparsity=SparsityConfig(method="dense", target_density=None)):
            torch.testing.assert_close(model(ids).logits, want)
        with ctx.running("sparse", sparsity=SparsityConfig(method="topk", target_density=0.3, dense_last_rows=0)):
            assert (model(ids).logits - want).abs().max() > 1e-4
            assert set(ctx.densities()) == {0, 1} and max(ctx.densities().values()) < 1


def test_sparse_decode_refuses_windowed_layers_and_models_seer_cannot_stand_in_for():
    """transformers keeps only a window's keys in a windowed layer's cache, which sparse decode's block positions do
    not follow: decode gates and Quest refuse such a model, and so does the pre-flight of a decode budget."""
    from seer.gates.decode_gate import DecodeGateConfig
    from seer.model.decode import attach_decode_gates, attach_quest_decode
    from seer.preflight import check_decode

    model = _model("mistral", sliding_window=48)
    prepare_model(model, 16)
    with pytest.raises(ValueError, match="sparse decode does not model windowed attention \\(sliding or chunked; "
                                         "layers \\[0, 1\\]\\)"):
        attach_quest_decode(model)
    with pytest.raises(ValueError, match="sparse decode does not model windowed attention"):
        attach_decode_gates(model, DecodeGateConfig(block_size=16, hidden_size=24))
    with pytest.raises(ValueError, match="learns sink logits"):
        attach_decode_gates(_model("gpt_oss"), DecodeGateConfig(block_size=16, hidden_size=24))
    with pytest.raises(ConfigError, match="decode_sparsity: sparse decode does not model this model's windowed "
                                          "attention layers"):
        check_decode({"decode_sparsity": {"token_budget": 256}}, {"window": 48})
    assert check_decode({"decode_sparsity": {}}, {"window": 48}) is None  # dense decode: nothing to refuse


def test_a_windowed_layer_keeps_its_mask_while_tracing(monkeypatch):
    """Under CUDA-graph capture or torch.compile seer's mask function skips the mask of a plain causal prefill (so the
    gates run); a windowed layer's mask is kept, or SDPA would attend whole causal rows past the window."""
    import transformers.masking_utils as mu
    import transformers.utils.import_utils as iu

    ids = torch.randint(3, 300, (1, 70))
    for model_type, window in (("mistral", dict(sliding_window=32)),
                               ("llama4_text", dict(attention_chunk_size=32, no_rope_layers=[1, 1]))):
        model, plain = _model(model_type, **window), _model(model_type, **window)
        prepare_model(model, 16)
        with torch.no_grad():
            want = plain(ids, use_cache=False).logits
            with monkeypatch.context() as patch:
                for module in (mu, iu):
                    patch.setattr(module, "is_tracing", lambda *args, **kwargs: True)
                torch.testing.assert_close(model(ids, use_cache=False).logits, want, msg=model_type)
