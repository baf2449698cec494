"""Gates inside tiny Hugging Face models (Llama, Qwen2 with q/k bias, Qwen3 with q/k norm, Mistral)."""

import pytest
import torch

from seer.gates.config import GateConfig
from seer.sparsity.config import SparsityConfig
from seer.kernels import reference
from seer.model import attach_gates, freeze_base_model, gate_parameters, gates
from seer.model.gate_io import load_gates, read_gate_meta, save_gates
from tests.tiny import distill_records, tiny_model

FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]
GATE = GateConfig(block_size=16, hidden_size=24, k_pool=["max", "min"])


def _gated(family, seed=0):
    model = tiny_model(family, seed=seed)
    ctx = attach_gates(model, GATE)
    freeze_base_model(model)
    return model, ctx


def _pre_rope_qk(model, layer_idx, ids):
    """Q and K of one layer before RoPE, computed by hand from the layer input."""
    captured = {}
    layer = model.model.layers[layer_idx]

    def grab(_module, args, kwargs):
        captured["x"] = kwargs.get("hidden_states", args[0] if args else None)

    h = layer.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(ids)
    h.remove()
    attn = layer.self_attn
    x = layer.input_layernorm(captured["x"])
    b, n, _ = x.shape
    q = attn.q_proj(x).view(b, n, -1, attn.head_dim)
    k = attn.k_proj(x).view(b, n, -1, attn.head_dim)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    return q.transpose(1, 2), k.transpose(1, 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_gated_model_distill_records_and_dense_equivalence(family):
    model, _ = _gated(family)
    plain = tiny_model(family)
    ids = torch.randint(0, 300, (2, 70))
    records = distill_records(model, plain, ids)
    assert [r.layer_idx for r in records] == [0, 1]
    for rec in records:
        assert rec.logits.shape == rec.gt.shape == (2, 4, 5, 5) and rec.logits.requires_grad
        torch.testing.assert_close(rec.gt, reference.block_gt(rec.query, rec.key, 16, rec.scale))
        # the gate saw the layer's Q/K before RoPE (bias / q_norm included)
        q, k = _pre_rope_qk(plain, rec.layer_idx, ids)
        torch.testing.assert_close(rec.logits, gates(model)[rec.layer_idx](q, k))


def _sampled_rows_mass64(q, k, rows, block_size):
    """Float64 by hand: each query block's mass over every causal key block, averaged over ``rows`` rows spread evenly
    from its first row to its last (those inside the sequence)."""
    q, k = q.double(), k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    n = q.shape[2]
    nb = -(-n // block_size)
    p = torch.softmax((q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(
        torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")), dim=-1)
    per_block = torch.nn.functional.pad(p, (0, nb * block_size - n)).unflatten(-1, (nb, block_size)).sum(-1)
    out = torch.zeros(*q.shape[:2], nb, nb, dtype=torch.float64)
    for i in range(nb):
        picked = [i * block_size + round(t * (block_size - 1) / (rows - 1)) for t in range(rows)]
        picked = [r for r in picked if r < n]
        out[:, :, i] = per_block[:, :, picked].mean(2)
    return out


@pytest.mark.parametrize("rows", [4, 16])
def test_distill_rows_target_is_the_mass_of_evenly_spread_rows(rows):
    model, ctx = _gated("qwen2")
    ids = torch.randint(0, 300, (2, 70))  # 5 blocks of 16, the last of 6 tokens (4 rows: offsets 0 and 5 in it)
    records, mass = [], []
    with torch.no_grad():
        with ctx.running("distill", consumer=records.append, gt_target="rows", gt_rows=rows):
            model.model(ids)
        with ctx.running("distill", consumer=mass.append, gt_target="mass"):
            model.model(ids)
    assert len(records) == 2
    for rec, whole in zip(records, mass):
        expected = _sampled_rows_mass64(rec.query, rec.key, rows, 16)
        torch.testing.assert_close(rec.gt.double(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rec.gt.sum(-1), torch.ones(2, 4, 5))
        if rows == 16:  # every row of a block: the block mass itself
            torch.testing.assert_close(rec.gt, whole.gt, rtol=1e-5, atol=1e-6)
        else:
            assert (rec.gt - whole.gt).abs().max() > 1e-3
    with pytest.raises(ValueError, match="gt_rows 0"):
        ctx.update(gt_rows=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_mode_density_one_equals_dense_and_matches_reference_path(family):
    model, ctx = _gated(family)
    ids = torch.randint(0, 300, (1, 90))
    with torch.no_grad():
        dense = model(ids).logits
        with ctx.running("sparse", sparsity=SparsityConfig(method="topk", target_density=1.0)):
            torch.testing.assert_close(model(ids).logits, dense, rtol=1e-4, atol=1e-4)  # every block, sparse path
        assert ctx.densities() == {0: 1.0, 1: 1.0}
        # 6 blocks: the default dense last query block alone would be a third of the budget
        with ctx.running("sparse", sparsity=SparsityConfig(method="topk", target_density=0.4, dense_last_rows=0)):
            sparse = model(ids).logits
    assert all(abs(d - 0.4) < 0.15 for d in ctx.densities().values())
    assert not torch.allclose(sparse, dense, atol=1e-3)


def test_base_frozen_only_gates_train():
    model, _ = _gated("llama")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".seer_gate." in n for n in trainable)
    assert len(gate_parameters(model)) == len(trainable)
    with pytest.raises(ValueError, match="already has seer gates"):
        attach_gates(model, GATE)


def test_gate_checkpoint_roundtrip_and_refusals(tmp_path):
    model, _ = _gated("llama")
    for g in gates(model).values():
        torch.nn.init.normal_(g.k_weight)
    path = save_gates(tmp_path / "g", model, "tiny-llama")
    assert path.exists() and (tmp_path / "g" / "gates.json").exists()
    assert not list((tmp_path / "g").glob("*.tmp"))
    meta = read_gate_meta(tmp_path / "g")
    assert meta["base_model"] == "tiny-llama" and meta["model"]["num_heads"] == 4

    fresh = tiny_model("llama")
    load_gates(fresh, tmp_path / "g")  # attaches gates with the file's config
    for i, g in gates(model).items():
        torch.testing.assert_close(gates(fresh)[i].k_weight, g.k_weight)

    other_shape = tiny_model("llama", num_attention_heads=8, num_key_value_heads=2)
    with pytest.raises(ValueError, match="num_heads=4"):
        load_gates(other_shape, tmp_path / "g")
    with pytest.raises(ValueError, match="gate.hidden_size=24"):
        load_gates(tiny_model("llama"), tmp_path / "g", expected_gate=GateConfig(block_size=16, hidden_size=32,
                                                                                  k_pool=["max", "min"]))
    with pytest.raises(FileNotFoundError, match="no gate checkpoint"):
        load_gates(tiny_model("llama"), tmp_path / "missing")


@pytest.mark.parametrize("name", ["llama3_8b", "qwen2_5_7b", "qwen3_8b", "mistral_7b", "smollm2", "tiny_llama"])
def test_model_architectures_build_offline(name):
    """Each model config's architecture block gives a valid transformers config, and the gate's block RoPE accepts
    its rope settings (llama3 scaling included); a 2-layer random model of that family is gated end to end."""
    from omegaconf import OmegaConf

    from seer.checks import build
    from seer.gates import rope_frequencies
    from seer.model.config import ModelConfig
    from seer.model.loading import load_causal_lm, load_config
    from seer.config import compose

    values = OmegaConf.to_container(compose([f"model={name}"]).model, resolve=True)
    cfg = load_config(build(ModelConfig, "model", {**values, "random_init": True}))
    arch = values["architecture"]
    assert cfg.model_type == arch["model_type"] and cfg.num_hidden_layers == arch["num_hidden_layers"]
    assert cfg.num_key_value_heads == arch["num_key_value_heads"]
    inv_freq, scale = rope_frequencies(cfg, 128)
    assert inv_freq.shape == (64,) and torch.isfinite(inv_freq).all() and scale > 0
    small = {**arch, "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 64, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128}
    model = load_causal_lm(build(ModelConfig, "model",
                                 {"architecture": small, "random_init": True, "dtype": "float32"}))
    ctx = attach_gates(model, GateConfig(block_size=16, hidden_size=16))
    records = []
    with ctx.running("distill", consumer=records.append), torch.no_grad():
        model.base_model(input_ids=torch.randint(0, 128, (1, 40)))
    assert len(records) == 2 and all(torch.isfinite(r.gt).all() for r in records)


def test_context_settings_change_through_checks_and_running_restores_them():
    model, ctx = _gated("llama")
    with pytest.raises(ValueError, match="unknown seer context setting"):
        ctx.update(modes="sparse")
    with pytest.raises(ValueError, match="is not one of"):
        ctx.update(mode="sparce")
    with pytest.raises(ValueError, match="needs a calibration"):  # the default budget is calibrated
        ctx.update(mode="sparse", sparsity=SparsityConfig())
    assert ctx.mode == "dense" and ctx.sparsity == SparsityConfig()  # a refused change changes nothing
    with pytest.raises(RuntimeError, match="inside"), ctx.running("observe", want_mass=True):
        assert ctx.mode == "observe" and ctx.want_mass
        raise RuntimeError("inside")
    assert ctx.mode == "dense" and not ctx.want_mass and ctx.consumer is None
    with ctx.observing(want_mass=True) as observed, torch.no_grad():
        model.model(torch.randint(0, 300, (2, 70)))
    assert sorted(observed.scores()) == [0, 1] and observed.scores()[0].shape == (2, 4, 5, 5)
    assert observed.masses()[1].shape == (2, 4, 5, 5) and ctx.mode == "dense"


def test_blended_gate_scores_mix_the_gate_with_its_partner_and_name_calibrations(tmp_path):
    import dataclasses

    from seer.sparsity.selectors import LayerInputs, VerticalSlash, blend_scores

    model, ctx = _gated("qwen2")
    ids = torch.randint(0, 300, (1, 70))
    records = []
    with ctx.running("distill", consumer=records.append), torch.no_grad():  # raw gate logits, post-RoPE Q/K
        model.model(ids)
    with pytest.raises(ValueError, match="not \\['hidden_size'\\]"):
        ctx.update(gate_config=dataclasses.replace(GATE, hidden_size=32))
    ctx.update(gate_config=dataclasses.replace(GATE, blend="vertical_slash", blend_weight=0.3))
    assert ctx.scorer_name == "gate+vertical_slash@0.3"
    with ctx.observing() as observed, torch.no_grad():
        model.model(ids)
    for rec in records:
        partner = VerticalSlash().scores(LayerInputs(rec.query, rec.key, 16, rec.scale, rec.layer_idx))
        torch.testing.assert_close(observed.scores()[rec.layer_idx],
                                   blend_scores(rec.logits.detach(), partner, 0.3))
    # a gate file loads with the blend asked for; an architecture difference is still refused
    save_gates(tmp_path, model, "tiny")
    fresh = tiny_model("qwen2")
    load_gates(fresh, tmp_path, expected_gate=dataclasses.replace(GATE, blend=None))
    assert fresh.seer_context.gate_config.blend is None
    with pytest.raises(ValueError, match="hidden_size"):
        load_gates(tiny_model("qwen2"), tmp_path, expected_gate=dataclasses.replace(GATE, hidden_size=32))


def test_reranked_gate_scores_rank_the_blended_candidates_by_sampled_rows(tmp_path):
    """gate.rerank_rows: the blended gate proposes each row's top-p blocks, sampled query rows rank them; every row
    and every block (rows = block, top_p 1) is the oracle whatever the gate says. The fields load over a gate file."""
    import dataclasses

    from seer.sparsity.selectors import (LayerInputs, Oracle, VerticalSlash, blend_scores, log_mass,
                                         sampled_rows_mass, top_p_candidates)

    model, ctx = _gated("qwen2")
    ids = torch.randint(0, 300, (1, 70))
    records = []
    with ctx.running("distill", consumer=records.append), torch.no_grad():
        model.model(ids)
    reranked = dataclasses.replace(GATE, blend="vertical_slash", blend_weight=0.3, rerank_rows=4, rerank_top_p=0.7)
    ctx.update(gate_config=reranked)
    assert ctx.scorer_name == "gate+vertical_slash@0.3+rerank4@0.7"
    with ctx.observing() as observed, torch.no_grad():
        model.model(ids)
    for rec in records:
        x = LayerInputs(rec.query, rec.key, 16, rec.scale, rec.layer_idx)
        blended = blend_scores(rec.logits.detach(), VerticalSlash().scores(x), 0.3)
        candidates = top_p_candidates(blended, 0.7)
        assert not candidates.tril().all(), "top-p 0.7 should leave some blocks out"
        torch.testing.assert_close(observed.scores()[rec.layer_idx], log_mass(sampled_rows_mass(x, candidates, 4)))
    ctx.update(gate_config=dataclasses.replace(GATE, rerank_rows=16, rerank_top_p=1.0))
    with ctx.observing() as observed, torch.no_grad():
        model.model(ids)
    for rec in records:
        x = LayerInputs(rec.query.double(), rec.key.double(), 16, rec.scale, rec.layer_idx)
        torch.testing.assert_close(observed.scores()[rec.layer_idx], Oracle().scores(x), atol=1e-4, rtol=1e-4)
    save_gates(tmp_path, model, "tiny")
    fresh = tiny_model("qwen2")
    load_gates(fresh, tmp_path, expected_gate=dataclasses.replace(GATE, rerank_rows=8))
    assert fresh.seer_context.gate_config.rerank_rows == 8


def test_a_blend_weight_per_layer_blends_each_layer_with_its_own_and_must_match_the_layers():
    import dataclasses

    from seer.checks import ConfigError
    from seer.sparsity.selectors import LayerInputs, VerticalSlash, blend_scores

    model, ctx = _gated("llama")
    assert ctx.num_layers == 2
    ids = torch.randint(0, 300, (1, 70))
    records = []
    with ctx.running("distill", consumer=records.append), torch.no_grad():
        model.model(ids)
    weights = [0.8, 0.25]
    ctx.update(gate_config=dataclasses.replace(GATE, blend="vertical_slash", blend_weight=weights))
    with ctx.observing() as observed, torch.no_grad():
        model.model(ids)
    for rec in records:
        partner = VerticalSlash().scores(LayerInputs(rec.query, rec.key, 16, rec.scale, rec.layer_idx))
        torch.testing.assert_close(observed.scores()[rec.layer_idx],
                                   blend_scores(rec.logits.detach(), partner, weights[rec.layer_idx]))
    with pytest.raises(ConfigError, match="has 3 weights, but the model has 2 layers"):
        ctx.update(gate_config=dataclasses.replace(GATE, blend="vertical_slash", blend_weight=[0.5] * 3))
    with pytest.raises(ConfigError, match="has 1 weights, but the model has 2 layers"):
        attach_gates(tiny_model("llama"), dataclasses.replace(GATE, blend_weight=[0.5]))


def test_layer_selectors_score_their_layers_and_the_blended_gates_score_the_others():
    import dataclasses

    from seer.sparsity import select_blocks
    from seer.sparsity.calibration import Calibration
    from seer.sparsity.selectors import LayerInputs, Oracle, VerticalSlash, blend_scores

    model, ctx = _gated("qwen2")
    ids = torch.randint(0, 300, (1, 70))
    records = []
    with ctx.running("distill", consumer=records.append), torch.no_grad():  # raw gate logits, post-RoPE Q/K
        model.model(ids)
    ctx.update(gate_config=dataclasses.replace(GATE, blend="vertical_slash", blend_weight=0.3))
    inputs = {r.layer_idx: LayerInputs(r.query, r.key, 16, r.scale, r.layer_idx) for r in records}
    gate = {r.layer_idx: blend_scores(r.logits.detach(), VerticalSlash().scores(inputs[r.layer_idx]), 0.3)
            for r in records}
    oracle = {layer: Oracle().scores(x) for layer, x in inputs.items()}
    assert not torch.allclose(gate[1], oracle[1])  # the two scorers are told apart
    seen = []
    with ctx.running("observe", layer_selectors={1: Oracle()}, consumer=seen.append), torch.no_grad():
        model.model(ids)
    torch.testing.assert_close(seen[0].scores, gate[0])
    torch.testing.assert_close(seen[1].scores, oracle[1])
    # sparse: the first layer's selection changes the second's inputs, so only the first is compared
    budget, seen = SparsityConfig(method="topk", target_density=0.4), []
    with ctx.running("sparse", layer_selectors={0: Oracle()}, sparsity=budget, consumer=seen.append), \
            torch.no_grad():
        model.model(ids)
    torch.testing.assert_close(seen[0].scores, oracle[0])
    assert torch.equal(seen[0].mask, select_blocks(oracle[0], budget))
    assert ctx.layer_selectors == {} and ctx.scorer_name == "gate+vertical_slash@0.3"  # restored after the block
    with ctx.running(layer_selectors={1: Oracle()}):
        assert ctx.scorer_name == "gate+vertical_slash@0.3 oracle@1"
    with pytest.raises(ValueError, match=r"layer_selectors: layer 2 is not a layer of this model \(layers 0-1\)"):
        ctx.update(layer_selectors={2: Oracle()})
    with pytest.raises(ValueError, match="layer 0 is given 'oracle', not a seer.sparsity.selectors.Selector"):
        ctx.update(layer_selectors={0: "oracle"})
    with pytest.raises(ValueError, match="observe and sparse modes only, not 'train_sparse'"):
        ctx.update(mode="train_sparse", layer_selectors={0: Oracle()})
    calibrated = SparsityConfig(method="threshold", target_density=0.4)
    gate_calibration = Calibration(calibrated, {0: [0.1] * 4, 1: [0.1] * 4}, 0.4,
                                   selector="gate+vertical_slash@0.3")
    ctx.update(mode="sparse", sparsity=calibrated, calibration=gate_calibration)  # the gates' own: accepted
    with pytest.raises(ValueError, match="with the gate\\+vertical_slash@0.3 scorer, not for .* with "
                                         "gate\\+vertical_slash@0.3 oracle@1"):
        ctx.update(layer_selectors={1: Oracle()})
