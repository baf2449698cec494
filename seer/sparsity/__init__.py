"""Block selection: gate scores -> boolean block masks (top-k, threshold), density and recall measures.

Training-free selectors (oracle, streaming, vertical-slash, ...) will live beside these as the evaluation
suite grows.
"""

from seer.sparsity.config import SparsityConfig
from seer.sparsity.masks import (block_density, causal_blocks, mass_recall, row_budgets, select_blocks,
                                 threshold_mask, topk_mask)

__all__ = ["SparsityConfig", "block_density", "causal_blocks", "mass_recall", "row_budgets", "select_blocks",
           "threshold_mask", "topk_mask"]
