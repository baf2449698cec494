"""Block pooling of Q or K for the attention gate, in one Triton pass over the tensor.

``block_pool(x, block_size, kinds)`` pools ``x [B, H, N, D]`` (any strides; usually a transposed view of a
``[B, N, H, D]`` projection output) over blocks of ``block_size`` tokens along N with every requested pool
(``avg``, ``max``, ``min``, ``last``) at once: each token is read once, however many pools are asked for, and
the pools are written side by side into ``[B, H, nb, D * len(kinds)]`` in the order given. The last block may
be partial: it is pooled over the tokens it has (its average divides by its own length). Averages accumulate
in float32. Same contract as the PyTorch :func:`seer.gates.pooling.pool_blocks`, which is its reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seer.kernels.common import POOL_KINDS

__all__ = ["block_pool", "POOL_KINDS"]


@triton.jit
def _block_pool_kernel(
    X, Out,
    stride_xb, stride_xh, stride_xn, stride_xd,
    stride_ob, stride_oh, stride_on,
    BH, H, N, D, BLOCK_SIZE,
    AVG: tl.constexpr, MAX: tl.constexpr, MIN: tl.constexpr, LAST: tl.constexpr,
    CHUNK: tl.constexpr, NCHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (block, batch * head), heads fastest: programs running together read the same tokens of
    all heads, whole rows of a ``[B, N, H, D]`` buffer. ``AVG``..``LAST``: output slot of each pool, -1 when
    not asked."""
    pid = tl.program_id(0)
    bh = pid % BH
    i = pid // BH
    b = bh // H
    h = bh % H
    x_base = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    o_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + i.to(tl.int64) * stride_on
    start = i * BLOCK_SIZE
    end = tl.minimum(start + BLOCK_SIZE, N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    acc_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_max = tl.full([BLOCK_D], float("-inf"), dtype=tl.float32)
    acc_min = tl.full([BLOCK_D], float("inf"), dtype=tl.float32)
    for c in tl.static_range(NCHUNK):
        offs_n = start + c * CHUNK + tl.arange(0, CHUNK)
        nmask = offs_n < end
        m = nmask[:, None] & dmask[None, :]
        x = tl.load(x_base + offs_n.to(tl.int64)[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                    mask=m, other=0.0).to(tl.float32)
        if AVG >= 0:
            acc_sum += tl.sum(x, 0)
        if MAX >= 0:
            acc_max = tl.maximum(acc_max, tl.max(tl.where(m, x, float("-inf")), 0))
        if MIN >= 0:
            acc_min = tl.minimum(acc_min, tl.min(tl.where(m, x, float("inf")), 0))
    dt = Out.dtype.element_ty
    if AVG >= 0:
        tl.store(o_base + AVG * D + offs_d, (acc_sum / (end - start).to(tl.float32)).to(dt), mask=dmask)
    if MAX >= 0:
        tl.store(o_base + MAX * D + offs_d, acc_max.to(dt), mask=dmask)
    if MIN >= 0:
        tl.store(o_base + MIN * D + offs_d, acc_min.to(dt), mask=dmask)
    if LAST >= 0:
        last = tl.load(x_base + (end - 1).to(tl.int64) * stride_xn + offs_d * stride_xd, mask=dmask, other=0.0)
        tl.store(o_base + LAST * D + offs_d, last.to(dt), mask=dmask)


def block_pool(x: torch.Tensor, block_size: int, kinds, out_dtype: torch.dtype | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Pools ``x [B, H, N, D]`` (CUDA, or CPU under ``TRITON_INTERPRET=1``) over blocks of ``block_size``
    tokens with each pool of ``kinds`` (distinct names out of :data:`POOL_KINDS`).

    Returns ``[B, H, ceil(N / block_size), D * len(kinds)]`` of ``out_dtype`` (default: ``x``'s dtype; float32
    keeps the float32 averages unrounded): ``out`` when given (that shape, channel stride 1, its dtype wins),
    else a new contiguous tensor. One launch, no host sync.
    """
    kinds = list(kinds)
    if x.dim() != 4:
        raise ValueError(f"x must be [B, H, N, D]; got {tuple(x.shape)}")
    if not kinds or len(set(kinds)) != len(kinds) or any(k not in POOL_KINDS for k in kinds):
        raise ValueError(f"kinds must be distinct pooling types out of {POOL_KINDS}; got {kinds}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    b, h, n, d = x.shape
    nb = triton.cdiv(n, block_size)
    shape = (b, h, nb, d * len(kinds))
    if out is None:
        out = torch.empty(shape, dtype=out_dtype or x.dtype, device=x.device)
    elif out.shape != shape or out.stride(-1) != 1 or out.device != x.device:
        raise ValueError(f"out must be {shape} on {x.device} with channel stride 1; got {tuple(out.shape)} "
                         f"(strides {out.stride()}) on {out.device}")
    if out.numel() == 0:
        return out
    block_d = triton.next_power_of_2(d)
    chunk = min(triton.next_power_of_2(block_size), max(1, 8192 // block_d))
    slot = {k: kinds.index(k) if k in kinds else -1 for k in POOL_KINDS}
    _block_pool_kernel[(nb * b * h,)](
        x, out,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        b * h, h, n, d, block_size,
        AVG=slot["avg"], MAX=slot["max"], MIN=slot["min"], LAST=slot["last"],
        CHUNK=chunk, NCHUNK=triton.cdiv(block_size, chunk), BLOCK_D=block_d,
        num_warps=4 if chunk * block_d >= 4096 else 2,
    )
    return out
