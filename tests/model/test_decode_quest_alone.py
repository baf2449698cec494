"""Training-free sparse decode (Quest alone, no decode gates: :func:`seer.model.decode.attach_quest_decode`): the same
logits as the gated path at ``estimate_weight`` 1, whatever its gates, over a left-padded batch and a static cache;
the key-bounds-only cache against a recomputation; clear refusals."""

from __future__ import annotations

import pytest
import torch

from seer.checks import ConfigError
from seer.model.decode_cache import BoundsOnly, DecodeKeyCache
from seer.sparsity.decode import DecodeSparsityConfig
from tests.tiny import padded_generation, tiny_decode_model, tiny_model

BS = 16
ALONE = {"token_budget": 48, "estimate": "quest", "estimate_weight": 1.0}


def quest_model(budget: dict | None = ALONE, block_size: int = BS, kernel: str = "reference"):
    """The tiny Llama of :func:`tests.tiny.tiny_decode_model` (same base weights), sparse decode by Quest alone."""
    from seer.model.attention import prepare_model
    from seer.model.decode import attach_quest_decode

    model = tiny_model("llama")
    prepare_model(model, block_size)
    ctx = attach_quest_decode(model, block_size)
    if budget is not None:
        ctx.enable(DecodeSparsityConfig(**budget), kernel)
    return model


@pytest.mark.parametrize("budget", [ALONE, {**ALONE, "first_block": False, "token_budget": 32},
                                    {"method": "threshold", "threshold": 0.3, "estimate": "quest",
                                     "estimate_weight": 1.0}])
def test_quest_alone_gives_the_gated_paths_logits_at_weight_one(budget):
    """Left-padded batch of two prompts, 20 greedy steps: identical logits to decode gates + Quest at weight 1 (which
    ignores the gate), and a sparse selection (density below 1) that changes them against dense decode."""
    gated_logits = padded_generation(tiny_decode_model(budget, BS), new=20)[0]
    model = quest_model(budget)
    logits, _, _ = padded_generation(model, new=20)
    torch.testing.assert_close(logits, gated_logits, rtol=0, atol=0)
    assert 0 < model.seer_decode.mean_density() < 1
    dense = padded_generation(quest_model(None), new=20)[0]
    assert not torch.allclose(logits, dense)


def test_every_block_kept_is_dense_decode():
    logits = padded_generation(quest_model({**ALONE, "token_budget": 4096}), new=12)[0]
    dense = padded_generation(quest_model(None), new=12)[0]
    torch.testing.assert_close(logits, dense, rtol=1e-5, atol=1e-5)


def test_a_static_cache_decodes_as_a_dynamic_one():
    from transformers import StaticCache

    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(7))
    got = {}
    for kind in ("dynamic", "static"):
        model = quest_model()
        cache = StaticCache(config=model.config, max_cache_len=64) if kind == "static" else None
        steps = []
        with torch.no_grad():
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            for _ in range(12):
                steps.append(out.logits[:, -1])
                out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values,
                            use_cache=True)
        got[kind] = torch.stack(steps)
        assert model.seer_decode.cache.keys == {} and model.seer_decode.cache.tails == {}  # bounds only
    torch.testing.assert_close(got["static"], got["dynamic"], rtol=1e-5, atol=1e-5)


def test_the_bounds_only_cache_matches_a_recomputation():
    """Rows of 5, 16 and 37 keys, then 30 one-token steps: the bounds, lengths and capacity of a cache without gates
    are those of each row's keys."""
    g = torch.Generator().manual_seed(0)
    layers = {0: BoundsOnly(4, 2, 8, BS), 2: BoundsOnly(4, 2, 8, BS)}
    cache = DecodeKeyCache(layers, 3, bounds_dtype=torch.float32)
    counts = torch.tensor([5, 16, 37])
    keys = torch.randn(3, 2, 37 + 30, 8, generator=g)
    for layer in layers:
        cache.update(layer, None, counts, keys[:, :, :37].clone())
    lengths = counts.clone()
    for _ in range(30):
        new = torch.stack([keys[r, :, int(lengths[r])] for r in range(3)])[:, :, None]
        for layer in layers:
            cache.update(layer, None, k_post=new)
        lengths += 1
    for layer in layers:
        assert cache.seqlens[layer].tolist() == lengths.tolist()
        for r, n in enumerate(lengths.tolist()):
            row = torch.cat([keys[r, :, :int(counts[r])], torch.stack(
                [keys[r, :, int(counts[r]) + i] for i in range(30)], 1)], 1)  # the row's keys in order
            assert row.shape[1] == n
            for b in range(-(-n // BS)):
                torch.testing.assert_close(cache.key_min[layer][r, :, b], row[:, b * BS:(b + 1) * BS].amin(1))
                torch.testing.assert_close(cache.key_max[layer][r, :, b], row[:, b * BS:(b + 1) * BS].amax(1))
    assert cache.capacity >= -(-int(lengths.max()) // BS) and cache.memory_bytes() == 0
    assert cache.bounds_memory_bytes() == 2 * 2 * 3 * 2 * cache.capacity * 8 * 4


def test_refusals():
    with pytest.raises(ValueError, match="keeps only key bounds: give bounds_dtype"):
        DecodeKeyCache({0: BoundsOnly(4, 2, 8, BS)}, 1)
    cache = DecodeKeyCache({0: BoundsOnly(4, 2, 8, BS)}, 1, bounds_dtype=torch.float32)
    with pytest.raises(ValueError, match="takes the post-RoPE keys only"):
        cache.update(0, torch.zeros(1, 2, 3, 8), k_post=torch.zeros(1, 2, 3, 8))
    cache.update(0, None, k_post=torch.zeros(1, 2, 3, 8))
    with pytest.raises(ValueError, match="no decode gates, only key bounds: use bound_scores"):
        cache.scores(0, torch.zeros(1, 4, 1, 8))
    model = quest_model(None)
    for budget, message in (({"token_budget": 48}, r"decode_sparsity\.estimate=None: .*estimate=quest"),
                            ({**ALONE, "estimate_weight": 0.5}, r"estimate_weight=0\.5: .*a mixture needs decode"),
                            ({**ALONE, "method": "threshold", "target_density": 0.1},
                             r"target_density=0\.1: a calibrated threshold is stored beside decode gates")):
        with pytest.raises(ConfigError, match=message):
            model.seer_decode.enable(DecodeSparsityConfig(**budget))
    with pytest.raises(Exception, match="token_budget=8.*below one block"):
        model.seer_decode.enable(DecodeSparsityConfig(**{**ALONE, "token_budget": 8}))
    from seer.model.decode import attach_quest_decode

    with pytest.raises(ValueError, match="already has a seer decode selection"):
        attach_quest_decode(model)
    for bad in (0, 8, True):
        with pytest.raises(ValueError, match=f"block_size={bad}: the decode kernels take key blocks of"):
            attach_quest_decode(tiny_model("llama"), bad)
