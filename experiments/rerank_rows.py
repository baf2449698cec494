"""An experiment, not a product option: the rerank's sampled query rows drawn at random instead of spread evenly.

The rerank (:func:`seer.sparsity.selectors.sampled_rows_mass`) averages each query block's masses over ``R`` rows
spread evenly from the block's first row to its last (:func:`seer.kernels.sampled_rows.sampled_offsets`). This wrapper
swaps those offsets, on the CPU reference path, for ``R`` rows drawn without replacement from the block by
``random.Random(SEER_RERANK_ROWS_SEED)`` (the same rows in every block and call), and runs a command: how much of a
measured perplexity is the choice of rows, i.e. how far a selection's small changes move it.

    SEER_RERANK_ROWS_SEED=1 python experiments/rerank_rows.py -m seer.eval selector=reranked selector.top_p=1.0 ...
"""

from __future__ import annotations

import os
import random
import sys

from run_patched import run_command

from seer.kernels import reference


def seed_setting() -> int:
    """``SEER_RERANK_ROWS_SEED`` as an integer (required)."""
    raw = os.environ.get("SEER_RERANK_ROWS_SEED", "")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"SEER_RERANK_ROWS_SEED must be an integer, got {raw!r}") from None


def random_offsets(block_size: int, rows: int) -> list[int]:
    """``min(rows, block_size)`` distinct offsets in ``[0, block_size)``, ascending, drawn by the seed's generator."""
    return sorted(random.Random(seed_setting()).sample(range(block_size), min(rows, block_size)))


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(__doc__)
    seed_setting()  # a bad setting fails before any model loads
    reference.sampled_offsets = random_offsets  # read through the module by reference.sampled_rows_mass
    run_command(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
