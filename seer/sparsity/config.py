"""``SparsityConfig``: how block scores become a block mask (Hydra group ``sparsity``; see :mod:`seer.config`)."""

from __future__ import annotations

from dataclasses import dataclass

from seer.config import fail, is_int, is_number

METHODS = ("topk", "threshold", "dense")


@dataclass
class SparsityConfig:
    """How gate scores become a block mask (see :mod:`seer.sparsity`).

    ``topk``: drop the fraction ``ratio`` of each query-block row's causal blocks (exact per-row budgets), or
    with ``nz_formula`` the authors' uniform ``k = (1 - sqrt(ratio)) * nb`` blocks per row, whose kept share of
    the causal triangle is ``1 - ratio``. ``threshold``: keep blocks whose softmax score exceeds ``threshold``.
    The diagonal block is always kept; ``sink_blocks`` forces the first key blocks, ``dense_last_rows`` keeps
    the last query-block rows whole (the question at the end of a prompt). ``dense`` keeps everything.
    """

    method: str = "topk"
    ratio: float = 0.9
    threshold: float = 1e-3
    nz_formula: bool = False
    sink_blocks: int = 0
    dense_last_rows: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            fail("sparsity", "method", self.method, f"choose from {METHODS}")
        if not is_number(self.ratio) or not 0 <= self.ratio < 1:
            fail("sparsity", "ratio", self.ratio, "is the fraction of causal blocks dropped; must be in [0, 1)")
        if not is_number(self.threshold) or not 0 <= self.threshold < 1:
            fail("sparsity", "threshold", self.threshold, "must be in [0, 1) (a softmax probability)")
        for key in ("sink_blocks", "dense_last_rows"):
            v = getattr(self, key)
            if not is_int(v) or v < 0:
                fail("sparsity", key, v, "must be an integer >= 0")

    @property
    def density(self) -> float:
        """Target kept fraction of causal blocks for ``topk`` (1.0 for ``dense``)."""
        return 1.0 if self.method == "dense" else 1.0 - self.ratio
