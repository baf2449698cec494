"""AttnGate against a slow loop-based reference written from the method's definition."""

import dataclasses
import math

import pytest
import torch

from seer.gates.config import GateConfig
from seer.gates import AttnGate, pool_blocks, rope_frequencies
from tests.tiny import tiny_config


def _pool_loop(x, bs, kinds):
    """x [B, H, N, D] -> [B, H, nb, D * len(kinds)], one block at a time."""
    b, h, n, d = x.shape
    nb = math.ceil(n / bs)
    out = torch.zeros(b, h, nb, d * len(kinds), dtype=torch.float64)
    for i in range(nb):
        tokens = x[:, :, i * bs:min(n, (i + 1) * bs)].double()
        parts = {"avg": tokens.mean(2), "max": tokens.max(2).values, "min": tokens.min(2).values,
                 "last": tokens[:, :, -1]}
        out[:, :, i] = torch.cat([parts[k] for k in kinds], dim=-1)
    return out


def _rope_loop(x, pos, inv_freq, scale):
    """Rotate-half RoPE on x [..., E] at a single position, element by element."""
    half = x.shape[-1] // 2
    out = torch.empty_like(x)
    for j in range(half):
        angle = pos * inv_freq[j].double()
        c, s = math.cos(angle) * scale, math.sin(angle) * scale
        out[..., j] = x[..., j] * c - x[..., j + half] * s
        out[..., j + half] = x[..., j + half] * c + x[..., j] * s
    return out


def _gate_loop(gate: AttnGate, q, k):
    cfg = gate.config
    bs = cfg.block_size
    qp, kp = _pool_loop(q, bs, cfg.q_pool), _pool_loop(k, bs, cfg.k_pool)
    b, hq, nb, _ = qp.shape
    group = hq // k.shape[1]
    out = torch.full((b, hq, nb, nb), float("-inf"), dtype=torch.float64)
    for h in range(hq):
        kh = kp[:, h // group]
        qg = qp[:, h] if gate.q_weight is None else qp[:, h] @ gate.q_weight[h].double()
        kg = kh @ gate.k_weight[h].double()
        if gate.rope_inv_freq is not None:
            qg = torch.stack([_rope_loop(qg[:, i], i * bs, gate.rope_inv_freq, gate.rope_scale) for i in range(nb)], 1)
            kg = torch.stack([_rope_loop(kg[:, i], i * bs, gate.rope_inv_freq, gate.rope_scale) for i in range(nb)], 1)
        for i in range(nb):
            for j in range(i + 1):
                out[:, h, i, j] = (qg[:, i] * kg[:, j]).sum(-1) / math.sqrt(qg.shape[-1])
    return out


@pytest.mark.parametrize("q_pool, k_pool, hidden, n, heads", [
    (["avg"], ["max"], 24, 70, (4, 2)),
    (["avg"], ["max", "min", "avg"], 16, 64, (6, 2)),   # hidden == head dim: the K-only-linear form
    (["avg", "last"], ["max", "min"], 8, 33, (2, 2)),
    (["max"], ["last"], 16, 17, (3, 1)),
])
def test_gate_matches_loop_reference(q_pool, k_pool, hidden, n, heads):
    torch.manual_seed(0)
    hq, hkv = heads
    cfg = GateConfig(block_size=16, q_pool=q_pool, k_pool=k_pool, hidden_size=hidden)
    inv_freq, scale = rope_frequencies(tiny_config("llama", rope_parameters={"rope_type": "llama3", "rope_theta": 5e5,
                                       "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64}), hidden)
    gate = AttnGate(cfg, head_dim=16, num_heads=hq, num_kv_heads=hkv, rope_inv_freq=inv_freq, rope_scale=scale)
    assert (gate.q_weight is None) == (len(q_pool) == 1 and hidden == 16)
    q, k = torch.randn(2, hq, n, 16), torch.randn(2, hkv, n, 16)
    got = gate(q, k)
    want = _gate_loop(gate, q, k)
    assert got.shape == (2, hq, math.ceil(n / 16), math.ceil(n / 16))
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_gate_without_rope_and_grad_flows():
    cfg = GateConfig(block_size=16, hidden_size=8, block_rope=False)
    gate = AttnGate(cfg, 16, 2, 1)
    q, k = torch.randn(1, 2, 40, 16), torch.randn(1, 1, 40, 16)
    torch.testing.assert_close(gate(q, k).double(), _gate_loop(gate, q, k), rtol=1e-4, atol=1e-4)
    gate(q, k).masked_fill(torch.ones(3, 3, dtype=torch.bool).triu(1), 0).sum().backward()
    assert gate.k_weight.grad is not None and gate.k_weight.grad.abs().sum() > 0


def test_llama3_rope_differs_from_default_and_matches_hf():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = tiny_config("llama", rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 64})
    inv, _ = rope_frequencies(cfg, 16)   # the model's head dim is 16: must equal the model's own frequencies
    torch.testing.assert_close(inv, LlamaRotaryEmbedding(cfg).inv_freq.float())
    plain, _ = rope_frequencies(tiny_config("llama", rope_parameters={"rope_type": "default", "rope_theta": 5e5}), 16)
    assert not torch.allclose(inv, plain)


def test_pool_blocks_partial_last_block():
    x = torch.arange(10, dtype=torch.float32).reshape(1, 1, 10, 1)
    got = pool_blocks(x, 4, ["avg", "max", "min", "last"])
    want = torch.tensor([[1.5, 3, 0, 3], [5.5, 7, 4, 7], [8.5, 9, 8, 9]])
    torch.testing.assert_close(got[0, 0], want)


def test_gate_rejects_wrong_shapes():
    gate = AttnGate(GateConfig(block_size=16, hidden_size=8), 16, 4, 2)
    with pytest.raises(ValueError, match="4 query and 2 key heads"):
        gate(torch.randn(1, 4, 20, 16), torch.randn(1, 4, 20, 16))
    with pytest.raises(ValueError, match="head dim 16"):
        gate(torch.randn(1, 4, 20, 8), torch.randn(1, 2, 20, 8))


def test_gate_blend_config_checked_named_and_not_architecture():
    from seer.checks import ConfigError
    from seer.gates.config import BLEND_SELECTORS
    from seer.sparsity.selectors import SELECTORS

    assert set(BLEND_SELECTORS) <= set(SELECTORS) and "oracle" not in BLEND_SELECTORS
    plain, blended = GateConfig(), GateConfig(blend="vertical_slash", blend_weight=0.25)
    assert plain.scorer_name == "gate" and blended.scorer_name == "gate+vertical_slash@0.25"
    assert plain.architecture_differences(blended) == []
    assert plain.architecture_differences(GateConfig(k_pool=["max", "min"])) == ["k_pool"]
    with pytest.raises(ConfigError, match="gate.blend='oracle'"):
        GateConfig(blend="oracle")
    with pytest.raises(ConfigError, match="gate.blend_weight=1"):
        GateConfig(blend="vertical_slash", blend_weight=1)
    reranked = GateConfig(rerank_rows=8, rerank_top_p=0.9)
    assert reranked.scorer_name == "gate+rerank8@0.9" and plain.architecture_differences(reranked) == []
    assert dataclasses.replace(blended, rerank_rows=4).scorer_name == "gate+vertical_slash@0.25+rerank4@0.99"
    assert GateConfig(rerank_rows=8, rerank_top_p=0.9, rerank_max_share=0.3).scorer_name == "gate+rerank8@0.9cap0.3"
    for field, bad in (("rerank_rows", -1), ("rerank_rows", 1.5), ("rerank_top_p", 0), ("rerank_top_p", 1.2),
                       ("rerank_max_share", 0), ("rerank_max_share", 1.2)):
        with pytest.raises(ConfigError, match=f"gate.{field}={bad}"):
            GateConfig(**{field: bad})


def test_gate_blend_weight_per_layer_is_checked_and_named():
    from omegaconf import OmegaConf

    from seer.checks import ConfigError

    listed = GateConfig(blend="vertical_slash", blend_weight=(0.8, 0.5, 0.5))
    assert listed.blend_weight == [0.8, 0.5, 0.5] and listed.layer_weight(0) == 0.8 and listed.layer_weight(2) == 0.5
    assert GateConfig(blend_weight=OmegaConf.create({"w": [0.25, 0.75]}).w).blend_weight == [0.25, 0.75]
    name = listed.scorer_name
    assert name.startswith("gate+vertical_slash@layers-") and len(name) == len("gate+vertical_slash@layers-") + 8
    assert name == GateConfig(blend="vertical_slash", blend_weight=[0.8, 0.5, 0.5]).scorer_name
    assert name != GateConfig(blend="vertical_slash", blend_weight=[0.5, 0.8, 0.5]).scorer_name
    assert GateConfig(blend="vertical_slash", blend_weight=0.5).layer_weight(7) == 0.5
    assert GateConfig(blend="vertical_slash").with_blend(weight=[0.3, 0.6]).blend_weight == [0.3, 0.6]
    assert listed.with_blend("none").scorer_name == "gate"
    with pytest.raises(ConfigError, match=r"gate.blend_weight\[1\]=1.2: "):
        GateConfig(blend_weight=[0.5, 1.2])
    with pytest.raises(ConfigError, match=r"gate.blend_weight\[0\]='a'"):
        GateConfig(blend_weight=["a"])
    with pytest.raises(ConfigError, match=r"gate.blend_weight=\[\]"):
        GateConfig(blend_weight=[])
    with pytest.raises(ConfigError, match="has 3 weights, but the model has 2 layers"):
        listed.check_layers(2)
    listed.check_layers(3)
    with pytest.raises(ValueError, match="none for layer 3"):
        listed.layer_weight(3)
