"""Pinned prompt blocks in sparse decode (``DecodeSparsityConfig.prompt_blocks``, SnapKV's observation window): the
choice against a float64 brute force, the blocks every step then lists, a padded batch pinning what each row alone
pins, and the config's checks."""

from __future__ import annotations

import math

import pytest
import torch

from seer.checks import ConfigError
from seer.model.decode_cache import prompt_block_pins
from seer.sparsity.decode import DecodeSparsityConfig
from tests.model.test_decode_quest_alone import quest_model
from tests.tiny import padded_generation

BS = 16


def _brute_force(query, key, blocks, block_size, scale, skip_first):
    """Per KV head, the blocks with the most causal softmax attention of the last queries, float64, loop by loop."""
    hq, w, _ = query.shape
    hkv, n, _ = key.shape
    group, nb = hq // hkv, -(-n // block_size)
    chosen = []
    for head in range(hkv):
        mass = [0.0] * nb
        for qh in range(head * group, (head + 1) * group):
            for i in range(w):
                position = n - w + i
                logits = (key[head, :position + 1].double() @ query[qh, i].double()) * scale
                probs = torch.softmax(logits, 0)
                for j in range(position + 1):
                    mass[j // block_size] += float(probs[j])
        candidates = [b for b in range(nb) if not (skip_first and b == 0)]
        ranked = sorted(candidates, key=lambda b: -mass[b])
        chosen.append(sorted(ranked[:blocks]))
    return chosen


@pytest.mark.parametrize("n, w, blocks, skip_first", [(100, 16, 2, True), (100, 16, 3, False), (37, 5, 9, True),
                                                      (16, 16, 1, True)])
def test_pins_are_the_most_attended_blocks_of_the_last_queries(n, w, blocks, skip_first):
    g = torch.Generator().manual_seed(n + blocks)
    query = torch.randn(4, w, 8, generator=g) * 2
    key = torch.randn(2, n, 8, generator=g) * 2
    pins = prompt_block_pins(query, key, blocks, BS, 0.3, skip_first)
    assert pins.shape == (2, -(-n // BS)) and pins.dtype == torch.bool
    want = _brute_force(query, key, blocks, BS, 0.3, skip_first)
    assert [pins[h].nonzero().flatten().tolist() for h in range(2)] == want
    default = prompt_block_pins(query, key, blocks, BS, None, skip_first)
    assert torch.equal(default, prompt_block_pins(query, key, blocks, BS, 1 / math.sqrt(8), skip_first))


def _lists(model, monkeypatch) -> list[torch.Tensor]:
    """Every block list the model's decode steps attend (``DecodeContext._attend``'s ``index``)."""
    from seer.model.decode import DecodeContext

    seen, attend = [], DecodeContext._attend

    def record(self, query, key, value, index, seqlens, scaling):
        seen.append((index.clone(), seqlens.clone()))
        return attend(self, query, key, value, index, seqlens, scaling)

    monkeypatch.setattr(DecodeContext, "_attend", record)
    return seen


def test_every_step_lists_the_pinned_blocks(monkeypatch):
    """A budget of the first, the newest and two pinned blocks: each step of an unpadded batch attends exactly those,
    the pins those of the rows' prefill."""
    budget = {"token_budget": 4 * BS, "estimate": "quest", "estimate_weight": 1.0, "prompt_blocks": 2}
    model = quest_model(budget)
    seen = _lists(model, monkeypatch)
    ids = torch.randint(3, 300, (2, 90), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=2)
    cache = model.seer_decode.cache
    assert set(cache.pinned) == {0, 1} and len(seen) == 2 * 9
    for step, (index, seqlens) in enumerate(seen):
        pinned = cache.pinned[step % 2]
        assert int(pinned.sum()) == 2 * 2 * 2  # rows x KV heads x blocks
        for row in range(2):
            newest = (int(seqlens[row]) - 1) // BS
            for head in range(index.shape[1]):
                want = sorted({0, newest, *pinned[row, head].nonzero().flatten().tolist()})
                got = [b for b in index[row, head].tolist() if b >= 0]
                assert got == want and 0 not in pinned[row, head].nonzero().flatten().tolist()


def test_a_padded_batch_pins_what_each_row_alone_pins():
    budget = {"token_budget": 4 * BS, "estimate": "quest", "estimate_weight": 1.0, "prompt_blocks": 2}
    model = quest_model(budget)
    logits, _, _ = padded_generation(model, new=6)  # prompts of 45 and 26 tokens, left-padded
    batch = {layer: pins.clone() for layer, pins in model.seer_decode.cache.pinned.items()}
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 300, (n,), generator=g) for n in (45, 26)]  # as padded_generation draws them
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            model.generate(prompt[None], max_new_tokens=2, do_sample=False, pad_token_id=2)
        for layer, pins in model.seer_decode.cache.pinned.items():
            nb = -(-len(prompt) // BS)
            assert torch.equal(batch[layer][row, :, :nb], pins[0, :, :nb]) and not batch[layer][row, :, nb:].any()
    assert all(int(pins.sum()) == 2 * 2 + 2 * 1 for pins in batch.values())  # 2 pins of 3 blocks, 1 of 2
    assert torch.isfinite(logits).all()


def test_the_config_checks_and_names_prompt_blocks():
    budget = DecodeSparsityConfig(token_budget=64, prompt_blocks=3)
    assert budget.describe() == "token_budget=64, 3 prompt blocks" and budget.stored()["prompt_blocks"] == 3
    assert budget.max_kept_blocks(100, 16) == 5  # the first, the newest and three pins outgrow four blocks
    assert DecodeSparsityConfig(token_budget=128).max_kept_blocks(100, 16) == 8
    for value, message in ((-1, "must be an integer >= 0"), (1.5, "must be an integer >= 0"),
                           (True, "must be an integer >= 0")):
        with pytest.raises(ConfigError, match=f"decode_sparsity.prompt_blocks={value!r}: .*{message}"):
            DecodeSparsityConfig(prompt_blocks=value)
    with pytest.raises(ConfigError, match="prompt_blocks=2: a calibrated threshold"):
        DecodeSparsityConfig(method="threshold", target_density=0.2, prompt_blocks=2)
