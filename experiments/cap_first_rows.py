"""An experiment, not a product option: a threshold's row cap applied only to the rows shorter than N blocks.

``sparsity.max_row_share`` caps every row of a calibrated threshold at that share of its causal blocks;
``sparsity.cap_min_blocks`` floors the cap, which uncaps the short rows (a window's first tokens) and leaves the long
ones capped. On Qwen2.5-Coder-0.5B the floor took away the cap's whole gain on prose at 8k, 16k and 32k
(docs/results/qwen/capped.md), so the gain is made in the short rows. This wrapper asks the converse: the cap in the
rows of fewer than ``SEER_CAP_ROWS`` causal blocks only, every longer row keeping every block over the threshold.
It runs a command:

    SEER_CAP_ROWS=27 python experiments/cap_first_rows.py -m seer.eval <seer.eval overrides, with
        sparsity.max_row_share=S>
    SEER_CAP_ROWS=27 python experiments/cap_first_rows.py experiments/quality_qwen.py <its arguments, with
        --max-row-share S>
"""

from __future__ import annotations

import os
import sys

import torch
from run_patched import run_command

from seer.sparsity import calibration, masks


def capped_rows() -> int:
    """``SEER_CAP_ROWS``: rows with fewer causal blocks than this are capped (an integer >= 1)."""
    value = os.environ.get("SEER_CAP_ROWS", "")
    try:
        rows = int(value)
    except ValueError:
        rows = 0
    if rows < 1:
        raise SystemExit(f"SEER_CAP_ROWS={value!r}: give the row length (in blocks) from which rows are uncapped, "
                         f"an integer >= 1")
    return rows


_THRESHOLD_MASK = masks.threshold_mask_from_probs  # the product's, before main() swaps it


def first_rows_cap_mask_from_probs(probs: torch.Tensor, threshold, sink_blocks: int = 0, local_blocks: int = 0,
                                   dense_last_rows: int = 0, max_row_share: float = 1.0,
                                   ranks: torch.Tensor | None = None, cap_min_blocks: int = 0,
                                   cap_rows: int | None = None) -> torch.Tensor:
    """:func:`seer.sparsity.masks.threshold_mask_from_probs` with the cap (and its floor) only in the rows of fewer
    than ``cap_rows`` causal blocks (query-block rows ``0 .. cap_rows - 2``; default ``SEER_CAP_ROWS``): those rows
    of the product's capped mask, the others of its uncapped one."""
    cap_rows = capped_rows() if cap_rows is None else cap_rows
    capped = _THRESHOLD_MASK(probs, threshold, sink_blocks, local_blocks, dense_last_rows, max_row_share, ranks,
                             cap_min_blocks)
    if max_row_share < 1:
        uncapped = _THRESHOLD_MASK(probs, threshold, sink_blocks, local_blocks, dense_last_rows)
        capped[..., cap_rows - 1:, :] = uncapped[..., cap_rows - 1:, :]
    return capped


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(__doc__)
    capped_rows()  # a bad SEER_CAP_ROWS stops the run before anything loads
    masks.threshold_mask_from_probs = first_rows_cap_mask_from_probs  # read through the module by threshold_mask
    calibration.threshold_mask_from_probs = first_rows_cap_mask_from_probs  # imported by name there
    run_command(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
