"""The compressed-K cache gives, step by step, the decode gate's logits of each row's newest token over its whole
sequence, for rows of different lengths, after a prefill and through decode steps: as the gate on the whole sequence
and as the cache did before its static-shape rewrite (tests/model/reference_decode_cache.py), with decode steps that
read nothing back from the device."""

import pytest
import torch

from seer.gates.decode_config import DecodeGateConfig
from seer.gates.decode_gate import DecodeGate
from seer.gates.pooling import pool_blocks
from seer.model.decode_cache import DecodeKeyCache, pool_prefix
from tests.model.reference_decode_cache import ReferenceDecodeKeyCache

BS, D, HQ, HKV = 16, 8, 4, 2
POOLS = [["max", "min", "avg"], ["max"], ["min"], ["avg"], ["avg", "max"], ["last", "min"]]


def _gates(k_pool=("max", "min", "avg")):
    torch.manual_seed(0)
    cfg = DecodeGateConfig(block_size=BS, k_pool=list(k_pool), hidden_size=12)
    return {0: DecodeGate(cfg, D, HQ, HKV, rope_scale=1.1), 3: DecodeGate(cfg, D, HQ, HKV)}


def _want(gate, q, k, lengths, nb):
    """The gate on each row's whole sequence, its last token, padded with -inf to nb blocks."""
    out = torch.full((len(lengths), HKV, nb), float("-inf"))
    for row, n in enumerate(lengths):
        got = gate(q[row:row + 1, :, n - 1:n], k[row:row + 1, :, :n])[0, :, -1]
        out[row, :, :got.shape[-1]] = got
    return out


def _close(got, want, **tol):
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got[torch.isfinite(want)], want[torch.isfinite(want)], **tol)


def _newest(x, lengths):
    """``[B, H, 1, D]``: each row's entry at its newest position."""
    return torch.stack([x[row, :, n - 1] for row, n in enumerate(lengths)])[:, :, None]


@pytest.mark.parametrize("k_pool", POOLS)
@pytest.mark.parametrize("max_length", [None, 100])
def test_cache_scores_equal_the_gate_on_the_whole_sequence(k_pool, max_length):
    gates = _gates(k_pool)
    prompts, steps = [5, 37, 64], 20
    total = max(prompts) + steps
    q, k = torch.randn(3, HQ, total, D), torch.randn(3, HKV, total, D)
    cache = DecodeKeyCache(gates, batch_size=3, max_length=max_length)
    for layer in gates:  # a prefill: each row's prompt, right-padded to the longest
        cache.update(layer, k[:, :, :max(prompts)].clone(), torch.tensor(prompts))
    for step in range(steps):
        lengths = [n + step for n in prompts]
        if step:  # one decode token per row, at each row's own position
            for layer in gates:
                cache.update(layer, _newest(k, lengths))
        nb = -(-max(lengths) // BS)
        for layer, gate in gates.items():
            got = cache.scores(layer, _newest(q, lengths))
            assert got.shape[-1] == cache.capacity >= nb
            assert torch.isinf(got[:, :, nb:]).all()
            _close(got[:, :, :nb], _want(gate, q, k, lengths, nb), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k_pool", POOLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_equals_the_cache_before_its_rewrite(k_pool, dtype):
    """Four rows, blocks filling at different steps (one prompt ends on a block boundary, one is a single token), a
    chunk of several tokens in between: the same scores and the same gate keys of full blocks as the old cache."""
    gates = _gates(k_pool)
    prompts, steps, chunk = [1, 16, 29, 47], 40, 3
    total = max(prompts) + steps + chunk
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(4, HQ, total, D, generator=g), torch.randn(4, HKV, total, D, generator=g)
    new, old = DecodeKeyCache(gates, 4, dtype=dtype, max_length=total), ReferenceDecodeKeyCache(gates, 4, dtype=dtype)
    padded = torch.zeros(4, HKV, max(prompts), D)
    for row, n in enumerate(prompts):
        padded[row, :, :n] = k[row, :, :n]
    for cache in (new, old):
        for layer in gates:
            cache.update(layer, padded, torch.tensor(prompts))
    lengths = list(prompts)
    for step in range(steps):
        if step == steps // 2:  # three tokens for every row (a step of several tokens)
            block = torch.stack([k[row, :, n:n + chunk] for row, n in enumerate(lengths)])
            lengths = [n + chunk for n in lengths]
        elif step:
            lengths = [n + 1 for n in lengths]
            block = _newest(k, lengths)
        for layer in gates:
            if step:
                new.update(layer, block)
                old.update(layer, block)
            nb = -(-max(lengths) // BS)
            got, want = new.scores(layer, _newest(q, lengths)), old.scores(layer, _newest(q, lengths))
            assert want.shape[-1] == nb and torch.isinf(got[:, :, nb:]).all()
            _close(got[:, :, :nb], want, rtol=1e-5, atol=1e-6)
            assert new.seqlens[layer].tolist() == old.lengths[layer] == lengths
            for row, n in enumerate(lengths):
                full = n // BS
                torch.testing.assert_close(new.keys[layer][row, :, :full], old.keys[layer][row, :, :full],
                                           rtol=1e-5, atol=1e-6)


def test_decode_steps_read_nothing_from_the_device(monkeypatch):
    gates = _gates()
    cache = DecodeKeyCache(gates, batch_size=2, max_length=64)
    for layer in gates:
        cache.update(layer, torch.randn(2, HKV, 20, D), torch.tensor([20, 13]))

    def refuse(*args, **kwargs):
        raise AssertionError("a host read in a decode step")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "cpu", "numpy", "__int__", "__index__", "__float__", "__bool__"):
            patch.setattr(torch.Tensor, name, refuse)
        for _ in range(BS + 2):  # every row fills a block on the way
            for layer in gates:
                cache.update(layer, torch.randn(2, HKV, 1, D))
                cache.scores(layer, torch.randn(2, HQ, 1, D))
    assert cache.seqlens[0].tolist() == [38, 31] and cache.capacity == 4


def test_pool_prefix_pools_each_rows_first_tokens():
    x = torch.randn(3, 2, BS, D)
    counts = torch.tensor([1, 7, BS])
    kinds = ["max", "min", "avg", "last"]
    got = pool_prefix(x, counts, kinds)
    for row, n in enumerate(counts.tolist()):
        torch.testing.assert_close(got[row:row + 1], pool_blocks(x[row:row + 1, :, :n], BS, kinds))


def test_cache_memory_is_its_buffers():
    gates = _gates()
    cache = DecodeKeyCache(gates, batch_size=2, dtype=torch.bfloat16)
    for layer in gates:
        cache.update(layer, torch.randn(2, HKV, 70, D), torch.tensor([70, 64]))
    # 5 blocks (the longest row's, its partial one included), 12 values a KV head in bf16, per layer; one newest block
    # of keys (float32) a row
    assert cache.capacity == 5
    assert cache.memory_bytes() == len(gates) * (2 * HKV * 5 * 12 * 2 + 2 * HKV * BS * D * 4)
    sized = DecodeKeyCache(gates, batch_size=2, dtype=torch.bfloat16, max_length=1000)
    assert sized.capacity == 63 and sized.memory_bytes() == len(gates) * (2 * HKV * 63 * 12 * 2 + 2 * HKV * BS * D * 4)


def test_cache_grows_without_max_length_and_refuses_past_it():
    gates = {0: _gates()[0]}
    grown, sized = DecodeKeyCache(gates, 1), DecodeKeyCache(gates, 1, max_length=33)
    for cache in (grown, sized):
        cache.update(0, torch.randn(1, HKV, 32, D))
    for _ in range(3):
        grown.update(0, torch.randn(1, HKV, 1, D))
    assert grown.capacity == 4  # 2 blocks after the prefill, doubled at the 33rd token
    sized.update(0, torch.randn(1, HKV, 1, D))
    with pytest.raises(ValueError, match="a row of 34 tokens passes the decode key cache's max_length 33"):
        sized.update(0, torch.randn(1, HKV, 1, D))


def test_copy_puts_a_clone_back_in_place():
    gates = _gates()
    cache = DecodeKeyCache(gates, batch_size=2, max_length=80)
    for layer in gates:
        cache.update(layer, torch.randn(2, HKV, 30, D), torch.tensor([30, 17]))
    saved, q = cache.clone(), torch.randn(2, HQ, 1, D)
    buffers = [t.data_ptr() for d in (cache.keys, cache.tails, cache.seqlens) for t in d.values()]
    steps = [torch.randn(2, HKV, 1, D) for _ in range(20)]
    first = []
    for k in steps:
        cache.update(0, k)
        first.append(cache.scores(0, q))
    cache.copy_(saved)
    assert [t.data_ptr() for d in (cache.keys, cache.tails, cache.seqlens) for t in d.values()] == buffers
    assert cache.seqlens[0].tolist() == [30, 17] and saved.seqlens[0].tolist() == [30, 17]
    for k, want in zip(steps, first):
        cache.update(0, k)
        assert torch.equal(cache.scores(0, q), want)


def test_cache_refuses_bad_input():
    cache = DecodeKeyCache(_gates(), batch_size=2)
    with pytest.raises(ValueError, match=r"layer 0: keys must be \[2, 2, T, 8\]; got \(2, 4, 3, 8\)"):
        cache.update(0, torch.randn(2, 4, 3, 8))
    with pytest.raises(ValueError, match=r"new_tokens must be 2 counts in \[0, 3\]; got \[4, 1\]"):
        cache.update(0, torch.randn(2, 2, 3, 8), torch.tensor([4, 1]))
    with pytest.raises(ValueError, match=r"every row needs a cached key .* lengths \[0, 0\]"):
        cache.scores(0, torch.randn(2, 4, 1, 8))
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        DecodeKeyCache(_gates(), batch_size=2, max_length=0)


def test_cache_scores_feed_the_decode_budget():
    """Rows of different lengths: each keeps its newest block and the first, at most the budget's blocks, none past
    its own keys."""
    from seer.sparsity.decode import DecodeSparsityConfig, decode_block_index, decode_block_mask

    gates = _gates()
    cache = DecodeKeyCache(gates, batch_size=3)
    lengths = torch.tensor([9, 50, 100])
    cache.update(0, torch.randn(3, HKV, 100, D), lengths)
    assert torch.equal(cache.seqlens[0], lengths.int())
    scores = cache.scores(0, torch.randn(3, HQ, 1, D))
    budget = DecodeSparsityConfig(token_budget=48)
    index = decode_block_index(decode_block_mask(scores, lengths, budget, BS), budget.max_kept_blocks(7, BS))
    for row, n in enumerate(lengths.tolist()):
        for head in range(HKV):
            kept = [int(j) for j in index[row, head] if j >= 0]
            assert kept[0] == 0 and kept[-1] == (n - 1) // BS and len(kept) == min(3, (n - 1) // BS + 1)
