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

One program per query block ``i`` and set of ``P`` query heads sharing a key head (grid ``nb x B*Hkv*G/P``): their
sampled rows are stacked into one tile of ``P' x RP`` rows (``RP = max(2, next_pow2(R))``, ``P' = next_pow2(P)``, at
least 16 rows in all; padding rows have weight 0), ``P`` the largest divisor of ``G = Hq / Hkv`` for which
``P' x RP <= 128`` and ``P <= 8`` (:func:`program_layout`), so that each key tile is read once for the ``P`` heads
(Qwen2.5's 7 heads at 16 rows: one 128-row tile) rather than once per head. The program walks the **union** of its
heads' candidate lists (:func:`union_lists`), each entry ``c << 8 | bits`` with bit ``g`` set where the program's
``g``-th head lists block ``c``; a row attends to a listed block only when its head's bit is set (read off the entry the
loop loads anyway: no load per row), so each head's softmax is over its own candidates as above. With
``blocks_per_program`` ``QB > 1`` (by default as many as fill 64 rows, :func:`blocks_to_fill`: for groups of few
heads, where a program would otherwise hold 16 or 32 rows) a program holds ``QB`` consecutive query blocks of its
heads: member ``g`` is block ``i + g // P'`` of head ``g % P'`` (``QB P' <= 8``, ``QB P' RP <= 128``), the list is the
union of the members' lists, and the causal mask applies per row from the program's first block on. In base 2
(``x2 = x * log2(e)``), one pass over the listed key tiles keeps each row's online max ``m_t`` and
``z_t = sum_c exp2(x2 - m_t)`` and stores, for each entry ``j``, the row's partial sum in log form,
``l_t[j] = m_t' + log2 sum_{c in J} exp2(x2[t, c] - m_t')`` (``m_t'`` the max when the entry ends) in a float32 scratch;
a second loop, which reads no keys, writes for each listed ``j`` and each head of the group
``mass[i, j] = sum_t w_t exp2(l_t[j] - m_t) / z_t / sum_t w_t`` over the head's rows (0 where its candidates lack
``j``). Cost: ``P' RP x D x |U(i)| B`` multiply-adds and as many ``exp2`` per program (``U(i)`` the union), against
``B x D x (i + 1) B`` of each per head for the block's dense logits, one read of the union's key tiles and ``4 P' RP``
bytes of scratch per entry. ``passes=2`` computes the same without scratch: the first pass keeps ``m_t`` and ``z_t``,
the second recomputes ``x2`` and sums ``exp2(x2 - m_t) / z_t`` per block (twice the dots and the ``exp2``).
:func:`seer.kernels.reference.sampled_rows_mass` is the same contract in PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seer.kernels.block_index import append_selected, build_lists
from seer.kernels.common import (INTERPRET, LOG2E, check_block_size, check_device, check_qkv, dot_precision,
                                 softmax_scale, with_unit_last_stride)

__all__ = ["LAUNCH", "SCRATCH_BYTES", "blocks_to_fill", "last_kernel_resources", "program_layout", "sampled_offsets",
           "sampled_rows_mass", "union_lists"]

MAX_GRID_Y = 65535
"""The most programs on a CUDA grid's second axis."""

MEMBER_BITS: tl.constexpr = tl.constexpr(8)
"""Low bits of a union-list entry that say which of the program's query heads list its block (so at most 8 heads a
program, and blocks below ``2**23``): the kernel reads a row's candidate test off the entry, with no load per row."""

FINISH_ENTRIES: tl.constexpr = tl.constexpr(8)
"""List entries the one-pass kernel's key-free second loop finishes a step (one load of their partial sums)."""

SCRATCH_BYTES = 1 << 28
"""The most scratch one launch of the one-pass kernel takes (256 MiB); longer inputs run in several launches."""

LAUNCH: dict = {"num_warps": 4, "num_stages": None, "heaviest_first": True, "block_n": None}
"""Launch settings on CUDA: ``num_warps`` and ``num_stages`` (None: Triton's default), 4 warps timed best on an H100
(docs/bench_rerank.md); ``heaviest_first``: the programs start from the last query block (whose union list is the
longest: a program's work grows with its block index), the key heads' lists side by side, so that the short programs
fill the end of the launch rather than the long ones (False: the first block first, list by list): 9-19% faster on
every shape of two H100 runs beside other work, 7-18% in two H200 runs alone (docs/bench_rerank.md, last sections);
``block_n``: keys a tile (None: a block, at most 64 on CUDA; 16 or 32 halve or quarter the logit tile each step
holds in registers; slower on an H100 at Qwen's shape). ``experiments/bench_rerank.py --launch`` times the
alternatives."""


_LAST: dict = {}


def last_kernel_resources() -> dict:
    """``{"n_regs", "n_spills"}`` (registers per thread, spilled bytes) of the latest launch's compiled kernel on CUDA;
    None values under the interpreter or before a launch (for benchmarks: a kernel that spills shows it here)."""
    compiled = _LAST.get("compiled")
    return {"n_regs": getattr(compiled, "n_regs", None), "n_spills": getattr(compiled, "n_spills", None)}


def sampled_offsets(block_size: int, rows: int) -> list[int]:
    """The offsets in a block of its ``min(rows, block_size)`` sampled query rows: spread evenly from the first row to
    the last (``round(t (B - 1) / (R - 1))``, rounding halves up), the last row alone for one row."""
    r = min(rows, block_size)
    if r == 1:
        return [block_size - 1]
    return [(2 * t * (block_size - 1) + r - 1) // (2 * (r - 1)) for t in range(r)]


@triton.jit
def _sr_logits(q, K, stride_kn, kb, offs_n, offs_d, pos, bias, diag, N, qk_scale, DOT_PRECISION: tl.constexpr):
    """``x2`` of the sampled rows against one key tile, plus ``bias`` per row (``-inf`` in the rows whose head does
    not list the tile's block); on the diagonal block (``diag``) also ``-inf`` where ``c > r_t``, which drops
    ``c >= N`` too. Blocks before the diagonal need no causal mask: their keys precede every sampled row."""
    keys = kb + offs_n
    kt = tl.load(K + keys[None, :] * stride_kn + offs_d[:, None], mask=keys[None, :] < N, other=0.0)
    x2 = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale + bias[:, None]
    if diag:
        x2 = tl.where(keys[None, :] <= pos[:, None], x2, float("-inf"))
    return x2


@triton.jit
def _sr_entry(idx_row, e, g):
    """Entry ``e`` of the union list: its block ``c`` and, per row (``g`` the row's head in the program), 0 where the
    row's head lists it, else ``-inf`` (read off the entry's membership bits: no load per row)."""
    ce = tl.load(idx_row + e)
    return ce >> MEMBER_BITS, tl.where(((ce >> g) & 1) != 0, 0.0, float("-inf"))


@triton.jit
def _sr_stats(q, K, stride_kn, idx_row, g, i, e, offs_n, offs_d, pos, N, qk_scale, m, z,
              BS: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Pass 1 over the tiles of list entry ``e``: the online max ``m`` and sum ``z`` of each sampled row."""
    c, bias = _sr_entry(idx_row, e, g)
    for sub in tl.static_range(BS // BLOCK_N):
        x2 = _sr_logits(q, K, stride_kn, c * BS + sub * BLOCK_N, offs_n, offs_d, pos, bias, c >= i, N, qk_scale,
                        DOT_PRECISION)
        m_new = tl.maximum(m, tl.max(x2, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        z = z * tl.math.exp2(m - m_use) + tl.sum(tl.math.exp2(x2 - m_use[:, None]), 1)
        m = m_new
    return m, z


@triton.jit
def _sr_mass(q, K, stride_kn, idx_row, g, i, e, offs_n, offs_d, pos, N, qk_scale, m, scale_rows, out_heads,
             head_ok, BS: tl.constexpr, BLOCK_N: tl.constexpr, PP: tl.constexpr, RP: tl.constexpr,
             DOT_PRECISION: tl.constexpr):
    """Pass 2 for list entry ``e``: each head's weighted mean probability of its block over its sampled rows."""
    c, bias = _sr_entry(idx_row, e, g)
    rows = tl.zeros_like(m)
    for sub in tl.static_range(BS // BLOCK_N):
        x2 = _sr_logits(q, K, stride_kn, c * BS + sub * BLOCK_N, offs_n, offs_d, pos, bias, c >= i, N, qk_scale,
                        DOT_PRECISION)
        rows += tl.sum(tl.math.exp2(x2 - m[:, None]), 1)
    tl.store(out_heads + c, tl.sum(tl.reshape(rows * scale_rows, (PP, RP)), 1), mask=head_ok)


@triton.jit
def _sr_partial(q, K, stride_kn, idx_row, g, i, e, offs_n, offs_d, pos, N, qk_scale, m, z, part_e,
                BS: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One pass over the tiles of list entry ``e``: the online ``m`` and ``z`` of each sampled row, and the entry's
    partial sum stored at ``part_e`` in base-2 log form (``m + log2 sum_{c in J} exp2(x2 - m)`` with the ``m`` of
    the entry's end; ``-inf`` where the row has no key in it). Few operations a logit: the scale folded into the
    ``exp2``'s argument (a fused multiply-add; the max taken on the raw dots, the scale being positive) and the
    candidate test applied per row (the row's max and sum left out where its head does not list the entry) rather
    than as a bias added to every logit (about 3% faster on an H100, docs/bench_rerank.md)."""
    ce = tl.load(idx_row + e)
    c = ce >> MEMBER_BITS
    listed = ((ce >> g) & 1) != 0
    s = tl.zeros_like(z)
    for sub in tl.static_range(BS // BLOCK_N):
        keys = c * BS + sub * BLOCK_N + offs_n
        kt = tl.load(K + keys[None, :] * stride_kn + offs_d[:, None], mask=keys[None, :] < N, other=0.0)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
        if c >= i:  # a program's first query block or later: the causal mask (a no-op in rows of later blocks)
            qk = tl.where(keys[None, :] <= pos[:, None], qk, float("-inf"))
        m_new = tl.maximum(m, tl.where(listed, tl.max(qk, 1) * qk_scale, float("-inf")))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.where(listed, tl.sum(tl.math.exp2(qk * qk_scale - m_use[:, None]), 1), 0.0)
        alpha = tl.math.exp2(m - m_use)
        z = z * alpha + p
        s = s * alpha + p
        m = m_new
    m_use = tl.where(m == float("-inf"), 0.0, m)
    tl.store(part_e, tl.where(s > 0, m_use + tl.math.log2(tl.maximum(s, 1e-30)), float("-inf")))
    return m, z


@triton.jit
def _sr_finish(idx_row, e0, cnt, part_base, stride_pe, t, m, z_inv_w, out_heads, head_ok, PP: tl.constexpr,
               RP: tl.constexpr, EC: tl.constexpr):
    """Second (key-free) loop of the one-pass kernel, ``EC`` list entries a step (``e0 ..``, those below ``cnt``):
    their stored partial sums, normalised per row and averaged per head. One load of ``EC`` entries' sums a step, so
    the step's wait on memory (nothing else hides it: the loop has no other work) is paid once per ``EC`` entries;
    one entry a step spent a quarter of the kernel's time in that wait (Nsight Compute, docs/bench_rerank.md)."""
    es = e0 + tl.arange(0, EC)
    ok = es < cnt
    c = tl.load(idx_row + es, mask=ok, other=0) >> MEMBER_BITS
    part = tl.load(part_base + es[:, None].to(tl.int64) * stride_pe + t[None, :], mask=ok[:, None],
                   other=float("-inf"))
    rows = tl.math.exp2(part - m[None, :]) * z_inv_w[None, :]
    tl.store(out_heads[None, :] + c[:, None], tl.sum(tl.reshape(rows, (EC, PP, RP)), 2),
             mask=ok[:, None] & head_ok[None, :])


@triton.jit
def _sampled_rows_kernel(
    Q, K, Idx, Cnt, Out, Part,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_ib, stride_ih, stride_ir, stride_cb, stride_ch,
    stride_ob, stride_oh, stride_or,
    stride_pp, stride_pi, stride_pe, G0, LISTS, CHUNKS, GROUP, N, qk_scale,
    D: tl.constexpr, BS: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, P: tl.constexpr, PP: tl.constexpr,
    QB: tl.constexpr, BLOCK_N: tl.constexpr, LAST_FALLBACK: tl.constexpr, ONE_PASS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HEAVIEST_FIRST: tl.constexpr, INTERP: tl.constexpr,
):
    # bl: batch x list, LISTS = Hkv x CHUNKS lists, each the union of P query heads' candidates in QB consecutive
    # query blocks (a group of blocks; the launch's groups start at G0)
    if HEAVIEST_FIRST:  # grid (lists, groups): the launch's last group first, every list's at once
        bl = tl.program_id(0)
        gi = tl.num_programs(1) - 1 - tl.program_id(1)
    else:  # grid (groups, lists)
        gi = tl.program_id(0)
        bl = tl.program_id(1)
    i = (G0 + gi) * QB  # the program's first query block
    off_b = (bl // LISTS).to(tl.int64)
    off_l = (bl % LISTS).to(tl.int64)
    off_hk = off_l // CHUNKS
    h0 = off_hk * GROUP + (off_l % CHUNKS) * P  # the first query head of the program
    nb = (N + BS - 1) // BS
    # row t: member g = t // RP (query block i + g // PP, head h0 + g % PP; bit g of the list entries), sample t % RP
    t = tl.arange(0, QB * PP * RP)
    g = t // RP
    hh = g % PP
    blk = i + g // PP
    smp = t % RP
    if R == 1:  # sampled_offsets, computed here (no host tensor: the launch can be captured in a CUDA graph)
        offset = tl.full([QB * PP * RP], BS - 1, dtype=tl.int32)
    else:
        offset = (2 * smp * (BS - 1) + R - 1) // (2 * (R - 1))
    raw = blk * BS + tl.where(smp < R, offset, 0)
    w = ((smp < R) & (raw < N) & (hh < P) & (blk < nb)).to(tl.float32)
    if LAST_FALLBACK:  # a short last block holding none of the sampled rows takes its last token
        w = tl.where((blk == nb - 1) & (smp == 0) & (hh < P), 1.0, w)
    head = h0 + tl.where(hh < P, hh, 0).to(tl.int64)
    pos = tl.minimum(raw, N - 1)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(Q + off_b * stride_qb + head[:, None] * stride_qh + pos[:, None].to(tl.int64) * stride_qn
                + offs_d[None, :], mask=w[:, None] > 0, other=0.0)
    K = K + off_b * stride_kb + off_hk * stride_kh
    idx_row = Idx + off_b * stride_ib + off_l * stride_ih + (G0 + gi).to(tl.int64) * stride_ir
    cnt = tl.load(Cnt + off_b * stride_cb + off_l * stride_ch + G0 + gi)
    m = tl.full([QB * PP * RP], float("-inf"), dtype=tl.float32)
    z = tl.zeros([QB * PP * RP], dtype=tl.float32)
    members = tl.arange(0, QB * PP)
    out_heads = (Out + off_b * stride_ob + (h0 + members % PP).to(tl.int64) * stride_oh
                 + (i + members // PP).to(tl.int64) * stride_or)
    head_ok = (members % PP < P) & (i + members // PP < nb)
    # each member's rows weigh w / (its number of sampled rows: fewer in a short last block)
    count = tl.reshape(tl.broadcast_to(tl.sum(tl.reshape(w, (QB * PP, RP)), 1)[:, None], (QB * PP, RP)),
                       (QB * PP * RP,))
    w_rows = w / tl.where(count > 0, count, 1.0)
    if ONE_PASS:
        part_base = Part + bl.to(tl.int64) * stride_pp + gi.to(tl.int64) * stride_pi
        part = part_base + t
        if INTERP:  # run-time loop bounds: see seer.kernels.common
            e = 0
            while e < cnt:
                m, z = _sr_partial(q, K, stride_kn, idx_row, g, i, e, offs_n, offs_d, pos, N, qk_scale, m, z,
                                   part + e * stride_pe, BS, BLOCK_N, DOT_PRECISION)
                e += 1
        else:
            for e in range(0, cnt):
                m, z = _sr_partial(q, K, stride_kn, idx_row, g, i, e, offs_n, offs_d, pos, N, qk_scale, m, z,
                                   part + e * stride_pe, BS, BLOCK_N, DOT_PRECISION)
        # the second loop reads partial sums other threads of the program stored: a barrier orders those stores first
        tl.debug_barrier()
        m = tl.where(m == float("-inf"), 0.0, m)
        z_inv_w = tl.where(w > 0, w_rows / tl.where(z > 0, z, 1.0), 0.0)
        if INTERP:
            e = 0
            while e < cnt:
                _sr_finish(idx_row, e, cnt, part_base, stride_pe, t, m, z_inv_w, out_heads, head_ok, QB * PP, RP,
                           FINISH_ENTRIES)
                e += FINISH_ENTRIES
        else:
            for e in range(0, cnt, FINISH_ENTRIES):
                _sr_finish(idx_row, e, cnt, part_base, stride_pe, t, m, z_inv_w, out_heads, head_ok, QB * PP, RP,
                           FINISH_ENTRIES)
    else:
        if INTERP:
            e = 0
            while e < cnt:
                m, z = _sr_stats(q, K, stride_kn, idx_row, g, i, e, offs_n, offs_d, pos, N, qk_scale, m, z,
                                 BS, BLOCK_N, DOT_PRECISION)
                e += 1
        else:
            for e in range(0, cnt):
                m, z = _sr_stats(q, K, stride_kn, idx_row, g, i, e, offs_n, offs_d, pos, N, qk_scale, m, z,
                                 BS, BLOCK_N, DOT_PRECISION)
        scale_rows = tl.where(w > 0, w_rows / tl.where(z > 0, z, 1.0), 0.0)
        m = tl.where(m == float("-inf"), 0.0, m)
        if INTERP:
            e = 0
            while e < cnt:
                _sr_mass(q, K, stride_kn, idx_row, g, i, e, offs_n, offs_d, pos, N, qk_scale, m, scale_rows,
                         out_heads, head_ok, BS, BLOCK_N, QB * PP, RP, DOT_PRECISION)
                e += 1
        else:
            for e in range(0, cnt):
                _sr_mass(q, K, stride_kn, idx_row, g, i, e, offs_n, offs_d, pos, N, qk_scale, m, scale_rows,
                         out_heads, head_ok, BS, BLOCK_N, QB * PP, RP, DOT_PRECISION)


def program_layout(group: int, rows: int, block_size: int, heads: int | None = None) -> tuple[int, int, int]:
    """``(P, P', RP)``: the query heads of one program, ``heads`` or else the most (a divisor of ``group``, at most
    :data:`MEMBER_BITS`) whose padded sampled rows fill at most 128 rows once the head count is padded to ``P'``, a
    power of two (at least 1); that padded count; and the padded rows per head (``max(2, next_pow2(min(rows,
    block_size)))``, raised so that a program has at least the 16 rows ``tl.dot`` needs)."""
    rp = max(2, triton.next_power_of_2(min(rows, block_size)))
    if heads is None:
        heads = max(h for h in range(1, min(group, MEMBER_BITS.value) + 1)
                    if group % h == 0 and (h == 1 or triton.next_power_of_2(h) * rp <= 128))
    elif (isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or group % heads
          or heads > MEMBER_BITS.value):
        raise ValueError(f"sampled_rows_mass: heads_per_program must divide the group of {group} query heads per "
                         f"key head and be at most {MEMBER_BITS.value}, got {heads!r}")
    pp = triton.next_power_of_2(heads)
    return heads, pp, max(rp, 16 // pp)


FILL_ROWS = 64
"""Rows a program is filled to with consecutive query blocks when its heads hold fewer (:func:`blocks_to_fill`)."""


def blocks_to_fill(pp: int, rp: int) -> int:
    """The query blocks a program holds by default: the most (a power of two, at most :data:`MEMBER_BITS` members)
    whose ``P' x RP`` rows stay within :data:`FILL_ROWS`, at least 1. A program of one head's 16 rows (a key head per
    query head) then holds 4 blocks: 3.4x faster on an H100 at 32:32 heads, D 128, 32k, where filling on to 128 rows
    gained nothing more, and a 64-row program of 4 heads gained nothing from 2 blocks (docs/bench_rerank.md). It also
    keeps programs off 32 rows where it can (groups of 4 heads at 8 rows, as Llama-3's 32:8 and SmolLM2's 9:3, take 2
    blocks): 2 blocks of one head's 16 rows, the one 32-row layout timed, gave masses 4e-3 to 9e-3 off the reference
    on an H100 (the same section)."""
    qb = 1
    while 2 * qb * pp <= MEMBER_BITS.value and 2 * qb * pp * rp <= FILL_ROWS:
        qb *= 2
    return qb


@triton.jit
def _sr_union_chunk(crow, irow, c0, base, r, P, NB, stride_ch, stride_cr, stride_cc, PP: tl.constexpr,
                    QB: tl.constexpr, CHUNK: tl.constexpr):
    """Columns ``c0 ..`` of group ``r``'s union list: the blocks one of its members (query block ``r * QB + g // PP``
    of head ``g % PP``, the ``P`` heads' ``QB`` blocks) lists at or before its own block, packed with the members'
    bits."""
    cols = c0 + tl.arange(0, CHUNK)
    members = tl.arange(0, QB * PP)
    blk = r * QB + members // PP
    listed = tl.load(crow + (members % PP)[:, None] * stride_ch + blk[:, None].to(tl.int64) * stride_cr
                     + cols[None, :] * stride_cc,
                     mask=((members % PP < P) & (blk < NB))[:, None] & (cols[None, :] <= blk[:, None]), other=0) != 0
    bits = tl.sum(listed.to(tl.int32) << members[:, None], 0)
    return append_selected(irow, base, bits != 0, (cols << MEMBER_BITS) | bits)


@triton.jit
def _sr_union_index_kernel(
    Cand, Idx, Cnt,
    stride_cb, stride_cl, stride_cr, stride_cc, stride_ib, stride_il, stride_ir, stride_nb, stride_nl,
    LISTS, NB, stride_ch, P,
    CHUNK: tl.constexpr, INTERP: tl.constexpr, PP: tl.constexpr, QB: tl.constexpr,
):
    r = tl.program_id(0)  # the group of query blocks r * QB ..
    bl = tl.program_id(1)
    off_b = (bl // LISTS).to(tl.int64)
    off_l = (bl % LISTS).to(tl.int64)
    crow = Cand + off_b * stride_cb + off_l * stride_cl
    irow = Idx + off_b * stride_ib + off_l * stride_il + r.to(tl.int64) * stride_ir
    end = tl.minimum(r * QB + QB, NB)  # past the group's last causal block
    base = 0
    if INTERP:  # run-time loop bound: see seer.kernels.common
        c0 = 0
        while c0 < end:
            base = _sr_union_chunk(crow, irow, c0, base, r, P, NB, stride_ch, stride_cr, stride_cc, PP, QB, CHUNK)
            c0 += CHUNK
    else:
        for c0 in range(0, end, CHUNK):
            base = _sr_union_chunk(crow, irow, c0, base, r, P, NB, stride_ch, stride_cr, stride_cc, PP, QB, CHUNK)
    tl.store(Cnt + off_b * stride_nb + off_l * stride_nl + r, base)


def union_lists(candidates: torch.Tensor, heads: int, blocks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The lists the kernel walks: for each batch, program list ``l`` (query heads ``l * heads ..`` of one key head:
    ``heads`` divides the group) and group ``r`` of ``blocks`` query blocks (``r * blocks ..``), the ascending union of
    the blocks each member (a head's query block ``i``) lists at or before ``i``, each entry packed as
    ``c << MEMBER_BITS | bits``: bit ``g`` set where member ``g`` (block ``r * blocks + g // P'``, the list's
    ``g % P'``-th head, ``P'`` = ``heads`` padded to a power of two) lists ``c``. int32 ``[B, Hq / heads, groups, nb]``,
    and the lengths int32 ``[B, Hq / heads, groups]`` (entries past a length unwritten). One launch of
    :func:`seer.kernels.block_index.build_lists` over each list's first head."""
    nb = candidates.shape[-1]
    return build_lists(_sr_union_index_kernel, candidates[:, ::heads], triton.cdiv(nb, blocks),
                       lambda shape, dtype, device: torch.empty(shape, dtype=dtype, device=device),
                       candidates.stride(1), heads, PP=triton.next_power_of_2(heads), QB=blocks)


def sampled_rows_mass(q: torch.Tensor, k: torch.Tensor, candidates: torch.Tensor, rows: int, block_size: int = 64,
                      sm_scale: float | None = None, heads_per_program: int | None = None,
                      passes: int = 1, blocks_per_program: int | None = None) -> torch.Tensor:
    """Block masses ``[B, Hq, nb, nb]`` float32 of ``rows`` sampled query rows per block over each row's candidate
    blocks (module docstring), 0 off the candidates.

    ``q`` ``[B, Hq, N, D]``, ``k`` ``[B, Hkv, N, D]`` (``Hq % Hkv == 0``; post-RoPE), fp16/bf16/fp32, any strides with a
    unit last stride; ``candidates`` bool ``[B, Hq, nb, nb]`` (``nb = ceil(N / block_size)``; entries above the
    diagonal ignored), each row's diagonal block among them; ``rows`` 1 .. ``block_size`` (more are clipped to it); a
    kernel block size (16 .. 128); ``sm_scale`` defaults to ``D ** -0.5``; ``heads_per_program`` (a divisor of
    ``Hq / Hkv``) overrides :func:`program_layout`'s choice (1: the kernel before the heads of a group shared a
    program); ``passes`` 1 (one pass over the keys and a scratch of partial sums, at most :data:`SCRATCH_BYTES` per
    launch) or 2 (two passes, no scratch), the same masses; ``blocks_per_program`` (1, 2, 4 or 8, at most 8 members
    and 128 rows a program with the heads: a power of two times the padded heads) puts that many consecutive query
    blocks of the program's heads in one program, which walks the union of their lists (each key tile read once for
    them all: for groups of few heads); None: :func:`blocks_to_fill`. CUDA tensors, or CPU ones under
    ``TRITON_INTERPRET=1``. No autograd, no host sync."""
    check_block_size(block_size)
    b, hq, hkv, n, d = check_qkv(q, k, None)
    nb = triton.cdiv(n, block_size)
    if candidates.dtype != torch.bool or tuple(candidates.shape) != (b, hq, nb, nb):
        raise ValueError(f"sampled_rows_mass: candidates must be bool [B, Hq, nb, nb] = {(b, hq, nb, nb)}, got "
                         f"{candidates.dtype} {tuple(candidates.shape)}")
    if nb >= 1 << (31 - MEMBER_BITS.value):
        raise ValueError(f"sampled_rows_mass: {nb} key blocks of {block_size} tokens; the lists hold fewer than "
                         f"{1 << (31 - MEMBER_BITS.value)} (a larger block_size)")
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"sampled_rows_mass: rows must be an integer >= 1, got {rows!r}")
    if passes not in (1, 2):
        raise ValueError(f"sampled_rows_mass: passes must be 1 or 2, got {passes!r}")
    check_device(q=q, k=k, candidates=candidates)
    per_block = min(rows, block_size)
    q, k = with_unit_last_stride(q), with_unit_last_stride(k)
    group = hq // hkv
    p, pp, rp = program_layout(group, per_block, block_size, heads_per_program)
    qb = blocks_to_fill(pp, rp) if blocks_per_program is None else blocks_per_program
    if (isinstance(qb, bool) or not isinstance(qb, int) or qb not in (1, 2, 4, 8) or qb * pp > MEMBER_BITS.value
            or qb * pp * rp > 128):
        raise ValueError(f"sampled_rows_mass: blocks_per_program must be 1, 2, 4 or 8 with at most "
                         f"{MEMBER_BITS.value // pp} here ({pp} padded heads of {rp} rows: at most "
                         f"{MEMBER_BITS.value} members and 128 rows a program), got {qb!r}")
    chunks = group // p
    lists = hkv * chunks
    groups = triton.cdiv(nb, qb)
    idx, cnt = union_lists(candidates, p, qb)
    out = torch.zeros(b, hq, nb, nb, dtype=torch.float32, device=q.device)
    last = n - (nb - 1) * block_size
    offsets = sampled_offsets(block_size, per_block)
    # one pass: each launch takes the groups of query blocks whose scratch (a float per sampled row and list entry, at
    # most nb entries) fits SCRATCH_BYTES
    per_group_bytes = b * lists * nb * qb * pp * rp * 4
    span = groups if passes == 2 else max(1, min(groups, SCRATCH_BYTES // per_group_bytes))
    part = torch.empty((b * lists, span, nb, qb * pp * rp) if passes == 1 else (1, 1, 1, 1), dtype=torch.float32,
                       device=q.device)
    launch = {"num_warps": LAUNCH["num_warps"]}
    if LAUNCH["num_stages"]:
        launch["num_stages"] = LAUNCH["num_stages"]
    heaviest = bool(LAUNCH["heaviest_first"])
    # key-tile width: a block at a time under the interpreter, at most 64 keys on CUDA, or LAUNCH's (capped at a block)
    if LAUNCH["block_n"] not in (None, 16, 32, 64):
        raise ValueError(f"sampled_rows.LAUNCH['block_n'] must be None, 16, 32 or 64, got {LAUNCH['block_n']!r}")
    block_n = min(LAUNCH["block_n"] or (block_size if INTERPRET else 64), block_size)
    if heaviest:  # the groups on the grid's second axis, which holds at most 65535 programs
        span = min(span, MAX_GRID_Y)
    for g0 in range(0, groups, span):
        launched = min(span, groups - g0)
        _LAST["compiled"] = _sampled_rows_kernel[(b * lists, launched) if heaviest else (launched, b * lists)](
            q, k, idx, cnt, out, part,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            idx.stride(0), idx.stride(1), idx.stride(2), cnt.stride(0), cnt.stride(1),
            out.stride(0), out.stride(1), out.stride(2),
            part.stride(0), part.stride(1), part.stride(2), g0, lists, chunks, group, n,
            softmax_scale(sm_scale, d) * LOG2E.value,
            D=d, BS=block_size, R=per_block, RP=rp, P=p, PP=pp, QB=qb,
            BLOCK_N=block_n,
            LAST_FALLBACK=min(offsets) >= last,
            ONE_PASS=passes == 1, DOT_PRECISION=dot_precision(q.dtype), HEAVIEST_FIRST=heaviest,
            INTERP=INTERPRET,
            **launch,
        )
    return out
