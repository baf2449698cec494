"""An experiment, not a product option: a threshold's row cap counted in the window's blocks, not the row's.

``sparsity.max_row_share`` caps each row of a calibrated threshold at that share of *its own* causal blocks, so a
short row (the window's first blocks) is cut to one or two blocks. On Qwen2.5-Coder-0.5B at 8k that cap won the
window's long rows and lost its short ones (docs/results/prefix_ppl.md). This wrapper caps every row at the same
number of blocks instead, ``max_row_share`` times the window's blocks (a row shorter than that is not cut), and runs a
command:

    python experiments/row_cap_window.py -m seer.eval <seer.eval overrides, with sparsity.max_row_share=S>
    python experiments/row_cap_window.py experiments/quality_qwen.py <its arguments, with --max-row-share S>
"""

from __future__ import annotations

import sys

import torch
from run_patched import run_command

from seer.sparsity import calibration, masks


def window_cap_mask_from_probs(probs: torch.Tensor, threshold, sink_blocks: int = 0, local_blocks: int = 0,
                               dense_last_rows: int = 0, max_row_share: float = 1.0,
                               ranks: torch.Tensor | None = None, cap_min_blocks: int = 0) -> torch.Tensor:
    """:func:`seer.sparsity.masks.threshold_mask_from_probs` with each row kept to at most
    ``round(max_row_share * nb)`` blocks, or ``cap_min_blocks`` if more (forced blocks counted, and kept even beyond
    it)."""
    nb = probs.shape[-1]
    forced = masks.forced_blocks(nb, sink_blocks, local_blocks, probs.device)
    over = probs > masks._per_head(threshold, probs)
    if max_row_share < 1:
        if ranks is None:
            ranks = masks.row_ranks(probs, sink_blocks, local_blocks)
        over &= ranks < max(1, round(max_row_share * nb), cap_min_blocks)
    return masks._finish(over | forced, nb, dense_last_rows)


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(__doc__)
    masks.threshold_mask_from_probs = window_cap_mask_from_probs  # read through the module by threshold_mask
    calibration.threshold_mask_from_probs = window_cap_mask_from_probs  # imported by name there
    run_command(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
