"""Block masses from a few exact query rows per block, over candidate blocks only (the rerank step; no autograd).

The ``reranked`` scorer (:class:`seer.sparsity.selectors.Reranked`, and ``gate.rerank_rows``) ranks each query block's
candidate key blocks by the exact attention of ``R`` sampled query rows of that block. For query block ``i`` (``B``
tokens) of query head ``h`` (key head ``h // G``, ``G = Hq / Hkv``), with ``C(i)`` its candidate blocks (an ascending
list, the diagonal ``i`` among them):

* sampled rows ``r_t = iB + o_t``, ``R`` offsets spread evenly over the block from its first row to its last
  (:func:`sampled_offsets`: ``o_t = round(t (B - 1) / (R - 1))``; the last row alone for ``R = 1``), those ``< N``
  (in a short last block with none of them, the last token alone), weights ``w_t`` 1 for those and 0 for the others;
* ``x_t[c] = scale * q_{r_t} . k_c`` for the keys ``c`` of the candidate blocks with ``c <= r_t``;
* ``a_t = softmax(x_t)`` over those keys, and for each candidate block ``j``:
  ``mass[i, j] = sum_t w_t sum_{c in J} a_t[c] / sum_t w_t``; other blocks get 0.

Two passes over the candidates' key tiles per program (grid ``nb x B*Hq``), in base 2 (``x2 = x * log2(e)``): the
first keeps each row's online max ``m_t`` and ``z_t = sum_c exp2(x2 - m_t)``; the second recomputes ``x2`` and
writes ``mass[i, j] = sum_t w_t sum_{c in J} exp2(x2[t, c] - m_t) / z_t / sum_t w_t`` for each listed ``j``. The
``R`` rows are padded to ``RP = max(16, R)`` rows for ``tl.dot`` (the padding rows have weight 0). Cost: twice
``R x D x |C(i)| B`` multiply-adds per block row, against ``B x D x (i + 1) B`` for the block's dense logits.
:func:`seer.kernels.reference.sampled_rows_mass` is the same contract in PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seer.kernels.block_index import build_block_index
from seer.kernels.common import (INTERPRET, LOG2E, check_block_size, check_device, check_qkv, dot_precision,
                                 softmax_scale, with_unit_last_stride)

__all__ = ["sampled_offsets", "sampled_rows_mass"]


def sampled_offsets(block_size: int, rows: int) -> list[int]:
    """The offsets in a block of its ``min(rows, block_size)`` sampled query rows: spread evenly from the first row to
    the last (``round(t (B - 1) / (R - 1))``, rounding halves up), the last row alone for one row."""
    r = min(rows, block_size)
    if r == 1:
        return [block_size - 1]
    return [(2 * t * (block_size - 1) + r - 1) // (2 * (r - 1)) for t in range(r)]


@triton.jit
def _sr_logits(q, K, stride_kn, kb, offs_n, offs_d, pos, N, qk_scale, DOT_PRECISION: tl.constexpr):
    """``x2`` of the sampled rows against one key tile (``-inf`` where ``c > r_t``, which also drops ``c >= N``)."""
    keys = kb + offs_n
    kt = tl.load(K + keys[None, :] * stride_kn + offs_d[:, None], mask=keys[None, :] < N, other=0.0)
    x2 = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
    return tl.where(keys[None, :] <= pos[:, None], x2, float("-inf"))


@triton.jit
def _sr_stats(q, K, stride_kn, idx_row, e, offs_n, offs_d, pos, N, qk_scale, m, z,
              BS: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Pass 1 over the tiles of list entry ``e``: the online max ``m`` and sum ``z`` of each sampled row."""
    c = tl.load(idx_row + e)
    for sub in tl.static_range(BS // BLOCK_N):
        x2 = _sr_logits(q, K, stride_kn, c * BS + sub * BLOCK_N, offs_n, offs_d, pos, N, qk_scale, DOT_PRECISION)
        m_new = tl.maximum(m, tl.max(x2, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        z = z * tl.math.exp2(m - m_use) + tl.sum(tl.math.exp2(x2 - m_use[:, None]), 1)
        m = m_new
    return m, z


@triton.jit
def _sr_mass(q, K, stride_kn, idx_row, e, offs_n, offs_d, pos, N, qk_scale, m, inv_z, w_norm, out_row,
             BS: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Pass 2 for list entry ``e``: its block's weighted mean probability over the sampled rows, stored."""
    c = tl.load(idx_row + e)
    rows = tl.zeros_like(m)
    for sub in tl.static_range(BS // BLOCK_N):
        x2 = _sr_logits(q, K, stride_kn, c * BS + sub * BLOCK_N, offs_n, offs_d, pos, N, qk_scale, DOT_PRECISION)
        rows += tl.sum(tl.math.exp2(x2 - m[:, None]), 1)
    tl.store(out_row + c, tl.sum(rows * inv_z * w_norm, 0))


@triton.jit
def _sampled_rows_kernel(
    Q, K, Offsets, Idx, Cnt, Out,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_ib, stride_ih, stride_ir, stride_cb, stride_ch, stride_ob, stride_oh, stride_or,
    HQ, GROUP, N, qk_scale,
    D: tl.constexpr, BS: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, BLOCK_N: tl.constexpr,
    LAST_FALLBACK: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERP: tl.constexpr,
):
    i = tl.program_id(0)
    bh = tl.program_id(1)
    off_b = (bh // HQ).to(tl.int64)
    off_h = (bh % HQ).to(tl.int64)
    off_hk = off_h // GROUP
    nb = (N + BS - 1) // BS
    t = tl.arange(0, RP)
    raw = i * BS + tl.load(Offsets + t, mask=t < R, other=0)
    w = ((t < R) & (raw < N)).to(tl.float32)
    if LAST_FALLBACK:  # a short last block holding none of the sampled rows takes its last token
        w = tl.where((i == nb - 1) & (t == 0), 1.0, w)
    pos = tl.minimum(raw, N - 1)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + pos[:, None].to(tl.int64) * stride_qn + offs_d[None, :],
                mask=w[:, None] > 0, other=0.0)
    K = K + off_b * stride_kb + off_hk * stride_kh
    idx_row = Idx + off_b * stride_ib + off_h * stride_ih + i.to(tl.int64) * stride_ir
    cnt = tl.load(Cnt + off_b * stride_cb + off_h * stride_ch + i)
    out_row = Out + off_b * stride_ob + off_h * stride_oh + i.to(tl.int64) * stride_or
    m = tl.full([RP], float("-inf"), dtype=tl.float32)
    z = tl.zeros([RP], dtype=tl.float32)
    if INTERP:  # run-time loop bounds: see seer.kernels.common
        e = 0
        while e < cnt:
            m, z = _sr_stats(q, K, stride_kn, idx_row, e, offs_n, offs_d, pos, N, qk_scale, m, z, BS, BLOCK_N,
                             DOT_PRECISION)
            e += 1
    else:
        for e in range(0, cnt):
            m, z = _sr_stats(q, K, stride_kn, idx_row, e, offs_n, offs_d, pos, N, qk_scale, m, z, BS, BLOCK_N,
                             DOT_PRECISION)
    inv_z = tl.where(w > 0, 1.0 / tl.where(z > 0, z, 1.0), 0.0)
    w_norm = w / tl.sum(w, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    if INTERP:
        e = 0
        while e < cnt:
            _sr_mass(q, K, stride_kn, idx_row, e, offs_n, offs_d, pos, N, qk_scale, m, inv_z, w_norm, out_row, BS,
                     BLOCK_N, DOT_PRECISION)
            e += 1
    else:
        for e in range(0, cnt):
            _sr_mass(q, K, stride_kn, idx_row, e, offs_n, offs_d, pos, N, qk_scale, m, inv_z, w_norm, out_row, BS,
                     BLOCK_N, DOT_PRECISION)


def sampled_rows_mass(q: torch.Tensor, k: torch.Tensor, candidates: torch.Tensor, rows: int, block_size: int = 64,
                      sm_scale: float | None = None) -> torch.Tensor:
    """Block masses ``[B, Hq, nb, nb]`` float32 of ``rows`` sampled query rows per block over each row's candidate
    blocks (module docstring), 0 off the candidates.

    ``q`` ``[B, Hq, N, D]``, ``k`` ``[B, Hkv, N, D]`` (``Hq % Hkv == 0``; post-RoPE), fp16/bf16/fp32, any strides with a
    unit last stride; ``candidates`` bool ``[B, Hq, nb, nb]`` (``nb = ceil(N / block_size)``; entries above the
    diagonal ignored), each row's diagonal block among them; ``rows`` 1 .. ``block_size`` (more are clipped to it); a
    kernel block size (16 .. 128); ``sm_scale`` defaults to ``D ** -0.5``. CUDA tensors, or CPU ones under
    ``TRITON_INTERPRET=1``. No autograd, no host sync."""
    check_block_size(block_size)
    b, hq, hkv, n, d = check_qkv(q, k, None)
    nb = triton.cdiv(n, block_size)
    if candidates.dtype != torch.bool or tuple(candidates.shape) != (b, hq, nb, nb):
        raise ValueError(f"sampled_rows_mass: candidates must be bool [B, Hq, nb, nb] = {(b, hq, nb, nb)}, got "
                         f"{candidates.dtype} {tuple(candidates.shape)}")
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"sampled_rows_mass: rows must be an integer >= 1, got {rows!r}")
    check_device(q=q, k=k, candidates=candidates)
    per_block = min(rows, block_size)
    q, k = with_unit_last_stride(q), with_unit_last_stride(k)
    idx, cnt = build_block_index(candidates)
    out = torch.zeros(b, hq, nb, nb, dtype=torch.float32, device=q.device)
    last = n - (nb - 1) * block_size
    rp = max(16, triton.next_power_of_2(per_block))
    offsets = sampled_offsets(block_size, per_block)
    _sampled_rows_kernel[(nb, b * hq)](
        q, k, torch.tensor(offsets, dtype=torch.int32, device=q.device), idx, cnt, out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        idx.stride(0), idx.stride(1), idx.stride(2), cnt.stride(0), cnt.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        hq, hq // hkv, n, softmax_scale(sm_scale, d) * LOG2E.value,
        D=d, BS=block_size, R=per_block, RP=rp, BLOCK_N=block_size if INTERPRET else min(block_size, 64),
        LAST_FALLBACK=min(offsets) >= last,
        DOT_PRECISION=dot_precision(q.dtype), INTERP=INTERPRET, num_warps=4,
    )
    return out
