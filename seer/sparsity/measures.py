"""How good a block selection is: achieved density and recall of attention mass, beside the oracle's.

``mass`` is the true block attention mass (:func:`seer.kernels.reference.block_attn_mass`: the share of each
query-block row's attention that falls in each key block; rows sum to 1). Recall is the share of it a mask keeps,
averaged over rows, heads and batch; the oracle keeps the top blocks of ``mass`` itself at the same density.
"""

from __future__ import annotations

import torch

from seer.sparsity.masks import causal_blocks, forced_blocks


def head_density(mask: torch.Tensor) -> torch.Tensor:
    """Kept share of the causal blocks of each head, ``[H]`` float32, averaged over the batch (``mask`` is
    ``[B, H, nb, nb]``)."""
    nb = mask.shape[-1]
    kept = (mask & causal_blocks(nb, mask.device)).sum(dim=(0, 2, 3)).float()
    return kept / (mask.shape[0] * nb * (nb + 1) / 2)


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


def oracle_recall(mass: torch.Tensor, density: float, sink_blocks: int = 0, local_blocks: int = 0) -> torch.Tensor:
    """The most recall any mask of ``density`` can have on ``mass [..., nb, nb]`` (a 0-dim tensor): the forced blocks
    (diagonal, ``sink_blocks``, ``local_blocks``), then the blocks of largest mass over the whole tensor until the
    same number of blocks is kept. Recall averages the rows' kept shares, so this greedy choice is optimal: an upper
    bound for every budget (top-k, threshold, top-p) at that density with those forced blocks."""
    nb = mass.shape[-1]
    causal = causal_blocks(nb, mass.device)
    forced = forced_blocks(nb, sink_blocks, local_blocks, mass.device).expand(mass.shape)
    free = causal & ~forced
    budget = round(density * int(causal.sum()) * (mass.numel() // (nb * nb)))
    rest = mass.float().masked_fill(~free, float("-inf")).flatten()
    extra = max(0, min(budget - int(forced.sum()), int(free.sum())))
    keep = torch.zeros_like(rest, dtype=torch.bool)
    keep[rest.topk(extra).indices] = True
    return mass_recall(keep.view(mass.shape) | forced, mass)


def attention_mass(query: torch.Tensor, key: torch.Tensor, block_size: int, scale: float,
                   lse: torch.Tensor | None = None) -> torch.Tensor:
    """The true block attention mass ``[B, Hq, nb, nb]`` (float32) of post-RoPE ``query [B, Hq, N, D]`` and ``key
    [B, Hkv, N, D]``. On CUDA: the Triton pass over Q K^T given the rows' log-sum-exp (``lse [B, Hq, N]`` float32,
    computed by a flash forward when not given); elsewhere :func:`seer.kernels.reference.block_attn_mass` (chunked:
    memory ``O(N * block)`` per head)."""
    if query.is_cuda:
        from seer.kernels.flash_gt import flash_attn, gt_from_lse

        if lse is None:
            lse = flash_attn(query, key, key, sm_scale=scale)[1]  # only the log-sum-exp is used
        return gt_from_lse(query, key, lse, block_size, sm_scale=scale, pool="mass")
    from seer.kernels.reference import block_attn_mass

    return block_attn_mass(query, key, block_size, scale).float()

