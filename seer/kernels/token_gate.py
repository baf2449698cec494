"""Token-query gate logits (``gate.q_tokens``, :mod:`seer.gates.attn_gate`) in one Triton pass: the per-token scores
are never written to memory.

Given the token queries ``x [B, Hq, N, E]`` (already projected and rotated by the gate) and the block-pooled gate
keys ``kg [B, Hq, nb, E]`` (``nb = ceil(N / block_size)``), with ``scale = 1 / sqrt(E)``::

    s[t, j]              = scale * x_t . kg_j
    logits[b, h, i, j]   = logsumexp_{t in block i} s[t, j] - log(n_i)     for j <= i
                         = -inf                                             for j > i

where block ``i`` holds the tokens ``[i * block_size, min(N, (i + 1) * block_size))`` and ``n_i`` is their count
(the last block may be partial; its missing rows count for nothing). The PyTorch path
(:func:`seer.gates.attn_gate.token_block_logits`) is the reference.

Grid and tiles: one program per (query block ``i``, batch * head), the longest rows first (``i`` from ``nb - 1``
down). A program loads its block's queries once, ``[BLOCK_M = block_size, BLOCK_E]`` (``BLOCK_E``: ``E`` rounded up
to a power of two, at least 16; padding columns load as 0), then loops over the key blocks ``0..i`` in tiles of
``BLOCK_N``: ``dot(x_i, kg_tile^T)`` ``[BLOCK_M, BLOCK_N]`` in float32 (IEEE for float32 inputs, see
:func:`seer.kernels.common.dot_precision`), rows past ``N`` set to ``-inf``, then the column-wise log-sum-exp (base
2, ``log2(e)`` folded into the scale) minus ``log(n_i)``; columns above the diagonal of the last tile are written
``-inf``, and a second loop writes ``-inf`` over the key tiles entirely above the diagonal. Both loop bounds depend
on ``i`` (run time), hence the ``INTERP`` while loops (:mod:`seer.kernels.common`). Work per program grows with
``i`` (``(i + 1) * block_size * E`` multiply-adds); ``x`` is read once, the keys of a head (``nb * E``) are re-read
by each of its query blocks, mostly from L2.

Forward only (inference: the gate's autograd path stays in PyTorch). Output float32 ``[B, Hq, nb, nb]``; the gate
casts it to its own dtype as its PyTorch path does.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from seer.kernels.common import (DTYPES, INTERPRET, LN2, LOG2E, check_block_size, check_device, dot_precision,
                                 output)

__all__ = ["token_gate_logits"]


@triton.jit
def _lse_tile(x, row_ok, kg_base, stride_kn, j0, i, nb, log_n, o_base, offs_e, E, scale2,
              BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Key blocks ``j0 .. j0 + BLOCK_N - 1``: the scores of the block's tokens against them, reduced over the tokens
    to ``logsumexp - log(n_i)``; ``-inf`` for ``j > i``."""
    offs_j = j0 + tl.arange(0, BLOCK_N)
    col_ok = offs_j < nb
    kg = tl.load(kg_base + offs_j.to(tl.int64)[:, None] * stride_kn + offs_e[None, :],
                 mask=col_ok[:, None] & (offs_e[None, :] < E), other=0.0)
    s = tl.dot(x, tl.trans(kg), input_precision=DOT_PRECISION) * scale2  # [BLOCK_M, BLOCK_N], base 2
    s = tl.where(row_ok[:, None], s, float("-inf"))
    m = tl.max(s, 0)  # finite: block i has at least one token
    lse = (m + tl.log2(tl.sum(tl.exp2(s - m[None, :]), 0))) * LN2 - log_n
    lse = tl.where(offs_j <= i, lse, float("-inf"))
    tl.store(o_base + offs_j, lse, mask=col_ok)


@triton.jit
def _token_gate_kernel(
    X, KG, Out,
    stride_xb, stride_xh, stride_xn,
    stride_kb, stride_kh, stride_kn,
    stride_ob, stride_oh, stride_om,
    H, N, E, nb, scale2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERP: tl.constexpr,
):
    """One program per (query block, batch * head): grid ``(nb, B * H)``, ``i = nb - 1 - program_id(0)``."""
    i = nb - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    x_base = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    kg_base = KG + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    o_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + i.to(tl.int64) * stride_om
    offs_m = i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    row_ok = offs_m < N
    x = tl.load(x_base + offs_m.to(tl.int64)[:, None] * stride_xn + offs_e[None, :],
                mask=row_ok[:, None] & (offs_e[None, :] < E), other=0.0)
    log_n = tl.log((tl.minimum(N - i * BLOCK_M, BLOCK_M)).to(tl.float32))
    hi = (i // BLOCK_N + 1) * BLOCK_N  # the key tiles holding blocks 0..i
    if INTERP:  # run-time loop bounds: see seer.kernels.common
        j0 = 0
        while j0 < hi:
            _lse_tile(x, row_ok, kg_base, stride_kn, j0, i, nb, log_n, o_base, offs_e, E, scale2, BLOCK_N,
                      DOT_PRECISION)
            j0 += BLOCK_N
        j0 = hi
        while j0 < nb:
            offs_j = j0 + tl.arange(0, BLOCK_N)
            tl.store(o_base + offs_j, tl.full([BLOCK_N], float("-inf"), tl.float32), mask=offs_j < nb)
            j0 += BLOCK_N
    else:
        for j0 in range(0, hi, BLOCK_N):
            _lse_tile(x, row_ok, kg_base, stride_kn, j0, i, nb, log_n, o_base, offs_e, E, scale2, BLOCK_N,
                      DOT_PRECISION)
        for j0 in range(hi, nb, BLOCK_N):
            offs_j = j0 + tl.arange(0, BLOCK_N)
            tl.store(o_base + offs_j, tl.full([BLOCK_N], float("-inf"), tl.float32), mask=offs_j < nb)


def token_gate_logits(x: torch.Tensor, kg: torch.Tensor, block_size: int, out: torch.Tensor | None = None,
                      block_n: int | None = None, precision: str | None = None) -> torch.Tensor:
    """Block logits ``[B, Hq, nb, nb]`` (float32) of token queries ``x [B, Hq, N, E]`` against gate keys
    ``kg [B, Hq, nb, E]`` (module docstring): CUDA, or CPU under ``TRITON_INTERPRET=1``; ``x`` and ``kg`` of one
    dtype out of :data:`seer.kernels.common.DTYPES`, any strides with a unit last stride (else copied).
    ``out``: a preallocated float32 output (row stride of the last dim 1). ``block_n``: key blocks per tile
    (a power of two >= 16; default 64, less for few blocks). ``precision``: the dots' ``input_precision`` (default
    :func:`seer.kernels.common.dot_precision`: IEEE for float32, as PyTorch's default float32 matmul; ``"tf32"``
    trades float32 accuracy for tensor cores). One launch, no host sync."""
    check_block_size(block_size)
    if x.dim() != 4 or kg.dim() != 4:
        raise ValueError(f"x and kg must be 4-D; got {list(x.shape)} and {list(kg.shape)}")
    b, h, n, e = x.shape
    nb = triton.cdiv(n, block_size)
    if n < 1 or tuple(kg.shape) != (b, h, nb, e):
        raise ValueError(f"kg must be [B, Hq, ceil(N / block_size), E] = {[b, h, nb, e]} for x {list(x.shape)} "
                         f"(N >= 1); got {list(kg.shape)}")
    if x.dtype not in DTYPES or kg.dtype != x.dtype:
        raise ValueError(f"x and kg must share one dtype out of {DTYPES}; got {x.dtype} and {kg.dtype}")
    check_device(x=x, kg=kg)
    x = x if x.stride(-1) == 1 else x.contiguous()
    kg = kg if kg.stride(-1) == 1 else kg.contiguous()
    out = output("out", out, (b, h, nb, nb), torch.float32, x.device, contiguous=False)
    block_e = max(16, triton.next_power_of_2(e))
    if block_n is None:
        block_n = min(64, max(16, triton.next_power_of_2(nb)))
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16; got {block_n}")
    tile = block_size * max(block_n, block_e)
    _token_gate_kernel[(nb, b * h)](
        x, kg, out,
        x.stride(0), x.stride(1), x.stride(2),
        kg.stride(0), kg.stride(1), kg.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        h, n, e, nb, LOG2E.value / math.sqrt(e),
        BLOCK_M=block_size, BLOCK_N=block_n, BLOCK_E=block_e,
        DOT_PRECISION=precision or dot_precision(x.dtype), INTERP=INTERPRET,
        num_warps=8 if tile >= 8192 else 4, num_stages=2,
    )
    return out
