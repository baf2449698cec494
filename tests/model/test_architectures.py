"""Architectures beyond the four families of test_attention.py, as tiny random models: the gates get each one's pre-RoPE
Q and K wherever its Q/K norm sits (over the whole projection: OLMo-2; per head after the heads' transpose: Apertus,
EXAONE-4; with a weight per head: Cohere); models whose attention seer cannot stand in for are refused before
anything runs (capped logits, learned sinks, no full-attention layer, a fused QKV projection); in hybrid models
(Gemma-3, EXAONE-4, Llama-4) the windowed layers keep the model's own attention in every mode, also while tracing,
get no gate and are not counted, while seer selects blocks in the full-attention layers, in prefill and in decode."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from seer.checks import ConfigError
from seer.gates import rope_frequencies
from seer.gates.config import GateConfig
from seer.model import attach_gates, freeze_base_model, gates
from seer.model.attention import attention_windows, prepare_model
from seer.model.config import ModelConfig
from seer.model.gate_io import load_gates, save_gates
from seer.preflight import model_shape
from seer.sparsity.config import SparsityConfig
from tests.tiny import distill_records

COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
              pad_token_id=2)
GATE = GateConfig(block_size=16, hidden_size=24, k_pool=["max", "min"])
FULL = dict(layer_types=["full_attention", "full_attention"])
HYBRID = dict(layer_types=["sliding_attention", "full_attention"], sliding_window=32)

# where each family's Q/K norm sits: its output as the model computes it -> [B, heads, N, D]
NORM_LAYOUTS = {
    "qwen3": lambda x, heads: x.transpose(1, 2),  # per head, on [B, N, heads, D]
    "olmo2": lambda x, heads: x.unflatten(-1, (heads, -1)).transpose(1, 2),  # over the whole projection
    "apertus": lambda x, heads: x,  # per head, after the transpose to [B, heads, N, D]
    "exaone4": lambda x, heads: x,
    "cohere": lambda x, heads: x.transpose(1, 2),  # per head with a weight per head, on [B, N, heads, D]
}
OPTIONS = {"cohere": {"use_qk_norm": True}, "exaone4": FULL}


def _model(model_type: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**COMMON, **overrides})
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type", sorted(NORM_LAYOUTS))
def test_the_gates_see_each_familys_normed_pre_rope_qk(model_type):
    options = OPTIONS.get(model_type, {})
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
    attach_gates(model, GATE)
    freeze_base_model(model)
    records = distill_records(model, plain, torch.randint(3, 300, (2, 70)))
    assert [r.layer_idx for r in records] == [0, 1]
    heads = {"q": COMMON["num_attention_heads"], "k": COMMON["num_key_value_heads"]}
    for rec in records:
        q, k = (NORM_LAYOUTS[model_type](seen[(rec.layer_idx, w)], heads[w]) for w in ("q", "k"))
        assert q.shape[:3] == (2, heads["q"], 70) and k.shape[:3] == (2, heads["k"], 70)
        torch.testing.assert_close(rec.logits, gates(model)[rec.layer_idx](q, k))


REFUSED = [
    ("gemma2", {}, "gemma2 caps its attention logits \\(attn_logit_softcapping=50.0\\), which seer's attention "
                   "does not"),
    ("mistral", dict(sliding_window=4096), "every attention layer of mistral attends within a window \\(4096 "
                                           "tokens, sliding or chunked\\): seer has no full-attention layer to select "
                                           "blocks in"),
    ("gpt_oss", FULL, "GptOssForCausalLM's attention learns sink logits \\(`sinks`, layers \\[0, 1\\]\\)"),
    ("phi3", {}, "Phi3ForCausalLM has no causal self-attention layers with q_proj/k_proj/layer_idx"),
]


@pytest.mark.parametrize("model_type,options,why", REFUSED)
def test_attention_seer_cannot_stand_in_for_is_refused(model_type, options, why):
    model = _model(model_type, **options)
    with pytest.raises(ValueError, match=why):
        prepare_model(model, 16)
    assert getattr(model, "seer_context", None) is None
    if model_type in ("gemma2", "mistral"):  # from the config alone: the CLIs refuse before loading a model
        arch = dict(model_type=model_type, **COMMON, **options)
        with pytest.raises(ConfigError, match=f"model: random-{model_type}: {why.split(': ')[0][:40]}"):
            model_shape(ModelConfig(random_init=True, architecture=arch))


@pytest.mark.parametrize("model_type", ["exaone4", "gemma3_text"])
def test_hybrid_models_select_in_their_full_layers_and_keep_their_windows(model_type, tmp_path):
    """Layer 0 slides a 32-token window, layer 1 attends whole rows: at 70 tokens only layer 1 has a gate, is
    distilled, selected and counted; a dense budget gives the model's own outputs, a sparse one changes them; gate
    files round-trip; Gemma-3's gates take the full-attention layers' RoPE (theta 1e6, not the local 1e4)."""
    model, plain = _model(model_type, **HYBRID), _model(model_type, **HYBRID)
    ctx = attach_gates(model, GATE)
    freeze_base_model(model)
    assert sorted(gates(model)) == [1]
    if model_type == "gemma3_text":
        want_freq, _ = rope_frequencies(model.config, GATE.hidden_size)
        assert torch.allclose(want_freq, 1.0 / 1e6 ** (torch.arange(0, 24, 2) / 24))
        torch.testing.assert_close(gates(model)[1].rope_inv_freq, want_freq)
    ids = torch.randint(3, 300, (2, 70))
    with torch.no_grad():
        want = plain(ids).logits
        torch.testing.assert_close(model(ids).logits, want)
        records = []
        with ctx.running("distill", consumer=records.append):
            torch.testing.assert_close(model(ids).logits, want)
        assert [r.layer_idx for r in records] == [1]
        with ctx.running("sparse", sparsity=SparsityConfig(method="dense", target_density=None)):
            torch.testing.assert_close(model(ids).logits, want)
        with ctx.running("sparse", sparsity=SparsityConfig(method="topk", target_density=0.3, dense_last_rows=0)):
            sparse = model(ids).logits
            assert (sparse - want).abs().max() > 1e-4
            assert set(ctx.densities()) == {1} and ctx.densities()[1] < 1
    save_gates(tmp_path / "g", model, model_type)
    again = _model(model_type, **HYBRID)
    load_gates(again, tmp_path / "g")
    assert sorted(gates(again)) == [1]
    with torch.no_grad(), again.seer_context.running(
            "sparse", sparsity=SparsityConfig(method="topk", target_density=0.3, dense_last_rows=0)):
        torch.testing.assert_close(again(ids).logits, sparse)


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


FAMILIES = ["apertus", "cohere", "exaone4", "gemma", "glm", "granite", "helium", "mixtral", "olmo2", "phi", "qwen2_moe",
            "qwen3_moe", "smollm3", "stablelm", "starcoder2"]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_more_families_run_dense_and_sparse_through_seer(model_type):
    """Gates attached change nothing in dense mode; a dense budget gives the model's own outputs; top-k at 0.3 keeps
    fewer blocks and changes them."""
    options = OPTIONS.get(model_type, {})
    model, plain = _model(model_type, **options), _model(model_type, **options)
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


def test_sparse_decode_of_a_hybrid_selects_in_its_full_layers():
    """Quest alone on EXAONE-4 with a 32-token window in layer 0: greedy generation past the window (transformers keeps
    only the window's keys in that layer's cache) keeps layer 0's own attention; every block kept gives dense decode,
    a small budget a sparse one in layer 1; decode gates sit on layer 1 alone; learned sinks are refused."""
    from seer.gates.decode_gate import DecodeGateConfig
    from seer.model.decode import attach_decode_gates, attach_quest_decode, decode_gates
    from seer.sparsity.decode import DecodeSparsityConfig
    from tests.tiny import padded_generation

    def quest(budget: int | None):
        model = _model("exaone4", **HYBRID)
        prepare_model(model, 16)
        ctx = attach_quest_decode(model, 16)
        assert sorted(ctx.gates) == [1]
        if budget is not None:
            ctx.enable(DecodeSparsityConfig(token_budget=budget, estimate="quest", estimate_weight=1.0))
        return model

    dense = padded_generation(quest(None), new=24)[0]
    torch.testing.assert_close(padded_generation(quest(4096), new=24)[0], dense, rtol=1e-5, atol=1e-5)
    sparse = quest(32)
    assert not torch.allclose(padded_generation(sparse, new=24)[0], dense)
    assert 0 < sparse.seer_decode.mean_density() < 1
    gated = _model("exaone4", **HYBRID)
    attach_decode_gates(gated, DecodeGateConfig(block_size=16, hidden_size=24))
    assert sorted(decode_gates(gated)) == [1]
    with pytest.raises(ValueError, match="learns sink logits"):
        attach_decode_gates(_model("gpt_oss", **FULL), DecodeGateConfig(block_size=16, hidden_size=24))


def test_a_windowed_layer_keeps_its_mask_while_tracing(monkeypatch):
    """Under CUDA-graph capture or torch.compile seer's mask function skips the mask of a plain causal prefill (so the
    gates run); a windowed layer then builds its window's mask itself, or SDPA would attend whole causal rows past the
    window (sliding: EXAONE-4; chunked: Llama-4)."""
    import transformers.masking_utils as mu
    import transformers.utils.import_utils as iu

    ids = torch.randint(3, 300, (1, 70))
    for model_type, options in (("exaone4", HYBRID),
                                ("llama4_text", dict(attention_chunk_size=32, no_rope_layers=[1, 0]))):
        model, plain = _model(model_type, **options), _model(model_type, **options)
        prepare_model(model, 16)
        assert attention_windows(model.config)
        with torch.no_grad():
            want = plain(ids, use_cache=False).logits
            with monkeypatch.context() as patch:
                for module in (mu, iu):
                    patch.setattr(module, "is_tracing", lambda *args, **kwargs: True)
                torch.testing.assert_close(model(ids, use_cache=False).logits, want, msg=model_type)


def _multimodal(model_type: str):
    """A tiny image-text model of ``model_type`` on the meta device (its modules only)."""
    from transformers import AutoModelForImageTextToText

    config = AutoConfig.for_model(model_type)
    text = config.get_text_config()
    for part in (text, config.vision_config):
        for key, value in {**COMMON, "num_hidden_layers": 2, "pad_token_id": 0}.items():
            if hasattr(part, key):
                setattr(part, key, value)
    if hasattr(text, "cross_attention_layers"):
        text.cross_attention_layers = [1]
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def test_only_causal_self_attention_layers_are_seers():
    """Mllama's cross-attention layer keeps its own attention (seer takes its self-attention layer, and counts both in
    gate files and per-layer settings); PaliGemma's
    prefix-LM attention is not causal, so the model is refused; Gemma-3's image-text model is its text layers."""
    from seer.model.attention import attention_layers

    from seer.model.gate_io import config_signature, model_signature

    mllama = _multimodal("mllama")
    assert [type(m).__name__ for m in attention_layers(mllama)] == ["MllamaTextSelfAttention"]
    # gate files and per-layer settings count the model's layers, the cross-attention one too (gates go by layer_idx)
    assert model_signature(mllama)["num_layers"] == config_signature(mllama.config)["num_layers"] == 2
    assert prepare_model(mllama, 16).num_layers == 2
    with pytest.raises(ValueError, match="PaliGemmaForConditionalGeneration has no causal self-attention layers"):
        prepare_model(_multimodal("paligemma"), 16)
    assert [m.layer_idx for m in attention_layers(_multimodal("gemma3"))] == [0, 1]
