"""Calibration: the knob of a budget (top-k share, threshold, top-p level) that reaches a target density.

An adaptive budget (``threshold``, ``topp``) keeps a different number of blocks in every row, head and layer, so
its knob says nothing about the density it gives. :func:`calibrate` finds, on the block scores of calibration rows
(``{layer: [rows, H, nb, nb]}``, collected with the model running dense), the knob(s) whose masks reach
``config.target_density`` there: the achieved mean density over rows, heads and layers (forced blocks counted,
layers of ``dense_layers`` counted as density 1). Each knob is found by bisection on the real mask functions of
:mod:`seer.sparsity.masks` (density is monotone in every knob), so the calibrated masks are exactly what inference
computes. ``config.allocation``:

* ``global``: one knob for every layer and head;
* ``uniform``: one knob per (layer, head), each head reaching the target;
* ``oracle``: one knob per (layer, head), each head reaching the density that one global threshold on the *true*
  block attention mass (``masses``, same shapes) gives it on the calibration rows.

The result (:class:`Calibration`) is plain data: saved beside a gate checkpoint (``calibration.json``) so
``seer.load(..., sparsity={...})`` finds it again without calibrating, and reported by the evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from seer.checks import build
from seer.files import atomic_write_text, read_json_records
from seer.sparsity.config import SparsityConfig
from seer.sparsity.masks import causal_blocks, row_probs, row_ranks, select_blocks, threshold_mask_from_probs
from seer.sparsity.measures import head_density

FILE = "calibration.json"
log = logging.getLogger(__name__)

# the range each knob is searched in, and whether the density rises with it
_SEARCH = {"topk": (0.0, 1.0, True), "threshold": (1e-12, 1.0, False), "topp": (0.0, 1.0, True)}
_STEPS = 40


@dataclass
class Calibration:
    """Knobs that make ``sparsity`` reach its target density, found on ``rows`` calibration rows of ``seq_len``
    tokens with the scorer ``selector``. ``knobs[layer]`` holds one knob per head (a layer of ``dense_layers`` has
    none); ``density`` is the mean density reached on the calibration rows, ``head_density[layer]`` per head."""

    sparsity: SparsityConfig
    knobs: dict[int, list[float]]
    density: float
    head_density: dict[int, list[float]] = field(default_factory=dict)
    selector: str = "gate"
    rows: int = 0
    seq_len: int = 0
    _tensors: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def knob(self, layer_idx: int, device=None) -> torch.Tensor | None:
        """The per-head knob ``[H]`` of a layer (None for a dense layer), kept per device after the first call so
        a forward pays no host-to-device copy per layer."""
        values = self.knobs.get(layer_idx)
        if values is None:
            return None
        key = (layer_idx, str(device))
        if key not in self._tensors:
            self._tensors[key] = torch.tensor(values, dtype=torch.float32, device=device)
        return self._tensors[key]

    def matches(self, sparsity: SparsityConfig, selector: str = "gate", seq_len: int | None = None) -> bool:
        """Whether this calibration was made for ``sparsity`` (every field), ``selector`` and (when given)
        ``seq_len``."""
        return self.sparsity == sparsity and self.selector == selector and seq_len in (None, self.seq_len)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        out["sparsity"] = dataclasses.asdict(self.sparsity)
        out["knobs"] = {str(k): v for k, v in self.knobs.items()}
        out["head_density"] = {str(k): v for k, v in self.head_density.items()}
        return out

    @classmethod
    def from_dict(cls, values: Mapping) -> Calibration:
        values = dict(values)
        values["sparsity"] = build(SparsityConfig, "sparsity", values["sparsity"])
        values["knobs"] = {int(k): list(v) for k, v in values["knobs"].items()}
        values["head_density"] = {int(k): list(v) for k, v in values.get("head_density", {}).items()}
        return cls(**values)


def _bisect(density_of: Callable[[torch.Tensor], torch.Tensor], target: torch.Tensor, method: str) -> torch.Tensor:
    """Per-entry knob (shape of ``target``) whose density is closest to ``target`` from above, by bisection
    (geometric for thresholds, which span decades)."""
    lo_v, hi_v, rising = _SEARCH[method]
    lo = torch.full_like(target, lo_v, dtype=torch.float64)
    hi = torch.full_like(target, hi_v, dtype=torch.float64)
    for _ in range(_STEPS):
        mid = (lo * hi).sqrt() if method == "threshold" else (lo + hi) / 2
        enough = density_of(mid.float()) >= target
        # rising: density grows with the knob, so enough density -> the knob may come down
        lo, hi = (torch.where(enough, lo, mid), torch.where(enough, mid, hi)) if rising else \
            (torch.where(enough, mid, lo), torch.where(enough, hi, mid))
    return (hi if rising else lo).float()  # the side that reaches the target


def _density_of_knob(scores: torch.Tensor, config: SparsityConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """``knob [H] -> density [H]``: the kept share of each head of ``scores [rows, H, nb, nb]`` under ``config`` with
    a per-head knob; for a threshold the rows' softmax (and a row cap's ranks) is computed once, not at every
    bisection step (the masks are the same)."""
    if config.method != "threshold":
        return lambda knob: head_density(select_blocks(scores, config, knob))
    probs = row_probs(scores)
    ranks = row_ranks(probs, config.sink_blocks, config.local_blocks) if config.max_row_share < 1 else None
    return lambda knob: head_density(threshold_mask_from_probs(probs, knob, config.sink_blocks, config.local_blocks,
                                                               config.dense_last_rows, config.max_row_share, ranks,
                                                               config.cap_min_blocks))


def _check_calibratable(config: SparsityConfig) -> None:
    if config.method == "dense" or config.target_density is None:
        raise ValueError(f"sparsity {config.describe()} has no target density to calibrate for")


def _shared_or_per_head_goal(config: SparsityConfig, target: float, width: int, device) -> torch.Tensor | float:
    """The goal of :func:`_fit` for ``allocation`` ``global`` (one mean) or ``uniform`` (``target`` for each head)."""
    return target if config.allocation == "global" else torch.full((width,), target, device=device)


def _sparse_target(config: SparsityConfig, layers: list[int]) -> float:
    """The mean density the sparse layers must reach so that, with ``dense_layers`` at 1, all layers average the
    target."""
    dense = [i for i in layers if config.runs_dense(i)]
    sparse = len(layers) - len(dense)
    if not sparse:
        raise ValueError(f"sparsity.dense_layers={config.dense_layers} leaves no sparse layer to calibrate")
    target = (config.target_density * len(layers) - len(dense)) / sparse
    if target <= 0:
        raise ValueError(f"sparsity.target_density={config.target_density} is below what dense_layers="
                         f"{config.dense_layers} alone cost ({len(dense)} of {len(layers)} layers)")
    return min(1.0, target)


def _fit(density_of: Callable[[torch.Tensor], torch.Tensor], width: int, goal: torch.Tensor | float, method: str,
         device) -> torch.Tensor:
    """Knobs ``[width]`` (layers' heads side by side, ``density_of`` from :func:`_density_of_knob`): one shared knob
    reaching the mean ``goal`` (a float), or one per head reaching ``goal [width]``. Every bisection step is one
    mask computation over all layers."""
    if isinstance(goal, torch.Tensor):
        return _bisect(density_of, goal.double(), method)
    mean = lambda k: density_of(k.expand(width)).mean().reshape(1)  # noqa: E731
    shared = _bisect(mean, torch.tensor([goal], dtype=torch.float64, device=device), method)
    return shared.expand(width).clone()


def fit_knob(scores: torch.Tensor, config: SparsityConfig) -> torch.Tensor:
    """The per-head knob ``[H]`` with which ``config`` reaches its target density on one layer's scores
    ``[rows, H, nb, nb]`` (``global``: one knob shared by the heads; ``uniform``: one per head): the knob
    ``calibrate({layer: scores}, config)`` finds, computed on the scores' device without a host sync, for a training
    step that calibrates each layer on its batch."""
    _check_calibratable(config)
    if config.allocation not in ("global", "uniform"):
        raise ValueError(f"sparsity.allocation={config.allocation!r}: a per-batch knob supports global or uniform")
    scores = scores.float()
    width = scores.shape[1]
    goal = _shared_or_per_head_goal(config, min(1.0, config.target_density), width, scores.device)
    return _fit(_density_of_knob(scores, config), width, goal, config.method, scores.device)


_warned_unreachable: set[tuple[float, int]] = set()  # (target, blocks a row) already warned about


def calibrate(scores: Mapping[int, torch.Tensor], config: SparsityConfig,
              masses: Mapping[int, torch.Tensor] | None = None, selector: str = "gate",
              seq_len: int = 0) -> Calibration:
    """The :class:`Calibration` of ``config`` on ``scores`` (``{layer: [rows, H, nb, nb]}``, every layer the same
    shape; ``masses`` of the same shapes, the true block attention mass, for ``allocation=oracle``). See the module
    docstring."""
    _check_calibratable(config)
    if not scores:
        raise ValueError("calibration needs the block scores of at least one layer")
    layers = sorted(scores)
    target = _sparse_target(config, layers)
    sparse = [i for i in layers if not config.runs_dense(i)]
    heads = scores[sparse[0]].shape[1]
    stacked = torch.cat([scores[i].float() for i in sparse], dim=1)  # [rows, L*H, nb, nb]: layers as more heads
    width, device = stacked.shape[1], stacked.device
    density_of = _density_of_knob(stacked, config)
    if config.allocation == "oracle":
        if masses is None or not set(sparse) <= set(masses):
            raise ValueError("allocation=oracle needs the true block mass of every calibrated layer")
        truth = dataclasses.replace(config, method="threshold", allocation="global")
        logs = torch.cat([torch.log(masses[i].float().clamp_min(1e-30)) for i in sparse], dim=1)
        truth_density_of = _density_of_knob(logs, truth)
        goal = truth_density_of(_fit(truth_density_of, width, target, truth.method, device))
    else:
        goal = _shared_or_per_head_goal(config, target, width, device)
    knobs = _fit(density_of, width, goal, config.method, device)
    dens = density_of(knobs).view(len(sparse), heads).tolist()
    knobs = knobs.view(len(sparse), heads).tolist()
    per_layer = {i: sum(d) / heads for i, d in zip(sparse, dens)}
    mean = sum(per_layer.get(i, 1.0) for i in layers) / len(layers)
    if mean > config.target_density + 0.01 and (config.target_density, stacked.shape[-1]) not in _warned_unreachable:
        _warned_unreachable.add((config.target_density, stacked.shape[-1]))  # once a process: runs calibrate often
        log.warning("sparsity.target_density=%s is below what the forced blocks alone keep at %d blocks a row: "
                    "calibrated to %.3f (use longer rows or a higher target)", config.target_density,
                    stacked.shape[-1], mean)
    return Calibration(sparsity=config, knobs=dict(zip(sparse, knobs)), density=mean,
                       head_density=dict(zip(sparse, dens)), selector=selector,
                       rows=scores[sparse[0]].shape[0], seq_len=seq_len)


Observer = Callable[[Calibration | None], tuple[dict[int, torch.Tensor], dict[int, torch.Tensor] | None]]


def calibrate_in_rounds(observe: Observer, config: SparsityConfig, selector: str = "gate",
                        seq_len: int = 0) -> Calibration:
    """:func:`calibrate` on the ``(scores, masses)`` of ``observe(None)`` (the calibration rows with the model running
    dense), then ``config.calibration_rounds`` times again on those of ``observe(last)`` (the same rows with the model
    running sparse under the last calibration): a sparse model's later layers score other inputs, and each round fits
    the knob to what the model it serves sees (see :mod:`seer.sparsity.config`)."""
    calibration = None
    for _ in range(1 + config.calibration_rounds):
        scores, masses = observe(calibration)
        calibration = calibrate(scores, config, masses, selector=selector, seq_len=seq_len)
    return calibration


def selection_masks(scores: Mapping[int, torch.Tensor], config: SparsityConfig,
                    masses: Mapping[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
    """The masks ``config`` picks from each layer's scores; a calibrated budget is calibrated on these very scores
    first (what a training metric can do: it has no held-out calibration rows)."""
    calibration = calibrate(scores, config, masses) if config.calibrated else None
    return {i: causal_blocks(s.shape[-1], s.device).expand(s.shape) if config.runs_dense(i)
            else select_blocks(s, config, None if calibration is None else calibration.knob(i, s.device))
            for i, s in scores.items()}


def save_calibration(folder: str | Path, calibration: Calibration) -> Path:
    """Adds ``calibration`` to ``folder/calibration.json`` (replacing one made for the same sparsity, selector and
    length)."""
    kept = [c for c in load_calibrations(folder)
            if not c.matches(calibration.sparsity, calibration.selector, calibration.seq_len)]
    return atomic_write_text(Path(folder) / FILE, json.dumps([c.to_dict() for c in [*kept, calibration]], indent=1))


def load_calibrations(folder: str | Path) -> list[Calibration]:
    """The calibrations stored in ``folder/calibration.json`` (none when there is no such file); a
    :class:`~seer.config.ConfigError` names a file that is not one."""
    return read_json_records(Path(folder) / FILE, Calibration.from_dict, "seer calibration")


def find_calibration(folder: str | Path, sparsity: SparsityConfig, selector: str = "gate",
                     seq_len: int | None = None) -> Calibration:
    """The calibration stored in ``folder`` for ``sparsity`` and ``selector``: the one made at ``seq_len`` tokens,
    or without ``seq_len`` the one made at the longest length (a threshold reaches other densities at other
    lengths); a ``ValueError`` listing what is stored otherwise."""
    stored = load_calibrations(folder)
    found = [c for c in stored if c.matches(sparsity, selector, seq_len)]
    if found:
        return max(found, key=lambda c: c.seq_len)
    have = "; ".join(f"{c.sparsity.describe()} with {c.selector} at {c.seq_len} tokens" for c in stored) or "none"
    raise ValueError(f"no calibration for sparsity {sparsity.describe()} with the {selector} scorer in "
                     f"{Path(folder) / FILE} (stored: {have}); "
                     f"calibrate it with python -m seer.eval (see the README) or give the knob itself "
                     f"(target_density=null)")


__all__ = ["Calibration", "calibrate", "calibrate_in_rounds", "find_calibration", "fit_knob", "load_calibrations",
           "save_calibration", "selection_masks"]
