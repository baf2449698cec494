"""Budgets: requested density, never an empty row, forced blocks, threshold and top-p semantics against brute force."""

import math

import pytest
import torch

from seer.sparsity import (SparsityConfig, block_density, causal_blocks, forced_blocks, head_density, mass_recall,
                           oracle_recall, row_budgets, row_probs, select_blocks, threshold_mask, topk_mask, topp_mask)


@pytest.mark.parametrize("nb", [1, 7, 32, 100])
@pytest.mark.parametrize("density", [1.0, 0.5, 0.3, 0.1, 0.05])
def test_topk_density_and_rows(nb, density):
    scores = torch.randn(2, 3, nb, nb)
    mask = topk_mask(scores, density)
    causal = causal_blocks(nb)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert not (mask & ~causal).any()
    assert mask.diagonal(dim1=-2, dim2=-1).all()
    assert (mask.sum(-1) >= 1).all()
    total = nb * (nb + 1) / 2
    # every row keeps max(1, its share); the triangle's density is off by at most the rows forced up to 1 block
    assert abs(block_density(mask).item() - density) <= (1 / total) + sum(
        max(0.0, 1 - density * (i + 1)) for i in range(nb)) / total + 1e-6
    # kept blocks are the top-scoring ones of each row (apart from the forced diagonal)
    s = scores.masked_fill(~causal, float("-inf")).masked_fill(torch.eye(nb, dtype=torch.bool), float("inf"))
    kept_min = s.masked_fill(~mask, float("inf")).amin(-1)
    dropped_max = s.masked_fill(mask | ~causal, float("-inf")).amax(-1)
    assert (kept_min >= dropped_max).all()


def test_topk_large_grid_hits_density_exactly():
    mask = topk_mask(torch.randn(1, 1, 512, 512), 0.1)
    assert abs(block_density(mask).item() - 0.1) < 2e-3


def test_topk_per_head_density():
    scores = torch.randn(2, 3, 64, 64)
    dens = torch.tensor([0.05, 0.2, 0.6])
    got = head_density(topk_mask(scores, dens))
    assert torch.allclose(got, dens, atol=0.02)
    for h in range(3):  # each head's mask is the shared-density mask at its own share
        assert torch.equal(topk_mask(scores, dens)[:, h], topk_mask(scores[:, h:h + 1], float(dens[h]))[:, 0])


def test_nz_formula_uniform_k():
    nb, density = 64, 0.25
    mask = topk_mask(torch.randn(1, 2, nb, nb), density, nz_formula=True)
    k = round((1 - math.sqrt(1 - density)) * nb)
    assert (mask.sum(-1) == torch.clamp(torch.arange(1, nb + 1), max=k)).all()
    assert abs(block_density(mask).item() - density) < 0.03


def test_forced_blocks_sink_local_and_dense_rows():
    nb = 20
    f = forced_blocks(nb, sink_blocks=2, local_blocks=3)
    i, j = torch.meshgrid(torch.arange(nb), torch.arange(nb), indexing="ij")
    assert torch.equal(f, (j <= i) & ((j < 2) | (i - j <= 3)))
    scores = torch.randn(1, 2, nb, nb)
    for mask in (topk_mask(scores, 0.05, sink_blocks=2, local_blocks=3, dense_last_rows=3),
                 threshold_mask(scores, 0.99, sink_blocks=2, local_blocks=3, dense_last_rows=3),
                 topp_mask(scores, 0.01, sink_blocks=2, local_blocks=3, dense_last_rows=3)):
        assert (mask | ~f).all()  # forced blocks kept
        assert torch.equal(mask[0, :, -3:], causal_blocks(nb)[-3:].expand(2, 3, nb))
        assert not (mask & ~causal_blocks(nb)).any()


def test_threshold_mask_semantics():
    nb = 12
    scores = torch.randn(2, 2, nb, nb) * 3
    mask = threshold_mask(scores, 0.05)
    probs = torch.softmax(scores.masked_fill(~causal_blocks(nb), float("-inf")), -1)
    want = ((probs > 0.05) | torch.eye(nb, dtype=torch.bool)) & causal_blocks(nb)
    assert torch.equal(mask, want)
    assert torch.equal(threshold_mask(scores, 0.0), causal_blocks(nb).expand_as(mask))
    assert (threshold_mask(scores, 0.999).sum(-1) >= 1).all()
    per_head = threshold_mask(scores, torch.tensor([0.05, 0.5]))
    assert torch.equal(per_head[:, 0], mask[:, 0]) and torch.equal(per_head[:, 1], threshold_mask(scores, 0.5)[:, 1])


def _capped_threshold_reference(probs, threshold, share, sink_blocks, local_blocks, dense_last_rows, floor=0):
    """A row cap by brute force in float64, row by row: the forced blocks, then the blocks over the threshold by
    falling share (ties: lower index first) while the row holds fewer than its top-k budget at ``share`` (or than
    ``floor`` blocks, if more)."""
    b, h, nb, _ = probs.shape
    forced = forced_blocks(nb, sink_blocks, local_blocks)
    budgets = [max(k, floor) for k in row_budgets(nb, share).tolist()]
    mask = torch.zeros(b, h, nb, nb, dtype=torch.bool)
    for x in range(b):
        for y in range(h):
            for i in range(nb):
                if i >= nb - dense_last_rows:
                    mask[x, y, i, :i + 1] = True
                    continue
                keep = [j for j in range(i + 1) if forced[i, j]]
                over = sorted((j for j in range(i + 1) if not forced[i, j] and probs[x, y, i, j] > threshold),
                              key=lambda j: (-float(probs[x, y, i, j]), j))
                keep += over[:max(0, budgets[i] - len(keep))]
                mask[x, y, i, keep] = True
    return mask


@pytest.mark.parametrize("share", [0.05, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("forced", [(0, 0, 0), (1, 2, 1)])
def test_threshold_row_cap_against_brute_force(share, forced):
    nb = 24
    scores = torch.randn(2, 3, nb, nb, dtype=torch.float64) * 2
    probs = row_probs(scores).double()
    for threshold in (0.0, 0.01, 0.05):
        got = threshold_mask(scores, threshold, *forced, max_row_share=share)
        want = _capped_threshold_reference(probs, threshold, share, *forced)
        assert torch.equal(got, want), (share, forced, threshold)
        if share == 1.0:
            assert torch.equal(got, threshold_mask(scores, threshold, *forced))
        elif threshold == 0.0 and forced == (0, 0, 0):  # every block clears 0: the cap alone decides, as top-k does
            assert torch.equal(got, topk_mask(scores, share))
    config = SparsityConfig(method="threshold", target_density=None, threshold=0.01, max_row_share=0.2)
    assert torch.equal(select_blocks(scores, config), threshold_mask(scores, 0.01, dense_last_rows=1,
                                                                     max_row_share=0.2))


@pytest.mark.parametrize("floor", [1, 5, 30])
def test_a_floor_under_the_row_cap_against_brute_force(floor):
    """``cap_min_blocks``: a row keeps up to ``floor`` blocks over the threshold where its share allows fewer; rows no
    longer than the floor are not capped at all, long rows as without it."""
    nb = 24
    scores = torch.randn(2, 3, nb, nb, dtype=torch.float64) * 2
    probs = row_probs(scores).double()
    for threshold in (0.0, 0.01, 0.05):
        got = threshold_mask(scores, threshold, 1, 1, 1, max_row_share=0.2, cap_min_blocks=floor)
        assert torch.equal(got, _capped_threshold_reference(probs, threshold, 0.2, 1, 1, 1, floor)), threshold
        uncapped, capped = threshold_mask(scores, threshold, 1, 1, 1), threshold_mask(scores, threshold, 1, 1, 1, 0.2)
        assert torch.equal(got[..., :floor, :], uncapped[..., :floor, :])
        long_rows = row_budgets(nb, 0.2) >= floor
        assert torch.equal(got[..., long_rows, :], capped[..., long_rows, :])
    config = SparsityConfig(method="threshold", target_density=None, threshold=0.01, max_row_share=0.2,
                            cap_min_blocks=floor)
    assert torch.equal(select_blocks(scores, config), threshold_mask(scores, 0.01, dense_last_rows=1,
                                                                     max_row_share=0.2, cap_min_blocks=floor))


@pytest.mark.parametrize("p", [0.3, 0.7, 0.9, 0.99, 1.0])
def test_topp_keeps_the_fewest_blocks_that_reach_p(p):
    """Brute force: for each row, the smallest k such that the diagonal plus the k - 1 most probable other blocks
    reach p; the mask keeps exactly that many, and they reach p."""
    nb = 9
    gen = torch.Generator().manual_seed(int(p * 100))
    scores = torch.randn(3, 2, nb, nb, generator=gen, dtype=torch.float64) * 2
    mask = topp_mask(scores, p)
    probs = row_probs(scores).double()
    for b in range(3):
        for h in range(2):
            for i in range(nb):
                row = probs[b, h, i, : i + 1].tolist()
                others = sorted(row[:i], reverse=True)
                need, mass = 1, row[i]
                for v in others:
                    if mass >= p - 1e-6:
                        break
                    mass += v
                    need += 1
                kept = mask[b, h, i]
                assert int(kept.sum()) == need, (b, h, i)
                assert kept[i] and float(probs[b, h, i][kept].sum()) >= min(p, 1.0) - 1e-6


def test_select_blocks_dispatch_and_calibration_needed():
    scores = torch.randn(1, 2, 8, 8)
    assert torch.equal(select_blocks(scores, SparsityConfig(method="dense")), causal_blocks(8).expand(1, 2, 8, 8))
    # the default budget keeps the last query block whole (dense_last_rows=1)
    topk = select_blocks(scores, SparsityConfig(method="topk", target_density=0.5))
    assert torch.equal(topk, topk_mask(scores, 0.5, dense_last_rows=1)) and topk[..., -1, :].all()
    assert not torch.equal(topk, topk_mask(scores, 0.5))
    cfg = SparsityConfig(method="threshold", target_density=None, threshold=0.1)
    assert torch.equal(select_blocks(scores, cfg), threshold_mask(scores, 0.1, dense_last_rows=1))
    assert torch.equal(select_blocks(scores, SparsityConfig(method="topp", target_density=None, p=0.5,
                                                            dense_last_rows=0)), topp_mask(scores, 0.5))
    with pytest.raises(ValueError, match="needs a calibration"):
        select_blocks(scores, SparsityConfig(method="threshold", target_density=0.2))
    assert torch.equal(select_blocks(scores, SparsityConfig(method="threshold", target_density=0.2), knob=0.1),
                       threshold_mask(scores, 0.1, dense_last_rows=1))


def test_row_budgets_sum():
    b = row_budgets(10, 0.6)
    assert b.sum().item() == round(0.6 * 55) and (b >= 1).all() and (b <= torch.arange(1, 11)).all()
    low = row_budgets(10, 0.05)  # rows whose share rounds to 0 still keep their diagonal block
    assert (low >= 1).all() and low.sum().item() <= round(0.05 * 55) + 10
    per_head = row_budgets(10, torch.tensor([0.6, 0.05]))
    assert torch.equal(per_head, torch.stack([b, low]))


def test_recall_and_the_oracle_bound():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 16, 16, generator=gen) * 2
    mass = row_probs(scores)
    assert mass_recall(causal_blocks(16).expand(2, 3, 16, 16), mass).item() == pytest.approx(1.0)
    assert oracle_recall(mass, 1.0).item() == pytest.approx(1.0)
    # no budget of the same density beats the oracle; the oracle's own top-k / threshold come close to it
    for density in (0.1, 0.3, 0.6):
        bound = float(oracle_recall(mass, density, sink_blocks=1))
        for mask in (topk_mask(torch.randn(2, 3, 16, 16, generator=gen), density, sink_blocks=1),
                     topk_mask(mass.log(), density, sink_blocks=1),
                     threshold_mask(mass.log(), 0.05, sink_blocks=1), topp_mask(mass.log(), 0.8, sink_blocks=1)):
            assert float(mass_recall(mask, mass)) <= float(oracle_recall(mass, float(block_density(mask)),
                                                                          sink_blocks=1)) + 1e-6
        assert float(mass_recall(topk_mask(mass.log(), density, sink_blocks=1), mass)) > bound - 0.1
    # brute force on a tiny case: the best set of k blocks holding the diagonal, by enumeration
    import itertools

    m = row_probs(torch.randn(1, 1, 4, 4, generator=gen) * 2)
    free = [(i, j) for i in range(4) for j in range(i)]
    for k in range(len(free) + 1):
        best = 0.0
        for chosen in itertools.combinations(free, k):
            mask = torch.eye(4, dtype=torch.bool)[None, None].clone()
            for i, j in chosen:
                mask[0, 0, i, j] = True
            best = max(best, float(mass_recall(mask, m)))
        assert float(oracle_recall(m, (4 + k) / 10)) == pytest.approx(best, abs=1e-6)
