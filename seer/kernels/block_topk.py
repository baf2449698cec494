"""Per-row top-k block selection in Triton: block scores -> boolean block mask, one program per query-block row.

``topk_block_mask(scores, budget, sink_blocks)`` computes exactly what a stable descending argsort of the
ranked row would keep (the PyTorch path of :func:`seer.sparsity.topk_mask`):

* rank: the causal blocks' scores as float32, the forced blocks (diagonal, first ``sink_blocks`` columns) as
  ``+inf``, blocks above the diagonal ``-inf``; then ``nan_to_num(nan=-inf)``, i.e. ``+-inf`` become the
  largest finite float32 and NaN scores rank below everything;
* keep the ``budget[r]`` highest of row ``r``; among equal values the lower column first;
* return ``(kept | forced) & causal``.

Instead of sorting, each program finds the ``k``-th largest value by bisection on the float's order-preserving
integer key (32 counting passes over the row held in registers), keeps everything above it, and the first
ties by a prefix count. The row is read once and the mask written once; no host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["topk_block_mask"]

_FMAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _topk_mask_kernel(
    S, Budget, M,
    stride_sb, stride_sh, stride_sr, stride_sc,
    stride_mb, stride_mh, stride_mr,
    H, NB, SINK,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    cols = tl.arange(0, BLOCK)
    inrow = cols < NB
    s = tl.load(S + b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh + r.to(tl.int64) * stride_sr
                + cols * stride_sc, mask=inrow, other=0.0).to(tl.float32)
    causal = cols <= r
    forced = causal & ((cols == r) | (cols < SINK))
    v = tl.where(causal, s, float("-inf"))
    v = tl.where(forced, float("inf"), v)
    v = tl.where(v != v, float("-inf"), tl.minimum(tl.maximum(v, -_FMAX), _FMAX))  # nan_to_num(nan=-inf)
    v = tl.where(v == 0.0, 0.0, v)  # -0.0 and +0.0 tie, as in a sort
    bits = v.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed-int order == float order
    key = tl.where(inrow, key, -2147483648)  # padding: below every real key (-inf's key is larger)
    k = tl.load(Budget + r).to(tl.int32)
    # bisection for t = the k-th largest key: count(key >= lo) >= k > count(key >= hi)
    lo = tl.full([], -2147483648, tl.int64)
    hi = tl.full([], 2147483648, tl.int64)
    for _ in tl.static_range(32):
        mid = lo + (hi - lo) // 2
        ge = tl.sum((key >= mid.to(tl.int32)).to(tl.int32), 0)
        take = ge >= k
        lo = tl.where(take, mid, lo)
        hi = tl.where(take, hi, mid)
    t = lo.to(tl.int32)
    gt = key > t
    eq = (key == t).to(tl.int32)
    need = k - tl.sum(gt.to(tl.int32), 0)
    keep = gt | ((eq != 0) & (tl.cumsum(eq, 0) <= need))
    out = (keep | forced) & causal
    tl.store(M + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh + r.to(tl.int64) * stride_mr + cols,
             out.to(tl.int8), mask=inrow)


def topk_block_mask(scores: torch.Tensor, budget: torch.Tensor, sink_blocks: int = 0,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Bool ``[B, H, nb, nb]`` mask keeping, per row ``r``, the ``budget[r]`` top-ranked causal blocks of
    ``scores [B, H, nb, nb]`` (any float dtype and strides) plus the diagonal and the first ``sink_blocks``
    columns (see the module docstring). ``budget``: integer ``[nb]`` on the scores' device, each in
    ``1..r + 1``. Written into ``out`` (bool, same shape, last stride 1) when given. CUDA tensors, or CPU ones
    under ``TRITON_INTERPRET=1``."""
    if scores.dim() != 4 or scores.shape[-1] != scores.shape[-2]:
        raise ValueError(f"scores must be [B, H, nb, nb]; got {tuple(scores.shape)}")
    b, h, nb, _ = scores.shape
    if budget.shape != (nb,) or budget.device != scores.device:
        raise ValueError(f"budget must be [{nb}] on {scores.device}; got {tuple(budget.shape)} on {budget.device}")
    if out is None:
        mask = torch.empty(b, h, nb, nb, dtype=torch.bool, device=scores.device)
    elif out.shape != scores.shape or out.dtype != torch.bool or out.stride(-1) != 1 or out.device != scores.device:
        raise ValueError(f"out must be bool {tuple(scores.shape)} on {scores.device} with last stride 1")
    else:
        mask = out
    if mask.numel() == 0:
        return mask
    m = mask.view(torch.int8)
    block = triton.next_power_of_2(nb)
    _topk_mask_kernel[(nb, b * h)](
        scores, budget, m,
        scores.stride(0), scores.stride(1), scores.stride(2), scores.stride(3),
        m.stride(0), m.stride(1), m.stride(2),
        h, nb, sink_blocks,
        BLOCK=block, num_warps=max(1, min(16, block // 512)),
    )
    return mask
