"""Block selection: scores -> boolean block masks (budgets, calibration), training-free scorers, measures.

* :mod:`seer.sparsity.config` - :class:`SparsityConfig`, the budget (topk, threshold, topp, dense; forced blocks).
* :mod:`seer.sparsity.masks` - the mask of a budget from block scores.
* :mod:`seer.sparsity.calibration` - the knob of an adaptive budget that reaches a target density.
* :mod:`seer.sparsity.selectors` - training-free block scorers (oracle, streaming, vertical-slash, ...).
* :mod:`seer.sparsity.measures` - achieved density, recall of attention mass, the oracle's recall.
* :mod:`seer.sparsity.blend_fit` - a gate blend weight per layer, fitted on calibration rows.
"""

from seer.sparsity.calibration import selection_masks
from seer.sparsity.config import SparsityConfig
from seer.sparsity.masks import (causal_blocks, forced_blocks, row_budgets, row_probs, select_blocks, threshold_mask,
                                 topk_mask, topp_mask)
from seer.sparsity.measures import attention_mass, block_density, head_density, mass_recall, oracle_recall

__all__ = ["SparsityConfig", "attention_mass", "block_density", "causal_blocks", "forced_blocks", "head_density",
           "mass_recall", "oracle_recall", "row_budgets", "row_probs", "select_blocks", "selection_masks",
           "threshold_mask", "topk_mask", "topp_mask"]
