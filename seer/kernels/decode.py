"""Block-sparse decode attention in Triton: a few new query tokens against a KV cache, over listed key blocks.

Math
----
Sequence ``b`` holds ``L = cache_seqlens[b]`` valid keys, its ``T`` new tokens last: query token ``t`` sits at
position ``p_t = L - T + t``. Query head ``h`` reads KV head ``g = h // (Hq // Hkv)``, whose list
``block_index[b, g]`` names key blocks (``-1`` is padding, a block listed twice counts once but with
``unique_blocks=True``). With ``B`` the block size:

.. math::

    S(t) = \\{ j \\le p_t : j // B \\in \\mathrm{block\\_index}[b, g] \\},\\quad
    s_{tj} = \\mathrm{scale}\\, q_t \\cdot k_j,\\quad
    \\mathrm{out}_t = \\frac{\\sum_{j \\in S(t)} e^{s_{tj}} v_j}{\\sum_{j \\in S(t)} e^{s_{tj}}},\\quad
    \\mathrm{lse}_t = \\log \\sum_{j \\in S(t)} e^{s_{tj}}

(``j <= p_t`` implies ``j < L``). An empty ``S(t)`` (no listed block reaches ``p_t``: impossible when the newest
block is listed) gives ``out_t = 0``, ``lse_t = -inf``.

Split-KV
--------
One program per (sequence, KV head, tile of query rows, split): the ``G x T`` query rows of a KV head's group
(``G = Hq / Hkv``) are stacked head-major as the M dimension of one tile (``BLOCK_M >= 16`` rows, several tiles when
``G x T > 64``), so each K/V tile is read once for the whole group. Split ``s`` of ``num_splits`` takes list
positions ``s, s + num_splits, ...`` (interleaved, so ``-1`` padding at the end of a list spreads over the splits).
Each program first compacts its positions into a dense list in scratch memory, keeping an entry when it is a block
that starts before ``L`` and no earlier position lists the same block (compared vectorised against the list;
skipped with ``unique_blocks=True``, where the caller promises unique lists), then walks the dense list with the
online softmax of FlashAttention in base 2 (``m``, ``l``, ``acc``; see :mod:`seer.kernels.block_sparse`), every
tile masked by ``j <= p_t``. A split writes its normalised partial output ``o_s`` and ``lse_s`` (base 2; ``-inf``
and zeros when it attended nothing); a second launch merges them:

.. math::

    m = \\max_s \\mathrm{lse}_s,\\quad w_s = 2^{\\mathrm{lse}_s - m},\\quad
    \\mathrm{out} = \\frac{\\sum_s w_s o_s}{\\sum_s w_s},\\quad
    \\mathrm{lse} = \\ln 2\\,(m + \\log_2 \\textstyle\\sum_s w_s).

With one split the first launch writes ``out`` and ``lse`` itself and there is no merge.

Lists read in place (``IN_PLACE``, a launch-config switch that applies with ``unique_blocks=True``): no compaction;
the program walks its list positions themselves, an entry that is padding or a block at or past ``L`` turning into a
key tile past ``L`` (every key masked, nothing read), so the first K/V loads wait on no scratch writes.

Copy engine (``USE_TMA``, a launch-config switch for devices of capability >= 9): the K/V tiles come through tensor
descriptors over the sequence's ``[L, D]`` keys and values (rows past ``L`` read as zeros, so no bounds masks); the
causal mask ``j <= p_t`` stays.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from seer.kernels.block_index import append_selected
from seer.kernels.common import (INTERPRET, LN2, LOG2E, check_device, dot_precision, softmax_scale, tiles_invalid,
                                 tma_ok, with_unit_last_stride)
from seer.kernels.decode_index import check_decode_args, check_decode_values
from seer.kernels.tuning import LaunchTable

__all__ = ["block_sparse_decode", "default_num_splits", "launch_plan"]

ENTRY_CHUNK = 32  # list positions a program compacts at a time
LIST_CHUNK = 64  # list positions compared against them at a time (the repeat check)
MERGE_CHUNK = 16  # splits the merge reads at a time
MAX_SPLITS = 65535  # the second grid axis


@triton.jit
def _dec_compact_chunk(idx_row, scr_row, n_kept, k0, split, n_mine, SPLITS, nb_valid,
                       ENTRY_CHUNK: tl.constexpr, LIST_CHUNK: tl.constexpr, UNIQUE: tl.constexpr,
                       INTERP: tl.constexpr):
    """Appends the kept entries among this split's positions ``k0 .. k0 + ENTRY_CHUNK - 1`` to ``scr_row``
    (``UNIQUE``: the caller promises no repeats, and the check against earlier positions is skipped)."""
    ks = k0 + tl.arange(0, ENTRY_CHUNK)
    inside = ks < n_mine
    pos = split + ks * SPLITS
    e = tl.load(idx_row + pos, mask=inside, other=-1)
    keep = inside & (e >= 0) & (e < nb_valid)
    if not UNIQUE:
        hi = split + (tl.minimum(k0 + ENTRY_CHUNK, n_mine) - 1) * SPLITS  # earlier positions: below the last one
        if INTERP:  # run-time loop bound: see seer.kernels.common
            j0 = 0
            while j0 < hi:
                keep = _dec_not_seen(idx_row, keep, e, pos, j0, hi, LIST_CHUNK)
                j0 += LIST_CHUNK
        else:
            for j0 in range(0, hi, LIST_CHUNK):
                keep = _dec_not_seen(idx_row, keep, e, pos, j0, hi, LIST_CHUNK)
    return append_selected(scr_row, n_kept, keep, e)


@triton.jit
def _dec_not_seen(idx_row, keep, e, pos, j0, hi, LIST_CHUNK: tl.constexpr):
    """``keep`` and no list position ``j0 <= j < min(hi, pos)`` holds the same block."""
    js = j0 + tl.arange(0, LIST_CHUNK)
    prev = tl.load(idx_row + js, mask=js < hi, other=-1)
    seen = (prev[None, :] == e[:, None]) & (js[None, :] < pos[:, None])
    return keep & (tl.max(seen.to(tl.int32), 1) == 0)


@triton.jit
def _dec_tile(acc, l_i, m_i, q, k_base, v_base, kstart, offs_n, offs_d, qpos, stride_kn, stride_vn, L, qk_scale,
              DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """One key tile of the online softmax, keys ``kstart ..`` masked by ``j <= p_t`` (and ``j < L`` for reads). With
    ``USE_TMA``, ``k_base``/``v_base`` are tensor descriptors over the sequence's ``L`` keys (the copy engine
    zero-fills rows past ``L``)."""
    offs_k = kstart + offs_n
    if USE_TMA:
        kt = tl.trans(k_base.load([kstart, 0]))
    else:
        kt = tl.load(k_base + offs_k[None, :] * stride_kn + offs_d[:, None], mask=offs_k[None, :] < L, other=0.0)
    qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
    qk = tl.where(offs_k[None, :] <= qpos[:, None], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that saw only masked keys: no (-inf) - (-inf)
    p = tl.math.exp2(qk * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if USE_TMA:
        v = v_base.load([kstart, 0])
    else:
        v = tl.load(v_base + offs_k[:, None] * stride_vn + offs_d[None, :], mask=offs_k[:, None] < L, other=0.0)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _dec_block(acc, l_i, m_i, q, k_base, v_base, scr_row, idx_row, i, split, SPLITS, nb_valid, offs_n, offs_d, qpos,
               stride_kn, stride_vn, L, qk_scale, MASK_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
               DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, IN_PLACE: tl.constexpr):
    """All key tiles of the ``i``-th kept block (``IN_PLACE``: of the split's ``i``-th list position, an entry that
    selects nothing read as the block at ``nb_valid``, past ``L``: masked whole)."""
    if IN_PLACE:
        kb = tl.load(idx_row + split + i * SPLITS)
        kb = tl.where((kb >= 0) & (kb < nb_valid), kb, nb_valid)
    else:
        kb = tl.load(scr_row + i)
    for sub in tl.static_range(MASK_BLOCK // BLOCK_N):
        acc, l_i, m_i = _dec_tile(acc, l_i, m_i, q, k_base, v_base, kb * MASK_BLOCK + sub * BLOCK_N, offs_n, offs_d,
                                  qpos, stride_kn, stride_vn, L, qk_scale, DOT_PRECISION, USE_TMA)
    return acc, l_i, m_i


@triton.jit
def _dec_split_kernel(
    Q, K, V, Idx, Seqlens, Scratch, Out, Lse,
    qk_scale,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ib, stride_ih,
    stride_ob, stride_oh, stride_ot, stride_os,
    stride_lb, stride_lh, stride_lt,
    HKV, N, T, GROUP, S, SPLITS, N_MTILES, SCR_LEN,
    HEAD_DIM: tl.constexpr, MASK_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DIRECT: tl.constexpr, UNIQUE: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERP: tl.constexpr,
    ENTRY_CHUNK: tl.constexpr, LIST_CHUNK: tl.constexpr, USE_TMA: tl.constexpr, IN_PLACE: tl.constexpr,
):
    pid = tl.program_id(0)  # (b * HKV + g) * N_MTILES + m-tile
    split = tl.program_id(1)
    mtile = pid % N_MTILES
    bg = pid // N_MTILES
    off_b = (bg // HKV).to(tl.int64)
    off_g = (bg % HKV).to(tl.int64)
    L = tl.minimum(tl.load(Seqlens + off_b), N)  # clamped: never read past the cache

    # 1. compact this split's positions of the list into a dense list of kept blocks
    idx_row = Idx + off_b * stride_ib + off_g * stride_ih
    scr_row = Scratch + (pid.to(tl.int64) * SPLITS + split) * SCR_LEN
    n_mine = (S - split + SPLITS - 1) // SPLITS
    nb_valid = (tl.maximum(L, 0) + MASK_BLOCK - 1) // MASK_BLOCK
    if IN_PLACE:  # unique lists walked as they are (the module docstring)
        n_kept = n_mine
    else:
        n_kept = 0
        if INTERP:
            k0 = 0
            while k0 < n_mine:
                n_kept = _dec_compact_chunk(idx_row, scr_row, n_kept, k0, split, n_mine, SPLITS, nb_valid,
                                            ENTRY_CHUNK, LIST_CHUNK, UNIQUE, INTERP)
                k0 += ENTRY_CHUNK
        else:
            for k0 in range(0, n_mine, ENTRY_CHUNK):
                n_kept = _dec_compact_chunk(idx_row, scr_row, n_kept, k0, split, n_mine, SPLITS, nb_valid,
                                            ENTRY_CHUNK, LIST_CHUNK, UNIQUE, INTERP)
        tl.debug_barrier()  # the compacted list, written by all threads, is read by all threads

    # 2. the group's query rows, stacked head-major: row r is head g * GROUP + r // T, token r % T
    rows = mtile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP * T
    heads = off_g * GROUP + (rows // T).to(tl.int64)
    toks = rows % T
    qpos = L - T + toks
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + off_b * stride_qb + (heads * stride_qh + toks * stride_qt)[:, None] + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    k_base = K + off_b * stride_kb + off_g * stride_kh
    v_base = V + off_b * stride_vb + off_g * stride_vh
    if USE_TMA:  # the sequence's [L, D] keys and values; the copy engine zero-fills reads past L
        rows_kv = tl.maximum(L, 1)
        k_base = tl.make_tensor_descriptor(k_base, shape=[rows_kv, HEAD_DIM], strides=[stride_kn, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        v_base = tl.make_tensor_descriptor(v_base, shape=[rows_kv, HEAD_DIM], strides=[stride_vn, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if INTERP:
        i = 0
        while i < n_kept:
            acc, l_i, m_i = _dec_block(acc, l_i, m_i, q, k_base, v_base, scr_row, idx_row, i, split, SPLITS, nb_valid,
                                       offs_n, offs_d, qpos, stride_kn, stride_vn, L, qk_scale, MASK_BLOCK, BLOCK_N,
                                       DOT_PRECISION, USE_TMA, IN_PLACE)
            i += 1
    else:
        for i in range(0, n_kept):
            acc, l_i, m_i = _dec_block(acc, l_i, m_i, q, k_base, v_base, scr_row, idx_row, i, split, SPLITS, nb_valid,
                                       offs_n, offs_d, qpos, stride_kn, stride_vn, L, qk_scale, MASK_BLOCK, BLOCK_N,
                                       DOT_PRECISION, USE_TMA, IN_PLACE)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))
    o_rows = off_b * stride_ob + heads * stride_oh + toks * stride_ot + split * stride_os
    l_rows = off_b * stride_lb + heads * stride_lh + toks * stride_lt + split
    if DIRECT:  # one split: the final result
        tl.store(Out + o_rows[:, None] + offs_d[None, :], out.to(Out.dtype.element_ty), mask=row_ok[:, None])
        tl.store(Lse + l_rows, lse2 * LN2, mask=row_ok)
    else:  # a partial result for the merge (float32, lse in base 2)
        tl.store(Out + o_rows[:, None] + offs_d[None, :], out, mask=row_ok[:, None])
        tl.store(Lse + l_rows, lse2, mask=row_ok)


@triton.jit
def _dec_merge_kernel(OPart, LsePart, Out, Lse, SPLITS, HQ, T,
                      stride_ob, stride_oh, stride_ot, stride_lb, stride_lh,
                      HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr, INTERP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # (b * HQ + h) * T + t; the partials are contiguous [B, HQ, T, SPLITS, D]
    off_t = row % T
    off_h = (row // T) % HQ
    off_b = row // (T * HQ)
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, HEAD_DIM)
    lse_row = LsePart + row * SPLITS
    o_row = OPart + row * SPLITS * HEAD_DIM
    m = tl.full([CHUNK], float("-inf"), dtype=tl.float32)
    if INTERP:
        s0 = 0
        while s0 < SPLITS:
            m = tl.maximum(m, tl.load(lse_row + s0 + offs_c, mask=s0 + offs_c < SPLITS, other=float("-inf")))
            s0 += CHUNK
    else:
        for s0 in range(0, SPLITS, CHUNK):
            m = tl.maximum(m, tl.load(lse_row + s0 + offs_c, mask=s0 + offs_c < SPLITS, other=float("-inf")))
    m_all = tl.max(m, 0)
    m_use = tl.where(m_all == float("-inf"), 0.0, m_all)
    den = tl.zeros([CHUNK], dtype=tl.float32)
    num = tl.zeros([HEAD_DIM], dtype=tl.float32)
    if INTERP:
        s0 = 0
        while s0 < SPLITS:
            den, num = _dec_merge_chunk(lse_row, o_row, s0, SPLITS, m_use, den, num, offs_c, offs_d, HEAD_DIM)
            s0 += CHUNK
    else:
        for s0 in range(0, SPLITS, CHUNK):
            den, num = _dec_merge_chunk(lse_row, o_row, s0, SPLITS, m_use, den, num, offs_c, offs_d, HEAD_DIM)
    total = tl.sum(den, 0)
    empty = total == 0.0
    total_safe = tl.where(empty, 1.0, total)
    tl.store(Out + off_b * stride_ob + off_h * stride_oh + off_t * stride_ot + offs_d,
             (num / total_safe).to(Out.dtype.element_ty))
    tl.store(Lse + off_b * stride_lb + off_h * stride_lh + off_t,
             tl.where(empty, float("-inf"), (m_use + tl.math.log2(total_safe)) * LN2))


@triton.jit
def _dec_merge_chunk(lse_row, o_row, s0, SPLITS, m_use, den, num, offs_c, offs_d, HEAD_DIM: tl.constexpr):
    inside = s0 + offs_c < SPLITS
    w = tl.math.exp2(tl.load(lse_row + s0 + offs_c, mask=inside, other=float("-inf")) - m_use)
    o = tl.load(o_row + (s0 + offs_c)[:, None] * HEAD_DIM + offs_d[None, :], mask=inside[:, None], other=0.0)
    return den + w, num + tl.sum(o * w[:, None], 0)


# ----------------------------------------------------------------------------------------------------------
# Launch configuration, keyed on (head dim, block size, BLOCK_M): one untimed guess on CUDA (nothing was timed on a
# GPU yet; experiments/bench_decode.py --tune sweeps them), screened for spills on sm_90 without a GPU
# (experiments/compile_decode.py: D 128 with 64-row tiles spills at 4 warps, not at 8; 128-token blocks at 3 stages
# take 217 KB of shared memory at 64-row tiles). The interpreter takes whole mask blocks.
# ----------------------------------------------------------------------------------------------------------

def _cuda_config(key: tuple[int, int, int]) -> list[dict]:
    d, block, block_m = key
    return [dict(BLOCK_N=min(block, 64), num_warps=8 if d * block_m >= 128 * 64 else 4,
                 num_stages=2 if block >= 128 else 4, USE_TMA=False, IN_PLACE=True)]


# USE_TMA: K/V tiles through the copy engine (tensor descriptors over each sequence's [L, D] rows), used where
# :func:`seer.kernels.common.tma_ok` allows (capability >= 9, aligned caches). Not a candidate of the table yet: it
# is checked in the interpreter and reached with force_config (experiments/bench_decode.py --variants / --tune time
# it against the default on a GPU); it joins the candidates once a GPU run shows it correct and faster.
# IN_PLACE: unique lists read without the compaction (applies only with unique_blocks=True; lists that may repeat a
# block are still compacted): on by default on CUDA since an H100 run (2026-12-06, docs/bench_decode.md) timed it 7%
# faster than the compaction at batch 1 / 32k and level at batch 16 / 32k (the interpreter keeps the compaction).
# num_stages 4 below 128-token blocks (3 before): two H100 runs in a row (2026-12-06, job kstages) timed it 2% faster
# at batch 16 / 32k / density 0.1 (9.10x dense both times, against 8.91x / 8.93x) and level at batch 1.
CONFIGS = LaunchTable("block_sparse_decode", ("BLOCK_N", "num_warps", "num_stages", "USE_TMA", "IN_PLACE"),
                      _cuda_config,
                      lambda key: dict(BLOCK_N=key[1], num_warps=1, num_stages=1, USE_TMA=False, IN_PLACE=False),
                      tiles_invalid)


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def default_num_splits(programs: int, list_len: int, num_sms: int) -> int:
    """Splits of each list when ``programs`` (sequences x KV heads x query tiles) run on ``num_sms`` SMs: none once
    the programs fill three quarters of the SMs (on an H200 at batch 16 x 8 KV heads, 128 programs for 132 SMs, one
    split beat 2-12: docs/bench_decode.md), else enough to start about two programs per SM, at most one per two list
    entries."""
    if 4 * programs >= 3 * num_sms:
        return 1
    return max(1, min(-(-2 * num_sms // programs), list_len // 2))


def launch_plan(b: int, hkv: int, group: int, t_new: int, list_len: int, device: torch.device,
                num_splits: int | None = None) -> tuple[int, int, int]:
    """``(BLOCK_M, query tiles, splits)`` of a call: the group's ``group x t_new`` rows in tiles of 16 to 64 rows,
    and ``num_splits`` or :func:`default_num_splits` for the device's SMs."""
    block_m = min(64, max(16, triton.next_power_of_2(group * t_new)))
    n_mtiles = triton.cdiv(group * t_new, block_m)
    return block_m, n_mtiles, num_splits or default_num_splits(b * hkv * n_mtiles, list_len, _num_sms(device))


def block_sparse_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_index: torch.Tensor,
                        cache_seqlens: torch.Tensor, block_size: int = 64, sm_scale: float | None = None, *,
                        num_splits: int | None = None, unique_blocks: bool = False,
                        validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of ``T`` new tokens over the key blocks a list selects (Triton, split-KV; see the module
    docstring for the math).

    ``q`` ``[B, Hq, T, D]``: the new tokens, the last ``T`` of each sequence's ``cache_seqlens[b]`` (int32 ``[B]``)
    valid keys in ``k_cache``/``v_cache`` ``[B, Hkv, N, D]``, causal among themselves; ``block_index`` int32
    ``[B, Hkv, S]``: the key blocks of ``block_size`` tokens each KV head's query group attends, any order, ``-1``
    padding, repeats counted once; blocks at or past ``cache_seqlens`` select nothing. float16 / bfloat16 (float32
    for tests), head dim 16..256 (meant for 64 and 128), any strides with a unit last stride. ``sm_scale`` defaults to
    ``1 / sqrt(D)``. A row with no attended key gets ``out = 0``, ``lse = -inf``.

    ``num_splits``: splits of each list, 1..65535 (default :func:`default_num_splits`; more splits than entries leave
    some empty). ``unique_blocks``: the caller promises that no list repeats a block (true of top-k lists such as
    :func:`seer.kernels.decode_index.block_index_from_scores`), and the kernel skips its repeat check; a block that
    is listed twice anyway is then attended twice (a wrong result), ``-1`` padding and blocks past the length are
    still skipped. ``validate``: check the values of ``block_index`` (``-1`` or ``< ceil(N / block_size)``) and
    ``cache_seqlens`` (``T..N``), which reads them on the host (one synchronisation); ``validate=False`` skips that
    (decode loops, CUDA-graph capture), and then entries outside ``0 .. ceil(cache_seqlens / block_size) - 1`` are
    ignored and lengths above ``N`` read as ``N``: nothing is read out of bounds.

    Returns ``(out [B, Hq, T, D] in q's dtype, lse [B, Hq, T] float32, natural log)``, as
    :func:`seer.kernels.reference.block_sparse_decode`. Forward only: inputs that require grad are refused while
    grad is enabled.
    """
    b, hq, hkv, t_new, n, d = check_decode_args(q, k_cache, v_cache, block_index, cache_seqlens, block_size)
    check_device(q=q, k_cache=k_cache, v_cache=v_cache, block_index=block_index, cache_seqlens=cache_seqlens)
    if num_splits is not None and (not isinstance(num_splits, int) or not 1 <= num_splits <= MAX_SPLITS):
        raise ValueError(f"num_splits must be an int in 1..{MAX_SPLITS}, got {num_splits!r}")
    if torch.is_grad_enabled() and (q.requires_grad or k_cache.requires_grad or v_cache.requires_grad):
        raise ValueError("block_sparse_decode has no backward: call it under torch.no_grad() or torch.inference_mode()")
    if validate:
        check_decode_values(block_index, cache_seqlens, t_new, n, block_size)
    scale = softmax_scale(sm_scale, d)
    out = torch.empty(b, hq, t_new, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, hq, t_new, dtype=torch.float32, device=q.device)
    if b * hq * t_new == 0:
        return out, lse
    q, k_cache, v_cache = with_unit_last_stride(q), with_unit_last_stride(k_cache), with_unit_last_stride(v_cache)
    block_index = block_index if block_index.stride(-1) == 1 else block_index.contiguous()
    group = hq // hkv
    s_len = block_index.shape[2]
    block_m, n_mtiles, splits = launch_plan(b, hkv, group, t_new, s_len, q.device, num_splits)
    programs = b * hkv * n_mtiles
    scr_len = max(1, triton.cdiv(s_len, splits))
    scratch = torch.empty(programs * splits * scr_len, dtype=torch.int32, device=q.device)
    direct = splits == 1
    if direct:
        o_dst, l_dst = out, lse
        o_strides = (out.stride(0), out.stride(1), out.stride(2), 0)
        l_strides = (lse.stride(0), lse.stride(1), lse.stride(2))
    else:
        o_dst = torch.empty(b, hq, t_new, splits, d, dtype=torch.float32, device=q.device)
        l_dst = torch.empty(b, hq, t_new, splits, dtype=torch.float32, device=q.device)
        o_strides = (o_dst.stride(0), o_dst.stride(1), o_dst.stride(2), o_dst.stride(3))
        l_strides = (l_dst.stride(0), l_dst.stride(1), l_dst.stride(2))

    def run(config: dict):
        use_tma = config["USE_TMA"] and tma_ok(k_cache, v_cache)
        return _dec_split_kernel[(programs, splits)](
            q, k_cache, v_cache, block_index, cache_seqlens, scratch, o_dst, l_dst,
            scale * LOG2E.value,
            q.stride(0), q.stride(1), q.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            block_index.stride(0), block_index.stride(1),
            *o_strides, *l_strides,
            hkv, n, t_new, group, s_len, splits, n_mtiles, scr_len,
            HEAD_DIM=d, MASK_BLOCK=block_size, BLOCK_M=block_m, DIRECT=direct, UNIQUE=bool(unique_blocks),
            DOT_PRECISION=dot_precision(q.dtype), INTERP=INTERPRET, ENTRY_CHUNK=ENTRY_CHUNK, LIST_CHUNK=LIST_CHUNK,
            **dict(config, USE_TMA=use_tma, IN_PLACE=config["IN_PLACE"] and bool(unique_blocks)),
        )

    CONFIGS.launch((d, block_size, block_m), run)
    if not direct:
        _dec_merge_kernel[(b * hq * t_new,)](
            o_dst, l_dst, out, lse, splits, hq, t_new,
            out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
            HEAD_DIM=d, CHUNK=MERGE_CHUNK, INTERP=INTERPRET, num_warps=1 if d <= 64 else 2,
        )
    return out, lse
