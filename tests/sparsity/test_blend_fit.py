"""A blend weight per layer, fitted on calibration rows (seer.sparsity.blend_fit)."""

import pytest
import torch

from seer.sparsity import SparsityConfig
from seer.sparsity.blend_fit import blend_recalls, fit_blend_weights
from seer.sparsity.masks import causal_blocks


def _log_softmax_causal(logits):
    nb = logits.shape[-1]
    return torch.log_softmax(logits.masked_fill(~causal_blocks(nb), float("-inf")), dim=-1)


def _layers(seed=0, rows=2, heads=2, nb=24):
    """Layer 0: the partner is the true mass, the gate noise; layer 1: the gate is the truth, the partner noise."""
    g = torch.Generator().manual_seed(seed)
    truth = [3 * torch.randn(rows, heads, nb, nb, generator=g) for _ in range(2)]
    noise = [torch.randn(rows, heads, nb, nb, generator=g) for _ in range(2)]
    masses = {i: _log_softmax_causal(t).exp() for i, t in enumerate(truth)}
    gate = {0: noise[0], 1: truth[1]}
    partner = {0: _log_softmax_causal(truth[0]), 1: _log_softmax_causal(noise[1])}
    return gate, partner, masses


def test_each_layer_gets_the_weight_of_the_scorer_that_knows_its_mass():
    gate, partner, masses = _layers()
    assert fit_blend_weights(gate, partner, masses, 0.2) == [0.9, 0.25]
    assert fit_blend_weights(gate, partner, masses, 0.2, grid=(0.3, 0.6)) == [0.6, 0.3]
    topk = SparsityConfig(method="topk", target_density=0.5)  # its own target density replaced by the fit's
    assert fit_blend_weights(gate, partner, masses, 0.2, sparsity=topk) == [0.9, 0.25]
    recalls = blend_recalls(gate, partner, masses, 0.2)
    assert list(recalls[0]) == [0.25, 0.5, 0.75, 0.9] and recalls[0][0.9] > recalls[0][0.25]
    assert recalls[1][0.25] > recalls[1][0.9]


def test_the_fit_is_deterministic_and_ties_go_to_the_weight_closest_to_half():
    gate, partner, masses = _layers(seed=3)
    assert fit_blend_weights(gate, partner, masses, 0.15) == fit_blend_weights(gate, partner, masses, 0.15)
    same = {i: torch.zeros_like(m) for i, m in gate.items()}  # every weight gives the same scores up to rounding
    flat = {i: _log_softmax_causal(torch.zeros_like(m)) for i, m in gate.items()}
    assert fit_blend_weights(same, flat, masses, 0.2, grid=(0.9, 0.25, 0.75, 0.5)) == [0.5, 0.5]
    assert fit_blend_weights(same, flat, masses, 0.2, grid=(0.9, 0.25, 0.75)) == [0.25, 0.25]


def test_bad_inputs_are_refused():
    gate, partner, masses = _layers()
    with pytest.raises(ValueError, match="no layers"):
        fit_blend_weights({}, {}, {}, 0.1)
    with pytest.raises(ValueError, match="must be 0..L-1"):
        fit_blend_weights({1: gate[1]}, {1: partner[1]}, {1: masses[1]}, 0.1)
    with pytest.raises(ValueError, match="masses has layers \\[0\\]"):
        fit_blend_weights(gate, partner, {0: masses[0]}, 0.1)
    with pytest.raises(ValueError, match="layer 1's partner_log_scores"):
        fit_blend_weights(gate, {0: partner[0], 1: partner[1][:1]}, masses, 0.1)
    with pytest.raises(ValueError, match="must be \\[rows, H, nb, nb\\]"):
        fit_blend_weights({0: gate[0][0]}, {0: partner[0][0]}, {0: masses[0][0]}, 0.1)
    with pytest.raises(ValueError, match="target_density must be in \\(0, 1\\], got 0"):
        fit_blend_weights(gate, partner, masses, 0)
    for grid in [(), (0.5, 0.5), (0.5, 1.0), (0.0,)]:
        with pytest.raises(ValueError, match="grid must be distinct weights"):
            fit_blend_weights(gate, partner, masses, 0.1, grid=grid)
    with pytest.raises(ValueError, match="dense budget"):
        fit_blend_weights(gate, partner, masses, 0.1, sparsity=SparsityConfig(method="dense"))
