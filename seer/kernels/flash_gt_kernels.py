"""Triton kernels of :mod:`seer.kernels.flash_gt` and their launchers (the math and the contract are there).

* ``_fwd_kernel``: one program per (``BLOCK_M`` query rows, batch x query head), longest rows first: the causal
  FlashAttention-2 forward (key tiles left of the diagonal unmasked, then the masked diagonal tiles). With
  ``GT`` it writes each key tile's row maxima (log2 units) to the packed causal-triangle scratch and, with
  ``EPI=1``, pools its own rows' scratch into ``gt`` once its ``lse`` is final.
* ``_epilogue_kernel`` (``EPI=0``): one program per (gt row block, batch x head) pools the scratch after the
  forward, streaming it once.
* ``_gt_kernel``: the low-memory pass 2, ``q k^T`` again per key block with ``lse`` known.

Hopper path: with ``USE_TMA`` (a compile-time switch, off by default; offered by the launch tables as an extra
candidate on devices of capability >= 9) ``_fwd_kernel`` moves its Q, K, V tiles in and its output tile out, and
``_gt_kernel`` its Q and K tiles in, through tensor descriptors over one head's ``[N, D]`` rows (the copy engine
zero-fills reads past ``N`` and drops writes past it, so no bounds masks); the launchers drop it where the copy
engine cannot address the tensors (:func:`seer.kernels.common.tma_ok`).

Loops whose bounds are known only at run time are written twice, selected by ``INTERP`` (see
:mod:`seer.kernels.common`). Launch configurations come from :mod:`seer.kernels.tuning` (tables in
:mod:`seer.kernels.flash_gt`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seer.kernels.common import INTERPRET, LN2, LOG2E, dot_precision, tma_ok


@triton.jit
def _this_program(NUM_M, H, GROUP):
    """``(query tile, batch x query head, batch, query head, key/value head)`` of this program; the last query
    tiles (longest rows under the causal mask) run first."""
    start_m = NUM_M - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    off_b = bh // H
    off_h = bh % H
    return start_m, bh, off_b, off_h, off_h // GROUP


@triton.jit
def _fwd_tile(acc, l_i, m_i, t_run, q, k_base, v_base, stride_kn, stride_vn, scr_base,
              offs_m, offs_n, offs_d, row_ok, row_blk, row_tri, row_loc, start_n, qk_scale, N,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr,
              MASKED: tl.constexpr, GT: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """Online-softmax update by the keys ``[start_n, start_n + BLOCK_N)``; with ``GT`` also their row maxima per
    ground-truth block to the scratch. ``offs_n``: ``arange(BS)`` when a tile holds two gt blocks, else
    ``arange(BLOCK_N)``. With ``USE_TMA``, ``k_base``/``v_base`` are tensor descriptors of tiles of ``len(offs_n)``
    rows (the copy engine zero-fills rows past N, so no bounds masks)."""
    if GT and BLOCK_N == 2 * BS:
        # Two ground-truth blocks per key tile: two half-width dots give each block's row maxima for free,
        # one online-softmax rescale per BLOCK_N keys.
        ca = start_n + offs_n
        cb = ca + BS
        if USE_TMA:
            ka = tl.trans(k_base.load([start_n, 0]))
            kb = tl.trans(k_base.load([start_n + BS, 0]))
            va = v_base.load([start_n, 0])
            vb = v_base.load([start_n + BS, 0])
        elif MASKED:
            ka = tl.load(k_base + offs_d[:, None] + ca[None, :] * stride_kn, mask=ca[None, :] < N, other=0.0)
            kb = tl.load(k_base + offs_d[:, None] + cb[None, :] * stride_kn, mask=cb[None, :] < N, other=0.0)
            va = tl.load(v_base + ca[:, None] * stride_vn + offs_d[None, :], mask=ca[:, None] < N, other=0.0)
            vb = tl.load(v_base + cb[:, None] * stride_vn + offs_d[None, :], mask=cb[:, None] < N, other=0.0)
        else:
            ka = tl.load(k_base + offs_d[:, None] + ca[None, :] * stride_kn)
            kb = tl.load(k_base + offs_d[:, None] + cb[None, :] * stride_kn)
            va = tl.load(v_base + ca[:, None] * stride_vn + offs_d[None, :])
            vb = tl.load(v_base + cb[:, None] * stride_vn + offs_d[None, :])
        sa = tl.dot(q, ka, input_precision=DOT_PRECISION) * qk_scale
        sb = tl.dot(q, kb, input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            sa = tl.where((ca[None, :] <= offs_m[:, None]) & (ca[None, :] < N), sa, float("-inf"))
            sb = tl.where((cb[None, :] <= offs_m[:, None]) & (cb[None, :] < N), sb, float("-inf"))
        ta = tl.max(sa, 1)
        tb = tl.max(sb, 1)
        m_ij = tl.maximum(m_i, tl.maximum(ta, tb))
        pa = tl.math.exp2(sa - m_ij[:, None])
        pb = tl.math.exp2(sb - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + (tl.sum(pa, 1) + tl.sum(pb, 1))
        acc = acc * alpha[:, None]
        acc = tl.dot(pa.to(va.dtype), va, acc, input_precision=DOT_PRECISION)
        acc = tl.dot(pb.to(vb.dtype), vb, acc, input_precision=DOT_PRECISION)
        m_i = m_ij
        j = start_n // BS
        if MASKED:
            tl.store(scr_base + row_tri + j * BS + row_loc, ta, mask=row_ok & (j <= row_blk))
            tl.store(scr_base + row_tri + (j + 1) * BS + row_loc, tb, mask=row_ok & (j + 1 <= row_blk))
        else:
            tl.store(scr_base + row_tri + j * BS + row_loc, ta, mask=row_ok)
            tl.store(scr_base + row_tri + (j + 1) * BS + row_loc, tb, mask=row_ok)
    else:
        cols = start_n + offs_n
        if USE_TMA:
            kt = tl.trans(k_base.load([start_n, 0]))
            v = v_base.load([start_n, 0])
        else:
            kt_ptrs = k_base + offs_d[:, None] + cols[None, :] * stride_kn
            v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :]
            if MASKED:
                kt = tl.load(kt_ptrs, mask=cols[None, :] < N, other=0.0)
                v = tl.load(v_ptrs, mask=cols[:, None] < N, other=0.0)
            else:
                kt = tl.load(kt_ptrs)
                v = tl.load(v_ptrs)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
        if MASKED:
            keep = (cols[None, :] <= offs_m[:, None]) & (cols[None, :] < N)
            s = tl.where(keep, qk * qk_scale, float("-inf"))
            if GT and BLOCK_N > BS:
                # several ground-truth blocks in one key tile: per-block row maxima
                t_sub = tl.max(tl.reshape(s, [BLOCK_M, BLOCK_N // BS, BS]), 2)
                row_max = tl.max(t_sub, 1)
            else:
                row_max = tl.max(s, 1)
            m_ij = tl.maximum(m_i, row_max)
            p = tl.math.exp2(s - m_ij[:, None])
        else:
            if GT and BLOCK_N > BS:
                t_sub = tl.max(tl.reshape(qk, [BLOCK_M, BLOCK_N // BS, BS]), 2) * qk_scale
                row_max = tl.max(t_sub, 1)
            else:
                row_max = tl.max(qk, 1) * qk_scale
            m_ij = tl.maximum(m_i, row_max)
            p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_ij
        if GT:
            if BLOCK_N > BS:
                js = start_n // BS + tl.arange(0, BLOCK_N // BS)
                ptrs = scr_base + row_tri[:, None] + js[None, :] * BS + row_loc[:, None]
                tl.store(ptrs, t_sub, mask=row_ok[:, None] & (js[None, :] <= row_blk[:, None]))
            else:
                # BS is a multiple of BLOCK_N: keep a running max over the BS // BLOCK_N tiles of one block and
                # (re)write it each tile; the last write of a block holds the max over all its tiles.
                j = start_n // BS
                if BS == BLOCK_N:
                    t_run = row_max
                else:
                    first = (start_n % BS) == 0
                    t_run = tl.where(first, row_max, tl.maximum(t_run, row_max))
                tl.store(scr_base + row_tri + j * BS + row_loc, t_run, mask=row_ok & (j <= row_blk))
    return acc, l_i, m_i, t_run


@triton.jit
def _fwd_tiles(acc, l_i, m_i, t_run, q, k_base, v_base, stride_kn, stride_vn, scr_base,
               offs_m, row_ok, row_blk, row_tri, row_loc, lo, hi, qk_scale, N,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr,
               MASKED: tl.constexpr, GT: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERP: tl.constexpr,
               USE_TMA: tl.constexpr):
    """:func:`_fwd_tile` over the key tiles ``[lo, hi)``."""
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BS if GT and BLOCK_N == 2 * BS else BLOCK_N)
    if INTERP:
        start_n = lo
        while start_n < hi:
            acc, l_i, m_i, t_run = _fwd_tile(acc, l_i, m_i, t_run, q, k_base, v_base, stride_kn, stride_vn,
                                             scr_base, offs_m, offs_n, offs_d, row_ok, row_blk, row_tri, row_loc,
                                             start_n, qk_scale, N, BLOCK_M, BLOCK_N, BS, MASKED, GT, DOT_PRECISION,
                                             USE_TMA)
            start_n += BLOCK_N
    else:
        for start_n in tl.range(lo, hi, BLOCK_N):
            acc, l_i, m_i, t_run = _fwd_tile(acc, l_i, m_i, t_run, q, k_base, v_base, stride_kn, stride_vn,
                                             scr_base, offs_m, offs_n, offs_d, row_ok, row_blk, row_tri, row_loc,
                                             start_n, qk_scale, N, BLOCK_M, BLOCK_N, BS, MASKED, GT, DOT_PRECISION,
                                             USE_TMA)
    return acc, l_i, m_i, t_run


@triton.jit
def _pool_own_rows(scr_base, gt_base, x_off, row_ok, row_blk, lse2, gis, offs_j, start_m, j0, NB,
                   BS: tl.constexpr, SUBM: tl.constexpr, JC: tl.constexpr):
    """``gt[i, j] = exp2(max_r (t2[r, j] - lse2[r]))`` for this program's gt rows ``gis`` and the key blocks
    ``j0 + offs_j``."""
    js = j0 + offs_j
    x = tl.load(scr_base + x_off + js[None, :] * BS,
                mask=row_ok[:, None] & (js[None, :] <= row_blk[:, None]), other=float("-inf"))
    x = x - lse2[:, None]
    if SUBM == 1:
        g = tl.math.exp2(tl.max(x, 0))
        tl.store(gt_base + start_m * NB + js, g, mask=js < NB)
    else:
        g = tl.math.exp2(tl.max(tl.reshape(x, [SUBM, BS, JC]), 1))
        tl.store(gt_base + gis[:, None] * NB + js[None, :], g, mask=(gis[:, None] < NB) & (js[None, :] < NB))


@triton.jit
def _zero_gt_from(gt_base, gis, first, NB, SUBM: tl.constexpr, JC: tl.constexpr, INTERP: tl.constexpr):
    """``gt[gis, first:NB] = 0``: the tiles above the diagonal of the gt rows ``gis``."""
    offs_j = tl.arange(0, JC)
    zero = tl.zeros([SUBM, JC], tl.float32)
    if INTERP:
        j0 = first
        while j0 < NB:
            tl.store(gt_base + gis[:, None] * NB + (j0 + offs_j)[None, :], zero,
                     mask=(gis[:, None] < NB) & ((j0 + offs_j)[None, :] < NB))
            j0 += JC
    else:
        for j0 in range(first, NB, JC):
            tl.store(gt_base + gis[:, None] * NB + (j0 + offs_j)[None, :], zero,
                     mask=(gis[:, None] < NB) & ((j0 + offs_j)[None, :] < NB))


@triton.jit
def _fwd_kernel(Q, K, V, Out, Lse, Scratch, Gt, qk_scale,
                stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                N, H, GROUP, NB, TRI, NUM_M,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr,
                GT: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERP: tl.constexpr,
                EPI: tl.constexpr = 0, JC: tl.constexpr = 16, USE_TMA: tl.constexpr = False):
    """The forward (``out``, ``lse``); with ``GT`` the tile maxima to ``Scratch`` (``TRI`` values per head) and,
    with ``EPI=1``, the pooling of this program's gt rows (``JC`` gt columns at a time). ``EPI``, ``JC``: only
    with ``GT``. ``USE_TMA``: Q, K, V in and the output out through tensor descriptors (see the module
    docstring)."""
    start_m, bh, off_b, off_h, off_kh = _this_program(NUM_M, H, GROUP)
    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    k_base = K + off_b.to(tl.int64) * stride_kb + off_kh.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_kh.to(tl.int64) * stride_vh
    o_base = Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
    lse_base = Lse + bh.to(tl.int64) * N
    scr_base = Scratch + bh.to(tl.int64) * TRI
    gt_base = Gt + bh.to(tl.int64) * NB * NB

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N
    row_blk = offs_m // BS
    row_loc = offs_m % BS
    row_tri = BS * (row_blk * (row_blk + 1) // 2)  # start of block row_blk in the packed causal triangle

    if USE_TMA:  # one head's [N, D] rows of each tensor; the copy engine zero-fills reads and drops writes past N
        KV_ROWS: tl.constexpr = BS if GT and BLOCK_N == 2 * BS else BLOCK_N
        o_desc = tl.make_tensor_descriptor(o_base, shape=[N, HEAD_DIM], strides=[stride_on, 1],
                                           block_shape=[BLOCK_M, HEAD_DIM])
        k_base = tl.make_tensor_descriptor(k_base, shape=[N, HEAD_DIM], strides=[stride_kn, 1],
                                           block_shape=[KV_ROWS, HEAD_DIM])
        v_base = tl.make_tensor_descriptor(v_base, shape=[N, HEAD_DIM], strides=[stride_vn, 1],
                                           block_shape=[KV_ROWS, HEAD_DIM])
        q = tl.make_tensor_descriptor(q_base, shape=[N, HEAD_DIM], strides=[stride_qn, 1],
                                      block_shape=[BLOCK_M, HEAD_DIM]).load([start_m * BLOCK_M, 0])
    else:
        q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    t_run = tl.full([BLOCK_M], float("-inf"), tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    diag = start_m * BLOCK_M
    # keys strictly left of this query tile: no mask needed (all < every row, all < N)
    acc, l_i, m_i, t_run = _fwd_tiles(acc, l_i, m_i, t_run, q, k_base, v_base, stride_kn, stride_vn, scr_base,
                                      offs_m, row_ok, row_blk, row_tri, row_loc, 0, diag, qk_scale, N,
                                      HEAD_DIM, BLOCK_M, BLOCK_N, BS, False, GT, DOT_PRECISION, INTERP, USE_TMA)
    # keys on the diagonal tile: causal and bounds masks
    acc, l_i, m_i, t_run = _fwd_tiles(acc, l_i, m_i, t_run, q, k_base, v_base, stride_kn, stride_vn, scr_base,
                                      offs_m, row_ok, row_blk, row_tri, row_loc, diag, diag + BLOCK_M, qk_scale, N,
                                      HEAD_DIM, BLOCK_M, BLOCK_N, BS, True, GT, DOT_PRECISION, INTERP, USE_TMA)

    out = acc / l_i[:, None]
    if USE_TMA:
        o_desc.store([start_m * BLOCK_M, 0], out.to(Out.dtype.element_ty))
    else:
        tl.store(o_base + offs_m[:, None] * stride_on + offs_d[None, :], out.to(Out.dtype.element_ty),
                 mask=row_ok[:, None])
    lse2 = m_i + tl.math.log2(l_i)
    tl.store(lse_base + offs_m, lse2 * LN2, mask=row_ok)

    if GT and EPI:
        # This program's rows are final: re-read their tile maxima (written by this program only, so mostly
        # still in L2) and pool them. The barrier makes the scratch stores of all threads of the program visible
        # to all of them.
        tl.debug_barrier()
        SUBM: tl.constexpr = BLOCK_M // BS
        offs_j = tl.arange(0, JC)
        gis = start_m * SUBM + tl.arange(0, SUBM)
        x_off = row_tri[:, None] + row_loc[:, None]
        if INTERP:
            j0 = 0
            while j0 < (start_m + 1) * SUBM:
                _pool_own_rows(scr_base, gt_base, x_off, row_ok, row_blk, lse2, gis, offs_j, start_m, j0, NB,
                               BS, SUBM, JC)
                j0 += JC
        else:
            for j0 in range(0, (start_m + 1) * SUBM, JC):
                _pool_own_rows(scr_base, gt_base, x_off, row_ok, row_blk, lse2, gis, offs_j, start_m, j0, NB,
                               BS, SUBM, JC)
        _zero_gt_from(gt_base, gis, (start_m + 1) * SUBM, NB, SUBM, JC, INTERP)


@triton.jit
def _pool_row(scr_base, gt_base, tri, offs_b, rok, l2, i, j0, offs_j, NB, BS: tl.constexpr):
    """``gt[i, j0 + offs_j]`` from the scratch of gt row block ``i`` (``l2``: its rows' lse in log2 units)."""
    js = j0 + offs_j
    x = tl.load(scr_base + tri + js[None, :] * BS + offs_b[:, None],
                mask=rok[:, None] & (js[None, :] <= i), other=float("-inf"))
    g = tl.math.exp2(tl.max(x - l2[:, None], 0))
    tl.store(gt_base + i * NB + js, g, mask=js < NB)


@triton.jit
def _epilogue_kernel(Lse, Scratch, Gt, N, NB, TRI, BS: tl.constexpr, JC: tl.constexpr, INTERP: tl.constexpr):
    """Fast mode with a separate epilogue: one program per (gt row block, batch x head) pools the scratch."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    lse_base = Lse + bh.to(tl.int64) * N
    scr_base = Scratch + bh.to(tl.int64) * TRI
    gt_base = Gt + bh.to(tl.int64) * NB * NB
    offs_b = tl.arange(0, BS)
    offs_j = tl.arange(0, JC)
    rows = i * BS + offs_b
    rok = rows < N
    l2 = tl.load(lse_base + rows, mask=rok, other=float("inf")) * LOG2E
    tri = BS * (i * (i + 1) // 2)
    if INTERP:
        j0 = 0
        while j0 < NB:
            _pool_row(scr_base, gt_base, tri, offs_b, rok, l2, i, j0, offs_j, NB, BS)
            j0 += JC
    else:
        for j0 in range(0, NB, JC):
            _pool_row(scr_base, gt_base, tri, offs_b, rok, l2, i, j0, offs_j, NB, BS)


@triton.jit
def _gt_block(gt_base, q, k_base, stride_kn, l2, offs_m, offs_n, offs_d, gis, g_ok, i0, diag_blk, j, qk_scale,
              N, NB, BS: tl.constexpr, SUBM: tl.constexpr, DOT_PRECISION: tl.constexpr, MASS: tl.constexpr,
              USE_TMA: tl.constexpr):
    """``gt[gis, j]`` for this program's rows and key block ``j``: the max over the tile of ``s2 - lse2``,
    exponentiated, or with ``MASS`` the mean over each block's rows of the probability they put on block ``j``.
    With ``USE_TMA``, ``k_base`` is a tensor descriptor of ``BS``-row tiles."""
    cols = j * BS + offs_n
    if USE_TMA:
        kt = tl.trans(k_base.load([j * BS, 0]))
    else:
        kt = tl.load(k_base + offs_d[:, None] + cols[None, :] * stride_kn, mask=cols[None, :] < N, other=0.0)
    qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
    x = qk * qk_scale - l2[:, None]
    if j >= diag_blk:
        x = tl.where((cols[None, :] <= offs_m[:, None]) & (cols[None, :] < N), x, float("-inf"))
    if MASS:
        r = tl.sum(tl.math.exp2(x), 1)  # [BLOCK_M] each row's probability on block j (0 for rows past N)
        if SUBM == 1:
            rows = tl.minimum(N - i0 * BS, BS).to(tl.float32)
            tl.store(gt_base + i0 * NB + j, tl.sum(r, 0) / rows, mask=j < NB)
        else:
            rows = tl.minimum(tl.maximum(N - gis * BS, 1), BS).to(tl.float32)
            g = tl.sum(tl.reshape(r, [SUBM, BS]), 1) / rows
            tl.store(gt_base + gis * NB + j, g, mask=g_ok & (j < NB))
    else:
        r = tl.max(x, 1)  # [BLOCK_M]
        if SUBM == 1:
            tl.store(gt_base + i0 * NB + j, tl.math.exp2(tl.max(r, 0)), mask=j < NB)
        else:
            g = tl.math.exp2(tl.max(tl.reshape(r, [SUBM, BS]), 1))
            tl.store(gt_base + gis * NB + j, g, mask=g_ok & (j < NB))


@triton.jit
def _gt_kernel(Q, K, Lse, Gt, qk_scale,
               stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
               N, H, GROUP, NB, NUM_M,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BS: tl.constexpr, DOT_PRECISION: tl.constexpr,
               JC: tl.constexpr, INTERP: tl.constexpr, MASS: tl.constexpr, USE_TMA: tl.constexpr = False):
    """Low-memory pass 2: with ``lse`` final, gt[i, j] = exp2(max over the tile of (s2 - lse2)) per key block (with
    ``MASS``: the block's rows' mean probability on key block j, i.e. the block attention mass). ``USE_TMA``: Q
    and K in through tensor descriptors."""
    start_m, bh, off_b, off_h, off_kh = _this_program(NUM_M, H, GROUP)
    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    k_base = K + off_b.to(tl.int64) * stride_kb + off_kh.to(tl.int64) * stride_kh
    lse_base = Lse + bh.to(tl.int64) * N
    gt_base = Gt + bh.to(tl.int64) * NB * NB
    SUBM: tl.constexpr = BLOCK_M // BS

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BS)
    row_ok = offs_m < N
    if USE_TMA:  # as in _fwd_kernel
        k_base = tl.make_tensor_descriptor(k_base, shape=[N, HEAD_DIM], strides=[stride_kn, 1],
                                           block_shape=[BS, HEAD_DIM])
        q = tl.make_tensor_descriptor(q_base, shape=[N, HEAD_DIM], strides=[stride_qn, 1],
                                      block_shape=[BLOCK_M, HEAD_DIM]).load([start_m * BLOCK_M, 0])
    else:
        q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    l2 = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf")) * LOG2E
    i0 = start_m * SUBM
    gis = i0 + tl.arange(0, SUBM)  # gt rows of this program
    g_ok = gis < NB

    diag_blk = start_m * SUBM
    # key blocks past NB are fully masked and not stored
    if INTERP:
        j = 0
        while j < diag_blk + SUBM:
            _gt_block(gt_base, q, k_base, stride_kn, l2, offs_m, offs_n, offs_d, gis, g_ok, i0, diag_blk, j,
                      qk_scale, N, NB, BS, SUBM, DOT_PRECISION, MASS, USE_TMA)
            j += 1
    else:
        for j in range(0, diag_blk + SUBM):
            _gt_block(gt_base, q, k_base, stride_kn, l2, offs_m, offs_n, offs_d, gis, g_ok, i0, diag_blk, j,
                      qk_scale, N, NB, BS, SUBM, DOT_PRECISION, MASS, USE_TMA)
    _zero_gt_from(gt_base, gis, diag_blk + SUBM, NB, SUBM, JC, INTERP)


# --------------------------------------------------------------------------------------------------------------
# Launchers: the argument lists of the kernels above, for [B, H, N, D] tensors with a unit last stride
# --------------------------------------------------------------------------------------------------------------


def launch_forward(q, k, v, out, lse, scratch, gt, qk_scale: float, nb: int, tri: int, block_size: int,
                   with_gt: bool, config: dict):
    """``_fwd_kernel`` over ``q [B, Hq, N, D]``; without gt, ``scratch`` and ``gt`` are unused (any tensor).
    ``config["USE_TMA"]`` (absent: off) takes effect only where the copy engine can move the tensors
    (:func:`seer.kernels.common.tma_ok`). Returns the compiled kernel."""
    b, hq, n, d = q.shape
    grid = (triton.cdiv(n, config["BLOCK_M"]), b * hq)
    use_tma = config.get("USE_TMA", False) and tma_ok(q, k, v, out)
    return _fwd_kernel[grid](
        q, k, v, out, lse, scratch, gt, qk_scale,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        n, hq, hq // k.shape[1], nb, tri, grid[0],
        HEAD_DIM=d, BS=block_size, GT=with_gt, DOT_PRECISION=dot_precision(q.dtype), INTERP=INTERPRET,
        **dict(config, USE_TMA=use_tma))


def launch_epilogue(lse: torch.Tensor, scratch: torch.Tensor, gt: torch.Tensor, nb: int, tri: int,
                    block_size: int) -> None:
    """``_epilogue_kernel``: ``gt`` from the scratch of a forward with ``GT`` and ``EPI=0``."""
    b, hq, n = lse.shape
    _epilogue_kernel[(nb, b * hq)](lse, scratch, gt, n, nb, tri, BS=block_size, JC=32, INTERP=INTERPRET,
                                   num_warps=4)


def launch_pass2(q, k, lse, gt, qk_scale: float, nb: int, block_size: int, config: dict, mass: bool = False):
    """``_gt_kernel``: ``gt`` (or with ``mass`` the block attention mass) from ``q``, ``k`` and the final ``lse``;
    ``USE_TMA`` as in :func:`launch_forward`. Returns the compiled kernel."""
    b, hq, n, d = q.shape
    grid = (triton.cdiv(n, config["BLOCK_M"]), b * hq)
    use_tma = config.get("USE_TMA", False) and tma_ok(q, k)
    return _gt_kernel[grid](
        q, k, lse, gt, qk_scale,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        n, hq, hq // k.shape[1], nb, grid[0],
        HEAD_DIM=d, BS=block_size, DOT_PRECISION=dot_precision(q.dtype), JC=32, INTERP=INTERPRET, MASS=mass,
        **dict(config, USE_TMA=use_tma))
