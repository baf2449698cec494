"""An experiment, not a product option: every rerank ranks its key-head group's union of candidate blocks.

The rerank (:func:`seer.sparsity.selectors.sampled_rows_mass`) scores each query head's candidate blocks by a few
exact query rows; the fused kernel walks the union of a key head's query heads' candidates anyway and masks each
row to its own head's, so ranking the union instead costs the same dots and exponentials. Each head's softmax then
runs over more keys (closer to its full row) and can pick blocks its own proposal missed. This wrapper swaps the
selectors' rerank for that variant and runs a command:

    python experiments/rerank_union.py -m seer.eval <seer.eval overrides>
    python experiments/rerank_union.py experiments/quality_qwen.py <its arguments>

Measured on a CPU (SmolLM2-135M at 4k and 8k, the recipe's gates: no consistent effect;
docs/results/smollm2_rerank_cpu.md, last section).
"""

from __future__ import annotations

import sys

import torch
from run_patched import run_command

from seer.sparsity import selectors

_per_head = selectors.sampled_rows_mass


def group_union(candidates: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``candidates`` ``[B, Hq, nb, nb]`` (bool) with each query head's set replaced by its key head's union."""
    b, hq, nb, _ = candidates.shape
    grouped = candidates.view(b, kv_heads, hq // kv_heads, nb, nb).any(2, keepdim=True)
    return grouped.expand(b, kv_heads, hq // kv_heads, nb, nb).reshape(b, hq, nb, nb)


def union_sampled_rows_mass(x: selectors.LayerInputs, candidates: torch.Tensor, rows: int) -> torch.Tensor:
    """:func:`seer.sparsity.selectors.sampled_rows_mass` over the group's union of candidates."""
    return _per_head(x, group_union(candidates, x.k.shape[1]), rows)


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(__doc__)
    selectors.sampled_rows_mass = union_sampled_rows_mass  # read through the module by the gate and the selector
    run_command(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
