"""The decode gates' ground truth in one Triton pass, from the final log-sum-exp of the dense attention.

``gt[b, g, r, j] = max over the group's heads h and keys c <= r of block j of exp(s_h[r, c] - lse_h[r])``,
normalised per row: :func:`seer.kernels.decode_gt.decode_block_gt` (its PyTorch reference) from ``lse`` (e.g. of
:func:`seer.kernels.flash_gt.flash_attn`, computed beside the attention output). A program holds ``BLOCK_M`` query
rows of one KV head and walks the key blocks up to its last row's, all of the group's heads per key tile; no
``N x N`` map exists.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seer.kernels.common import (INTERPRET, LOG2E, check_block_size, check_device, check_qkv_shapes, check_tensor,
                                 dot_precision, softmax_scale, with_unit_last_stride)

BLOCK_M = 16  # query rows a program


@triton.jit
def _key_block(Q, K, Lse2, b, kvh, j, offs_m, row_ok, offs_n, offs_d, qk_scale, N, HQ,
               sqb, sqh, sqn, skb, skh, skn, G: tl.constexpr, BLOCK: tl.constexpr, BS: tl.constexpr,
               PRECISION: tl.constexpr):
    """The pooled probability of key block ``j`` for the program's rows: max over its keys and the group's heads."""
    keys = j * BS + offs_n
    k_ok = keys < N
    k = tl.load(K + b * skb + kvh * skh + keys[:, None] * skn + offs_d[None, :], mask=k_ok[:, None], other=0.0)
    ok = (keys[None, :] <= offs_m[:, None]) & k_ok[None, :] & row_ok[:, None]
    best = tl.zeros([BLOCK], dtype=tl.float32)
    for g in tl.static_range(G):
        h = kvh * G + g
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=row_ok[:, None],
                    other=0.0)
        l2 = tl.load(Lse2 + (b * HQ + h) * N + offs_m, mask=row_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.where(ok, tl.exp2(s - l2[:, None]), 0.0)
        best = tl.maximum(best, tl.max(p, axis=1))
    return best


@triton.jit
def _decode_gt_kernel(Q, K, Lse2, Gt, qk_scale, N, NB, HKV, HQ, sqb, sqh, sqn, skb, skh, skn,
                      G: tl.constexpr, BLOCK: tl.constexpr, BS: tl.constexpr, D: tl.constexpr,
                      PRECISION: tl.constexpr, INTERP: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    kvh = (pid_bh % HKV).to(tl.int64)
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BS)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < N
    hi = tl.minimum(NB, (pid_m * BLOCK + BLOCK - 1) // BS + 1)
    gt_rows = Gt + (b * HKV + kvh) * N * NB + offs_m.to(tl.int64) * NB
    if INTERP:  # see seer.kernels.common: the interpreter needs a while loop for a run-time bound
        j = 0
        while j < hi:
            best = _key_block(Q, K, Lse2, b, kvh, j, offs_m, row_ok, offs_n, offs_d, qk_scale, N, HQ,
                              sqb, sqh, sqn, skb, skh, skn, G, BLOCK, BS, PRECISION)
            tl.store(gt_rows + j, best, mask=row_ok)
            j += 1
    else:
        for j in range(0, hi):
            best = _key_block(Q, K, Lse2, b, kvh, j, offs_m, row_ok, offs_n, offs_d, qk_scale, N, HQ,
                              sqb, sqh, sqn, skb, skh, skn, G, BLOCK, BS, PRECISION)
            tl.store(gt_rows + j, best, mask=row_ok)


def decode_gt_from_lse(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, block_size: int,
                       sm_scale: float | None = None) -> torch.Tensor:
    """Ground truth ``[B, Hkv, N, nb]`` float32 (rows sum to 1) of post-RoPE ``q [B, Hq, N, D]`` and ``k [B, Hkv,
    N, D]`` from their causal attention's ``lse [B, Hq, N]`` (float32, natural log, the same ``sm_scale``)."""
    b, hq, hkv, n, d = check_qkv_shapes(q, k)
    check_device(q=q, k=k)
    check_block_size(block_size)
    check_tensor("lse", lse, (b, hq, n), torch.float32, q.device, contiguous=True)
    if d & (d - 1) or d < 16:
        raise ValueError(f"decode_gt_from_lse needs a power-of-two head dim >= 16; got {d}")
    q, k = with_unit_last_stride(q), with_unit_last_stride(k)
    nb = -(-n // block_size)
    gt = torch.zeros(b, hkv, n, nb, dtype=torch.float32, device=q.device)
    lse2 = lse * LOG2E.value  # the kernel works in base 2
    scale2 = softmax_scale(sm_scale, d) * LOG2E.value
    grid = (triton.cdiv(n, BLOCK_M), b * hkv)
    _decode_gt_kernel[grid](q, k, lse2, gt, scale2, n, nb, hkv, hq, q.stride(0), q.stride(1), q.stride(2),
                            k.stride(0), k.stride(1), k.stride(2), G=hq // hkv, BLOCK=BLOCK_M, BS=block_size, D=d,
                            PRECISION=dot_precision(q.dtype), INTERP=INTERPRET)
    return gt / gt.sum(-1, keepdim=True)
