"""Block-sparse causal FlashAttention backward in Triton: gradients of :func:`block_sparse_attn` in q, k, v.

Math
----
In the notation of :mod:`seer.kernels.block_sparse` (``S(i)`` the keys query row ``i`` may attend to,
``s_ij = scale q_i . k_j``, ``lse_i = log sum_{j in S(i)} exp(s_ij)``), the forward's probabilities are
``P_ij = exp(s_ij - lse_i)`` for ``j`` in ``S(i)`` and 0 elsewhere, and ``out_i = sum_j P_ij v_j``. Given
``dO = dL/d out`` (and ``dlse = dL/d lse`` when the loss uses ``lse``):

.. math::

    dv_j = \\sum_i P_{ij}\\, dO_i,\\qquad dP_{ij} = dO_i \\cdot v_j,\\qquad
    \\delta_i = dO_i \\cdot \\mathrm{out}_i - dlse_i \\;(= \\textstyle\\sum_j P_{ij} dP_{ij} - dlse_i),

.. math::

    dS_{ij} = \\frac{\\partial L}{\\partial s_{ij}} = P_{ij}\\,(dP_{ij} - \\delta_i),\\qquad
    dq_i = \\mathrm{scale} \\sum_j dS_{ij}\\, k_j,\\qquad dk_j = \\mathrm{scale} \\sum_i dS_{ij}\\, q_i .

With grouped-query attention, ``dk`` and ``dv`` of key/value head ``g`` sum over the query heads
``g * G .. g * G + G - 1`` of its group (``G = Hq // Hkv``); K and V are never repeated. ``P`` is recomputed
from the forward's ``lse`` in base 2 (``t_ij = (scale log2 e) q_i . k_j``, ``P_ij = 2^(t_ij - lse_i log2 e)``).
A row with an empty ``S(i)`` (``lse = -inf``) has ``P = 0``: its ``dq`` is 0 and it adds nothing to ``dk``/``dv``.

Kernels
-------
1. ``_bs_bwd_preprocess_kernel``: per query row, ``delta`` and ``lse2 = lse * log2 e`` into buffers padded to
   ``nb * block_size`` rows; rows past ``N`` and empty rows get ``delta = 0`` and ``lse2 = +inf``, so that
   ``P = 2^(t - lse2)`` is exactly 0 there and the main loops need no row masks on ``P``.
2. :func:`build_block_col_index`: the transposed lists, on the device and without a host sync: for key
   block ``c``, the query blocks ``r >= c`` that selected it, ascending (the diagonal, when selected, first).
3. ``_bs_bwd_dkdv_kernel``: one program per (key tile of ``BLOCK_N`` keys inside key block ``c``, key/value
   head). It keeps its K/V tile and the ``dk``/``dv`` accumulators on chip, loops over the query heads of its
   group and, for each, over the query blocks of that head's column list, ``BLOCK_M`` query rows at a time:
   ``t^T = K Q^T``, ``P^T = 2^(t^T - lse2)``, ``dv += P^T dO``, ``dP^T = V dO^T``, ``dS^T = P^T (dP^T - delta)``,
   ``dk += dS^T Q``. Only the diagonal block needs the causal mask (it comes first in the list); when ``N`` is
   not a multiple of the block, the query loads carry a row bound (cheaper in registers than a separate
   code path for the partial last block).
4. ``_bs_bwd_dq_kernel``: one program per (tile of ``BLOCK_M`` query rows, query head), walking the forward's
   row list (:func:`seer.kernels.block_sparse.build_block_index`): ``t = Q K^T``, ``P``, ``dP = dO V^T``,
   ``dS``, ``dq += dS K``. The diagonal block, the only one masked, comes last.

``dq`` is computed apart from ``dk``/``dv`` (recomputing ``Q K^T`` and ``dO V^T``) instead of with atomic
adds: no float atomics, deterministic results. Within a head, programs are launched longest lists first
(first key blocks for ``dk``/``dv``, last query blocks for ``dq``); heads come one after another.

Launch configurations
---------------------
Two launch tables (:class:`seer.kernels.tuning.LaunchTable`), keyed by (head dim, mask block size):
``block_sparse_bwd.dkdv`` (``DKDV_TABLE``: ``BLOCK_N``, ``BLOCK_M``, ``num_warps``, ``num_stages``, ``USE_TMA``)
and ``block_sparse_bwd.dq`` (``DQ_TABLE``: ``BLOCK_M``, ``BLOCK_N``, ``num_warps``, ``num_stages``, ``USE_TMA``).
As for the forward, one candidate per key, never timed at run time: on CUDA the entries for head dims 64 and 128
and blocks 64 and 128 (picked from an offline sm_90 compile without register spills, see the tables), 64 x 64
tiles for other sizes, tiles clamped to the mask block; under the interpreter, tiles of one mask block. Tiles must
divide the mask block (:func:`seer.kernels.common.tiles_invalid`). Experiments and tests force configs with
``seer.kernels.tuning.force_config("block_sparse_bwd.dq", BLOCK_M=..., ...)``.

Use
---
:func:`seer.kernels.block_sparse_attn` records a ``torch.autograd.Function`` (``_BlockSparseAttnFunction``)
when grad is enabled and q, k or v requires grad: its forward is the forward kernel (saving ``out``, ``lse``
and the bool mask), its backward builds the row and column lists from the mask and runs the kernels above.
Without grad the forward runs exactly as before. :func:`block_sparse_attn_backward` is the same backward as a
function. :func:`seer.kernels.block_sparse_attn_varlen` runs these kernels over sequences packed in one row
(:func:`launch_backward` with ``cu_seqlens``; the ``VARLEN`` constexpr, as in the forward: batch strides 0, pointers
moved to each sequence's first token, query loads always bounded; the dk/dv and dq kernels take a 1-d grid over
only the tiles inside a sequence, in the linear order of the padded 2-d grid, :func:`seer.kernels.common.varlen_order`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seer.kernels.block_index import append_selected, build_block_index, build_lists, check_mask, mask_heads
from seer.kernels.common import (INTERPRET, LOG2E, check_block_size, check_device, check_qkv, dot_precision,
                                 softmax_scale, tiles_invalid, tma_ok, varlen_order, with_unit_last_stride)
from seer.kernels.tuning import LaunchTable

__all__ = ["block_sparse_attn_backward", "build_block_col_index"]


def _check_mask_shape(block_mask: torch.Tensor, b: int, hq: int, hkv: int, nb: int) -> None:
    """The forward's checks of a bool ``[B, Hq or Hkv, nb, nb]`` mask."""
    check_mask(block_mask)
    if block_mask.shape[0] != b or block_mask.shape[2] != nb:
        raise ValueError(f"block_mask must be [B, Hq or Hkv, nb, nb] = [{b}, {hq} or {hkv}, {nb}, {nb}]; "
                         f"got {tuple(block_mask.shape)}")
    mask_heads(block_mask.shape[1], hq, hkv, "block_mask")


def _alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every scratch and index buffer of this module comes from here (tests poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _alloc_like(x: torch.Tensor) -> torch.Tensor:
    """Gradient buffers: the strides of ``x`` where ``x`` is dense (a ``[B, N, H, D]`` view keeps its layout)."""
    return torch.empty_like(x)


# ----------------------------------------------------------------------------------------------------------
# Column lists: boolean block mask -> for each key block, the query blocks that selected it
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _bs_col_chunk(mcol, icol, r0, base, NB, stride_mr, CHUNK: tl.constexpr):
    rows = r0 + tl.arange(0, CHUNK)
    sel = tl.load(mcol + rows * stride_mr, mask=rows < NB, other=0) != 0
    return append_selected(icol, base, sel, rows)


@triton.jit
def _bs_build_col_index_kernel(
    Mask, Idx, Cnt,
    stride_mb, stride_mh, stride_mr, stride_mc,
    stride_ib, stride_ih, stride_ic,
    stride_cb, stride_ch,
    H, NB,
    CHUNK: tl.constexpr, INTERP: tl.constexpr,
):
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    mcol = Mask + b * stride_mb + h * stride_mh + c.to(tl.int64) * stride_mc
    icol = Idx + b * stride_ib + h * stride_ih + c.to(tl.int64) * stride_ic
    base = 0
    if INTERP:  # the interpreter (NumPy 2) cannot use a run-time value as a range() bound
        r0 = c
        while r0 < NB:
            base = _bs_col_chunk(mcol, icol, r0, base, NB, stride_mr, CHUNK)
            r0 += CHUNK
    else:
        for r0 in range(c, NB, CHUNK):  # rows r >= c only: the causal half
            base = _bs_col_chunk(mcol, icol, r0, base, NB, stride_mr, CHUNK)
    tl.store(Cnt + b * stride_cb + h * stride_ch + c, base)


def build_block_col_index(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact per-column lists of the query blocks that select each key block, built on the device.

    ``block_mask`` is bool ``[B, H, nb, nb]`` (any strides). Entries above the diagonal are ignored.
    Returns ``q_indices`` int32 ``[B, H, nb, nb]`` and ``q_counts`` int32 ``[B, H, nb]``:
    ``q_indices[b, h, c, :q_counts[b, h, c]]`` are the query blocks ``r >= c`` with ``block_mask[b, h, r, c]``,
    ascending (so the diagonal ``r = c``, when selected, comes first); entries past the count are unwritten.
    One launch, no host synchronisation (the transpose of :func:`seer.kernels.block_sparse.build_block_index`).
    """
    check_mask(block_mask)
    check_device(block_mask=block_mask)
    return build_lists(_bs_build_col_index_kernel, block_mask, block_mask.shape[-1], _alloc)


# ----------------------------------------------------------------------------------------------------------
# Preprocess: delta = rowsum(dO * out) - dlse, lse2 = lse * log2(e), padded to whole blocks
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _bs_bwd_preprocess_kernel(
    Out, DO, Lse, DLse, Delta, Lse2, Cu,
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    stride_lb, stride_lh,
    stride_dlb, stride_dlh, stride_dln,
    N, HQ, N_PAD,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, HAS_DLSE: tl.constexpr, VARLEN: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // HQ).to(tl.int64)
    off_h = (pid_bh % HQ).to(tl.int64)
    if VARLEN:  # packed sequences (batch strides 0): "batch" b is tokens Cu[b] .. Cu[b + 1] - 1
        tok0 = tl.load(Cu + off_b).to(tl.int64)
        N = (tl.load(Cu + off_b + 1) - tok0).to(tl.int32)
        Out += tok0 * stride_on
        DO += tok0 * stride_don
        Lse += tok0
        DLse += tok0 * stride_dln
    offs_m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    in_n = offs_m < N
    o = tl.load(Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
                mask=in_n[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                 mask=in_n[:, None], other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLse + off_b * stride_dlb + off_h * stride_dlh + offs_m * stride_dln, mask=in_n, other=0.0)
    lse = tl.load(Lse + off_b * stride_lb + off_h * stride_lh + offs_m, mask=in_n, other=float("-inf"))
    live = lse != float("-inf")  # a real row that attends to something
    row = pid_bh.to(tl.int64) * N_PAD + offs_m
    tl.store(Delta + row, tl.where(live, delta, 0.0))
    tl.store(Lse2 + row, tl.where(live, lse * LOG2E, float("inf")))


# ----------------------------------------------------------------------------------------------------------
# dk, dv: one program per (key tile, key/value head), over the column lists of the query heads of its group
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _bs_dkdv_tile(dk, dv, k, v, q_src, do_src, lse2_row, delta_row, off_b, off_h, qstart, offs_n, offs_d,
                  stride_qn, stride_don, N, qk_scale,
                  BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, DIAG: tl.constexpr, BOUNDS: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """One tile of ``BLOCK_M`` query rows against the program's key tile. ``DIAG``: causal mask (diagonal
    block); ``BOUNDS``: the rows may run past ``N`` (masked loads). With ``USE_TMA``, ``q_src``/``do_src`` are
    tensor descriptors over ``[B, Hq, N, D]`` (the copy engine zero-fills rows past ``N``)."""
    offs_m = qstart + tl.arange(0, BLOCK_M)
    if USE_TMA:
        q = q_src.load([off_b, off_h, qstart, 0]).reshape(BLOCK_M, HEAD_DIM)
        do = do_src.load([off_b, off_h, qstart, 0]).reshape(BLOCK_M, HEAD_DIM)
    elif BOUNDS:
        q = tl.load(q_src + offs_m[:, None] * stride_qn + offs_d[None, :], mask=offs_m[:, None] < N, other=0.0)
        do = tl.load(do_src + offs_m[:, None] * stride_don + offs_d[None, :], mask=offs_m[:, None] < N, other=0.0)
    else:
        q = tl.load(q_src + offs_m[:, None] * stride_qn + offs_d[None, :])
        do = tl.load(do_src + offs_m[:, None] * stride_don + offs_d[None, :])
    lse2 = tl.load(lse2_row + offs_m)  # padded buffers: +inf (P = 0) past N
    delta = tl.load(delta_row + offs_m)
    p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale - lse2[None, :])
    if DIAG:
        p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _bs_dkdv_block(dk, dv, k, v, q_src, do_src, lse2_row, delta_row, off_b, off_h, rblock, offs_n, offs_d,
                   stride_qn, stride_don, N, qk_scale,
                   MASK_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BOUNDS: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """All query rows of off-diagonal query block ``rblock`` (``BOUNDS``: the block may end past ``N``)."""
    for sub in tl.static_range(MASK_BLOCK // BLOCK_M):
        dk, dv = _bs_dkdv_tile(dk, dv, k, v, q_src, do_src, lse2_row, delta_row, off_b, off_h,
                               rblock * MASK_BLOCK + sub * BLOCK_M, offs_n, offs_d, stride_qn, stride_don, N,
                               qk_scale, BLOCK_M, HEAD_DIM, False, BOUNDS, DOT_PRECISION, USE_TMA)
    return dk, dv


@triton.jit
def _bs_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, Lse2, Delta, QIdx, QCnt, Cu, Order,
    qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_ib, stride_ih, stride_ic,
    stride_cb, stride_ch,
    NBATCH, N, NB, N_PAD, HQ, HKV, GROUP, MASK_GROUP,
    HEAD_DIM: tl.constexpr, MASK_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERP: tl.constexpr, USE_TMA: tl.constexpr,
    VARLEN: tl.constexpr,
):
    if VARLEN:  # a 1-d grid over Order: (sequence x key/value head, key tile) packed, tiles inside a sequence only
        packed = tl.load(Order + tl.program_id(0))
        pid_n = packed % (NB * (MASK_BLOCK // BLOCK_N))
        pid_bh = packed // (NB * (MASK_BLOCK // BLOCK_N))
    else:
        pid_n = tl.program_id(0)  # first key blocks (longest column lists) first
        pid_bh = tl.program_id(1)
    off_b = pid_bh // HKV
    off_g = pid_bh % HKV
    c = pid_n // (MASK_BLOCK // BLOCK_N)  # the key block
    kstart = pid_n * BLOCK_N
    ob = off_b.to(tl.int64)
    og = off_g.to(tl.int64)
    if VARLEN:  # packed sequences (batch strides 0, EVEN_N false): every pointer starts at the sequence's token 0
        tok0 = tl.load(Cu + ob).to(tl.int64)
        N = (tl.load(Cu + ob + 1) - tok0).to(tl.int32)
        Q += tok0 * stride_qn
        K += tok0 * stride_kn
        V += tok0 * stride_vn
        DO += tok0 * stride_don
        DK += tok0 * stride_dkn
        DV += tok0 * stride_dvn

    offs_n = kstart + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_n = offs_n[:, None] < N
    k = tl.load(K + ob * stride_kb + og * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=in_n, other=0.0)
    v = tl.load(V + ob * stride_vb + og * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=in_n, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    if USE_TMA:
        q_desc = tl.make_tensor_descriptor(Q, shape=[NBATCH, HQ, N, HEAD_DIM], strides=[stride_qb, stride_qh,
                                           stride_qn, 1], block_shape=[1, 1, BLOCK_M, HEAD_DIM])
        do_desc = tl.make_tensor_descriptor(DO, shape=[NBATCH, HQ, N, HEAD_DIM], strides=[stride_dob, stride_doh,
                                            stride_don, 1], block_shape=[1, 1, BLOCK_M, HEAD_DIM])

    h = off_g * GROUP
    h_end = h + GROUP
    while h < h_end:  # the query heads of this key/value head's group
        oh = h.to(tl.int64)
        ohm = (h // MASK_GROUP).to(tl.int64)
        idx_ptr = QIdx + ob * stride_ib + ohm * stride_ih + c.to(tl.int64) * stride_ic
        cnt = tl.load(QCnt + ob * stride_cb + ohm * stride_ch + c)
        if VARLEN:  # a key tile at or past the sequence's end: nothing to accumulate (and nothing stored; Order
            cnt = tl.where(kstart < N, cnt, 0)  # lists no such tile, this only keeps the kernel safe)
        if USE_TMA:
            q_src = q_desc
            do_src = do_desc
        else:
            q_src = Q + ob * stride_qb + oh * stride_qh
            do_src = DO + ob * stride_dob + oh * stride_doh
        lse2_row = Lse2 + (ob * HQ + oh) * N_PAD
        delta_row = Delta + (ob * HQ + oh) * N_PAD

        # the diagonal block (first in the ascending list): causal mask, rows may pass N; query tiles that end
        # before the key tile starts see none of its keys
        first = tl.load(idx_ptr)
        has_diag = (cnt > 0) & (first == c)
        if has_diag:
            for sub in tl.static_range(MASK_BLOCK // BLOCK_M):
                qstart = c * MASK_BLOCK + sub * BLOCK_M
                if qstart + BLOCK_M > kstart:
                    dk, dv = _bs_dkdv_tile(dk, dv, k, v, q_src, do_src, lse2_row, delta_row, off_b, h, qstart,
                                           offs_n, offs_d, stride_qn, stride_don, N, qk_scale, BLOCK_M, HEAD_DIM,
                                           True, True, DOT_PRECISION, USE_TMA)
        t0 = has_diag.to(tl.int32)
        if INTERP:  # the interpreter (NumPy 2) cannot use a run-time value as a range() bound
            t = t0
            while t < cnt:
                dk, dv = _bs_dkdv_block(dk, dv, k, v, q_src, do_src, lse2_row, delta_row, off_b, h,
                                        tl.load(idx_ptr + t), offs_n, offs_d, stride_qn, stride_don, N, qk_scale,
                                        MASK_BLOCK, BLOCK_M, HEAD_DIM, not EVEN_N, DOT_PRECISION, USE_TMA)
                t += 1
        else:
            for t in range(t0, cnt):
                dk, dv = _bs_dkdv_block(dk, dv, k, v, q_src, do_src, lse2_row, delta_row, off_b, h,
                                        tl.load(idx_ptr + t), offs_n, offs_d, stride_qn, stride_don, N, qk_scale,
                                        MASK_BLOCK, BLOCK_M, HEAD_DIM, not EVEN_N, DOT_PRECISION, USE_TMA)
        h += 1

    dk = dk * sm_scale
    tl.store(DK + ob * stride_dkb + og * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=in_n)
    tl.store(DV + ob * stride_dvb + og * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=in_n)


# ----------------------------------------------------------------------------------------------------------
# dq: one program per (query tile, query head), over the forward's row list
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _bs_dq_tile(dq, q, do, lse2, delta, k_src, v_src, off_b, off_g, kstart, offs_m, offs_d,
                stride_kn, stride_vn, N, qk_scale,
                BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DIAG: tl.constexpr, DOT_PRECISION: tl.constexpr,
                USE_TMA: tl.constexpr):
    """One key tile of ``BLOCK_N`` keys against the program's query rows (``DIAG``: causal mask, and key rows
    may pass ``N``). With ``USE_TMA``, ``k_src``/``v_src`` are tensor descriptors over ``[B, Hkv, N, D]``."""
    offs_n = kstart + tl.arange(0, BLOCK_N)
    if USE_TMA:
        k = k_src.load([off_b, off_g, kstart, 0]).reshape(BLOCK_N, HEAD_DIM)
        v = v_src.load([off_b, off_g, kstart, 0]).reshape(BLOCK_N, HEAD_DIM)
    elif DIAG:
        k = tl.load(k_src + offs_n[:, None] * stride_kn + offs_d[None, :], mask=offs_n[:, None] < N, other=0.0)
        v = tl.load(v_src + offs_n[:, None] * stride_vn + offs_d[None, :], mask=offs_n[:, None] < N, other=0.0)
    else:
        k = tl.load(k_src + offs_n[:, None] * stride_kn + offs_d[None, :])
        v = tl.load(v_src + offs_n[:, None] * stride_vn + offs_d[None, :])
    p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - lse2[:, None])
    if DIAG:
        p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)


@triton.jit
def _bs_dq_block(dq, q, do, lse2, delta, k_src, v_src, off_b, off_g, cblock, offs_m, offs_d,
                 stride_kn, stride_vn, N, qk_scale,
                 MASK_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """All keys of off-diagonal key block ``cblock``."""
    for sub in tl.static_range(MASK_BLOCK // BLOCK_N):
        dq = _bs_dq_tile(dq, q, do, lse2, delta, k_src, v_src, off_b, off_g, cblock * MASK_BLOCK + sub * BLOCK_N,
                         offs_m, offs_d, stride_kn, stride_vn, N, qk_scale, BLOCK_N, HEAD_DIM, False,
                         DOT_PRECISION, USE_TMA)
    return dq


@triton.jit
def _bs_bwd_dq_kernel(
    Q, K, V, DO, DQ, Lse2, Delta, KvIdx, KvCnt, Cu, Order,
    qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    stride_ib, stride_ih, stride_ir,
    stride_cb, stride_ch,
    NBATCH, N, N_PAD, N_QPROG, HQ, HKV, GROUP, MASK_GROUP,
    HEAD_DIM: tl.constexpr, MASK_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERP: tl.constexpr, USE_TMA: tl.constexpr, VARLEN: tl.constexpr,
):
    if VARLEN:  # a 1-d grid over Order: (sequence x query head, query tile) packed, tiles inside a sequence only
        packed = tl.load(Order + tl.program_id(0))
        pid_m = packed % N_QPROG
        pid_bh = packed // N_QPROG
    else:
        pid_m = N_QPROG - 1 - tl.program_id(0)  # last query blocks (longest row lists) first
        pid_bh = tl.program_id(1)
    off_b = pid_bh // HQ
    off_h = pid_bh % HQ
    off_g = off_h // GROUP
    ob = off_b.to(tl.int64)
    oh = off_h.to(tl.int64)
    og = off_g.to(tl.int64)
    ohm = (off_h // MASK_GROUP).to(tl.int64)
    if VARLEN:  # packed sequences (batch strides 0): every pointer starts at the sequence's token 0
        tok0 = tl.load(Cu + ob).to(tl.int64)
        N = (tl.load(Cu + ob + 1) - tok0).to(tl.int32)
        Q += tok0 * stride_qn
        K += tok0 * stride_kn
        V += tok0 * stride_vn
        DO += tok0 * stride_don
        DQ += tok0 * stride_dqn

    row0 = pid_m * BLOCK_M
    r = row0 // MASK_BLOCK  # the query block
    idx_ptr = KvIdx + ob * stride_ib + ohm * stride_ih + r.to(tl.int64) * stride_ir
    cnt = tl.load(KvCnt + ob * stride_cb + ohm * stride_ch + r)
    if VARLEN:  # query rows at or past the sequence's end: nothing to read (and nothing stored; Order lists no
        cnt = tl.where(row0 < N, cnt, 0)  # such tile, this only keeps the kernel safe)

    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_n = offs_m[:, None] < N
    q = tl.load(Q + ob * stride_qb + oh * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=in_n, other=0.0)
    do = tl.load(DO + ob * stride_dob + oh * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                 mask=in_n, other=0.0)
    lse2 = tl.load(Lse2 + (ob * HQ + oh) * N_PAD + offs_m)
    delta = tl.load(Delta + (ob * HQ + oh) * N_PAD + offs_m)
    if USE_TMA:
        k_src = tl.make_tensor_descriptor(K, shape=[NBATCH, HKV, N, HEAD_DIM], strides=[stride_kb, stride_kh,
                                          stride_kn, 1], block_shape=[1, 1, BLOCK_N, HEAD_DIM])
        v_src = tl.make_tensor_descriptor(V, shape=[NBATCH, HKV, N, HEAD_DIM], strides=[stride_vb, stride_vh,
                                          stride_vn, 1], block_shape=[1, 1, BLOCK_N, HEAD_DIM])
    else:
        k_src = K + ob * stride_kb + og * stride_kh
        v_src = V + ob * stride_vb + og * stride_vh

    # entries before the last are off-diagonal, whole key blocks below the query block: no masks
    last = tl.load(idx_ptr + tl.maximum(cnt - 1, 0))
    has_diag = (cnt > 0) & (last == r)
    n_off = cnt - has_diag.to(tl.int32)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if INTERP:  # the interpreter (NumPy 2) cannot use a run-time value as a range() bound
        t = 0
        while t < n_off:
            dq = _bs_dq_block(dq, q, do, lse2, delta, k_src, v_src, off_b, off_g, tl.load(idx_ptr + t), offs_m,
                              offs_d, stride_kn, stride_vn, N, qk_scale, MASK_BLOCK, BLOCK_N, HEAD_DIM,
                              DOT_PRECISION, USE_TMA)
            t += 1
    else:
        for t in range(0, n_off):
            dq = _bs_dq_block(dq, q, do, lse2, delta, k_src, v_src, off_b, off_g, tl.load(idx_ptr + t), offs_m,
                              offs_d, stride_kn, stride_vn, N, qk_scale, MASK_BLOCK, BLOCK_N, HEAD_DIM,
                              DOT_PRECISION, USE_TMA)
    if has_diag:  # key tiles that start after the program's last row see none of its rows
        for sub in tl.static_range(MASK_BLOCK // BLOCK_N):
            kstart = r * MASK_BLOCK + sub * BLOCK_N
            if kstart < row0 + BLOCK_M:
                dq = _bs_dq_tile(dq, q, do, lse2, delta, k_src, v_src, off_b, off_g, kstart, offs_m, offs_d,
                                 stride_kn, stride_vn, N, qk_scale, BLOCK_N, HEAD_DIM, True, DOT_PRECISION, USE_TMA)
    dq = dq * sm_scale
    tl.store(DQ + ob * stride_dqb + oh * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=in_n)


# ----------------------------------------------------------------------------------------------------------
# Launch configurations and the host side
# ----------------------------------------------------------------------------------------------------------

# Launch configurations (seer.kernels.tuning; see the module docstring). D 128: the winners of the H100 sweep of
# experiments/bench_sparse_bwd.py (docs/bench_sparse_bwd.md; 32k, density 1.0 and 0.1, the same winners in two runs,
# their gradients checked against the float32 reference on the GPU); D 64: picked from registers/spills of an
# offline sm_90 compile (experiments/compile_stats.py), not timed. Other sizes: 64 x 64 tiles, 8 warps from D 128 on
# (D 256: no spills, about 197 KB of shared memory). USE_TMA: read the streamed
# operand (q and dO for dk/dv, K and V for dq) through the copy engine when the tensors allow it (common.tma_ok).
_H100_DKDV: dict[tuple[int, int], dict] = {  # BLOCK_N keys per program, BLOCK_M query rows per step
    (128, 64): dict(BLOCK_N=64, BLOCK_M=64, num_warps=4, num_stages=2, USE_TMA=False),  # 62 ms at 32k, d 1.0
    (128, 128): dict(BLOCK_N=128, BLOCK_M=64, num_warps=8, num_stages=2, USE_TMA=False),  # 60 ms
    (64, 64): dict(BLOCK_N=64, BLOCK_M=64, num_warps=4, num_stages=2, USE_TMA=False),
    (64, 128): dict(BLOCK_N=64, BLOCK_M=64, num_warps=4, num_stages=2, USE_TMA=False),
}
_H100_DQ: dict[tuple[int, int], dict] = {  # BLOCK_M query rows per program, BLOCK_N keys per step
    (128, 64): dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, USE_TMA=True),  # 60 ms
    (128, 128): dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2, USE_TMA=False),  # 60 ms
    (64, 64): dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, USE_TMA=False),
    (64, 128): dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, USE_TMA=False),
}


def _cuda_config(h100: dict[tuple[int, int], dict]):
    def candidates(key: tuple[int, int]) -> list[dict]:
        d, block = key
        config = h100.get(key, dict(BLOCK_N=64, BLOCK_M=64, num_warps=8 if d >= 128 else 4, num_stages=2,
                                    USE_TMA=False))
        return [dict(config, BLOCK_N=min(config["BLOCK_N"], block), BLOCK_M=min(config["BLOCK_M"], block))]
    return candidates


def _interpreter_config(key: tuple[int, int]) -> dict:
    return dict(BLOCK_N=key[1], BLOCK_M=key[1], num_warps=4, num_stages=1, USE_TMA=False)


DKDV_TABLE = LaunchTable("block_sparse_bwd.dkdv", ("BLOCK_N", "BLOCK_M", "num_warps", "num_stages", "USE_TMA"),
                         _cuda_config(_H100_DKDV), _interpreter_config, tiles_invalid)
DQ_TABLE = LaunchTable("block_sparse_bwd.dq", ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "USE_TMA"),
                       _cuda_config(_H100_DQ), _interpreter_config, tiles_invalid)


def _grad_buffer(x: torch.Tensor, given: torch.Tensor | None, name: str) -> torch.Tensor:
    if given is None:
        g = _alloc_like(x)
        return g if g.stride(-1) == 1 else _alloc(x.shape, x.dtype, x.device)
    if given.shape != x.shape or given.dtype != x.dtype or given.device != x.device or given.stride(-1) != 1:
        raise ValueError(f"{name} must be a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device} with unit "
                         f"last stride; got {given.dtype} {tuple(given.shape)} on {given.device}")
    return given


def _check_index(name: str, idx: torch.Tensor, cnt: torch.Tensor, b: int, hq: int, hkv: int, nb: int) -> None:
    for n_, t in ((name + " indices", idx), (name + " counts", cnt)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32:
            raise ValueError(f"{n_} must be an int32 tensor")
    if idx.dim() != 4 or idx.shape[0] != b or idx.shape[2] != nb or idx.shape[3] < nb or idx.stride(3) != 1 \
            or idx.shape[1] not in (hq, hkv):
        raise ValueError(f"{name} indices must be [B, Hq or Hkv, {nb}, >= {nb}] with unit last stride; "
                         f"got {tuple(idx.shape)}")
    if cnt.shape != idx.shape[:3] or cnt.stride(2) != 1:
        raise ValueError(f"{name} counts must be {tuple(idx.shape[:3])} with unit last stride; got {tuple(cnt.shape)}")


def block_sparse_attn_backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    block_mask: torch.Tensor | None, block_size: int = 64, sm_scale: float | None = None, *,
    dlse: torch.Tensor | None = None,
    kv_index: tuple[torch.Tensor, torch.Tensor] | None = None,
    q_index: tuple[torch.Tensor, torch.Tensor] | None = None,
    dq: torch.Tensor | None = None, dk: torch.Tensor | None = None, dv: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of :func:`seer.kernels.block_sparse_attn` (what its autograd backward runs).

    ``do`` is ``dL/d out`` ``[B, Hq, N, D]``; ``out`` and ``lse`` are the forward's results for ``q``, ``k``,
    ``v``, ``block_mask``, ``block_size``, ``sm_scale`` (same contract as the forward; the mask may be per
    query head or per key/value head). ``dlse`` (optional, ``[B, Hq, N]``) is ``dL/d lse``.
    ``kv_index`` = ``(kv_indices, kv_counts)``, the forward's row lists (:func:`build_block_index`, ``pair=False``),
    and ``q_index`` = ``(q_indices, q_counts)``, the column lists (:func:`build_block_col_index`), are built from
    ``block_mask`` when not given (``block_mask`` may then be None). ``dq``/``dk``/``dv`` optionally receive the
    results in place. ``dk``/``dv`` are ``[B, Hkv, N, D]``, summed over each query-head group. No host sync.
    """
    check_block_size(block_size)
    b, hq, hkv, n, d = check_qkv(q, k, v)
    nb = triton.cdiv(n, block_size)
    if do.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"do and out must have q's shape {tuple(q.shape)}; got {tuple(do.shape)}, {tuple(out.shape)}")
    if lse.shape != (b, hq, n) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32 {(b, hq, n)}; got {lse.dtype} {tuple(lse.shape)}")
    if dlse is not None and dlse.shape != (b, hq, n):
        raise ValueError(f"dlse must be {(b, hq, n)}; got {tuple(dlse.shape)}")
    if block_mask is not None:
        _check_mask_shape(block_mask, b, hq, hkv, nb)
    elif kv_index is None or q_index is None:
        raise ValueError("block_mask is needed unless both kv_index and q_index are given")
    masks = {} if block_mask is None else {"block_mask": block_mask}
    check_device(q=q, k=k, v=v, do=do, out=out, lse=lse, **masks)
    dq = _grad_buffer(q, dq, "dq")
    dk = _grad_buffer(k, dk, "dk")
    dv = _grad_buffer(v, dv, "dv")
    if n == 0 or b * hq == 0:
        return dq, dk, dv
    if kv_index is None:
        kv_index = build_block_index(block_mask, pair=False)
    if q_index is None:
        q_index = build_block_col_index(block_mask)
    _check_index("kv_index", *kv_index, b, hq, hkv, nb)
    _check_index("q_index", *q_index, b, hq, hkv, nb)
    launch_backward(do, q, k, v, out, lse, dlse, kv_index, q_index, block_size, sm_scale, dq, dk, dv)
    return dq, dk, dv


def launch_backward(do, q, k, v, out, lse, dlse, kv_index, q_index, block_size, sm_scale, dq, dk, dv,
                    cu_seqlens=None, seqlens=None):
    """The three backward launches over checked inputs. With ``cu_seqlens`` (int32 ``[S + 1]``) and ``seqlens`` (the
    ``S`` lengths, on the host), the ``[1, H, T, D]`` tensors (and ``[1, Hq, T]`` lse) hold ``S`` sequences packed in
    one row, the lists are per sequence and the gradient buffers are written only at the sequences' tokens. The
    dk/dv and dq kernels then launch only the tiles inside a sequence, in the linear order of their padded 2-d grids
    (each sequence and head in turn: key tiles first to last, query tiles last to first, so a head's programs run
    together; :func:`seer.kernels.common.varlen_order`); the preprocess keeps its padded grid (it fills every padded
    row, which the column lists may name)."""
    kv_idx, kv_cnt = kv_index
    q_idx, q_cnt = q_index
    _, hq, n, d = q.shape
    hkv = k.shape[1]
    varlen = cu_seqlens is not None
    b, nb = kv_cnt.shape[0], kv_cnt.shape[2]
    if n == 0 or b * hq == 0:
        return
    cu = cu_seqlens if varlen else kv_cnt  # a placeholder pointer when there are no offsets

    def batch_stride(t: torch.Tensor) -> int:
        return 0 if varlen else t.stride(0)

    scale = softmax_scale(sm_scale, d)
    q, k, v, out = (with_unit_last_stride(x) for x in (q, k, v, out))
    do = with_unit_last_stride(do.to(q.dtype))
    lse = lse if lse.stride(-1) == 1 else lse.contiguous()
    n_pad = nb * block_size
    delta = _alloc((b, hq, n_pad), torch.float32, q.device)
    lse2 = _alloc((b, hq, n_pad), torch.float32, q.device)
    dl = dlse.float() if dlse is not None else lse  # a placeholder pointer when there is no dlse
    _bs_bwd_preprocess_kernel[(nb, b * hq)](
        out, do, lse, dl, delta, lse2, cu,
        batch_stride(out), out.stride(1), out.stride(2),
        batch_stride(do), do.stride(1), do.stride(2),
        batch_stride(lse), lse.stride(1),
        batch_stride(dl), dl.stride(1), dl.stride(2),
        n, hq, n_pad,
        HEAD_DIM=d, BLOCK=block_size, HAS_DLSE=dlse is not None, VARLEN=varlen, num_warps=4,
    )

    group = hq // hkv
    key = (d, block_size)

    orders = {}  # per kernel and tile: built once per call (the launch table may time several configs)

    def order_grid(kernel: str, heads: int, tile: int, last_first: bool):
        n_prog = n_pad // tile
        if not varlen:
            return cu, (n_prog, b * heads)  # a placeholder pointer when there is no order
        if (kernel, tile) not in orders:
            orders[kernel, tile] = varlen_order(cu, seqlens, heads, tile, n_prog, last_first)
        order = orders[kernel, tile]
        return order, (order.numel(),)

    def run_dkdv(config: dict):
        order, grid = order_grid("dkdv", hkv, config["BLOCK_N"], last_first=False)
        return _bs_bwd_dkdv_kernel[grid](
            q, k, v, do, dk, dv, lse2, delta, q_idx, q_cnt, cu, order,
            scale * LOG2E.value, scale,
            batch_stride(q), q.stride(1), q.stride(2),
            batch_stride(k), k.stride(1), k.stride(2),
            batch_stride(v), v.stride(1), v.stride(2),
            batch_stride(do), do.stride(1), do.stride(2),
            batch_stride(dk), dk.stride(1), dk.stride(2),
            batch_stride(dv), dv.stride(1), dv.stride(2),
            q_idx.stride(0), q_idx.stride(1), q_idx.stride(2),
            q_cnt.stride(0), q_cnt.stride(1),
            b, n, nb, n_pad, hq, hkv, group, hq // q_idx.shape[1],
            HEAD_DIM=d, MASK_BLOCK=block_size, EVEN_N=n % block_size == 0 and not varlen,
            DOT_PRECISION=dot_precision(q.dtype), INTERP=INTERPRET, VARLEN=varlen,
            **dict(config, USE_TMA=config["USE_TMA"] and not varlen and tma_ok(q, do)),
        )
    DKDV_TABLE.launch(key, run_dkdv)

    def run_dq(config: dict):
        n_qprog = n_pad // config["BLOCK_M"]
        order, grid = order_grid("dq", hq, config["BLOCK_M"], last_first=True)
        return _bs_bwd_dq_kernel[grid](
            q, k, v, do, dq, lse2, delta, kv_idx, kv_cnt, cu, order,
            scale * LOG2E.value, scale,
            batch_stride(q), q.stride(1), q.stride(2),
            batch_stride(k), k.stride(1), k.stride(2),
            batch_stride(v), v.stride(1), v.stride(2),
            batch_stride(do), do.stride(1), do.stride(2),
            batch_stride(dq), dq.stride(1), dq.stride(2),
            kv_idx.stride(0), kv_idx.stride(1), kv_idx.stride(2),
            kv_cnt.stride(0), kv_cnt.stride(1),
            b, n, n_pad, n_qprog, hq, hkv, group, hq // kv_idx.shape[1],
            HEAD_DIM=d, MASK_BLOCK=block_size, DOT_PRECISION=dot_precision(q.dtype), INTERP=INTERPRET,
            VARLEN=varlen, **dict(config, USE_TMA=config["USE_TMA"] and not varlen and tma_ok(k, v)),
        )
    DQ_TABLE.launch(key, run_dq)
