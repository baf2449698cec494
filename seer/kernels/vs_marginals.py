"""The vertical and slash marginals of the last query rows' causal softmax, fused (inference, no autograd).

MInference's vertical-slash estimate (:class:`seer.sparsity.selectors.VerticalSlash`, and so the gate blend at
inference) starts from the true attention of the last ``L = min(last_queries, N)`` query rows ``start + i``
(``start = N - L``, ``0 <= i < L``) of each query head ``h`` (key head ``h // G``, ``G = Hq / Hkv``):

* ``A[i, c] = exp(x[i, c] - lse[i])`` for keys ``c <= start + i``, 0 after, with ``x[i, c] = scale * q_{start+i} .
  k_c`` and ``lse[i] = log sum_{c <= start+i} exp(x[i, c])``;
* vertical ``v[c] = 1/L sum_i A[i, c]`` (``c = 0..N-1``);
* slash ``s[o] = 1/L sum_i A[i, start + i - o]`` (``o = 0..N-1``; terms with ``start + i - o < 0`` absent).

Both are ``[B, Hq, N]`` float32 and sum to 1. The PyTorch path builds the ``[B, Hq, L, N]`` probabilities and makes
several passes over them; here they are never written. Three launches, all math in base 2 (``x2 = x * log2(e)``):

1. **partial lse** (grid ``SPLIT x B*Hq``): program ``p`` walks its share of the key tiles (``BLOCK_N1`` keys each),
   ``x2 = (Q_last @ K_tile^T) * scale * log2(e)`` with one ``tl.dot`` (fp16/bf16/fp32 operands, fp32 accumulate;
   IEEE fp32 for fp32 inputs), keys masked by ``c <= start + i`` (which also keeps ``c < N``), and keeps the
   online row max ``m_p[i]`` and ``l_p[i] = sum_c exp2(x2 - m_p[i])``, stored to ``[B*Hq, SPLIT, BM]``
   (``BM = max(16, next_pow2(L))`` rows; rows ``i >= L`` stay ``-inf`` / 0).
2. **combine** (grid ``B*Hq``): ``M = max_p m_p``, ``lse2[i] = M + log2(sum_p l_p * exp2(m_p - M))`` to
   ``[B*Hq, BM]`` (0 for the padding rows).
3. **marginals** (grid ``T x B*Hq``, ``T = ceil(N / BN)``): program ``t`` owns the key tile ``[tBN, (t+1)BN)`` (for
   ``v``) and the offset tile ``[o0, o0 + BN)`` with ``o0 = N - (t+1)BN`` (for ``s``; offsets below 0 dropped), so
   every key and every offset has exactly one owner. Row ``i`` reaches offset ``o0 + j`` at key
   ``start + i - o0 - j = tBN - L + i + BN - j``, which lies in ``[tBN - BN + 1, (t+1)BN)``: so the program takes one
   window of ``W = 2 BN`` keys starting at ``kb = tBN - BN`` (the owned key tile is its second half; ``BN >= BM >=
   L``), computes ``P = exp2(x2 - lse2)`` on the ``[BM, W]`` window with one ``tl.dot`` (0 where not causal, for keys
   below 0 and for rows ``i >= L``), and

   * ``v[kb + w] = 1/L sum_i P[i, w]`` for the window columns ``w >= BN`` (keys below ``N``);
   * ``s[o0 + j] = 1/L sum_i P[i, 2BN - L + i - j]``: the diagonals of the window, read by ``tl.gather`` along the
     keys with the constant skewed index ``2BN - L + i - j`` (in ``[BN - L + 1, 2BN - 1]`` for the real rows;
     clamped for the padding rows, whose ``P`` is 0), so no register needs to move along a diagonal by hand.

Cost: pass 1 one ``[BM, D] x [D, N]`` product and ``BM * N`` exponentials per head, pass 3 twice that (the window
overlaps its neighbour by ``BN`` keys); no ``O(L * N)`` buffer, no host sync (all sizes come from shapes).
:func:`seer.kernels.reference.last_rows_marginals` is the same contract in PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seer.kernels.common import (DTYPES, HEAD_DIMS, INTERPRET, LOG2E, check_device, check_qkv, dot_precision,
                                 softmax_scale, with_unit_last_stride)

__all__ = ["MAX_LAST_QUERIES", "last_rows_marginals", "supported"]

MAX_LAST_QUERIES = 128  # rows the kernels hold in one tile (BM); more fall back to PyTorch in seer.sparsity
_BLOCK_N1 = 128  # keys per tile of the lse pass (64 for fp32 inputs)
_TARGET_PROGRAMS = 1024  # lse-pass programs to aim for (B*Hq*SPLIT), so a few heads still fill the GPU
_MAX_SPLIT = 64


@triton.jit
def _lse_tile(q, K, stride_kn, offs_d, rows_last, c0, N, m, z, qk_scale,
              BLOCK_N1: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERP: tl.constexpr):
    """One key tile of the lse pass: update the online row max ``m`` and sum ``z`` (base 2)."""
    cols = c0 + tl.arange(0, BLOCK_N1)
    # the causal mask also keeps c < N (the last row is N - 1) and drops the padding rows (rows_last = -1)
    causal = cols[None, :] <= rows_last[:, None]
    k = tl.load(K + cols[:, None] * stride_kn + offs_d[None, :], mask=(cols < N)[:, None], other=0.0)
    if INTERP:  # the interpreter multiplies bf16 as its raw 16-bit integers: fp32 operands there (exact)
        k = k.to(tl.float32)
    x = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    x = tl.where(causal, x, float("-inf"))
    m_new = tl.maximum(m, tl.max(x, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    z = z * tl.exp2(m - m_ref) + tl.sum(tl.exp2(x - m_ref[:, None]), 1)
    return m_new, z


@triton.jit
def _last_rows(Q, stride_qb, stride_qh, stride_qn, H, N, L, BM: tl.constexpr, D: tl.constexpr):
    """The program's (batch, query head) from its second grid axis, and that head's last ``L`` query rows ``[BM, D]``
    (rows past ``L`` zero) with each row's last visible key (-1 on the padding rows)."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    start = N - L
    offs_i = tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    rows_last = tl.where(offs_i < L, start + offs_i, -1)  # the last key each row sees
    q = tl.load(Q + b * stride_qb + h * stride_qh + (start + offs_i)[:, None] * stride_qn + offs_d[None, :],
                mask=(offs_i < L)[:, None], other=0.0)
    return bh, b, h, offs_i, offs_d, rows_last, q


@triton.jit
def _lse_partial_kernel(
    Q, K, Mp, Lp,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    H, G, N, L, SPLIT, tiles_per_split, qk_scale,
    BM: tl.constexpr, D: tl.constexpr, BLOCK_N1: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERP: tl.constexpr,
):
    sp = tl.program_id(0)
    bh, b, h, offs_i, offs_d, rows_last, q = _last_rows(Q, stride_qb, stride_qh, stride_qn, H, N, L, BM, D)
    if INTERP:
        q = q.to(tl.float32)
    Kh = K + b * stride_kb + (h // G) * stride_kh
    m = tl.full([BM], float("-inf"), tl.float32)
    z = tl.zeros([BM], tl.float32)
    t_lo = sp * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, tl.cdiv(N, BLOCK_N1))
    if INTERP:  # run-time loop bounds: a while loop in the interpreter (seer.kernels.common)
        t = t_lo
        while t < t_hi:
            m, z = _lse_tile(q, Kh, stride_kn, offs_d, rows_last, t * BLOCK_N1, N, m, z, qk_scale, BLOCK_N1,
                             DOT_PRECISION, INTERP)
            t += 1
    else:
        for t in range(t_lo, t_hi):
            m, z = _lse_tile(q, Kh, stride_kn, offs_d, rows_last, t * BLOCK_N1, N, m, z, qk_scale, BLOCK_N1,
                             DOT_PRECISION, INTERP)
    out = (bh.to(tl.int64) * SPLIT + sp) * BM + offs_i
    tl.store(Mp + out, m)
    tl.store(Lp + out, z)


@triton.jit
def _lse_combine_kernel(Mp, Lp, Lse, SPLIT, BM: tl.constexpr, SPLIT_PAD: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    offs_p = tl.arange(0, SPLIT_PAD)
    offs_i = tl.arange(0, BM)
    ptr = (bh * SPLIT + offs_p[:, None]) * BM + offs_i[None, :]
    keep = (offs_p < SPLIT)[:, None]
    m = tl.load(Mp + ptr, mask=keep, other=float("-inf"))
    z = tl.load(Lp + ptr, mask=keep, other=0.0)
    m_max = tl.max(m, 0)
    m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)
    total = tl.sum(z * tl.exp2(m - m_ref[None, :]), 0)
    # padding rows (no key, total 0) get 0: the marginals pass masks them
    tl.store(Lse + bh * BM + offs_i, m_ref + tl.log2(tl.where(total > 0, total, 1.0)))


@triton.jit
def _marginals_kernel(
    Q, K, Lse, V, S,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    H, G, N, L, qk_scale, inv_rows,
    BM: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERP: tl.constexpr,
):
    t = tl.program_id(0)
    bh, b, h, offs_i, offs_d, rows_last, q = _last_rows(Q, stride_qb, stride_qh, stride_qn, H, N, L, BM, D)
    offs_w = tl.arange(0, 2 * BN)
    offs_j = tl.arange(0, BN)
    lse = tl.load(Lse + bh.to(tl.int64) * BM + offs_i)  # 0 on the padding rows (masked below)

    kb = t * BN - BN  # the window: keys [kb, kb + 2BN)
    cols = kb + offs_w
    k = tl.load(K + b * stride_kb + (h // G) * stride_kh + cols[:, None] * stride_kn + offs_d[None, :],
                mask=((cols >= 0) & (cols < N))[:, None], other=0.0)
    if INTERP:  # as in _lse_tile
        q, k = q.to(tl.float32), k.to(tl.float32)
    x = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    causal = (cols[None, :] >= 0) & (cols[None, :] <= rows_last[:, None])
    p = tl.where(causal, tl.exp2(x - lse[:, None]), 0.0)  # [BM, 2BN]

    # vertical: the window's second half is this program's key tile
    v = tl.sum(p, 0) * inv_rows
    out = bh.to(tl.int64) * N
    tl.store(V + out + cols, v, mask=(offs_w >= BN) & (cols < N))

    # slash: offset o0 + j is key kb + (2BN - L + i - j) of row i
    idx = 2 * BN - L + offs_i[:, None] - offs_j[None, :]
    idx = tl.minimum(idx, 2 * BN - 1)  # only the padding rows (all 0) go past the window
    diag = tl.gather(p, idx, 1)  # [BM, BN]
    s = tl.sum(diag, 0) * inv_rows
    offs_o = N - (t + 1) * BN + offs_j
    tl.store(S + out + offs_o, s, mask=offs_o >= 0)


def supported(q: torch.Tensor, k: torch.Tensor, last_queries: int) -> bool:
    """Whether :func:`last_rows_marginals` runs these inputs: one dtype of :data:`~seer.kernels.common.DTYPES`, a
    head dim of :data:`~seer.kernels.common.HEAD_DIMS` and ``min(last_queries, N) <= MAX_LAST_QUERIES``."""
    return (q.dtype in DTYPES and k.dtype == q.dtype and q.dim() == 4 and q.shape[-1] in HEAD_DIMS
            and 1 <= min(last_queries, q.shape[2]) <= MAX_LAST_QUERIES)


def last_rows_marginals(q: torch.Tensor, k: torch.Tensor, last_queries: int = 64, sm_scale: float | None = None,
                        block_n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The vertical and slash marginals ``(v, s)``, each ``[B, Hq, N]`` float32, of the causal softmax of the last
    ``L = min(last_queries, N)`` query rows (module docstring): ``v[c]`` the mean probability of key ``c``, ``s[o]``
    the mean probability of the key ``o`` positions back from each row. Each sums to 1 per head.

    ``q`` ``[B, Hq, N, D]``, ``k`` ``[B, Hkv, N, D]`` (``Hq % Hkv == 0``; query head ``h`` reads key head
    ``h // (Hq / Hkv)``), one dtype of fp16/bf16/fp32, any strides (a unit last stride is used as is), ``D`` in
    :data:`~seer.kernels.common.HEAD_DIMS`, ``1 <= L <= MAX_LAST_QUERIES``; ``sm_scale`` defaults to ``D ** -0.5``.
    ``block_n`` (a power of two ``>= max(16, L)``; default ``max(64, BM)``) is the key / offset tile of the marginals
    pass. CUDA tensors, or CPU ones under ``TRITON_INTERPRET=1``. No autograd, no host sync."""
    b, hq, hkv, n, d = check_qkv(q, k, None)
    if isinstance(last_queries, bool) or not isinstance(last_queries, int) or last_queries < 1:
        raise ValueError(f"last_rows_marginals: last_queries must be an integer >= 1, got {last_queries!r}")
    rows = min(last_queries, n)
    if rows > MAX_LAST_QUERIES:
        raise ValueError(f"last_rows_marginals: at most {MAX_LAST_QUERIES} last rows, got {rows}")
    check_device(q=q, k=k)
    scale = softmax_scale(sm_scale, d)
    bm = max(16, triton.next_power_of_2(rows))
    bn = max(64, bm) if block_n is None else block_n
    if isinstance(bn, bool) or not isinstance(bn, int) or bn < bm or bn & (bn - 1):
        raise ValueError(f"last_rows_marginals: block_n must be a power of two >= {bm}, got {block_n!r}")
    q, k = with_unit_last_stride(q), with_unit_last_stride(k)
    dev = q.device
    v = torch.empty(b, hq, n, dtype=torch.float32, device=dev)
    s = torch.empty(b, hq, n, dtype=torch.float32, device=dev)
    # launch shapes screened by compiling for sm_90 without a GPU (ptxas: no spills for fp16/bf16 at D <= 256,
    # L <= 128; fp32's IEEE dots spill a few hundred bytes): more warps for fp32, D 256 and 128 rows
    big = q.dtype == torch.float32 or d >= 256 or bm >= 128
    block_n1 = min(_BLOCK_N1, 64) if q.dtype == torch.float32 else _BLOCK_N1
    tiles1 = triton.cdiv(n, block_n1)
    split = max(1, min(tiles1, _MAX_SPLIT, triton.cdiv(_TARGET_PROGRAMS, b * hq)))
    per_split = triton.cdiv(tiles1, split)
    split = triton.cdiv(tiles1, per_split)  # no empty split
    m_part = torch.empty(b * hq, split, bm, dtype=torch.float32, device=dev)
    l_part = torch.empty_like(m_part)
    lse = torch.empty(b * hq, bm, dtype=torch.float32, device=dev)
    qk_scale = scale * LOG2E.value
    precision = dot_precision(q.dtype)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    _lse_partial_kernel[(split, b * hq)](
        q, k, m_part, l_part, *strides, hq, hq // hkv, n, rows, split, per_split, qk_scale,
        BM=bm, D=d, BLOCK_N1=block_n1, DOT_PRECISION=precision, INTERP=INTERPRET, num_warps=8 if big else 4,
    )
    _lse_combine_kernel[(b * hq,)](m_part, l_part, lse, split, BM=bm, SPLIT_PAD=triton.next_power_of_2(split),
                                   num_warps=4)
    _marginals_kernel[(triton.cdiv(n, bn), b * hq)](
        q, k, lse, v, s, *strides, hq, hq // hkv, n, rows, qk_scale, 1.0 / rows,
        BM=bm, D=d, BN=bn, DOT_PRECISION=precision, INTERP=INTERPRET,
        num_warps=8 if big or bn * bm > 64 * 64 else 4,
    )
    return v, s
