"""Quest's key bounds in sparse decode (``DecodeSparsityConfig.estimate="quest"``): the bound against a float64 brute
force, the cache's per-block min/max against a recomputation from the keys after a padded prefill and decode steps,
the mixture of the gate's and Quest's block probabilities, and the whole model's steps with it; the oracle's true
block mass (``estimate="oracle"``) and the exact rerank of an estimate's top blocks (``rerank_blocks``) likewise."""

from __future__ import annotations

import math
import re

import pytest
import torch

from seer.checks import ConfigError
from seer.gates.decode_config import DecodeGateConfig
from seer.gates.decode_gate import DecodeGate
from seer.model.decode_cache import (DecodeKeyCache, key_bound_scores, key_moment_scores, reranked_block_scores,
                                     true_block_scores)
from seer.sparsity.decode import DecodeSparsityConfig, decode_step_blocks, mix_estimate
from tests.tiny import padded_generation, tiny_decode_model

BS, D, HQ, HKV = 16, 8, 4, 2
QUEST = {"token_budget": 48, "estimate": "quest", "estimate_weight": 0.5}


def _bounds_of(keys: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block min and max ``[Hkv, nb, D]`` of one row's keys ``[Hkv, n, D]``, block by block."""
    blocks = range(0, keys.shape[1], block_size)
    return (torch.stack([keys[:, s:s + block_size].amin(1) for s in blocks], 1),
            torch.stack([keys[:, s:s + block_size].amax(1) for s in blocks], 1))


def _rows(seed: int, lengths: list[int]):
    """Two rows of random float64 queries ``[2, Hq, 1, D]`` and keys of ``lengths`` ``[2, Hkv, n, D]``, their blocks'
    bounds ``[2, Hkv, nb, D]`` (float32, zero past a row's keys) and newest blocks."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, HQ, 1, D, generator=g, dtype=torch.float64)
    k = torch.randn(2, HKV, max(lengths), D, generator=g, dtype=torch.float64)
    nb = -(-max(lengths) // BS)
    key_min, key_max = torch.zeros(2, HKV, nb, D), torch.zeros(2, HKV, nb, D)
    for row, n in enumerate(lengths):
        low, high = _bounds_of(k[row, :, :n], BS)
        key_min[row, :, :low.shape[1]], key_max[row, :, :high.shape[1]] = low, high
    return q, k, key_min, key_max, torch.tensor([(n - 1) // BS for n in lengths])


def test_the_bound_is_quests_and_bounds_every_query_heads_logits():
    """Two rows (the newest block a single key in one), four query heads over two KV heads, float64 brute force."""
    lengths, scale = [5 * BS + 1, 3 * BS + 7], 0.3
    q, k, key_min, key_max, newest = _rows(0, lengths)
    nb = key_min.shape[2]
    got = key_bound_scores(q.float(), key_min, key_max, newest, scale)
    assert got.dtype == torch.float32 and got.shape == (2, HKV, nb)
    group = HQ // HKV
    for row, n in enumerate(lengths):
        assert torch.isinf(got[row, :, newest[row] + 1:]).all()
        for head in range(HKV):
            for block in range(newest[row] + 1):
                keys = k[row, head, block * BS:min(n, (block + 1) * BS)]  # [m, D]
                low, high = keys.amin(0), keys.amax(0)
                bounds, logits = [], []
                for qh in range(head * group, (head + 1) * group):
                    qd = q[row, qh, 0]
                    bounds.append(torch.maximum(qd * low, qd * high).sum() * scale)
                    logits.append((keys @ qd).max() * scale)
                want = max(bounds)
                assert got[row, head, block] == pytest.approx(float(want), rel=1e-5, abs=1e-5)
                assert all(b >= lg - 1e-12 for b, lg in zip(bounds, logits))  # each head's own bound
                if keys.shape[0] == 1:  # a one-key block: the bound is the logit itself
                    assert float(want) == pytest.approx(float(max(logits)), rel=1e-9, abs=1e-12)
    assert torch.equal(key_bound_scores(q.float(), key_min, key_max, newest),
                       key_bound_scores(q.float(), key_min, key_max, newest, 1 / math.sqrt(D)))


def test_the_mass_pooling_is_the_group_mean_of_each_heads_softmax():
    """``group="mass"``: per query head a softmax over the row's valid blocks of its bounds, averaged over the KV head's
    group, in log (float64 brute force); it ranks blocks otherwise than the group's largest bound when one head's
    logits run larger."""
    q, _, key_min, key_max, newest = _rows(4, [6 * BS + 3, 2 * BS])
    q[:, ::2] *= 4  # the first head of each group: larger logits
    scale = 0.5
    got = key_bound_scores(q.float(), key_min, key_max, newest, scale, group="mass")
    top = key_bound_scores(q.float(), key_min, key_max, newest, scale)
    group, differ = HQ // HKV, False
    for row in range(2):
        valid = newest[row] + 1
        assert torch.isinf(got[row, :, valid:]).all()
        for head in range(HKV):
            low, high = key_min[row, head, :valid].double(), key_max[row, head, :valid].double()
            probs = [torch.softmax(torch.maximum(q[row, h, 0] * low, q[row, h, 0] * high).sum(-1) * scale, 0)
                     for h in range(head * group, (head + 1) * group)]
            want = torch.stack(probs).mean(0).log()
            torch.testing.assert_close(got[row, head, :valid].double(), want, rtol=0, atol=1e-5)
            differ |= not torch.equal(got[row, head, :valid].argsort(), top[row, head, :valid].argsort())
    assert differ
    with pytest.raises(ValueError, match="group must be 'max' or 'mass', got 'sum'"):
        key_bound_scores(q.float(), key_min, key_max, newest, group="sum")


def test_the_oracle_is_each_blocks_true_attention_share_averaged_over_the_group():
    """``true_block_scores``: per KV head, the log of each block's share of the softmax attention of the token over
    its row's valid keys, averaged over the group's query heads (float64 brute force); ``-inf`` for blocks past a
    row's keys, up to the capacity; keys past ``seqlens`` (stale cache slots) change nothing."""
    lengths, scale, capacity = [5 * BS + 1, 3 * BS + 7], 0.4, 8
    q, k, *_ = _rows(5, lengths)
    k = torch.cat([k, 50 * torch.randn(2, HKV, 9, D, dtype=torch.float64)], 2)  # stale slots with large logits
    seqlens = torch.tensor(lengths)
    got = true_block_scores(q.float(), k.float(), seqlens, BS, capacity, scale)
    assert got.dtype == torch.float32 and got.shape == (2, HKV, capacity)
    group = HQ // HKV
    for row, n in enumerate(lengths):
        nb = -(-n // BS)
        assert torch.isinf(got[row, :, nb:]).all() and torch.isfinite(got[row, :, :nb]).all()
        for head in range(HKV):
            probs = torch.stack([torch.softmax(k[row, head, :n] @ q[row, h, 0] * scale, 0)
                                 for h in range(head * group, (head + 1) * group)]).mean(0)
            want = torch.nn.functional.pad(probs, (0, nb * BS - n)).view(nb, BS).sum(-1).log()
            torch.testing.assert_close(got[row, head, :nb].double(), want, rtol=0, atol=1e-5)
    assert torch.equal(true_block_scores(q.float(), k.float(), seqlens, BS, capacity),
                       true_block_scores(q.float(), k.float(), seqlens, BS, capacity, 1 / math.sqrt(D)))


def test_oracle_decode_of_a_left_padded_batch_is_each_row_alone():
    """The oracle reads each row's keys from its start: a left-padded batch decodes as each prompt alone (greedy
    logits; 40 new tokens, so that the short row too has more blocks than the budget), sparse, and on other blocks
    than Quest."""
    budget = {**QUEST, "estimate": "oracle", "estimate_weight": 1.0}
    model = tiny_decode_model(budget, BS)
    batch = padded_generation(model, new=40)[0]
    assert 0 < model.seer_decode.mean_density() < 1
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 300, (n,), generator=g) for n in (45, 26)]  # padded_generation's
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            out = model.generate(prompt[None], max_new_tokens=40, do_sample=False, pad_token_id=2, output_logits=True,
                                 return_dict_in_generate=True)
        alone = torch.stack(out.logits)[:, 0]  # up to an end-of-text token
        assert len(alone) >= 20
        torch.testing.assert_close(batch[:len(alone), row], alone, rtol=1e-4, atol=1e-4)
    quest = padded_generation(tiny_decode_model({**budget, "estimate": "quest"}, BS), new=40)[0]
    assert not torch.allclose(batch, quest, atol=1e-3)


def test_the_rerank_scores_the_candidates_by_their_own_keys_and_puts_the_rest_below():
    """``reranked_block_scores``: per KV head the top ``candidates`` blocks by the given scores get the log of their
    share of the group's attention over the candidates' keys alone (float64 brute force); the other valid blocks keep
    the scores' order below every candidate; invalid blocks stay ``-inf``."""
    lengths, scale, capacity, candidates = [6 * BS + 5, 3 * BS + 2], 0.4, 8, 3
    q, k, *_ = _rows(6, lengths)
    k = torch.cat([k, torch.randn(2, HKV, capacity * BS - k.shape[2], D, dtype=torch.float64)], 2)
    seqlens = torch.tensor(lengths)
    scores = torch.randn(2, HKV, capacity, generator=torch.Generator().manual_seed(2))
    for row, n in enumerate(lengths):
        scores[row, :, -(-n // BS):] = float("-inf")
    got = reranked_block_scores(q.float(), k.float(), seqlens, scores, candidates, BS, scale)
    group = HQ // HKV
    for row, n in enumerate(lengths):
        nb = -(-n // BS)
        assert torch.isinf(got[row, :, nb:]).all()
        for head in range(HKV):
            top = scores[row, head].topk(candidates).indices
            keys = torch.cat([k[row, head, b * BS:min(n, (b + 1) * BS)] for b in top.tolist()])
            probs = torch.stack([torch.softmax(keys @ q[row, h, 0] * scale, 0)
                                 for h in range(head * group, (head + 1) * group)]).mean(0)
            sizes = [min(n, (b + 1) * BS) - b * BS for b in top.tolist()]
            want = torch.stack([part.sum() for part in probs.split(sizes)]).log()
            torch.testing.assert_close(got[row, head, top].double(), want, rtol=0, atol=1e-5)
            rest = [b for b in range(nb) if b not in top.tolist()]
            assert got[row, head, rest].max() < got[row, head, top].min()
            assert torch.equal(got[row, head, rest].argsort(), scores[row, head, rest].argsort())


def test_offsets_read_each_rows_keys_after_its_left_padding():
    """``offsets``: the oracle and the rerank over a cache whose rows start after some padding give what they give over
    the same keys moved to the start."""
    lengths, scale, capacity = [5 * BS + 3, 3 * BS + 1], 0.4, 6
    q, k, *_ = _rows(9, lengths)
    q, k = q.float(), torch.cat([k, torch.zeros(2, HKV, capacity * BS - k.shape[2], D, dtype=torch.float64)], 2).float()
    pads = [0, 11]
    padded = torch.stack([torch.cat([torch.randn(HKV, pad, D) * 9, k[r]], 1)[:, :capacity * BS]
                          for r, pad in enumerate(pads)])
    seqlens, offsets = torch.tensor(lengths), torch.tensor(pads)
    torch.testing.assert_close(true_block_scores(q, padded, seqlens, BS, capacity, scale, offsets),
                               true_block_scores(q, k, seqlens, BS, capacity, scale))
    scores = true_block_scores(q, k, seqlens, BS, capacity, scale) + torch.randn(2, HKV, capacity)
    torch.testing.assert_close(reranked_block_scores(q, padded, seqlens, scores, 3, BS, scale, offsets),
                               reranked_block_scores(q, k, seqlens, scores, 3, BS, scale))
    assert not torch.allclose(reranked_block_scores(q, padded, seqlens, scores, 3, BS, scale),
                              reranked_block_scores(q, k, seqlens, scores, 3, BS, scale))


def test_a_rerank_of_every_block_is_the_oracle():
    """Quest's blocks ranked again over all of them choose what the oracle chooses: the same greedy logits for a
    left-padded batch, and other ones than Quest's alone."""
    quest = {**QUEST, "estimate": "quest", "estimate_weight": 1.0}
    logits = {name: padded_generation(tiny_decode_model(budget, BS), new=40)[0] for name, budget in
              [("oracle", {**quest, "estimate": "oracle"}), ("rerank", {**quest, "rerank_blocks": 64}),
               ("quest", quest)]}
    torch.testing.assert_close(logits["rerank"], logits["oracle"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits["rerank"], logits["quest"], atol=1e-3)


def test_quest_mass_decodes_by_its_own_pooling():
    """The model's decode steps read ``estimate``: Quest alone pooled by the largest bound and by the mass decode
    other tokens, each sparse."""
    tokens = {}
    for estimate in ("quest", "quest_mass"):
        model = tiny_decode_model({**QUEST, "estimate": estimate, "estimate_weight": 1.0}, BS)
        tokens[estimate] = padded_generation(model, new=24)[0]
        assert 0 < model.seer_decode.mean_density() < 1
    assert not torch.equal(tokens["quest"], tokens["quest_mass"])


def _gates():
    torch.manual_seed(0)
    cfg = DecodeGateConfig(block_size=BS, hidden_size=12)
    return {0: DecodeGate(cfg, D, HQ, HKV), 3: DecodeGate(cfg, D, HQ, HKV)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_length", [None, 120])
def test_cache_bounds_equal_a_recomputation_through_prefill_and_steps(dtype, max_length):
    """Rows of 1, 16, 29 and 47 tokens (right-padded input, as a prefill hands them over), one-token steps that fill
    and start blocks, a chunk of three tokens in between: every valid block's bounds are its keys' min and max, its
    moments (``key_stats`` both) the float64 sums of its keys and of their squares."""
    gates = _gates()
    prompts, steps, chunk = [1, 16, 29, 47], 30, 3
    total = max(prompts) + steps + chunk
    g = torch.Generator().manual_seed(1)
    k_pre = torch.randn(4, HKV, total, D, generator=g)
    k_post = torch.randn(4, HKV, total, D, generator=g).to(dtype)
    cache = DecodeKeyCache(gates, 4, max_length=max_length, bounds_dtype=dtype, key_stats=("bounds", "moments"))
    padded = torch.zeros(4, HKV, max(prompts), D, dtype=dtype)
    for row, n in enumerate(prompts):
        padded[row, :, :n] = k_post[row, :, :n]
    for layer in gates:
        cache.update(layer, k_pre[:, :, :max(prompts)], torch.tensor(prompts), padded)
    lengths = list(prompts)
    for step in range(steps + 1):
        if step == steps // 2:
            new = chunk
        elif step:
            new = 1
        else:
            new = 0
        if new:
            rows = [slice(n, n + new) for n in lengths]
            pre = torch.stack([k_pre[r, :, s] for r, s in enumerate(rows)])
            post = torch.stack([k_post[r, :, s] for r, s in enumerate(rows)])
            for layer in gates:
                cache.update(layer, pre, k_post=post)
            lengths = [n + new for n in lengths]
        for layer in gates:
            assert cache.key_min[layer].dtype == dtype and cache.key_min[layer].shape[2] == cache.capacity
            for row, n in enumerate(lengths):
                low, high = _bounds_of(k_post[row, :, :n], BS)
                assert torch.equal(cache.key_min[layer][row, :, :low.shape[1]], low)
                assert torch.equal(cache.key_max[layer][row, :, :high.shape[1]], high)
                keys = torch.nn.functional.pad(k_post[row, :, :n].double(), (0, 0, 0, -n % BS)).view(HKV, -1, BS, D)
                nb = keys.shape[1]
                assert cache.key_sum[layer].dtype == torch.float32
                torch.testing.assert_close(cache.key_sum[layer][row, :, :nb].double(), keys.sum(2), rtol=0, atol=1e-4)
                torch.testing.assert_close(cache.key_sq[layer][row, :, :nb].double(), (keys * keys).sum(2), rtol=0,
                                           atol=1e-4)
    assert cache.bounds_memory_bytes() == 2 * len(gates) * 4 * HKV * cache.capacity * D * (dtype.itemsize + 4)


def test_cache_bounds_need_post_rope_keys_exactly_when_kept():
    with pytest.raises(ValueError, match=r"post-RoPE keys .* are needed \(key statistics kept\); got None"):
        DecodeKeyCache(_gates(), 2, bounds_dtype=torch.float32).update(0, torch.randn(2, HKV, 3, D))
    with pytest.raises(ValueError, match=r"are not taken \(key statistics not kept\)"):
        DecodeKeyCache(_gates(), 2).update(0, torch.randn(2, HKV, 3, D), k_post=torch.randn(2, HKV, 3, D))
    with pytest.raises(ValueError, match="keeps no key bounds"):
        DecodeKeyCache(_gates(), 2).bound_scores(0, torch.randn(2, HQ, 1, D))
    with pytest.raises(ValueError, match="keeps no key bounds"):  # the moments alone
        DecodeKeyCache(_gates(), 2, bounds_dtype=torch.float32, key_stats=("moments",)).bound_scores(
            0, torch.randn(2, HQ, 1, D))
    for bad in [(), ("max",), ("bounds", "variance")]:
        want = "key_stats names 'bounds', 'moments' or both; got " + re.escape(repr(bad))
        with pytest.raises(ValueError, match=want):
            DecodeKeyCache(_gates(), 2, bounds_dtype=torch.float32, key_stats=bad)


def test_the_moments_estimate_is_a_gaussian_block_mass_pooled_over_the_group():
    """``key_moment_scores`` against float64: per head ``log n + s q.mu + s^2/2 sum q^2 var`` of each block's valid
    keys (the newest block partial), a softmax over the row's blocks, averaged over the group; ``-inf`` past a row's
    keys. For keys with one value per block (zero variance) it is the true block mass of such keys."""
    lengths, scale, capacity = [5 * BS + 3, 2 * BS], 0.3, 7
    q, k, *_ = _rows(8, lengths)
    key_sum, key_sq = torch.zeros(2, HKV, capacity, D), torch.zeros(2, HKV, capacity, D)
    for row, n in enumerate(lengths):
        for b in range(-(-n // BS)):
            part = k[row, :, b * BS:min(n, (b + 1) * BS)]
            key_sum[row, :, b], key_sq[row, :, b] = part.sum(1).float(), (part * part).sum(1).float()
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    got = key_moment_scores(q.float(), key_sum, key_sq, seqlens, BS, scale)
    group = HQ // HKV
    for row, n in enumerate(lengths):
        nb = -(-n // BS)
        assert torch.isinf(got[row, :, nb:]).all()
        for head in range(HKV):
            parts = [k[row, head, b * BS:min(n, (b + 1) * BS)] for b in range(nb)]
            probs = []
            for h in range(head * group, (head + 1) * group):
                qd = q[row, h, 0]
                logm = torch.stack([math.log(len(p)) + scale * (qd @ p.mean(0))
                                    + scale ** 2 / 2 * (qd * qd * p.var(0, unbiased=False)).sum() for p in parts])
                probs.append(torch.softmax(logm, 0))
            torch.testing.assert_close(got[row, head, :nb].double(), torch.stack(probs).mean(0).log(), rtol=0,
                                       atol=1e-4)
    # blocks of equal keys (16, 16 and 5 of them): no variance, so the estimate is each block's true mass
    same = torch.cat([k[:, :, b:b + 1].expand(-1, -1, BS, -1) for b in range(3)], 2)[:, :, :2 * BS + 5].float()
    sums = torch.nn.functional.pad(same, (0, 0, 0, BS - 5)).view(2, HKV, 3, BS, D)
    flat = key_moment_scores(q.float(), sums.sum(3), (sums * sums).sum(3), torch.tensor([2 * BS + 5] * 2), BS, scale)
    torch.testing.assert_close(flat, true_block_scores(q.float(), same, torch.tensor([2 * BS + 5] * 2), BS, 3, scale),
                               rtol=0, atol=1e-4)


def test_moments_decode_sparsely_on_other_blocks_than_quest():
    """The model's decode steps with ``estimate="moments"``: sparse, other tokens' logits than Quest's, and a cache
    that keeps the moments alone, equal after the steps to the float64 sums over the KV cache's keys (each row's from
    its left padding on)."""
    logits = {}
    for estimate in ("quest", "moments"):
        model = tiny_decode_model({**QUEST, "estimate": estimate, "estimate_weight": 1.0}, BS)
        logits[estimate], kv, _ = padded_generation(model, new=40)
        cache = model.seer_decode.cache
        assert 0 < model.seer_decode.mean_density() < 1 and cache.moments == (estimate == "moments")
        assert bool(cache.key_min) == (estimate == "quest")  # the moments replace the bounds
    assert not torch.allclose(logits["quest"], logits["moments"], atol=1e-3) and cache.key_sum
    for layer, sums in cache.key_sum.items():
        keys = kv.layers[layer].keys
        for row, (first, n) in enumerate(zip(cache.offsets, cache.seqlens[layer].tolist())):
            real = keys[row, :, first:first + n].double()
            blocks = torch.nn.functional.pad(real, (0, 0, 0, -n % BS)).view(HKV, -1, BS, real.shape[-1])
            nb = blocks.shape[1]
            torch.testing.assert_close(sums[row, :, :nb].double(), blocks.sum(2), rtol=0, atol=1e-4)
            torch.testing.assert_close(cache.key_sq[layer][row, :, :nb].double(), (blocks * blocks).sum(2), rtol=0,
                                       atol=1e-4)


def test_mixture_matches_a_float64_computation():
    g = torch.Generator().manual_seed(2)
    gate, quest = torch.randn(3, HKV, 9, generator=g) * 4, torch.randn(3, HKV, 9, generator=g) * 4
    newest = torch.tensor([0, 4, 8])
    after = (torch.arange(9)[None, :] > newest[:, None])[:, None]
    gate, quest = gate.masked_fill(after, float("-inf")), quest.masked_fill(after, float("-inf"))
    for w in (0.25, 0.5, 0.9):
        want = ((1 - w) * torch.softmax(gate.double(), -1) + w * torch.softmax(quest.double(), -1)).log()
        got = mix_estimate(gate, quest, w)
        assert got.dtype == torch.float32 and torch.equal(torch.isinf(got), after.expand_as(got))
        torch.testing.assert_close(got.double()[~torch.isinf(got)], want[~torch.isinf(want)], rtol=0, atol=1e-6)
        assert torch.allclose(torch.softmax(got, -1).double(), want.exp(), atol=1e-6)  # the threshold's reading
    torch.testing.assert_close(mix_estimate(None, quest, 1.0), torch.log_softmax(quest, -1))


@pytest.mark.parametrize("budget", [{"token_budget": 48}, {"method": "threshold", "threshold": 0.1}])
def test_budgets_on_the_mixture_keep_what_brute_force_keeps(budget):
    """The mixed probabilities in float64, ranked (token budget) or thresholded, the forced blocks added."""
    g = torch.Generator().manual_seed(3)
    nb, newest = 12, torch.tensor([0, 2, 11, 6])
    gate, quest = torch.randn(4, HKV, nb, generator=g) * 3, torch.randn(4, HKV, nb, generator=g) * 3
    after = (torch.arange(nb)[None, :] > newest[:, None])[:, None]
    gate, quest = gate.masked_fill(after, float("-inf")), quest.masked_fill(after, float("-inf"))
    sparsity = DecodeSparsityConfig(**budget, estimate="quest", estimate_weight=0.3)
    index, density = decode_step_blocks(mix_estimate(gate, quest, 0.3), newest, sparsity, BS)
    mixed = 0.7 * torch.softmax(gate.double(), -1) + 0.3 * torch.softmax(quest.double(), -1)
    fractions = []
    for row, last in enumerate(newest.tolist()):
        for head in range(HKV):
            p = mixed[row, head, :last + 1]
            forced = {0, last}
            if sparsity.method == "token_budget":
                rest = [j for j in p.argsort(descending=True).tolist() if j not in forced]
                want = sorted(forced | set(rest[:max(0, 48 // BS - len(forced))]))
            else:
                want = sorted(forced | {j for j in range(last + 1) if p[j] >= 0.1})
            assert [j for j in index[row, head].tolist() if j >= 0] == want
            fractions.append(len(want) / (last + 1))
    assert float(density) == pytest.approx(sum(fractions) / len(fractions))


def _reseeded(model, seed: int):
    torch.manual_seed(seed)
    for g in model.seer_decode.gates.values():
        torch.nn.init.normal_(g.k_weight, std=2.0)
    return model


def test_quest_alone_ignores_the_gate_and_the_mixture_does_not():
    """At ``estimate_weight`` 1 two different gates give the same logits; at 0.5 (and the gate alone) they differ."""
    alone = {**QUEST, "estimate_weight": 1.0}
    a, b = (padded_generation(_reseeded(tiny_decode_model(alone, BS), s), new=12)[0] for s in (1, 2))
    assert torch.equal(a, b)
    for budget in (QUEST, {"token_budget": 48}):
        a, b = (padded_generation(_reseeded(tiny_decode_model(budget, BS), s), new=12)[0] for s in (1, 2))
        assert not torch.equal(a, b)


def test_model_bounds_follow_the_kv_cache_of_a_left_padded_batch():
    """After a left-padded prefill and decode steps, the bounds are those of each row's post-RoPE keys in the KV
    cache, from its padding on."""
    model = tiny_decode_model(QUEST, BS)
    _, cache, mask = padded_generation(model, new=20)
    ctx = model.seer_decode
    for layer in ctx.gates:
        keys = cache.layers[layer].keys  # [B, Hkv, N, D]
        for row, first in enumerate(ctx.cache.offsets):
            n = keys.shape[2] - first
            assert int(ctx.cache.seqlens[layer][row]) == n
            low, high = _bounds_of(keys[row, :, first:], BS)
            assert torch.equal(ctx.cache.key_min[layer][row, :, :low.shape[1]], low)
            assert torch.equal(ctx.cache.key_max[layer][row, :, :high.shape[1]], high)
    assert 0 < ctx.mean_density() < 1


def test_model_bounds_follow_a_static_kv_cache():
    from transformers import StaticCache

    model = tiny_decode_model(QUEST, BS)
    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(7))
    cache = StaticCache(config=model.config, max_cache_len=64)
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        for _ in range(9):  # into the fourth block
            out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
    ctx = model.seer_decode
    for layer in ctx.gates:
        low, high = _bounds_of(cache.layers[layer].keys[:, :, :49].flatten(0, 1), BS)
        got_min, got_max = ctx.cache.key_min[layer][:, :, :4], ctx.cache.key_max[layer][:, :, :4]
        assert torch.equal(got_min.flatten(0, 1), low) and torch.equal(got_max.flatten(0, 1), high)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("estimate", "snapkv",
     r"decode_sparsity\.estimate='snapkv'.*choose a training-free estimate from \('quest', 'quest_mass', 'moments', "
     r"'oracle'\)"),
    ("rerank_blocks", -1, r"decode_sparsity\.rerank_blocks=-1.*integer >= 0"),
    ("rerank_blocks", 2.5, r"decode_sparsity\.rerank_blocks=2\.5"),
    ("estimate_weight", 0, r"decode_sparsity\.estimate_weight=0.*must be in \(0, 1\]"),
    ("estimate_weight", 1.5, r"decode_sparsity\.estimate_weight=1\.5.*must be in \(0, 1\]"),
    ("estimate_weight", "half", r"decode_sparsity\.estimate_weight='half'"),
    ("estimate_weight", True, r"decode_sparsity\.estimate_weight=True")])
def test_estimate_config_errors(field, value, message):
    with pytest.raises(ConfigError, match=message):
        DecodeSparsityConfig(**{field: value})


def test_the_estimate_is_stored_described_and_part_of_a_calibration():
    from seer.sparsity.decode import DecodeCalibration

    budget = DecodeSparsityConfig(method="threshold", target_density=0.1, estimate="quest", estimate_weight=0.25)
    assert budget.stored()["estimate"] == "quest" and budget.stored()["estimate_weight"] == 0.25
    assert budget.describe() == "threshold target_density=0.1, quest@0.25"
    assert DecodeSparsityConfig(token_budget=1024, estimate="quest", estimate_weight=1).describe() == \
        "token_budget=1024, quest@1"
    stored = DecodeCalibration.from_dict(DecodeCalibration(budget, threshold=0.01, density=0.1).to_dict())
    assert stored.sparsity == budget and stored.matches(budget)
    gate_alone = DecodeSparsityConfig(method="threshold", target_density=0.1)
    assert not stored.matches(gate_alone) and not DecodeCalibration(gate_alone, 0.01, 0.1).matches(budget)
