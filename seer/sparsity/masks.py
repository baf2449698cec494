"""Block masks from block scores: top-k (per-row budgets or the authors' uniform k) and threshold.

Scores are ``[B, H, nb, nb]`` (gate logits, or any score where larger means more important; entries above the
diagonal are ignored). Masks are bool ``[B, H, nb, nb]``, block-causal, and always keep the diagonal block, so
no query-block row is ever empty.

On CUDA, :func:`topk_mask` of 4-d scores runs as one Triton launch (:mod:`seer.kernels.block_topk`, the same
mask as the PyTorch sort path here, which CPU tensors keep using).
"""

from __future__ import annotations

import functools
import math

import torch

from seer.sparsity.config import SparsityConfig


def causal_blocks(nb: int, device=None) -> torch.Tensor:
    """Bool ``[nb, nb]``: key block ``j`` is visible from query block ``i`` iff ``j <= i``."""
    return torch.ones(nb, nb, dtype=torch.bool, device=device).tril()


def _forced(nb: int, sink_blocks: int, device) -> torch.Tensor:
    forced = torch.eye(nb, dtype=torch.bool, device=device)
    if sink_blocks:
        forced[:, :sink_blocks] = True
    return forced & causal_blocks(nb, device)


def row_budgets(nb: int, density: float, nz_formula: bool = False, device=None) -> torch.Tensor:
    """Blocks to keep in each query-block row, ``[nb]`` int64, each between 1 and the row's causal length.

    Default: the budgets of rows ``0..i`` add up to ``round(density * causal blocks of rows 0..i)``, so every row
    keeps about ``density`` of its blocks and the whole triangle keeps ``density`` of it, up to one block.
    ``nz_formula``: the authors' uniform ``k = (1 - sqrt(1 - density)) * nb`` in every row (capped by the row).
    """
    rows = torch.arange(1, nb + 1, device=device, dtype=torch.float64)
    if nz_formula:
        k = max(1, round((1.0 - math.sqrt(max(0.0, 1.0 - density))) * nb))
        budget = torch.clamp(rows, max=k)
    else:
        cum = torch.round(density * torch.cumsum(rows, 0))
        budget = torch.diff(cum, prepend=cum.new_zeros(1))
    return torch.maximum(torch.minimum(budget, rows), torch.ones_like(rows)).long()


@functools.lru_cache(maxsize=64)
def _topk_budgets(nb: int, ratio: float, nz_formula: bool, dense_last_rows: int, device) -> torch.Tensor:
    """:func:`row_budgets` at density ``1 - ratio`` with the last ``dense_last_rows`` rows whole; cached per
    setting and device (read-only), so a forward pays no launches for it."""
    budget = row_budgets(nb, 1.0 - ratio, nz_formula, device)
    if dense_last_rows:
        budget[max(0, nb - dense_last_rows):] = torch.arange(1, nb + 1, device=device)[max(0, nb - dense_last_rows):]
    return budget


def topk_mask(scores: torch.Tensor, ratio: float, nz_formula: bool = False, sink_blocks: int = 0,
              dense_last_rows: int = 0) -> torch.Tensor:
    """Keep the highest-scoring causal blocks of each row: a fraction ``1 - ratio`` of them (see
    :func:`row_budgets`). The diagonal (and ``sink_blocks`` first columns) are kept and count towards the budget;
    the last ``dense_last_rows`` rows are kept whole."""
    _check_scores(scores)
    nb = scores.shape[-1]
    dev = scores.device
    budget = _topk_budgets(nb, ratio, nz_formula, dense_last_rows, dev)
    if scores.is_cuda and scores.dim() == 4:
        from seer.kernels.block_topk import topk_block_mask

        return topk_block_mask(scores, budget, sink_blocks)
    causal = causal_blocks(nb, dev)
    forced = _forced(nb, sink_blocks, dev)
    ranked = scores.float().masked_fill(~causal, float("-inf")).masked_fill(forced, float("inf"))
    ranked = torch.nan_to_num(ranked, nan=float("-inf"))
    order = ranked.argsort(dim=-1, descending=True, stable=True)
    keep_sorted = torch.arange(nb, device=dev)[None, :] < budget[:, None]  # [nb rows, nb ranks]
    mask = torch.zeros_like(ranked, dtype=torch.bool).scatter(-1, order, keep_sorted.expand_as(order))
    return (mask | forced) & causal


def threshold_mask(scores: torch.Tensor, threshold: float, sink_blocks: int = 0,
                   dense_last_rows: int = 0) -> torch.Tensor:
    """Keep causal blocks whose softmax probability over the row's causal blocks exceeds ``threshold``, plus the
    diagonal, the ``sink_blocks`` first columns and the last ``dense_last_rows`` rows."""
    _check_scores(scores)
    nb = scores.shape[-1]
    causal = causal_blocks(nb, scores.device)
    probs = torch.softmax(scores.float().masked_fill(~causal, float("-inf")), dim=-1)
    mask = (probs > threshold) | _forced(nb, sink_blocks, scores.device)
    if dense_last_rows:
        mask[..., max(0, nb - dense_last_rows):, :] = True
    return mask & causal


def select_blocks(scores: torch.Tensor, config: SparsityConfig) -> torch.Tensor:
    """The block mask that ``config`` (method topk, threshold or dense) picks from ``scores``."""
    if config.method == "topk":
        return topk_mask(scores, config.ratio, config.nz_formula, config.sink_blocks, config.dense_last_rows)
    if config.method == "threshold":
        return threshold_mask(scores, config.threshold, config.sink_blocks, config.dense_last_rows)
    _check_scores(scores)
    return causal_blocks(scores.shape[-1], scores.device).expand(scores.shape).clone()


def block_density(mask: torch.Tensor) -> torch.Tensor:
    """Kept share of the causal blocks, averaged over everything but the last two dims (a 0-dim tensor)."""
    nb = mask.shape[-1]
    kept = (mask & causal_blocks(nb, mask.device)).sum(dim=(-1, -2)).float()
    return (kept / (nb * (nb + 1) / 2)).mean()


def mass_recall(mask: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Share of attention mass (``[..., nb, nb]``, e.g. :func:`seer.kernels.reference.block_attn_mass`) that the mask
    keeps, averaged over query-block rows, heads and batch (a 0-dim tensor)."""
    kept = (mass * mask).sum(-1)
    total = mass.sum(-1).clamp_min(torch.finfo(mass.dtype).tiny)
    return (kept / total).mean()


def _check_scores(scores: torch.Tensor) -> None:
    if scores.dim() < 2 or scores.shape[-1] != scores.shape[-2]:
        raise ValueError(f"block scores must be [..., nb, nb]; got {tuple(scores.shape)}")
