"""An experiment, not a product option: the rerank's block masses mixed with the proposal that chose its candidates.

The rerank (:func:`seer.sparsity.selectors.sampled_rows_mass`) ranks each row's candidate blocks by ``R`` exact query
rows of the block (16 of 64 on Qwen) and drops what proposed them: the gate's (blended) block probabilities, which
were trained to predict the mean over *every* row of the block. Two estimates of the same quantity with different
errors (the rerank's: the rows it did not sample; the proposal's: the model's), so a convex mix may rank better
than either:

    mass'[i, j] = (1 - mix) * mass[i, j] + mix * p[i, j],   p = the proposal's probabilities on row i's candidates,
                                                              renormalised over them (0 elsewhere)

The same applies to the training-free ``reranked`` selector (its proposal: vertical-slash). This wrapper sets
``mix`` (``SEER_RERANK_MIX``, default 0.25), swaps the selectors' rerank for the mixed one and runs a command:

    SEER_RERANK_MIX=0.25 python experiments/rerank_mix.py -m seer.eval <seer.eval overrides>
    python experiments/rerank_mix.py experiments/quality_qwen.py <its arguments>

Measured on a CPU (SmolLM2-135M at 4k, the recipe's gates, mix 0.25): 0.7 point worse on the novel with 16 rows and
with 8, 2.9 worse on code; refuted (docs/results/smollm2_rerank_cpu.md, last section).
"""

from __future__ import annotations

import os
import sys

import torch
from run_patched import run_command

from seer.sparsity import selectors

_top_p = selectors.top_p_candidates
_per_head = selectors.sampled_rows_mass
_proposal: list[torch.Tensor] = []  # the scores the last top-p call ranked (the rerank that follows reads them)


def mix_weight() -> float:
    """``SEER_RERANK_MIX`` as a float in [0, 1] (default 0.25); anything else is refused."""
    raw = os.environ.get("SEER_RERANK_MIX", "0.25")
    try:
        mix = float(raw)
    except ValueError:
        raise SystemExit(f"SEER_RERANK_MIX must be a number in [0, 1], got {raw!r}") from None
    if not 0.0 <= mix <= 1.0:
        raise SystemExit(f"SEER_RERANK_MIX must be a number in [0, 1], got {raw!r}")
    return mix


def proposal_top_p(scores: torch.Tensor, top_p: float, max_share: float = 1.0) -> torch.Tensor:
    """:func:`seer.sparsity.selectors.top_p_candidates`, keeping ``scores`` for the rerank that follows."""
    _proposal[:] = [scores]
    return _top_p(scores, top_p, max_share)


def mixed_masses(mass: torch.Tensor, proposal: torch.Tensor, candidates: torch.Tensor, mix: float) -> torch.Tensor:
    """``(1 - mix) * mass + mix * p``, ``p`` the probabilities ``exp(proposal)`` on each row's ``candidates``,
    renormalised over them (0 elsewhere)."""
    p = proposal.float().exp().masked_fill(~candidates, 0.0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
    return (1.0 - mix) * mass + mix * p


def mixed_sampled_rows_mass(x: selectors.LayerInputs, candidates: torch.Tensor, rows: int) -> torch.Tensor:
    """:func:`seer.sparsity.selectors.sampled_rows_mass` mixed with the proposal of the last top-p call."""
    mass = _per_head(x, candidates, rows)
    if not _proposal or _proposal[0].shape != mass.shape:
        raise RuntimeError("rerank_mix: a rerank with no proposal of its shape before it")
    return mixed_masses(mass, _proposal.pop(), candidates, MIX)


MIX = 0.25


def main(argv: list[str]) -> None:
    global MIX
    if not argv:
        raise SystemExit(__doc__)
    MIX = mix_weight()
    print(f"[rerank_mix] the rerank's masses mixed with the proposal at {MIX}", flush=True)
    selectors.top_p_candidates = proposal_top_p  # read through the module by the gate and the selector
    selectors.sampled_rows_mass = mixed_sampled_rows_mass
    run_command(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
