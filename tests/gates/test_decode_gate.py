"""DecodeGate against a float64 loop written from its definition."""

import math

import pytest
import torch

from seer.checks import ConfigError
from seer.gates.decode_config import DecodeGateConfig
from seer.gates.decode_gate import DecodeGate, SharedPrefillGate
from tests.gates.test_attn_gate import _rope_loop


def _pool(tokens, kinds):
    parts = {"avg": tokens.mean(-2), "max": tokens.max(-2).values, "min": tokens.min(-2).values,
             "last": tokens[..., -1, :]}
    return torch.cat([parts[k] for k in kinds], dim=-1)


def _decode_gate_loop(gate: DecodeGate, q, k):
    """Each query token, KV head and block not after the token's, one at a time."""
    cfg = gate.config
    bs = cfg.block_size
    b, hq, t, d = q.shape
    n, hkv = k.shape[2], k.shape[1]
    group = hq // hkv
    nb = math.ceil(n / bs)
    out = torch.full((b, hkv, t, nb), float("-inf"), dtype=torch.float64)
    for g in range(hkv):
        wq, wk = gate.q_weight[g].double(), gate.k_weight[g].double()
        for i in range(t):
            pos = n - t + i
            qi = torch.cat([q[:, g * group + h, i].double() for h in range(group)], -1) @ wq
            if gate.rope_inv_freq is not None:
                qi = _rope_loop(qi, pos, gate.rope_inv_freq, gate.rope_scale)
            for j in range(pos // bs + 1):
                end = min((j + 1) * bs, pos + 1)
                kj = _pool(k[:, g, j * bs:end].double(), cfg.k_pool) @ wk
                if gate.rope_inv_freq is not None:
                    kj = _rope_loop(kj, j * bs, gate.rope_inv_freq, gate.rope_scale)
                out[:, g, i, j] = (qi * kj).sum(-1) / math.sqrt(qi.shape[-1])
    return out


@pytest.mark.parametrize("k_pool, hidden, n, t, heads, rope", [
    (["max", "min", "avg"], 12, 37, 37, (4, 2), True),   # teacher forcing: every token, partial last block
    (["avg", "last"], 8, 40, 3, (6, 2), True),           # the last 3 tokens of 40
    (["max"], 6, 16, 16, (2, 2), False),                 # no GQA, no RoPE, one whole block
])
def test_decode_gate_matches_loop(k_pool, hidden, n, t, heads, rope):
    torch.manual_seed(0)
    hq, hkv = heads
    cfg = DecodeGateConfig(block_size=16, k_pool=k_pool, hidden_size=hidden, block_rope=rope)
    gate = DecodeGate(cfg, head_dim=8, num_heads=hq, num_kv_heads=hkv, rope_scale=1.3 if rope else 1.0)
    q, k = torch.randn(2, hq, t, 8), torch.randn(2, hkv, n, 8)
    got = gate(q, k)
    want = _decode_gate_loop(gate, q, k)
    assert got.shape == want.shape
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got.double()[finite], want[finite], rtol=1e-4, atol=1e-4)


def test_decode_gate_sees_no_future_key():
    torch.manual_seed(1)
    gate = DecodeGate(DecodeGateConfig(block_size=16, hidden_size=8), 8, 4, 2)
    q, k = torch.randn(1, 4, 40, 8), torch.randn(1, 2, 40, 8)
    k2 = k.clone()
    k2[:, :, 21:] += 5.0
    torch.testing.assert_close(gate(q, k)[:, :, :21], gate(q, k2)[:, :, :21])


def test_decode_gate_refuses_bad_input():
    with pytest.raises(ConfigError, match=r"decode_gate.k_pool=\['max', 'max'\]"):
        DecodeGateConfig(k_pool=["max", "max"])
    with pytest.raises(ConfigError, match="decode_gate.block_size=48"):
        DecodeGateConfig(block_size=48)
    gate = DecodeGate(DecodeGateConfig(block_size=16, hidden_size=8), 8, 4, 2)
    with pytest.raises(ValueError, match="expects 4 query and 2 key heads"):
        gate(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))
    with pytest.raises(ValueError, match="query tokens <= keys; got 5 and 4"):
        gate(torch.randn(1, 4, 5, 8), torch.randn(1, 2, 4, 8))


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_projection_per_head_matches_a_float64_product(rows):
    """Both routes of :func:`project_per_head` (batched over heads below the weights' column count, a decode step's
    one row on a view; broadcast over the batch above it) give each head's product, on a non-contiguous ``x``."""
    from seer.gates.decode_gate import project_per_head

    g = torch.Generator().manual_seed(rows)
    x = torch.randn(5, rows, 3, 24, generator=g).transpose(1, 2)  # [B 5, H 3, n, 24], as a permuted view
    w = torch.randn(3, 24, 32, generator=g)
    want = torch.einsum("bhni,hio->bhno", x.double(), w.double())
    got = project_per_head(x, w)
    assert got.shape == (5, 3, rows, 32)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n, heads, chunk_bytes", [
    (37, (4, 2), 1),         # partial last block; one query block per chunk
    (48, (2, 1), 1 << 20),   # whole blocks, all in one chunk
])
def test_block_scores_average_each_tokens_block_distribution(n, heads, chunk_bytes):
    """The prefill's block scores are the log of each query block's mean over its tokens of the token's softmax over
    the blocks up to its own (float64 loop from the definition), -inf above the diagonal, rows summing to 1."""
    torch.manual_seed(1)
    hq, hkv = heads
    cfg = DecodeGateConfig(block_size=16, k_pool=["max", "avg"], hidden_size=8)
    gate = DecodeGate(cfg, head_dim=8, num_heads=hq, num_kv_heads=hkv, rope_scale=1.1).double()
    q, k = torch.randn(2, hq, n, 8, dtype=torch.float64), torch.randn(2, hkv, n, 8, dtype=torch.float64)
    probs = _decode_gate_loop(gate, q, k).softmax(-1)  # [B, Hkv, n, nb]
    nb = math.ceil(n / 16)
    want = torch.stack([probs[:, :, i * 16:(i + 1) * 16].mean(2) for i in range(nb)], dim=2).log()
    got = gate.block_scores(q, k, chunk_bytes=chunk_bytes)
    assert got.dtype == torch.float32 and got.shape == (2, hkv, nb, nb)
    assert torch.equal(torch.isinf(got), torch.ones(nb, nb, dtype=torch.bool).triu(1).expand_as(got))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite].double(), want[finite], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(2, hkv, nb))


def test_block_scores_refuse_a_decode_step():
    gate = DecodeGate(DecodeGateConfig(block_size=16, hidden_size=8), head_dim=8, num_heads=2, num_kv_heads=1)
    with pytest.raises(ValueError, match="block_scores scores a prefill: q and k need the same tokens; got 3 and 40"):
        gate.block_scores(torch.randn(1, 2, 3, 8), torch.randn(1, 1, 40, 8))


def test_shared_prefill_gate_gives_each_query_head_its_groups_scores_and_owns_no_weights():
    torch.manual_seed(2)
    gate = DecodeGate(DecodeGateConfig(block_size=16, hidden_size=8), head_dim=8, num_heads=6, num_kv_heads=2)
    shared = SharedPrefillGate(gate)
    q, k = torch.randn(1, 6, 40, 8), torch.randn(1, 2, 40, 8)
    scores, per_group = shared(q, k), gate.block_scores(q, k)
    assert scores.shape == (1, 6, 3, 3)
    for h in range(6):
        assert torch.equal(scores[:, h], per_group[:, h // 3])
    assert list(shared.parameters()) == [] and shared.state_dict() == {}
