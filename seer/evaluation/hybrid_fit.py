"""A hybrid selection chosen on the calibration windows: which groups of layers another scorer takes from the default.

Each candidate is the default selection with one scorer on one group of layers instead (a training-free selector, or
the group's layers kept dense), calibrated on its own. Given the perplexity of the default and of every candidate on
the calibration windows (:meth:`seer.evaluation.harness.Evaluator.calibration_ppl`: windows the evaluated ones never
include), :func:`pick_hybrid` gives each group the scorer with the lowest perplexity when that beats the default by
more than a relative margin (else the group keeps the default's scores), and returns the union of the picks. Groups
are picked one at a time: how the picks interact is measured only when the combined hybrid is evaluated.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from seer.model.attention import layer_ranges

MARGIN = 0.002  # a candidate must lower the default's calibration-window PPL by more than this share of it


@dataclass(frozen=True)
class HybridPick:
    """What :func:`pick_hybrid` found: ``layers`` (``{layer: scorer}``, the union of the picked groups), ``picks``
    (``{group: scorer}``), and every candidate as a record (``group``, ``scorer``, ``ppl``, ``change``: relative to
    the baseline, ``picked``; ``ppl`` and ``change`` None for a candidate that could not be measured) in the order
    given, beside ``baseline_ppl`` and ``margin``."""

    layers: dict[int, str]
    picks: dict[tuple[int, ...], str]
    candidates: list[dict]
    baseline_ppl: float
    margin: float

    def describe(self) -> str:
        """The picks as ``scorer@layers`` (see :func:`describe_layers`); ``none`` when no group was picked."""
        return describe_layers(self.layers) or "none"

    def record(self) -> dict:
        """JSON-ready: the baseline, the margin, the picks and every candidate."""
        return {"baseline_ppl": self.baseline_ppl, "margin": self.margin, "picked": self.describe(),
                "layers": {str(layer): scorer for layer, scorer in sorted(self.layers.items())},
                "candidates": self.candidates}


def describe_layers(layers: Mapping[int, str]) -> str:
    """``{layer: scorer}`` as ``scorer@layers`` per scorer, in the order of their first layer (``""`` for none):
    ``{8: "vertical_slash", 9: "vertical_slash", 0: "dense"}`` -> ``dense@0 vertical_slash@8-9``."""
    by_scorer: dict[str, list[int]] = {}
    for layer, scorer in sorted(layers.items()):
        by_scorer.setdefault(scorer, []).append(layer)
    return " ".join(f"{scorer}@{layer_ranges(group)}" for scorer, group in by_scorer.items())


def check_groups(groups: Iterable[Iterable[int]]) -> None:
    """Raises ValueError, naming both, when two groups of layers share a layer (a layer can take one scorer only)."""
    owner: dict[int, tuple[int, ...]] = {}
    for group in dict.fromkeys(tuple(sorted(g)) for g in groups):
        for layer in group:
            if layer in owner:
                raise ValueError(f"groups of layers {layer_ranges(owner[layer])} and {layer_ranges(group)} overlap "
                                 f"(layer {layer}): a fitted hybrid needs disjoint groups")
            owner[layer] = group


def pick_hybrid(baseline_ppl: float, table: Mapping[tuple[tuple[int, ...], str], float | None],
                margin: float = MARGIN) -> HybridPick:
    """For each group of ``table`` (``{(group, scorer): ppl}``, every PPL measured on the calibration windows, as
    ``baseline_ppl``; None for a candidate that could not be measured, e.g. dense layers costing more than the
    budget: never picked), the scorer of lowest PPL (the first given of equal ones) when it lowers the baseline by more
    than ``margin`` of it (``(baseline - ppl) / baseline > margin``), else none: see :class:`HybridPick`. Overlapping
    groups raise ValueError (:func:`check_groups`)."""
    if not margin >= 0:
        raise ValueError(f"margin {margin}: give a share of the baseline PPL >= 0")
    if not baseline_ppl > 0:
        raise ValueError(f"baseline PPL {baseline_ppl}: give a perplexity > 0")
    check_groups(group for group, _ in table)
    best: dict[tuple[int, ...], tuple[str, float]] = {}
    for (group, scorer), ppl in table.items():
        group = tuple(sorted(group))
        if ppl is None:
            continue
        if group not in best or ppl < best[group][1]:
            best[group] = (scorer, ppl)
    picks = {group: scorer for group, (scorer, ppl) in best.items() if (baseline_ppl - ppl) / baseline_ppl > margin}
    candidates = [{"group": sorted(group), "scorer": scorer, "ppl": ppl,
                   "change": None if ppl is None else ppl / baseline_ppl - 1.0,
                   "picked": picks.get(tuple(sorted(group))) == scorer} for (group, scorer), ppl in table.items()]
    layers = {layer: scorer for group, scorer in picks.items() for layer in group}
    return HybridPick(dict(sorted(layers.items())), picks, candidates, baseline_ppl, margin)
