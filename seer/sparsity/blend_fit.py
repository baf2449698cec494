"""A blend weight per layer (``gate.blend_weight`` as a list), fitted on calibration rows.

At inference a gate's block softmax is mixed with a training-free estimate (``gate.blend``):
``(1 - w) softmax(gate) + w * estimate`` (:func:`seer.sparsity.selectors.blend_scores`). How much the estimate helps
differs by layer (on Qwen2.5-Coder-0.5B at 32k the gate alone misses most in layer 0:
``docs/results/qwen/layer_recall.md``), so one ``w`` for all layers leaves recall behind. :func:`fit_blend_weights`
tries each weight of a grid on every layer's calibration rows (the block scores and true block masses that
:meth:`seer.evaluation.harness.Evaluator.observe` returns, ``{layer: [rows, H, nb, nb]}``): it blends the gate's
logits with the estimate's log-scores as inference does, keeps the blocks the budget keeps at that layer's own knob
for the target density (:func:`seer.sparsity.calibration.fit_knob`, the masks of :mod:`seer.sparsity.masks`), and
picks the weight whose mask keeps the most attention mass (:func:`seer.sparsity.measures.mass_recall`); recalls
within :data:`TIE` of the best are ties, settled by the weight closest to 0.5 (then the smaller).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch

from seer.checks import is_number
from seer.sparsity.calibration import fit_knob
from seer.sparsity.config import SparsityConfig
from seer.sparsity.masks import select_blocks
from seer.sparsity.measures import mass_recall
from seer.sparsity.selectors import blend_scores

GRID = (0.25, 0.5, 0.75, 0.9)
TIE = 1e-6  # recalls closer than this to the best are ties

__all__ = ["GRID", "TIE", "blend_recalls", "fit_blend_weights", "pick_weights"]


def _budget(target_density: float, sparsity: SparsityConfig | None) -> SparsityConfig:
    """The budget the weights are fitted for: ``sparsity`` (default: a threshold) at ``target_density``, its knob
    fitted per layer (``allocation`` oracle, which needs every layer at once, is fitted as ``global``)."""
    if not is_number(target_density) or not 0 < target_density <= 1:
        raise ValueError(f"fit_blend_weights: target_density must be in (0, 1], got {target_density!r}")
    budget = sparsity or SparsityConfig(method="threshold")
    if budget.method == "dense":
        raise ValueError("fit_blend_weights: a dense budget keeps every block; give a sparse one")
    return dataclasses.replace(budget, target_density=target_density,
                               allocation="global" if budget.allocation == "oracle" else budget.allocation)


def _check_inputs(gate_logits: Mapping[int, torch.Tensor], partner_log_scores: Mapping[int, torch.Tensor],
                  masses: Mapping[int, torch.Tensor], grid: Sequence[float]) -> list[int]:
    """The layers ``0 .. L-1`` (refusing gaps, missing or mis-shaped tensors, and a bad grid)."""
    layers = sorted(gate_logits)
    if not layers:
        raise ValueError("fit_blend_weights: no layers given")
    if layers != list(range(len(layers))):
        raise ValueError(f"fit_blend_weights: the gate logits' layers must be 0..L-1 (one weight each), got {layers}")
    for name, given in (("partner_log_scores", partner_log_scores), ("masses", masses)):
        if sorted(given) != layers:
            raise ValueError(f"fit_blend_weights: {name} has layers {sorted(given)}, the gate logits {layers}")
    for i in layers:
        shape = tuple(gate_logits[i].shape)
        if len(shape) != 4 or shape[-1] != shape[-2]:
            raise ValueError(f"fit_blend_weights: layer {i}'s gate logits must be [rows, H, nb, nb], got {shape}")
        for name, given in (("partner_log_scores", partner_log_scores), ("masses", masses)):
            if tuple(given[i].shape) != shape:
                raise ValueError(f"fit_blend_weights: layer {i}'s {name} {tuple(given[i].shape)} differ from its gate "
                                 f"logits {shape}")
    if not grid or len(set(grid)) != len(grid) or not all(is_number(w) and 0 < w < 1 for w in grid):
        raise ValueError(f"fit_blend_weights: grid must be distinct weights in (0, 1), got {tuple(grid)}")
    return layers


@torch.no_grad()
def blend_recalls(gate_logits: Mapping[int, torch.Tensor], partner_log_scores: Mapping[int, torch.Tensor],
                  masses: Mapping[int, torch.Tensor], target_density: float, grid: Sequence[float] = GRID,
                  sparsity: SparsityConfig | None = None) -> dict[int, dict[float, float]]:
    """``{layer: {weight: recall}}``: the share of the true block mass ``masses[layer]`` kept by the mask the budget
    (``sparsity``, default a threshold; its ``target_density`` replaced by ``target_density``) picks, at the layer's
    own knob for that density, from ``gate_logits[layer]`` blended with ``partner_log_scores[layer]`` (an
    estimate's normalised log-scores) at each ``weight`` of ``grid``. Every tensor ``[rows, H, nb, nb]``, layers
    ``0 .. L-1``."""
    budget = _budget(target_density, sparsity)
    layers = _check_inputs(gate_logits, partner_log_scores, masses, grid)
    out: dict[int, dict[float, float]] = {}
    for i in layers:
        gate, partner, mass = gate_logits[i].float(), partner_log_scores[i].float(), masses[i].float()
        out[i] = {}
        for w in grid:
            blended = blend_scores(gate, partner, float(w))
            knob = fit_knob(blended, budget) if budget.calibrated else None
            out[i][float(w)] = float(mass_recall(select_blocks(blended, budget, knob), mass))
    return out


def fit_blend_weights(gate_logits: Mapping[int, torch.Tensor], partner_log_scores: Mapping[int, torch.Tensor],
                      masses: Mapping[int, torch.Tensor], target_density: float, grid: Sequence[float] = GRID,
                      sparsity: SparsityConfig | None = None) -> list[float]:
    """The blend weight of each layer ``0 .. L-1`` (``gate.blend_weight`` as a list): the weight of ``grid`` whose
    blended scores keep the most true block mass at ``target_density`` (:func:`blend_recalls`, same arguments); ties
    (within :data:`TIE`) go to the weight closest to 0.5, then the smaller. Deterministic for given inputs."""
    return pick_weights(blend_recalls(gate_logits, partner_log_scores, masses, target_density, grid, sparsity))


def pick_weights(recalls: Mapping[int, Mapping[float, float]]) -> list[float]:
    """The best weight of each layer of :func:`blend_recalls`' ``{layer: {weight: recall}}``, in layer order: the
    highest recall, ties (within :data:`TIE`) to the weight closest to 0.5, then the smaller."""
    weights = []
    for i in sorted(recalls):
        best = max(recalls[i].values())
        weights.append(min((w for w, r in recalls[i].items() if r >= best - TIE), key=lambda w: (abs(w - 0.5), w)))
    return weights
