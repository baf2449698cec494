"""An experiment, not a product option: the oracle's block masses pooled over a query block's rows by a power mean.

The oracle (:class:`seer.sparsity.selectors.Oracle`) scores block ``(i, j)`` by the mean over the rows ``r`` of query
block ``i`` of the row's softmax mass on key block ``j``, ``m_r[j] = sum_{c in j} p_r(c)``. Under a threshold at
density 0.1 on Qwen at 8k (a CPU) the training-free rerank, which averages the same masses over 16 of the 64 rows,
scored *better* than that exact mean (+4.7% against +7.08% on *Emma*). A sample's mean picked at a high threshold
favours blocks whose mass sits in few rows; this wrapper asks whether pooling that favours them on purpose is the
better target:

    pool[i, j] = (1/|i| sum_r m_r[j]^p)^(1/p)     (p = 1: the oracle; p -> inf: the max over rows)

then row-normalised like every selector's scores. ``SEER_ORACLE_POOL``: ``max``, a power ``p >= 1`` (default 2), or
``first:W``: the plain mean with each query block's first row weighted ``W`` times the others (the evenly spread
16-row sample of the rerank weighs it once in 16, the mean once in 64: ``first:4`` mimics that share).
The oracle's scores are swapped for these (on the CPU reference path only; a CUDA tensor is refused) and a command
runs:

    SEER_ORACLE_POOL=max python experiments/oracle_pool.py -m seer.eval selector=oracle <seer.eval overrides>

Measured (Qwen at 8k, novel, 0.1; docs/results/qwen/row_sampling_8k_cpu.md): the max is far worse (+13.0%), p = 2 and
``first:4`` win half of the gap (+5.43%, +5.93%): the rows' weighting, not spikiness, is what the mean misses.
"""

from __future__ import annotations

import os
import sys

import torch
from run_patched import run_command

from seer.kernels import reference
from seer.sparsity import selectors


def pool_setting() -> tuple[float, float]:
    """``SEER_ORACLE_POOL`` as ``(power, first-row weight)``: ``max`` is ``(inf, 1)``, a number ``p >= 1`` is
    ``(p, 1)`` (default 2), ``first:W`` (``W > 0``) is ``(1, W)``."""
    raw = os.environ.get("SEER_ORACLE_POOL", "2")
    if raw == "max":
        return float("inf"), 1.0
    first = raw.startswith("first:")
    try:
        value = float(raw[len("first:"):] if first else raw)
    except ValueError:
        value = float("nan")
    if first and value > 0 and value != float("inf"):
        return 1.0, value
    if not first and value >= 1:
        return value, 1.0
    raise ValueError(f"SEER_ORACLE_POOL must be 'max', a power >= 1 or 'first:W' with W > 0, got {raw!r}")


@torch.no_grad()
def pooled_mass(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float, power: float,
                first_weight: float = 1.0) -> torch.Tensor:
    """``[B, Hq, nb, nb]``: per query block, the power mean (``power``; ``inf``: the max) over its rows of each row's
    causal softmax mass on each key block (0 above the diagonal), the block's first row weighted ``first_weight``
    times the others (a weighted mean; the max ignores it), in float32 (float64 inputs stay float64)."""
    b, hq, hkv, n, _ = reference.check_qkv_shapes(q, k)
    nb = reference.num_blocks(n, block_size)
    out = torch.zeros(b, hq, nb, nb, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                      device=q.device)
    for start, stop in reference._row_chunks(n, block_size, hq, b, None):
        e = reference._causal_scores(q, k, start, stop, scale)  # [B, Hkv, G, rows, stop], -inf above the diagonal
        e = torch.softmax(e, dim=-1)
        kb = reference.num_blocks(stop, block_size)
        e = torch.nn.functional.pad(e, (0, kb * block_size - stop))
        per_row = e.unflatten(-1, (kb, block_size)).sum(-1)  # [B, Hkv, G, rows, kb]
        rows = stop - start
        qb = reference.num_blocks(rows, block_size)
        for t in range(qb):  # each query block's real rows
            block = per_row[..., t * block_size:min((t + 1) * block_size, rows), :]
            if power == float("inf"):
                pooled = block.amax(-2)
            else:
                weight = torch.ones(block.shape[-2], dtype=block.dtype, device=block.device)
                weight[0] = first_weight
                pooled = (block.pow(power) * weight[:, None]).sum(-2).div(weight.sum()).pow(1.0 / power)
            out[:, :, start // block_size + t, :kb] = pooled.reshape(b, hq, kb).to(out.dtype)
    return out


def pooled_oracle_scores(self, x: selectors.LayerInputs) -> torch.Tensor:
    """What :meth:`Oracle.scores` becomes: the log of the pooled masses of :func:`pool_setting`, row-normalised."""
    if x.q.is_cuda:
        raise ValueError("oracle_pool: the pooled oracle runs on the CPU reference path only")
    power, first_weight = pool_setting()
    return selectors.log_mass(pooled_mass(x.q, x.k, x.block_size, x.scale, power, first_weight))


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(__doc__)
    pool_setting()  # a bad setting fails before any model loads
    selectors.Oracle.scores = torch.no_grad()(pooled_oracle_scores)
    run_command(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
