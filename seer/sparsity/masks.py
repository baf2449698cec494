"""Block masks from block scores: top-k, threshold and top-p budgets with forced blocks; density and recall.

Scores are ``[B, H, nb, nb]`` log-scores (gate logits, or a selector's scores: larger means more important, and
the softmax over a row's causal blocks is the scorer's estimate of the row's attention mass per block; entries above
the diagonal are ignored). Masks are bool ``[B, H, nb, nb]``, block-causal, and always keep the diagonal block, so no
query-block row is ever empty. A budget's knob (top-k share, threshold, top-p level) is a float or a per-head
tensor ``[H]`` (what per-head calibration fits, :mod:`seer.sparsity.calibration`).

On CUDA, :func:`topk_mask` with one share for every head and no local blocks runs as one Triton launch
(:mod:`seer.kernels.block_topk`, the same mask as the PyTorch sort path here).
"""

from __future__ import annotations

import functools
import math

import torch

from seer.sparsity.config import SparsityConfig

Knob = float | torch.Tensor


@functools.lru_cache(maxsize=64)
def causal_blocks(nb: int, device=None) -> torch.Tensor:
    """Bool ``[nb, nb]``: key block ``j`` is visible from query block ``i`` iff ``j <= i`` (cached per size and
    device, so a forward pays no launch for it: read-only)."""
    return torch.ones(nb, nb, dtype=torch.bool, device=device).tril()


@functools.lru_cache(maxsize=64)
def forced_blocks(nb: int, sink_blocks: int = 0, local_blocks: int = 0, device=None) -> torch.Tensor:
    """Bool ``[nb, nb]`` of the blocks every budget keeps: the diagonal, the first ``sink_blocks`` key blocks and the
    ``local_blocks`` nearest blocks left of the diagonal (block-causal; cached, read-only)."""
    i = torch.arange(nb, device=device)[:, None]
    j = torch.arange(nb, device=device)[None, :]
    return (j <= i) & ((j < sink_blocks) | (i - j <= local_blocks))


def _per_head(knob: Knob, scores: torch.Tensor) -> Knob:
    """A per-head knob ``[H]`` as ``[1, H, 1, 1]`` (broadcasts against 4-d scores); a float as is."""
    if isinstance(knob, torch.Tensor) and knob.dim() > 0:
        if knob.shape != (scores.shape[1],):
            raise ValueError(f"a per-head knob must have shape [{scores.shape[1]}] (one per head); got "
                             f"{tuple(knob.shape)}")
        return knob.to(scores.device, torch.float32).view(1, -1, 1, 1)
    return float(knob)


def row_budgets(nb: int, density: Knob, nz_formula: bool = False, device=None) -> torch.Tensor:
    """Blocks to keep in each query-block row, int64 ``[nb]`` (``[H, nb]`` for a per-head ``density [H]``), each
    between 1 and the row's causal length.

    Default: the budgets of rows ``0..i`` add up to ``round(density * causal blocks of rows 0..i)``, so every row
    keeps about ``density`` of its blocks and the whole triangle keeps ``density`` of it, up to one block.
    ``nz_formula``: the authors' uniform ``k = (1 - sqrt(1 - density)) * nb`` in every row (capped by the row).
    """
    rows = torch.arange(1, nb + 1, device=device, dtype=torch.float64)
    d = density.to(device, torch.float64)[:, None] if isinstance(density, torch.Tensor) and density.dim() > 0 \
        else torch.tensor(float(density), dtype=torch.float64, device=device)
    if nz_formula:
        k = torch.clamp(torch.round((1.0 - torch.sqrt(torch.clamp(1.0 - d, min=0.0))) * nb), min=1)
        budget = torch.minimum(rows, k)
    else:
        cum = torch.round(d * torch.cumsum(rows, 0))
        budget = torch.diff(cum, dim=-1, prepend=torch.zeros_like(cum[..., :1]))
    return torch.maximum(torch.minimum(budget, rows), torch.ones_like(rows)).long()


def _finish(mask: torch.Tensor, nb: int, dense_last_rows: int) -> torch.Tensor:
    if dense_last_rows:
        mask[..., max(0, nb - dense_last_rows):, :] = True
    return mask & causal_blocks(nb, mask.device)


def topk_mask(scores: torch.Tensor, density: Knob, nz_formula: bool = False, sink_blocks: int = 0,
              local_blocks: int = 0, dense_last_rows: int = 0) -> torch.Tensor:
    """Keep the highest-scoring causal blocks of each row, a share ``density`` of them (see :func:`row_budgets`).
    Forced blocks (diagonal, sinks, local) are kept and count towards the budget; the last ``dense_last_rows`` rows
    are kept whole."""
    _check_scores(scores)
    nb, dev = scores.shape[-1], scores.device
    shared = not (isinstance(density, torch.Tensor) and density.dim() > 0)
    if scores.is_cuda and scores.dim() == 4 and shared and not local_blocks:
        from seer.kernels.block_topk import topk_block_mask

        budget = _shared_budgets(nb, float(density), nz_formula, dev)
        return _finish(topk_block_mask(scores, budget, sink_blocks), nb, dense_last_rows)
    budget = row_budgets(nb, density if shared else _per_head(density, scores).view(-1), nz_formula, dev)
    forced = forced_blocks(nb, sink_blocks, local_blocks, dev)
    ranked = scores.float().masked_fill(~causal_blocks(nb, dev), float("-inf")).masked_fill(forced, float("inf"))
    ranked = torch.nan_to_num(ranked, nan=float("-inf"))
    order = ranked.argsort(dim=-1, descending=True, stable=True)
    keep_sorted = torch.arange(nb, device=dev) < budget[..., None]  # [(H,) nb rows, nb ranks]
    if not shared:
        keep_sorted = keep_sorted.unsqueeze(0)
    mask = torch.zeros_like(ranked, dtype=torch.bool).scatter(-1, order, keep_sorted.expand_as(order))
    return _finish(mask | forced, nb, dense_last_rows)


@functools.lru_cache(maxsize=64)
def _shared_budgets(nb: int, density: float, nz_formula: bool, device) -> torch.Tensor:
    """:func:`row_budgets` cached per setting and device (read-only), so a forward pays no launches for it."""
    return row_budgets(nb, density, nz_formula, device)


def row_probs(scores: torch.Tensor) -> torch.Tensor:
    """Softmax of the scores over each row's causal blocks (float32; zero above the diagonal)."""
    nb = scores.shape[-1]
    return torch.softmax(scores.float().masked_fill(~causal_blocks(nb, scores.device), float("-inf")), dim=-1)


def threshold_mask(scores: torch.Tensor, threshold: Knob, sink_blocks: int = 0, local_blocks: int = 0,
                   dense_last_rows: int = 0, max_row_share: float = 1.0, cap_min_blocks: int = 0) -> torch.Tensor:
    """Keep causal blocks whose softmax share of the row exceeds ``threshold``, plus the forced blocks and the last
    ``dense_last_rows`` rows. With ``max_row_share < 1`` a row keeps at most its :func:`row_budgets` at that share,
    or ``cap_min_blocks`` if more (forced blocks counted, and kept even beyond it): of the blocks over the threshold,
    those of largest share."""
    _check_scores(scores)
    return threshold_mask_from_probs(row_probs(scores), threshold, sink_blocks, local_blocks, dense_last_rows,
                                     max_row_share, cap_min_blocks=cap_min_blocks)


def row_ranks(probs: torch.Tensor, sink_blocks: int = 0, local_blocks: int = 0) -> torch.Tensor:
    """Each causal block's rank in its row (int64, 0 first): the forced blocks, then the others by falling share
    (ties: the lower index first); blocks above the diagonal rank last. What a row cap compares with the row's
    budget; computed once, it serves every threshold a calibration tries."""
    nb = probs.shape[-1]
    forced = forced_blocks(nb, sink_blocks, local_blocks, probs.device)
    ranked = probs.float().masked_fill(forced, float("inf")).masked_fill(~causal_blocks(nb, probs.device),
                                                                         float("-inf"))
    order = ranked.argsort(dim=-1, descending=True, stable=True)
    return torch.empty_like(order).scatter_(-1, order, torch.arange(nb, device=probs.device).expand_as(order))


def threshold_mask_from_probs(probs: torch.Tensor, threshold: Knob, sink_blocks: int = 0, local_blocks: int = 0,
                              dense_last_rows: int = 0, max_row_share: float = 1.0,
                              ranks: torch.Tensor | None = None, cap_min_blocks: int = 0) -> torch.Tensor:
    """:func:`threshold_mask` given the rows' softmax shares ``probs = row_probs(scores)`` (and, for a row cap, the
    :func:`row_ranks` of ``probs`` when already computed): what a calibration that tries many thresholds on the same
    scores computes once."""
    nb = probs.shape[-1]
    forced = forced_blocks(nb, sink_blocks, local_blocks, probs.device)
    over = probs > _per_head(threshold, probs)
    if max_row_share < 1:
        if ranks is None:
            ranks = row_ranks(probs, sink_blocks, local_blocks)
        budgets = _shared_budgets(nb, float(max_row_share), False, probs.device)
        if cap_min_blocks:
            budgets = budgets.clamp(min=cap_min_blocks)  # a row shorter than that keeps all it is over
        over &= ranks < budgets[:, None]
    return _finish(over | forced, nb, dense_last_rows)


def topp_mask(scores: torch.Tensor, p: Knob, sink_blocks: int = 0, local_blocks: int = 0,
              dense_last_rows: int = 0) -> torch.Tensor:
    """Keep the forced blocks, then the highest-probability blocks of each row until the kept softmax mass reaches
    ``p`` (the block that crosses ``p`` is kept): the fewest blocks that reach ``p`` among sets holding the forced
    ones. The last ``dense_last_rows`` rows are kept whole."""
    _check_scores(scores)
    nb, dev = scores.shape[-1], scores.device
    probs = row_probs(scores)
    forced = forced_blocks(nb, sink_blocks, local_blocks, dev)
    ranked = probs.masked_fill(forced, float("inf")).masked_fill(~causal_blocks(nb, dev), float("-inf"))
    order = ranked.argsort(dim=-1, descending=True, stable=True)
    # keep rank k while the mass before it is below p, i.e. while the mass from k on exceeds 1 - p; summed from the
    # small end, so the tails that decide p close to 1 keep their precision
    tail = probs.gather(-1, order).flip(-1).cumsum(-1).flip(-1)
    keep_sorted = tail > 1.0 - _per_head(p, scores)
    mask = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, keep_sorted)
    return _finish(mask | forced, nb, dense_last_rows)


def select_blocks(scores: torch.Tensor, config: SparsityConfig, knob: Knob | None = None) -> torch.Tensor:
    """The block mask that ``config`` picks from ``scores``. ``knob`` (a float or a per-head ``[H]`` tensor) replaces
    the config's own knob (``target_density`` for topk, ``threshold``, ``p``): calibrated budgets pass the knob their
    calibration found, and need one."""
    _check_scores(scores)
    nb = scores.shape[-1]
    if config.method == "dense":
        return causal_blocks(nb, scores.device).expand(scores.shape).clone()
    if knob is None and config.calibrated:
        raise ValueError(f"sparsity {config.describe()} needs a calibration (seer.sparsity.calibration) to turn its "
                         f"target density into a knob; none was given")
    forced = dict(sink_blocks=config.sink_blocks, local_blocks=config.local_blocks,
                  dense_last_rows=config.dense_last_rows)
    if config.method == "topk":
        return topk_mask(scores, config.target_density if knob is None else knob, config.nz_formula, **forced)
    if config.method == "threshold":
        return threshold_mask(scores, config.threshold if knob is None else knob, max_row_share=config.max_row_share,
                              cap_min_blocks=config.cap_min_blocks, **forced)
    return topp_mask(scores, config.p if knob is None else knob, **forced)


def _check_scores(scores: torch.Tensor) -> None:
    if scores.dim() < 2 or scores.shape[-1] != scores.shape[-2]:
        raise ValueError(f"block scores must be [..., nb, nb]; got {tuple(scores.shape)}")
    if not math.prod(scores.shape[-2:]):
        raise ValueError("block scores need at least one block")
