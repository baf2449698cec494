"""Block-sparse causal FlashAttention forward in Triton (SeerAttention's inference kernel).

Math
----
Let ``B`` be the mask block size, ``q_i``, ``k_j``, ``v_j`` rows of one query head and of the key/value head it
reads (grouped-query attention: query head ``h`` reads key/value head ``h // (Hq // Hkv)``). Query row ``i``
lies in query block ``r = i // B``; it may attend to key ``j`` when ``j <= i`` (causal) and the mask selects
key block ``c = j // B`` for row block ``r``:

.. math::

    S(i) = \\{ j \\le i : \\mathrm{mask}[r, j // B] \\},\\quad
    s_{ij} = \\mathrm{scale}\\, q_i \\cdot k_j,\\quad
    \\mathrm{out}_i = \\frac{\\sum_{j \\in S(i)} e^{s_{ij}} v_j}{\\sum_{j \\in S(i)} e^{s_{ij}}},\\quad
    \\mathrm{lse}_i = \\log \\sum_{j \\in S(i)} e^{s_{ij}}.

An empty ``S(i)`` gives ``out_i = 0`` and ``lse_i = -inf``. Mask entries above the diagonal (``c > r``) are
ignored, so a mask may be given with or without its upper triangle.

As in the fused-attention tutorial of Triton, the softmax is computed online, one key tile at a time, in
base 2 with ``log2(e)`` folded into the scale: with ``t_ij = (scale * log2 e) q_i . k_j``, a running row max
``m``, denominator ``l`` and accumulator ``acc``, every tile does

.. math::

    m' = \\max(m, \\max_j t_{ij}),\\quad \\alpha = 2^{m - m'},\\quad p_{ij} = 2^{t_{ij} - m'},\\quad
    l \\leftarrow \\alpha l + \\textstyle\\sum_j p_{ij},\\quad acc \\leftarrow \\alpha\\, acc + p V,\\quad
    m \\leftarrow m',

and at the end ``out = acc / l`` and ``lse = ln 2 * (m + log2 l)``.

Sparsity
--------
The kernel never scans the mask: :func:`build_block_index` turns the boolean block mask, on the GPU and
without a host synchronisation, into a compact per-row list of the selected key blocks in ascending order
(``kv_indices``, ``kv_counts``), and each program walks its row's list. Only selected K/V tiles are read and
multiplied. Since the list is ascending, the diagonal block (the only one needing the causal and bounds masks)
comes last, so the loop over off-diagonal blocks carries no masks at all.

Two list layouts exist:

* ``row`` (the public one): ``kv_indices[b, h, r, :kv_counts[b, h, r]]`` are the selected key blocks of query
  block ``r``; one program computes one query block of ``B`` rows.
* ``pair`` (optional, for 64-token blocks): one list per pair of query blocks ``(2p, 2p + 1)``, the union
  of both rows' selections, each entry ``4 * c + bits`` with bit 0 set when block ``2p`` selected ``c`` and
  bit 1 when block ``2p + 1`` did. One program computes 128 query rows (better tensor-core tiles, half the K/V
  tile loads), masking the rows of a half that did not select the key block.

Programs are launched with the last (longest, under a causal mask) query blocks of a head first, heads one
after another so that concurrently running programs share a head's K/V in L2.

Hopper path (compile-time switches, chosen by the launch table on devices of capability >= 9): ``USE_TMA`` moves
the Q, K, V tiles in and the output tile out with the copy engine (tensor descriptors over one head's ``[N, D]``
rows: reads past ``N`` are zero-filled, writes past ``N`` dropped, so no bounds masks).

Packed sequences (``VARLEN``, :func:`block_sparse_attn_varlen`): the "batch" index ``b`` is a sequence of one packed
row, the tokens ``[Cu[b], Cu[b + 1])``; the batch strides are 0 and every pointer starts at token ``Cu[b]``, so the
math above runs on each sequence alone with ``N = Cu[b + 1] - Cu[b]`` (blocks aligned to its first token). Only the
programs of query blocks inside a sequence are launched, a 1-d grid over ``Order``
(:func:`seer.kernels.common.varlen_order`) in the per-head order above (each sequence and head in turn, its last
block first), not the longest sequence's block count for every sequence.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from seer.kernels.block_index import build_block_index, check_mask, mask_heads
from seer.kernels.block_sparse_bwd import block_sparse_attn_backward, build_block_col_index, launch_backward
from seer.kernels.common import (INTERPRET, LN2, LOG2E, check_block_size, check_device, check_qkv, check_varlen,
                                 dot_precision, is_hopper, output, softmax_scale, tiles_invalid, tma_ok, varlen_order,
                                 with_unit_last_stride, with_variants)
from seer.kernels.tuning import LaunchTable

__all__ = ["block_sparse_attn", "block_sparse_attn_indexed", "block_sparse_attn_varlen", "build_block_index",
           "heaviest_first"]


# ----------------------------------------------------------------------------------------------------------
# Attention kernel
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _bs_tile(acc, l_i, m_i, q, k_base, v_base, kstart, offs_m, offs_n, offs_d, rowsel,
             stride_kn, stride_vn, N, qk_scale,
             DIAG: tl.constexpr, PAIR: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """One key tile of the online softmax (``DIAG``: apply the causal and bounds masks). With ``USE_TMA``,
    ``k_base``/``v_base`` are tensor descriptors (the copy engine zero-fills rows past N)."""
    offs_k = kstart + offs_n
    if USE_TMA:
        kt = tl.trans(k_base.load([kstart, 0]))
    elif DIAG:
        kt = tl.load(k_base + offs_k[None, :] * stride_kn + offs_d[:, None], mask=offs_k[None, :] < N, other=0.0)
    else:
        kt = tl.load(k_base + offs_k[None, :] * stride_kn + offs_d[:, None])
    qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
    if DIAG:
        keep = offs_k[None, :] <= offs_m[:, None]
        if PAIR:
            keep = keep & rowsel[:, None]
        qk = tl.where(keep, qk, float("-inf"))
    elif PAIR:
        qk = tl.where(rowsel[:, None], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    if DIAG or PAIR:  # a row may have seen only masked keys so far: keep exp2 away from (-inf) - (-inf)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.math.exp2(qk * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if USE_TMA:
        v = v_base.load([kstart, 0])
    elif DIAG:
        v = tl.load(v_base + offs_k[:, None] * stride_vn + offs_d[None, :], mask=offs_k[:, None] < N, other=0.0)
    else:
        v = tl.load(v_base + offs_k[:, None] * stride_vn + offs_d[None, :])
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _bs_entry(acc, l_i, m_i, q, k_base, v_base, idx_ptr, t, is_top, offs_m, offs_n, offs_d,
              stride_kn, stride_vn, N, qk_scale, DIAG: tl.constexpr, PAIR: tl.constexpr,
              MASK_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
              USE_TMA: tl.constexpr):
    """All key tiles of list entry ``t``."""
    e = tl.load(idx_ptr + t)
    if PAIR:
        kb = e >> 2
        rowsel = tl.where(is_top, (e & 1) != 0, (e & 2) != 0)
    else:
        kb = e
        rowsel = is_top
    for sub in tl.static_range(MASK_BLOCK // BLOCK_N):
        acc, l_i, m_i = _bs_tile(acc, l_i, m_i, q, k_base, v_base, kb * MASK_BLOCK + sub * BLOCK_N,
                                 offs_m, offs_n, offs_d, rowsel, stride_kn, stride_vn, N, qk_scale,
                                 DIAG=DIAG, PAIR=PAIR, DOT_PRECISION=DOT_PRECISION, USE_TMA=USE_TMA)
    return acc, l_i, m_i


@triton.jit
def _bs_attn_fwd_kernel(
    Q, K, V, Out, Lse, Idx, Cnt, Order, Cu,
    qk_scale,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_lb, stride_lh,
    stride_ib, stride_ih, stride_ir,
    stride_cb, stride_ch,
    N, HQ, N_ROWPROG, GROUP, MASK_GROUP,
    HEAD_DIM: tl.constexpr, MASK_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAIR: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERP: tl.constexpr, USE_TMA: tl.constexpr,
    SORTED: tl.constexpr, VARLEN: tl.constexpr,
):
    if SORTED:  # a 1-d grid over Order: (batch x head, row program) packed (heaviest first, or varlen's real ones)
        packed = tl.load(Order + tl.program_id(0))
        pid_bh = packed // N_ROWPROG
        pid_m = packed % N_ROWPROG
    else:  # per head, the longest (last) query blocks first
        pid_m = N_ROWPROG - 1 - tl.program_id(0)
        pid_bh = tl.program_id(1)
    off_b = (pid_bh // HQ).to(tl.int64)
    off_h = pid_bh % HQ
    off_hkv = (off_h // GROUP).to(tl.int64)
    off_hm = (off_h // MASK_GROUP).to(tl.int64)
    off_h = off_h.to(tl.int64)
    tok0 = off_b * 0
    if VARLEN:  # sequences packed in one row (batch strides 0): "batch" b is tokens Cu[b] .. Cu[b + 1] - 1
        tok0 = tl.load(Cu + off_b).to(tl.int64)
        N = (tl.load(Cu + off_b + 1) - tok0).to(tl.int32)

    q_base = Q + off_b * stride_qb + off_h * stride_qh + tok0 * stride_qn
    k_base = K + off_b * stride_kb + off_hkv * stride_kh + tok0 * stride_kn
    v_base = V + off_b * stride_vb + off_hkv * stride_vh + tok0 * stride_vn
    o_base = Out + off_b * stride_ob + off_h * stride_oh + tok0 * stride_on
    if USE_TMA:  # one head's [N, D] rows of each tensor; the copy engine zero-fills reads and drops writes past N
        q_desc = tl.make_tensor_descriptor(q_base, shape=[N, HEAD_DIM], strides=[stride_qn, 1],
                                           block_shape=[BLOCK_M, HEAD_DIM])
        o_desc = tl.make_tensor_descriptor(o_base, shape=[N, HEAD_DIM], strides=[stride_on, 1],
                                           block_shape=[BLOCK_M, HEAD_DIM])
        k_base = tl.make_tensor_descriptor(k_base, shape=[N, HEAD_DIM], strides=[stride_kn, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        v_base = tl.make_tensor_descriptor(v_base, shape=[N, HEAD_DIM], strides=[stride_vn, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
    idx_ptr = Idx + off_b * stride_ib + off_hm * stride_ih + pid_m.to(tl.int64) * stride_ir
    cnt = tl.load(Cnt + off_b * stride_cb + off_hm * stride_ch + pid_m)
    if VARLEN:  # a query block at or past the sequence's end reads nothing (and stores nothing: rows >= N); Order
        cnt = tl.where(pid_m * BLOCK_M < N, cnt, 0)  # lists none, this only keeps the kernel safe

    row0 = pid_m * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if USE_TMA:
        q = q_desc.load([row0, 0])
    else:
        q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=offs_m[:, None] < N, other=0.0)

    # entries at or past the program's first query block need the causal mask; they are the last one or two
    first_diag = row0 // MASK_BLOCK
    last = tl.load(idx_ptr + tl.maximum(cnt - 1, 0))
    if PAIR:
        prev = tl.load(idx_ptr + tl.maximum(cnt - 2, 0))
        n_off = cnt - ((cnt > 0) & ((last >> 2) >= first_diag)).to(tl.int32) \
            - ((cnt > 1) & ((prev >> 2) >= first_diag)).to(tl.int32)
        is_top = offs_m < row0 + MASK_BLOCK
    else:
        n_off = cnt - ((cnt > 0) & (last >= first_diag)).to(tl.int32)
        is_top = offs_m < 0  # unused

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    if INTERP:  # run-time loop bound: see seer.kernels.common
        t = 0
        while t < n_off:
            acc, l_i, m_i = _bs_entry(acc, l_i, m_i, q, k_base, v_base, idx_ptr, t, is_top, offs_m, offs_n,
                                      offs_d, stride_kn, stride_vn, N, qk_scale, False, PAIR, MASK_BLOCK, BLOCK_N,
                                      DOT_PRECISION, USE_TMA)
            t += 1
    else:
        for t in range(0, n_off):
            acc, l_i, m_i = _bs_entry(acc, l_i, m_i, q, k_base, v_base, idx_ptr, t, is_top, offs_m, offs_n,
                                      offs_d, stride_kn, stride_vn, N, qk_scale, False, PAIR, MASK_BLOCK, BLOCK_N,
                                      DOT_PRECISION, USE_TMA)
    t = n_off
    while t < cnt:  # the diagonal entries: one (row layout) or up to two (pair layout)
        acc, l_i, m_i = _bs_entry(acc, l_i, m_i, q, k_base, v_base, idx_ptr, t, is_top, offs_m, offs_n, offs_d,
                                  stride_kn, stride_vn, N, qk_scale, True, PAIR, MASK_BLOCK, BLOCK_N,
                                  DOT_PRECISION, USE_TMA)
        t += 1

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    if USE_TMA:
        o_desc.store([row0, 0], out.to(Out.dtype.element_ty))
    else:
        tl.store(o_base + offs_m[:, None] * stride_on + offs_d[None, :], out.to(Out.dtype.element_ty),
                 mask=offs_m[:, None] < N)
    tl.store(Lse + off_b * stride_lb + off_h * stride_lh + tok0 + offs_m, lse, mask=offs_m < N)


# ----------------------------------------------------------------------------------------------------------
# Launch configurations (seer.kernels.tuning): per (head dim, mask block, pair) on CUDA, the default picked
# offline from a sweep on an H100 (`experiments/bench_sparse.py --tune`, B 1, 32 heads, 32k, density 1.0 and
# 0.1): the best config depends on the density, which a timing at the first call would sample by chance, and
# the first prefill of a model (or its CUDA-graph capture) pays no tuning runs. USE_TMA: read Q/K/V and write
# the output through the copy engine when the tensors allow it (:func:`seer.kernels.common.tma_ok`, capability
# >= 9). On a device of capability >= 9 the table adds the default with USE_TMA on after the default where that
# differs from it (:data:`HOPPER_VARIANTS`), so there the runtime tuner times both at the first call of a key
# (autotuning off: the default); elsewhere the default is the only candidate.
# Measured on an H200 (`experiments/bench_hopper.py`, docs/bench_hopper.md; 32k, B 1, 32 heads, D 128, bf16,
# 64-token blocks): row default (BN64 w4 s2 TMA) 19.59 ms dense, 2.245 ms at density 0.1; pair default (BN64 w8
# s3, no TMA) 19.66 / 3.227 ms; pair BN64 w8 s3 TMA (its Hopper candidate) 18.85 / 3.288 ms; SDPA flash 25.22 ms,
# cuDNN 14.78 ms (dense causal). A warp-specialised single-loop variant was removed after that run: it gave NaN or
# wrong outputs on the H200, and its correct configs were 1.8x-2.3x slower than the row default.
# ----------------------------------------------------------------------------------------------------------

FIELDS = ("BLOCK_N", "num_warps", "num_stages", "USE_TMA")

_H100_CONFIGS: dict[tuple[int, int, bool], dict] = {
    # H100: 19.5 ms (451 TF/s) dense, 2.14 ms at density 0.1
    (128, 64, False): dict(BLOCK_N=64, num_warps=4, num_stages=2, USE_TMA=True),
    # H100: 19.1 ms dense, 3.15 ms at density 0.1 (lists of pairs are longer)
    (128, 64, True): dict(BLOCK_N=64, num_warps=8, num_stages=3, USE_TMA=False),
    # H100: 18.7 ms (471 TF/s) dense, 2.05 ms at density 0.1
    (128, 128, False): dict(BLOCK_N=128, num_warps=8, num_stages=3, USE_TMA=False),
    # H100: 10.0 ms dense, 1.20 ms at density 0.1
    (64, 64, False): dict(BLOCK_N=64, num_warps=4, num_stages=2, USE_TMA=True),
    (64, 64, True): dict(BLOCK_N=64, num_warps=8, num_stages=3, USE_TMA=True),
    # H100: 9.9 ms dense, 1.22 ms at density 0.1
    (64, 128, False): dict(BLOCK_N=64, num_warps=8, num_stages=2, USE_TMA=True),
}

# what the Hopper candidate changes in a key's default: the copy engine (a second candidate only where the default
# has USE_TMA off: at D 128 the pair layout and 128-token blocks, and the keys outside the table)
HOPPER_VARIANTS: tuple[dict, ...] = (dict(USE_TMA=True),)

# keys whose default on Hopper differs from the table's: no software pipelining (num_stages 1) with the copy engine
# holds a third of the shared memory, so four programs share an SM instead of two. H100, 2026-12-08
# (docs/bench_hopper.md, last section): row BN64 w4 s1 with TMA 17.75 ms dense and 2.04 ms at density 0.1 against
# the table's 19.44 and 2.33 ms (32k, 32 heads, D 128). Elsewhere (no copy engine) the table's default stays.
HOPPER_DEFAULTS: dict[tuple[int, int, bool], dict] = {
    (128, 64, False): dict(num_stages=1, USE_TMA=True),
}


def _default_config(key: tuple[int, int, bool]) -> dict:
    _, block, pair = key
    if key in _H100_CONFIGS:
        return _H100_CONFIGS[key]
    return dict(BLOCK_N=min(block, 64), num_warps=8 if (2 * block if pair else block) >= 128 else 4, num_stages=2,
                USE_TMA=False)


def hopper_default(key: tuple[int, int, bool]) -> dict:
    """The default config of ``key`` on a device of capability >= 9: the table's, with :data:`HOPPER_DEFAULTS`."""
    return dict(_default_config(key), **HOPPER_DEFAULTS.get(key, {}))


def _cuda_config(key: tuple[int, int, bool]) -> list[dict]:
    if not is_hopper(torch.device("cuda", torch.cuda.current_device())):
        return [_default_config(key)]
    return with_variants([hopper_default(key)], HOPPER_VARIANTS)


CONFIGS = LaunchTable("block_sparse", FIELDS, _cuda_config,
                      lambda key: dict(BLOCK_N=key[1], num_warps=4, num_stages=1, USE_TMA=False),
                      tiles_invalid)


def heaviest_first(kv_counts: torch.Tensor, hq: int) -> torch.Tensor:
    """The row programs of ``kv_counts [B, Hm, R]`` (expanded to ``hq`` query heads) as int32 ``(b * hq + h) * R +
    r``, ordered by list length, longest first (ties: later rows first, as the per-head order), so that when
    budgets differ by head the heaviest programs start first instead of forming a tail. On the device, no sync."""
    b, hm, rows = kv_counts.shape
    work = kv_counts.repeat_interleave(hq // hm, dim=1).flip(-1).reshape(-1)
    packed = torch.arange(b * hq * rows, device=kv_counts.device, dtype=torch.int32).view(b * hq, rows).flip(-1)
    return packed.reshape(-1)[torch.argsort(work, descending=True, stable=True)]


def _forward(q, k, v, kv_indices, kv_counts, block_size, sm_scale, pair, out, lse, schedule="rows", cu_seqlens=None,
             seqlens=None):
    """The launch. With ``cu_seqlens`` (int32 ``[S + 1]``) and ``seqlens`` (the ``S`` lengths, on the host),
    ``q``/``k``/``v``/``out`` ``[1, H, T, D]`` and ``lse`` ``[1, Hq, T]`` hold ``S`` sequences packed in one row, the
    lists are per sequence (``[S, Hm, R, nb]``) and only the row programs inside a sequence are launched, in the
    per-head order (:func:`seer.kernels.common.varlen_order`; ``schedule`` is not used)."""
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    scale = softmax_scale(sm_scale, d)
    out = output("out", out, tuple(q.shape), q.dtype, q.device, contiguous=False)
    lse = output("lse", lse, (b, hq, n), torch.float32, q.device, contiguous=False)
    varlen = cu_seqlens is not None
    seqs = kv_counts.shape[0]
    if n == 0 or seqs * hq == 0:
        return out, lse
    q, k, v = with_unit_last_stride(q), with_unit_last_stride(k), with_unit_last_stride(v)
    block_m = 2 * block_size if pair else block_size
    n_rowprog = kv_counts.shape[2] if varlen else triton.cdiv(n, block_m)
    if varlen:  # the real row programs only, in the per-head order: a short sequence launches none past its end
        order = varlen_order(cu_seqlens, seqlens, hq, block_m, n_rowprog, last_first=True)
        if order.numel() == 0:
            return out, lse
    else:
        order = heaviest_first(kv_counts, hq) if _sorted(schedule) else None
    grid = (n_rowprog, seqs * hq) if order is None else (order.numel(),)

    def batch_stride(t: torch.Tensor) -> int:
        return 0 if varlen else t.stride(0)

    def run(config: dict):
        use_tma = config["USE_TMA"] and not varlen and tma_ok(q, k, v, out)
        return _bs_attn_fwd_kernel[grid](
            q, k, v, out, lse, kv_indices, kv_counts, kv_counts if order is None else order,
            cu_seqlens if varlen else kv_counts,
            scale * LOG2E.value,
            batch_stride(q), q.stride(1), q.stride(2),
            batch_stride(k), k.stride(1), k.stride(2),
            batch_stride(v), v.stride(1), v.stride(2),
            batch_stride(out), out.stride(1), out.stride(2),
            batch_stride(lse), lse.stride(1),
            kv_indices.stride(0), kv_indices.stride(1), kv_indices.stride(2),
            kv_counts.stride(0), kv_counts.stride(1),
            n, hq, n_rowprog, hq // hkv, hq // kv_indices.shape[1],
            HEAD_DIM=d, MASK_BLOCK=block_size, BLOCK_M=block_m, PAIR=pair, DOT_PRECISION=dot_precision(q.dtype),
            INTERP=INTERPRET, SORTED=order is not None, VARLEN=varlen,
            **dict(config, USE_TMA=use_tma),
        )
    CONFIGS.launch((d, block_size, pair), run)
    return out, lse


SCHEDULES = ("rows", "heaviest_first")


def _sorted(schedule: str) -> bool:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: choose from {SCHEDULES}")
    return schedule == "heaviest_first"


def block_sparse_attn_indexed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indices: torch.Tensor,
                              kv_counts: torch.Tensor, block_size: int = 64, sm_scale: float | None = None, *,
                              pair: bool = False, out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                              schedule: str = "rows") -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse causal attention over prebuilt block lists (skips :func:`build_block_index`).

    ``kv_indices`` int32 ``[B, Hm, R, >= nb_used]`` and ``kv_counts`` int32 ``[B, Hm, R]`` as returned by
    :func:`build_block_index` (``pair=False``: ``R = nb = ceil(N / block_size)``; ``pair=True``: ``R =
    ceil(nb / 2)``), ``Hm`` = Hq (a list per query head) or Hkv (shared by each query-head group). Each list
    must be ascending and hold only blocks ``c <= r`` (``c <= 2p + 1`` for pair ``p``); nothing checks this
    on the device. Reuse one index across layers that share a mask. ``out``/``lse`` optionally receive the
    results in place (``out`` with q's shape and dtype, ``lse`` float32 ``[B, Hq, N]``).
    Returns ``(out [B, Hq, N, D] in q's dtype, lse [B, Hq, N] float32, natural log)``. Forward only: refuses
    q, k, v that require grad while grad is enabled (use :func:`block_sparse_attn` for gradients).
    """
    check_block_size(block_size)
    b, hq, hkv, n, d = check_qkv(q, k, v)
    for name, t in (("kv_indices", kv_indices), ("kv_counts", kv_counts)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32:
            raise ValueError(f"{name} must be an int32 tensor; got "
                             f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    nb = triton.cdiv(n, block_size)
    rows = (nb + 1) // 2 if pair else nb
    if kv_indices.dim() != 4 or kv_indices.shape[0] != b or kv_indices.shape[2] != rows \
            or kv_indices.shape[3] < nb or kv_indices.stride(3) != 1:
        raise ValueError(f"kv_indices must be [B, Hq or Hkv, {rows}, >= {nb}] with unit last stride for N={n}, "
                         f"block_size={block_size}, pair={pair}; got {tuple(kv_indices.shape)}")
    if kv_counts.shape != kv_indices.shape[:3] or kv_counts.stride(2) != 1:
        raise ValueError(f"kv_counts must be {tuple(kv_indices.shape[:3])} with unit last stride; "
                         f"got {tuple(kv_counts.shape)}")
    mask_heads(kv_indices.shape[1], hq, hkv, "kv_indices")
    check_device(q=q, k=k, v=v, kv_indices=kv_indices, kv_counts=kv_counts)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise ValueError("block_sparse_attn_indexed has no backward: use block_sparse_attn (from the bool mask) "
                         "for gradients, or call it under torch.no_grad()")
    return _forward(q, k, v, kv_indices, kv_counts, block_size, sm_scale, pair, out, lse, schedule)


def block_sparse_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor,
                      block_size: int = 64, sm_scale: float | None = None, *, pair: bool = False,
                      out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                      schedule: str = "rows") -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention restricted to the key blocks a boolean block mask selects (Triton; differentiable).

    ``q`` ``[B, Hq, N, D]``; ``k``, ``v`` ``[B, Hkv, N, D]`` with ``Hq % Hkv == 0`` (query head ``h`` reads
    key/value head ``h // (Hq // Hkv)``; K/V are not repeated). Any strides with a unit last stride (e.g. a
    ``[B, N, H, D]`` tensor transposed). ``block_mask`` bool ``[B, Hq, nb, nb]`` (one mask per query head) or
    ``[B, Hkv, nb, nb]`` (shared by a query-head group), ``nb = ceil(N / block_size)``; entries above the
    diagonal are ignored; inside the diagonal block attention is causal. float16 / bfloat16 (float32 for
    tests); head dim 16..256 (tuned for 64 and 128); block size 16, 32, 64 or 128 (tuned for 64 and 128).
    ``sm_scale`` defaults to ``1 / sqrt(D)``. A row that selects nothing gets ``out = 0``, ``lse = -inf``.

    Builds the block lists with :func:`build_block_index` (one small launch, no host sync) and runs the
    kernel. ``pair`` picks the list layout (see the module docstring): the default ``row`` layout; ``pair=True``
    is 2% faster at density 1.0 on an H100 but 1.5x slower at density 0.1 (the union of two rows' lists is longer
    than either), and the density is not known on the host without a sync. ``schedule``: the order programs
    start in: ``rows`` (per head, the last query blocks first; heads one after another, so concurrent programs
    share a head's K/V in L2) or ``heaviest_first`` (all programs by list length, longest first,
    :func:`heaviest_first`). On an H100 at 32k ``rows`` was faster for uniform and for per-head-skewed budgets
    alike (docs/bench_adaptive.md). ``out``/``lse`` optionally receive the results in place. Returns ``(out [B, Hq, N,
    D] in q's dtype, lse [B, Hq, N] float32, natural log)``, the same as
    :func:`seer.kernels.reference.block_sparse_attn`.

    When grad is enabled and q, k or v requires grad, both results are differentiable in q, k and v over the
    same block selection (Triton backward in :mod:`seer.kernels.block_sparse_bwd`; the mask gets no gradient)
    and ``out``/``lse`` buffers cannot be given. Otherwise nothing is recorded for autograd.
    """
    check_block_size(block_size)
    b, hq, hkv, n, d = check_qkv(q, k, v)
    check_mask(block_mask)
    nb = triton.cdiv(n, block_size)
    if block_mask.shape[0] != b or block_mask.shape[2] != nb:
        raise ValueError(f"block_mask must be [B, Hq or Hkv, nb, nb] = [{b}, {hq} or {hkv}, {nb}, {nb}] for "
                         f"N={n}, block_size={block_size}; got {tuple(block_mask.shape)}")
    mask_heads(block_mask.shape[1], hq, hkv, "block_mask")
    check_device(q=q, k=k, v=v, block_mask=block_mask)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _attn_with_grad(q, k, v, block_mask, block_size, sm_scale, pair, out, lse)
    kv_indices, kv_counts = build_block_index(block_mask, pair=pair)
    return _forward(q, k, v, kv_indices, kv_counts, block_size, sm_scale, pair, out, lse, schedule)


def block_sparse_attn_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                             block_mask: torch.Tensor, block_size: int = 64, sm_scale: float | None = None, *,
                             seqlens: list[int] | None = None, out: torch.Tensor | None = None,
                             lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse causal attention of sequences packed in one row (FlashAttention's varlen layout; Triton).

    ``q [T, Hq, D]``, ``k``/``v`` ``[T, Hkv, D]`` (GQA as :func:`block_sparse_attn`); sequence ``s`` is the tokens
    ``cu_seqlens[s] .. cu_seqlens[s + 1] - 1`` (int32 ``[S + 1]``: 0 first, ``T`` last, never decreasing; empty
    sequences allowed). ``block_mask`` bool ``[S, Hq or Hkv, nb, nb]`` with ``nb >= ceil(longest / block_size)``:
    sequence ``s`` reads its top-left ``ceil(len_s / block_size)`` square, its blocks starting at its first token, so
    it gets what :func:`block_sparse_attn` gives it alone; no attention crosses sequences. One index build and one
    launch for all sequences, of only the programs of query blocks inside a sequence (not the longest sequence's
    count for each), in the per-head order of :func:`block_sparse_attn`: each sequence and head in turn, its last
    block first, so programs sharing a head's K/V run together in L2 (docs/bench_varlen.md: on an H200, 8 prompts
    of 2k-32k at density 0.1, 4.87 ms against 5.36 ms for the padded per-head grid and 5.08 ms one by one). The
    launch needs the lengths on the host: ``seqlens`` (a list of the ``S`` lengths, as ``cu_seqlens`` holds them;
    checked against ``T``, not against the device tensor) gives them without a device sync, else ``cu_seqlens`` is
    read once (one host sync, after which the GPU idles while the host builds the index and launches: 5.35 ms in
    the same run). K/V are read without the copy engine (TMA). ``out [T, Hq, D]`` / ``lse
    [Hq, T]`` optionally receive the results. Returns ``(out in q's dtype, lse float32, natural log)``, as
    :func:`seer.kernels.reference.block_sparse_attn_varlen`.

    When grad is enabled and q, k or v requires grad, both results are differentiable in q, k and v (the Triton
    backward of :mod:`seer.kernels.block_sparse_bwd` over the packed row; ``out``/``lse`` buffers cannot be given).
    """
    check_block_size(block_size)
    seqlens = check_varlen(q, k, v, cu_seqlens, block_mask, block_size, seqlens)
    t, hq, d = q.shape
    check_qkv(*(x.transpose(0, 1).unsqueeze(0) for x in (q, k, v)))
    check_device(q=q, k=k, v=v, cu_seqlens=cu_seqlens, block_mask=block_mask)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        if out is not None or lse is not None:
            raise ValueError("out= and lse= cannot be used when q, k or v requires grad; call without them, or "
                             "under torch.no_grad()")
        return _BlockSparseAttnVarlenFunction.apply(q, k, v, cu_seqlens, seqlens, block_mask, block_size, sm_scale)
    return _varlen_forward(q, k, v, cu_seqlens, seqlens, block_mask, block_size, sm_scale, out, lse)


def _varlen_forward(q, k, v, cu_seqlens, seqlens, block_mask, block_size, sm_scale, out, lse):
    """:func:`block_sparse_attn_varlen` on checked inputs, without autograd."""
    t, hq, d = q.shape
    out = output("out", out, (t, hq, d), q.dtype, q.device, contiguous=False)
    lse = output("lse", lse, (hq, t), torch.float32, q.device, contiguous=False)
    kv_indices, kv_counts = build_block_index(block_mask)
    q4, k4, v4, out4 = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v, out))
    _forward(q4, k4, v4, kv_indices, kv_counts, block_size, sm_scale, False, out4, lse.unsqueeze(0),
             cu_seqlens=cu_seqlens, seqlens=seqlens)
    return out, lse


# ----------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------

class _BlockSparseAttnFunction(torch.autograd.Function):
    """``(out, lse) = block_sparse_attn(q, k, v, block_mask, ...)`` with a Triton backward; the mask (bool)
    carries no gradient."""

    @staticmethod
    def forward(ctx, q, k, v, block_mask, block_size, sm_scale, pair):
        kv_indices, kv_counts = build_block_index(block_mask, pair=pair)
        out, lse = _forward(q, k, v, kv_indices, kv_counts, block_size, sm_scale, pair, None, None)
        # the lists are not kept: rebuilt from the bool mask in the backward (two small launches), so a layer
        # holds nb^2 bytes per mask head between forward and backward instead of 4 nb^2 more for the lists
        ctx.save_for_backward(q, k, v, out, lse, block_mask)
        ctx.block_size, ctx.sm_scale = block_size, sm_scale
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @once_differentiable  # no double backward
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, block_mask = ctx.saved_tensors
        if dout is None and dlse is None:
            return (None,) * 7
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = block_sparse_attn_backward(dout, q, k, v, out, lse, block_mask, ctx.block_size, ctx.sm_scale,
                                                dlse=dlse)
        need = ctx.needs_input_grad
        return dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, None, None, None, None


class _BlockSparseAttnVarlenFunction(torch.autograd.Function):
    """``(out, lse) = block_sparse_attn_varlen(q, k, v, cu_seqlens, block_mask, ...)`` with the Triton backward run
    over the packed row; the offsets and the mask carry no gradient."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, seqlens, block_mask, block_size, sm_scale):
        out, lse = _varlen_forward(q, k, v, cu_seqlens, seqlens, block_mask, block_size, sm_scale, None, None)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, block_mask)
        ctx.block_size, ctx.sm_scale, ctx.seqlens = block_size, sm_scale, seqlens
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @once_differentiable  # no double backward
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_seqlens, block_mask = ctx.saved_tensors
        if dout is None and dlse is None:
            return (None,) * 8
        if dout is None:
            dout = torch.zeros_like(out)
        grads = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v)]  # all rows written
        as_rows = [x.transpose(0, 1).unsqueeze(0) for x in (dout, q, k, v, out, *grads)]
        launch_backward(*as_rows[:5], lse.unsqueeze(0), None if dlse is None else dlse.unsqueeze(0),
                        build_block_index(block_mask), build_block_col_index(block_mask), ctx.block_size,
                        ctx.sm_scale, *as_rows[5:], cu_seqlens=cu_seqlens, seqlens=ctx.seqlens)
        need = ctx.needs_input_grad
        return (*(g if need[i] else None for i, g in enumerate(grads)), None, None, None, None, None)


def _attn_with_grad(q, k, v, block_mask, block_size, sm_scale, pair, out, lse):
    """:func:`seer.kernels.block_sparse_attn` when q, k or v needs a gradient (inputs already checked)."""
    if out is not None or lse is not None:
        raise ValueError("out= and lse= cannot be used when q, k or v requires grad (results written into given "
                         "buffers are not differentiable); call without them, or under torch.no_grad()")
    return _BlockSparseAttnFunction.apply(q, k, v, block_mask, block_size, sm_scale, pair)
