"""The compressed-K cache gives, step by step, the decode gate's logits of each row's newest token over its whole
sequence, for rows of different lengths, after a prefill and through decode steps."""

import pytest
import torch

from seer.gates.decode_config import DecodeGateConfig
from seer.gates.decode_gate import DecodeGate
from seer.model.decode_cache import DecodeKeyCache

BS, D, HQ, HKV = 16, 8, 4, 2


def _gates():
    torch.manual_seed(0)
    cfg = DecodeGateConfig(block_size=BS, k_pool=["max", "min", "avg"], hidden_size=12)
    return {0: DecodeGate(cfg, D, HQ, HKV, rope_scale=1.1), 3: DecodeGate(cfg, D, HQ, HKV)}


def _want(gate, q, k, lengths, nb):
    """The gate on each row's whole sequence, its last token, padded with -inf to nb blocks."""
    out = torch.full((len(lengths), HKV, nb), float("-inf"))
    for row, n in enumerate(lengths):
        got = gate(q[row:row + 1, :, n - 1:n], k[row:row + 1, :, :n])[0, :, -1]
        out[row, :, :got.shape[-1]] = got
    return out


def test_cache_scores_equal_the_gate_on_the_whole_sequence():
    gates = _gates()
    prompts, steps = [5, 37, 64], 20
    total = max(prompts) + steps
    q, k = torch.randn(3, HQ, total, D), torch.randn(3, HKV, total, D)
    cache = DecodeKeyCache(gates, batch_size=3)
    for layer in gates:  # a prefill: each row's prompt, right-padded to the longest
        cache.update(layer, k[:, :, :max(prompts)].clone(), torch.tensor(prompts))
    for step in range(steps):
        lengths = [n + step for n in prompts]
        if step:  # one decode token per row, at each row's own position
            new = torch.stack([k[row, :, n - 1] for row, n in enumerate(lengths)])[:, :, None]
            for layer in gates:
                cache.update(layer, new)
        q_new = torch.stack([q[row, :, n - 1] for row, n in enumerate(lengths)])[:, :, None]
        nb = -(-max(lengths) // BS)
        for layer, gate in gates.items():
            got = cache.scores(layer, q_new)
            want = _want(gate, q, k, lengths, nb)
            assert torch.equal(torch.isinf(got), torch.isinf(want)), (step, layer)
            torch.testing.assert_close(got[torch.isfinite(want)], want[torch.isfinite(want)], rtol=1e-4, atol=1e-5)


def test_cache_memory_is_one_gate_key_per_full_block():
    gates = _gates()
    cache = DecodeKeyCache(gates, batch_size=2, dtype=torch.bfloat16)
    for layer in gates:
        cache.update(layer, torch.randn(2, HKV, 70, D), torch.tensor([70, 64]))
    # 4 full blocks (the longest row), 12 values a KV head in bf16, per layer; row 0 keeps 6 keys of its partial block
    assert cache.memory_bytes() == len(gates) * (2 * HKV * 4 * 12 * 2 + HKV * 6 * D * 4)


def test_cache_refuses_bad_input():
    cache = DecodeKeyCache(_gates(), batch_size=2)
    with pytest.raises(ValueError, match=r"layer 0: keys must be \[2, 2, T, 8\]; got \(2, 4, 3, 8\)"):
        cache.update(0, torch.randn(2, 4, 3, 8))
    with pytest.raises(ValueError, match=r"new_tokens must be 2 counts in \[0, 3\]; got \[4, 1\]"):
        cache.update(0, torch.randn(2, 2, 3, 8), torch.tensor([4, 1]))
    with pytest.raises(ValueError, match=r"every row needs a cached key .* lengths \[0, 0\]"):
        cache.scores(0, torch.randn(2, 4, 1, 8))


def test_cache_scores_feed_the_decode_budget():
    """Rows of different lengths: each keeps its newest block and the first, at most the budget's blocks, none past
    its own keys."""
    from seer.sparsity.decode import DecodeSparsityConfig, decode_block_index, decode_block_mask

    gates = _gates()
    cache = DecodeKeyCache(gates, batch_size=3)
    lengths = torch.tensor([9, 50, 100])
    cache.update(0, torch.randn(3, HKV, 100, D), lengths)
    assert cache.lengths[0] == lengths.tolist() and torch.equal(cache.seqlens[0], lengths.int())
    scores = cache.scores(0, torch.randn(3, HQ, 1, D))
    budget = DecodeSparsityConfig(token_budget=48)
    index = decode_block_index(decode_block_mask(scores, lengths, budget, BS), budget.max_kept_blocks(7, BS))
    for row, n in enumerate(lengths.tolist()):
        for head in range(HKV):
            kept = [int(j) for j in index[row, head] if j >= 0]
            assert kept[0] == 0 and kept[-1] == (n - 1) // BS and len(kept) == min(3, (n - 1) // BS + 1)
