"""The CPU-side helpers of experiments/bench_varlen.py: its random masks, and their conversion to the release
kernel's per-token format."""

import torch

from experiments.bench_varlen import BLOCK, density_of, parse_args, prompt_masks, random_masks, release_mask

LENS = [1, 130, 64, 300]


def test_random_masks_keep_the_diagonal_at_the_density_asked_for():
    mask = random_masks(LENS, 0.3, device="cpu")
    assert mask.shape == (4, 8, 5, 5)
    for m in prompt_masks(mask, LENS):
        assert m.diagonal(dim1=-2, dim2=-1).all() and not m.triu(1).any()
    assert 0.3 <= density_of(mask, LENS) < 0.6  # small masks: the diagonal alone is a large share


def test_release_mask_gives_each_token_the_row_of_its_block():
    mask = random_masks(LENS, 0.3, device="cpu")
    converted = release_mask(mask, LENS)
    assert converted.shape == (4, 8, 300, 5)
    tokens = torch.arange(300)
    assert torch.equal(converted, mask[:, :, tokens // BLOCK])


def test_default_shape_is_the_issue_batch():
    args = parse_args([])
    assert args.lens == [2048, 4096, 6144, 8192, 12288, 16384, 24576, 32768] and args.density == 0.1
