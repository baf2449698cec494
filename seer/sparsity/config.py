"""``SparsityConfig``: a budget, i.e. how block scores become a block mask (Hydra group ``sparsity``; see
:mod:`seer.config`).

A block selection is a *scorer* (the trained gate, or a training-free selector of :mod:`seer.sparsity.selectors`)
plus a *budget* (this config). Budgets:

* ``topk``: keep the ``target_density`` share of each query-block row's causal blocks (exact per-row budgets; with
  ``nz_formula`` the authors' uniform ``k = (1 - sqrt(1 - density)) * nb`` per row).
* ``threshold``: keep the blocks whose softmax share of the row (softmax of the scores over the row's causal blocks)
  exceeds ``threshold``; with ``max_row_share < 1``, at most that share of each row's causal blocks (the top-k
  budget of :func:`seer.sparsity.masks.row_budgets` at that share, forced blocks counted): a flat row, whose every
  block clears the threshold, is cut to its largest shares instead of running dense. At most ``1 / threshold``
  blocks clear a threshold (the shares sum to 1), so the cap binds only in rows shorter than
  ``1 / (threshold * max_row_share)`` blocks (on Qwen at 8k-32k with 64-token blocks, every row).
  ``cap_min_blocks`` floors the cap: a row may keep that many blocks over the threshold where its share allows
  fewer (on Qwen at 8k-32k, 16 uncaps a window's first 6.8k tokens and gives back the uncapped budget's RULER
  variable tracking, needles and code, and its prose perplexity too: the cap acts through those first rows;
  docs/results/qwen/capped.md).
* ``topp``: keep the fewest blocks whose softmax mass reaches ``p`` (at least one).
* ``dense``: keep every causal block.

``target_density`` (kept share of causal blocks, averaged over rows, heads and layers, forced blocks counted): for
``topk`` the budget itself; for ``threshold`` and ``topp`` the knob is *calibrated* on calibration rows to reach it
(:mod:`seer.sparsity.calibration`), and ``threshold`` / ``p`` are then ignored; ``null`` uses the knob as given.
``allocation`` says how calibration shares the target among layers and heads: ``global`` (one knob for all),
``uniform`` (each head of each layer gets the target), ``oracle`` (each head gets the density that one global
threshold on the *true* block attention mass gives it: the recall-optimal split, measured on the calibration rows).
Calibration fits the knob on block scores observed with the model running dense; a sparse model's later layers see
other inputs and score differently, so the same knob keeps more or fewer blocks there. ``calibration_rounds`` re-fits
the knob that many times on the scores observed with the model running sparse under the last fit. It matters with a
row cap: on Qwen2.5-Coder-0.5B at 2k (oracle, target 0.2, ``max_row_share=0.3``) the dense-observed knob reached 0.244
on its own calibration window, one round 0.207, two 0.202, three 0.201 (uncapped: 0.2016 without rounds).

Forced blocks combine with every budget and count towards the density: the diagonal block (always), the first
``sink_blocks`` key blocks, the ``local_blocks`` nearest blocks left of the diagonal, and whole rows for the last
``dense_last_rows`` query blocks (the question at the end of a prompt; the default keeps the last one whole, since
2026-12-06: on Qwen2.5-Coder-0.5B at 32k it took RULER from 52.0 to 57.6 at density 0.1 and from 45.3 to 52.3 at 0.05,
dense 53.8, for about 4% of the budget at 32k; docs/results.md); layers in ``dense_layers`` stay dense.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from seer.checks import fail, is_int, is_number

METHODS = ("topk", "threshold", "topp", "dense")
ALLOCATIONS = ("global", "uniform", "oracle")


@dataclass
class SparsityConfig:
    """A budget (see the module docstring)."""

    method: str = "threshold"  # the best policy measured (docs/results.md): a threshold calibrated to the target
    target_density: Optional[float] = 0.1
    threshold: float = 1e-3
    p: float = 0.9
    allocation: str = "global"
    nz_formula: bool = False
    sink_blocks: int = 0
    local_blocks: int = 0
    dense_last_rows: int = 1  # the prompt's last query block attends densely (the module docstring)
    dense_layers: list[int] = field(default_factory=list)
    max_row_share: float = 1.0  # threshold only: the most of a row's causal blocks it keeps (1: no cap)
    cap_min_blocks: int = 0  # with a row cap: a row may keep this many blocks even where its share allows fewer
    calibration_rounds: int = 0  # calibrated budgets: re-fits of the knob on scores of the model running sparse

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            fail("sparsity", "method", self.method, f"choose from {METHODS}")
        if self.target_density is not None and (not is_number(self.target_density)
                                                or not 0 < self.target_density <= 1):
            fail("sparsity", "target_density", self.target_density,
                 "is the kept share of causal blocks; must be in (0, 1] (or null to use the knob as given)")
        if self.method == "topk" and self.target_density is None:
            fail("sparsity", "target_density", None, "topk needs the share of each row to keep")
        if not is_number(self.threshold) or not 0 <= self.threshold < 1:
            fail("sparsity", "threshold", self.threshold, "must be in [0, 1) (a softmax probability)")
        if not is_number(self.p) or not 0 < self.p <= 1:
            fail("sparsity", "p", self.p, "is a share of the row's score mass; must be in (0, 1]")
        if self.allocation not in ALLOCATIONS:
            fail("sparsity", "allocation", self.allocation, f"choose from {ALLOCATIONS}")
        for key in ("sink_blocks", "local_blocks", "dense_last_rows", "cap_min_blocks"):
            v = getattr(self, key)
            if not is_int(v) or v < 0:
                fail("sparsity", key, v, "must be an integer >= 0")
        if not is_number(self.max_row_share) or not 0 < self.max_row_share <= 1:
            fail("sparsity", "max_row_share", self.max_row_share, "is the most of a row's causal blocks a threshold "
                 "keeps; must be in (0, 1] (1: no cap)")
        if self.max_row_share < 1 and self.method != "threshold":
            fail("sparsity", "max_row_share", self.max_row_share, f"caps a threshold's rows; method={self.method} "
                 "takes none (topk keeps target_density of every row already)")
        if self.max_row_share < 1 and self.target_density is not None and self.max_row_share <= self.target_density:
            fail("sparsity", "max_row_share", self.max_row_share, f"caps every row at or below "
                 f"target_density={self.target_density}, which calibration could then not reach; give a cap above "
                 "the target (1.5x the target was measured: docs/results/qwen/capped.md)")
        if self.cap_min_blocks and self.max_row_share == 1:
            fail("sparsity", "cap_min_blocks", self.cap_min_blocks, "floors a row cap; give max_row_share < 1 with it")
        if not is_int(self.calibration_rounds) or self.calibration_rounds < 0:
            fail("sparsity", "calibration_rounds", self.calibration_rounds, "must be an integer >= 0")
        if self.calibration_rounds and not self.calibrated:
            fail("sparsity", "calibration_rounds", self.calibration_rounds, f"re-fits a calibrated knob; "
                 f"{self.describe()} has none to calibrate (give target_density)")
        self.dense_layers = list(self.dense_layers)
        if not all(is_int(i) for i in self.dense_layers) or len(set(self.dense_layers)) != len(self.dense_layers):
            fail("sparsity", "dense_layers", self.dense_layers, "must be distinct layer indices")

    @property
    def calibrated(self) -> bool:
        """Whether the knob must be calibrated to reach ``target_density`` (threshold and topp with a target, and
        topk with a non-global allocation)."""
        if self.method in ("threshold", "topp"):
            return self.target_density is not None
        return self.method == "topk" and self.allocation != "global"

    def runs_dense(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` attends to every causal block: a ``dense`` budget, or a layer of
        ``dense_layers`` (the one rule inference, training, measures and calibration follow)."""
        return self.method == "dense" or layer_idx in self.dense_layers

    def describe(self) -> str:
        """A short human-readable form, e.g. ``threshold target_density=0.1 (global)``."""
        if self.method == "dense":
            return "dense"
        if self.method == "topk" or self.target_density is not None:
            what = f"{self.method}{' nz_formula' if self.method == 'topk' and self.nz_formula else ''} " \
                   f"target_density={self.target_density}"
            if self.calibrated:
                what += f" ({self.allocation})"
        else:
            what = f"{self.method} {'threshold' if self.method == 'threshold' else 'p'}=" \
                   f"{self.threshold if self.method == 'threshold' else self.p}"
        forced = [f"{k}={getattr(self, k)}" for k in ("sink_blocks", "local_blocks", "dense_last_rows")
                  if getattr(self, k)]
        if self.dense_layers:
            forced.append(f"dense_layers={self.dense_layers}")
        if self.max_row_share < 1:
            forced.append(f"max_row_share={self.max_row_share:g}")
        if self.cap_min_blocks:
            forced.append(f"cap_min_blocks={self.cap_min_blocks}")
        if self.calibration_rounds:
            forced.append(f"calibration_rounds={self.calibration_rounds}")
        return what + (f" [{', '.join(forced)}]" if forced else "")
