"""Decode budgets against brute force, one token and head at a time."""

import math

import pytest
import torch

from seer.checks import ConfigError
from seer.sparsity.decode import (DecodeSparsityConfig, calibrate_decode_threshold, decode_block_index,
                                  decode_block_mask, decode_density, decode_step_blocks)

BS = 16


def _brute(scores, seqlens, cfg, tau=None):
    r, h, nb = scores.shape
    out = []
    for i in range(r):
        newest = (int(seqlens[i]) - 1) // BS
        heads = []
        for g in range(h):
            forced = {newest} | ({0} if cfg.first_block else set()) \
                | set(range(max(0, newest - cfg.recent_blocks), newest))
            valid = list(range(newest + 1))
            if cfg.method == "dense":
                kept = set(valid)
            elif cfg.method == "token_budget":
                rest = sorted((j for j in valid if j not in forced), key=lambda j: -float(scores[i, g, j]))
                kept = forced | set(rest[:max(0, cfg.token_budget // BS - len(forced))])
            else:
                s = [math.exp(float(scores[i, g, j])) for j in valid]
                kept = forced | {j for j in valid if s[j] / sum(s) >= (cfg.threshold if tau is None else tau)}
            heads.append(sorted(kept))
        out.append(heads)
    return out


def _lists(index):
    return [[[int(j) for j in row if j >= 0] for row in heads] for heads in index]


@pytest.mark.parametrize("cfg", [
    DecodeSparsityConfig(method="token_budget", token_budget=48),
    DecodeSparsityConfig(method="token_budget", token_budget=40, first_block=False),  # 2 blocks: 40 // 16
    DecodeSparsityConfig(method="token_budget", token_budget=16),  # 1 block, but 2 forced ones kept
    DecodeSparsityConfig(method="token_budget", token_budget=64, recent_blocks=2),  # a window of 2 before the newest
    DecodeSparsityConfig(method="token_budget", token_budget=16, recent_blocks=1, first_block=False),  # 2 forced
    DecodeSparsityConfig(method="threshold", threshold=0.15),
    DecodeSparsityConfig(method="threshold", threshold=0.15, first_block=False),
    DecodeSparsityConfig(method="threshold", threshold=0.3, recent_blocks=3),
    DecodeSparsityConfig(method="dense"),
])
def test_decode_budgets_match_brute_force(cfg):
    torch.manual_seed(0)
    scores = torch.randn(7, 3, 6)
    seqlens = torch.tensor([1, 16, 17, 40, 64, 81, 96])
    width = cfg.max_kept_blocks(6, BS)  # the host's bound: equal lists show that no kept block is cut off
    index = decode_block_index(decode_block_mask(scores, seqlens, cfg, BS), width)
    assert index.dtype == torch.int32 and index.shape == (7, 3, width)
    assert _lists(index) == _brute(scores, seqlens, cfg)
    if cfg.method != "threshold":  # the bound is reached here (a threshold may keep fewer than every block)
        assert max(len(heads) for rows in _lists(index) for heads in rows) == width
    # -1 only as padding at the end of a row
    assert all((row[:(row >= 0).sum()] >= 0).all() and (row[(row >= 0).sum():] == -1).all()
               for row in index.reshape(-1, index.shape[-1]))


@pytest.mark.parametrize("cfg", [
    DecodeSparsityConfig(method="token_budget", token_budget=48),
    DecodeSparsityConfig(method="token_budget", token_budget=40, first_block=False),
    DecodeSparsityConfig(method="token_budget", token_budget=16),
    DecodeSparsityConfig(method="token_budget", token_budget=160),  # more blocks than any sequence has
    DecodeSparsityConfig(method="token_budget", token_budget=48, recent_blocks=2),
    DecodeSparsityConfig(method="threshold", threshold=0.15),
    DecodeSparsityConfig(method="threshold", threshold=0.15, recent_blocks=1),
    DecodeSparsityConfig(method="dense"),
])
def test_a_decode_steps_blocks_are_the_masks(cfg):
    """decode_step_blocks (one decode step's list and density, a token budget's straight from topk; from each
    token's newest block) gives the list and density of decode_block_mask, decode_block_index and decode_density
    (from the lengths), tied scores included."""
    torch.manual_seed(0)
    scores = torch.randn(7, 3, 6).round()  # many ties
    seqlens = torch.tensor([1, 16, 17, 40, 64, 81, 96], dtype=torch.int32)
    index, density = decode_step_blocks(scores, (seqlens.long() - 1) // BS, cfg, BS)
    mask = decode_block_mask(scores, seqlens, cfg, BS)
    assert torch.equal(index, decode_block_index(mask, cfg.max_kept_blocks(6, BS)))
    assert torch.equal(density, decode_density(mask, seqlens, BS))


def test_calibrated_threshold_reaches_the_target():
    torch.manual_seed(1)
    cfg = DecodeSparsityConfig(method="threshold", target_density=0.5, first_block=False)
    scores, seqlens = torch.randn(50, 2, 8) * 2, torch.randint(1, 129, (50,))
    tau = calibrate_decode_threshold(scores, seqlens, cfg, BS)
    mask = decode_block_mask(scores, seqlens, cfg, BS, tau)
    assert _lists(decode_block_index(mask, cfg.max_kept_blocks(8, BS))) == _brute(scores, seqlens, cfg, tau)
    assert abs(float(decode_density(mask, seqlens, BS)) - 0.5) < 0.03
    with pytest.raises(ValueError, match="target_density=0.5 needs its calibrated threshold"):
        decode_block_mask(scores, seqlens, cfg, BS)


def test_recent_blocks_are_checked_named_and_bound_the_width():
    budget = DecodeSparsityConfig(token_budget=32, recent_blocks=3)
    assert budget.describe() == "token_budget=32, 3 recent blocks" and budget.stored()["recent_blocks"] == 3
    assert budget.max_kept_blocks(100, 16) == 5  # the first, the newest and three before it outgrow two blocks
    assert DecodeSparsityConfig(token_budget=32, recent_blocks=3, prompt_blocks=2).max_kept_blocks(100, 16) == 7
    for value in (-1, 1.5, True):
        with pytest.raises(ConfigError, match=f"decode_sparsity.recent_blocks={value!r}: .*must be an integer >= 0"):
            DecodeSparsityConfig(recent_blocks=value)
    # a calibrated threshold takes them (they are part of every mask it calibrates)
    cfg = DecodeSparsityConfig(method="threshold", target_density=0.5, recent_blocks=2)
    torch.manual_seed(2)
    scores, seqlens = torch.randn(40, 2, 32) * 2, torch.randint(257, 513, (40,))
    mask = decode_block_mask(scores, seqlens, cfg, BS, calibrate_decode_threshold(scores, seqlens, cfg, BS))
    assert abs(float(decode_density(mask, seqlens, BS)) - 0.5) < 0.03
    newest = (seqlens - 1) // BS
    for i in range(40):
        recent = range(max(0, int(newest[i]) - 2), int(newest[i]) + 1)
        assert mask[i, :, recent].all()


def test_decode_budgets_refuse_bad_input():
    with pytest.raises(ConfigError, match=r"decode_sparsity.token_budget=8: is below one block \(16 tokens\)"):
        decode_block_mask(torch.zeros(1, 1, 2), torch.tensor([5]), DecodeSparsityConfig(token_budget=8), BS)
    with pytest.raises(ConfigError, match="decode_sparsity.target_density=0.2: calibrates the threshold method"):
        DecodeSparsityConfig(method="token_budget", target_density=0.2)
    with pytest.raises(ValueError, match=r"seqlens must be in \[1, 32\] for 2 blocks of 16; got 5..40"):
        decode_block_mask(torch.zeros(2, 1, 2), torch.tensor([5, 40]), DecodeSparsityConfig(), BS)


def test_block_index_of_a_static_width_is_the_tight_one_padded():
    """``decode_block_index(mask, width)`` is the list as wide as the most any head keeps (read on the host, as it
    was once built), padded with -1 to ``width``."""
    torch.manual_seed(2)
    mask = torch.rand(4, 3, 9) < 0.3
    mask[0, 0] = False  # a head keeping nothing
    tight = max(1, int(mask.sum(-1).max()))
    order = torch.where(mask, torch.arange(9), 9).sort(-1).values[..., :tight]
    want = torch.where(order == 9, -1, order).to(torch.int32)
    for width in (tight, 9, 12):
        got = decode_block_index(mask, width)
        padded = torch.nn.functional.pad(want, (0, width - tight), value=-1)
        assert got.dtype == torch.int32 and torch.equal(got, padded)
    with pytest.raises(ValueError, match="width must be an int >= 1"):
        decode_block_index(mask, 0)


def _unique_list_cases():
    """(config, scores [R, Hkv, nb], newest blocks [R]) on fresh random inputs: short caches (one token, one block,
    a block and one token), budgets near the number of blocks, with and without the first block, ties and ``-inf``
    scores among the valid blocks."""
    gen = torch.Generator().manual_seed(11)
    cases = []
    for nb in (1, 2, 3, 7):
        seqlens = torch.cat([torch.tensor([1, min(16, nb * BS), min(17, nb * BS), nb * BS]),
                             torch.randint(1, nb * BS + 1, (2,), generator=gen)])
        budgets = sorted({max(1, nb + d) * BS for d in (-2, -1, 0, 1)} | {16, 2 * BS})
        configs = [DecodeSparsityConfig(method="token_budget", token_budget=t, first_block=f)
                   for t in budgets for f in (True, False)]
        configs += [DecodeSparsityConfig(method="threshold", threshold=tau, first_block=f)
                    for tau in (0.0, 0.2) for f in (True, False)] + [DecodeSparsityConfig(method="dense")]
        for cfg in configs:
            scores = torch.randn(len(seqlens), 2, nb, generator=gen)
            scores[1::2] = scores[1::2].round()  # ties
            scores[2, 0] = float("-inf")  # a head whose gate rules out every block
            scores[3, 1, ::2] = float("-inf")
            cases.append((cfg, scores, (seqlens - 1) // BS))
    return cases


def test_a_decode_steps_lists_never_repeat_a_block():
    """The model's decode path passes ``unique_blocks=True`` to the decode kernel: every list of
    decode_step_blocks holds each block at most once, and the kernel gives the same output with and without the
    repeat check on them (under the interpreter on the CPU, which is slow: on every fifth case, each cache length and
    both split counts among them)."""
    from seer.kernels import block_sparse_decode

    gen = torch.Generator().manual_seed(12)
    for i, (cfg, scores, newest) in enumerate(_unique_list_cases()):
        index, _ = decode_step_blocks(scores, newest, cfg, BS)
        for row in index.reshape(-1, index.shape[-1]):
            kept = row[row >= 0]
            assert kept.unique().numel() == kept.numel(), (cfg, row)
        assert (index <= newest[:, None, None]).all()
        if i % 5:
            continue
        r, hkv, nb = scores.shape
        seqlens = (newest * BS + torch.randint(1, BS + 1, (r,), generator=gen)).clamp(max=nb * BS).int()
        q = torch.randn(r, 2 * hkv, 1, 16, generator=gen)
        k, v = (torch.randn(r, hkv, nb * BS, 16, generator=gen) for _ in range(2))
        splits = 1 + i % 2  # one split, or two and the merge
        once = block_sparse_decode(q, k, v, index, seqlens, BS, num_splits=splits)
        unique = block_sparse_decode(q, k, v, index, seqlens, BS, num_splits=splits, unique_blocks=True)
        assert torch.equal(unique[0], once[0]) and torch.equal(unique[1], once[1]), (cfg, splits)
