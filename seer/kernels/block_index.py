"""The block lists of a boolean block mask, built on the device: what the block-sparse forward
(:mod:`seer.kernels.block_sparse`) and backward (:mod:`seer.kernels.block_sparse_bwd`) walk instead of the mask.

:func:`build_block_index` gives each query block (or pair of query blocks) the ascending list of the key blocks it
selected; the backward's column lists (:func:`seer.kernels.block_sparse_bwd.build_block_col_index`) are built by the
same launch (:func:`build_lists`) and list compaction (:func:`append_selected`). Also the checks of a mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seer.kernels.common import INTERPRET, check_device

__all__ = ["append_selected", "build_block_index", "build_lists", "check_mask", "mask_heads"]


# ----------------------------------------------------------------------------------------------------------
# Index builder: boolean block mask -> compact ascending per-row lists of selected key blocks
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def append_selected(out_ptr, base, sel, val):
    """Writes the entries of ``val`` where ``sel`` holds to ``out_ptr[base:]``, in order (each at ``base`` plus
    the number of selected entries before it); returns the new end of the list."""
    s = sel.to(tl.int32)
    pos = base + tl.cumsum(s, 0) - s
    tl.store(out_ptr + pos, val, mask=sel)
    return base + tl.sum(s, 0)


@triton.jit
def _bs_index_chunk(mrow, irow, c0, base, r_top, r_bot, NB, stride_mr, stride_mc,
                    PAIR: tl.constexpr, CHUNK: tl.constexpr):
    cols = c0 + tl.arange(0, CHUNK)
    top = tl.load(mrow + r_top * stride_mr + cols * stride_mc, mask=cols <= r_top, other=0) != 0
    if PAIR:
        bot = tl.load(mrow + r_bot * stride_mr + cols * stride_mc, mask=(cols <= r_bot) & (r_bot < NB), other=0) != 0
        sel = top | bot
        val = cols * 4 + top.to(tl.int32) + 2 * bot.to(tl.int32)
    else:
        sel = top
        val = cols
    return append_selected(irow, base, sel, val)


@triton.jit
def _bs_build_index_kernel(
    Mask, Idx, Cnt,
    stride_mb, stride_mh, stride_mr, stride_mc,
    stride_ib, stride_ih, stride_ir,
    stride_cb, stride_ch,
    H, NB,
    PAIR: tl.constexpr, CHUNK: tl.constexpr, INTERP: tl.constexpr,
):
    r = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    mrow = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
    irow = Idx + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih + r.to(tl.int64) * stride_ir
    if PAIR:
        r_top = 2 * r
        r_bot = 2 * r + 1
        ncols = tl.minimum(r_bot + 1, NB)
    else:
        r_top = r
        r_bot = r
        ncols = r + 1
    base = 0
    if INTERP:  # run-time loop bound: see seer.kernels.common
        c0 = 0
        while c0 < ncols:
            base = _bs_index_chunk(mrow, irow, c0, base, r_top, r_bot, NB, stride_mr, stride_mc, PAIR, CHUNK)
            c0 += CHUNK
    else:
        for c0 in range(0, ncols, CHUNK):
            base = _bs_index_chunk(mrow, irow, c0, base, r_top, r_bot, NB, stride_mr, stride_mc, PAIR, CHUNK)
    tl.store(Cnt + b.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch + r, base)


def check_mask(block_mask: torch.Tensor, name: str = "block_mask") -> None:
    if not isinstance(block_mask, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(block_mask).__name__}")
    if block_mask.dtype != torch.bool:
        raise ValueError(f"{name} must be bool, got {block_mask.dtype}")
    if block_mask.dim() != 4 or block_mask.shape[2] != block_mask.shape[3]:
        raise ValueError(f"{name} must be [B, H, nb, nb]; got {tuple(block_mask.shape)}")


def build_block_index(block_mask: torch.Tensor, *, pair: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact per-row lists of the key blocks a boolean block mask selects, built on the device.

    ``block_mask`` is bool ``[B, H, nb, nb]`` (any strides). Entries above the diagonal are ignored.
    Returns ``kv_indices`` int32 ``[B, H, nb, nb]`` and ``kv_counts`` int32 ``[B, H, nb]``:
    ``kv_indices[b, h, r, :kv_counts[b, h, r]]`` are the selected key blocks ``c <= r`` of query block ``r``
    in ascending order (the diagonal, when selected, last); entries past the count are left unwritten.

    With ``pair=True`` it builds the internal ``pair`` layout (see the module docstring): lists for the
    ``ceil(nb / 2)`` pairs of query blocks, shapes ``[B, H, ceil(nb/2), nb]`` and ``[B, H, ceil(nb/2)]``.
    One launch, no host synchronisation; reads only the causal half of the mask.
    """
    check_mask(block_mask)
    check_device(block_mask=block_mask)
    nb = block_mask.shape[-1]
    return build_lists(_bs_build_index_kernel, block_mask, (nb + 1) // 2 if pair else nb,
                        lambda shape, dtype, device: torch.empty(shape, dtype=dtype, device=device), PAIR=pair)


def build_lists(kernel, block_mask: torch.Tensor, rows: int, alloc, *args, **meta) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches a list builder (the forward's row lists, the backward's column lists, the rerank's union lists) over a
    checked bool mask ``[B, H, nb, nb]``: one program per list and batch x head, ``CHUNK`` mask entries at a time,
    ``args`` after the kernel's ``H, NB``. Returns the lists ``[B, H, rows, nb]`` and their lengths ``[B, H, rows]``
    (int32, from ``alloc(shape, dtype, device)``)."""
    b, h, nb, _ = block_mask.shape
    idx = alloc((b, h, rows, nb), torch.int32, block_mask.device)
    cnt = alloc((b, h, rows), torch.int32, block_mask.device)
    if b * h * rows == 0:
        return idx, cnt
    m = block_mask.view(torch.uint8)
    chunk = min(1024, triton.next_power_of_2(max(nb, 16)))
    kernel[(rows, b * h)](
        m, idx, cnt,
        m.stride(0), m.stride(1), m.stride(2), m.stride(3),
        idx.stride(0), idx.stride(1), idx.stride(2),
        cnt.stride(0), cnt.stride(1),
        h, nb, *args,
        CHUNK=chunk, INTERP=INTERPRET, num_warps=4 if chunk >= 512 else 1, **meta,
    )
    return idx, cnt


def mask_heads(hm: int, hq: int, hkv: int, what: str) -> int:
    if hm not in (hq, hkv):
        raise ValueError(f"{what} has {hm} heads; expected Hq={hq} (one per query head) or Hkv={hkv} "
                         f"(shared by each query-head group)")
    return hq // hm
