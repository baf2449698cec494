"""Block masks: requested density, never an empty row, diagonal/sink/dense-row rules, threshold semantics."""

import math

import pytest
import torch

from seer.sparsity.config import SparsityConfig
from seer.sparsity import block_density, causal_blocks, mass_recall, row_budgets, select_blocks, threshold_mask, topk_mask


@pytest.mark.parametrize("nb", [1, 7, 32, 100])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.7, 0.9, 0.95])
def test_topk_density_and_rows(nb, ratio):
    scores = torch.randn(2, 3, nb, nb)
    mask = topk_mask(scores, ratio)
    causal = causal_blocks(nb)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert not (mask & ~causal).any()
    assert mask.diagonal(dim1=-2, dim2=-1).all()
    assert (mask.sum(-1) >= 1).all()
    total = nb * (nb + 1) / 2
    target = 1 - ratio
    # every row keeps max(1, its share); the triangle's density is off by at most the rows forced up to 1 block
    assert abs(block_density(mask).item() - target) <= (1 / total) + sum(
        max(0.0, 1 - target * (i + 1)) for i in range(nb)) / total + 1e-6
    # kept blocks are the top-scoring ones of each row (apart from the forced diagonal)
    s = scores.masked_fill(~causal, float("-inf")).masked_fill(torch.eye(nb, dtype=torch.bool), float("inf"))
    kept_min = s.masked_fill(~mask, float("inf")).amin(-1)
    dropped_max = s.masked_fill(mask | ~causal, float("-inf")).amax(-1)
    assert (kept_min >= dropped_max).all()


def test_topk_large_grid_hits_density_exactly():
    mask = topk_mask(torch.randn(1, 1, 512, 512), 0.9)
    assert abs(block_density(mask).item() - 0.1) < 2e-3


def test_nz_formula_uniform_k():
    nb, ratio = 64, 0.75
    mask = topk_mask(torch.randn(1, 2, nb, nb), ratio, nz_formula=True)
    k = round((1 - math.sqrt(ratio)) * nb)
    assert (mask.sum(-1) == torch.clamp(torch.arange(1, nb + 1), max=k)).all()
    assert abs(block_density(mask).item() - (1 - ratio)) < 0.03


def test_sink_and_dense_last_rows():
    mask = topk_mask(torch.randn(1, 1, 20, 20), 0.9, sink_blocks=2, dense_last_rows=3)
    assert mask[..., 1:, 0].all() and mask[..., 2:, 1].all()
    assert torch.equal(mask[0, 0, -3:], causal_blocks(20)[-3:])


def test_threshold_mask_semantics():
    nb = 12
    scores = torch.randn(2, 2, nb, nb) * 3
    mask = threshold_mask(scores, 0.05)
    probs = torch.softmax(scores.masked_fill(~causal_blocks(nb), float("-inf")), -1)
    want = ((probs > 0.05) | torch.eye(nb, dtype=torch.bool)) & causal_blocks(nb)
    assert torch.equal(mask, want)
    assert torch.equal(threshold_mask(scores, 0.0), causal_blocks(nb).expand_as(mask))
    assert (threshold_mask(scores, 0.999).sum(-1) >= 1).all()


def test_row_budgets_sum():
    b = row_budgets(10, 0.6)
    assert b.sum().item() == round(0.6 * 55) and (b >= 1).all() and (b <= torch.arange(1, 11)).all()
    low = row_budgets(10, 0.05)  # rows whose share rounds to 0 still keep their diagonal block
    assert (low >= 1).all() and low.sum().item() <= round(0.05 * 55) + 10


def test_select_blocks_dispatch_and_recall():
    scores = torch.randn(1, 1, 8, 8)
    assert torch.equal(select_blocks(scores, SparsityConfig(method="dense")), causal_blocks(8)[None, None])
    assert torch.equal(select_blocks(scores, SparsityConfig(method="topk", ratio=0.5)), topk_mask(scores, 0.5))
    mass = torch.softmax(scores.masked_fill(~causal_blocks(8), float("-inf")), -1)
    assert mass_recall(causal_blocks(8)[None, None], mass).item() == pytest.approx(1.0)
    oracle = topk_mask(mass.log(), 0.5)
    assert mass_recall(oracle, mass) >= mass_recall(topk_mask(torch.randn(1, 1, 8, 8), 0.5), mass) - 1e-6
