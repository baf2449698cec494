"""Block lists of sparse decode: the argument checks :func:`seer.kernels.block_sparse_decode` and its reference
share, and builders of ``block_index`` from a boolean block mask or from block scores (PyTorch, on the device, no
host synchronisation).

A decode ``block_index`` is int32 ``[B, Hkv, S]``: the key blocks each KV head's query group attends, in any order,
padded with ``-1``; a block listed twice counts once (a list is a set).
"""

from __future__ import annotations

import torch

from seer.kernels.common import DTYPES, HEAD_DIMS, _one_of, check_block_size

__all__ = ["block_index_from_mask", "block_index_from_scores", "check_decode_args", "check_decode_values"]


def check_decode_args(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_index: torch.Tensor,
                      cache_seqlens: torch.Tensor, block_size: int,
                      kernel: bool = True) -> tuple[int, int, int, int, int, int]:
    """Shapes, dtypes and head counts of decode inputs (no values read); ``kernel``: also a dtype and head dim the
    Triton kernel runs (:data:`~seer.kernels.common.DTYPES`, :data:`~seer.kernels.common.HEAD_DIMS`), else any
    floating dtype and head dim. Returns ``(B, Hq, Hkv, T, N, D)``."""
    check_block_size(block_size)
    named = (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_index", block_index),
             ("cache_seqlens", cache_seqlens))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in named[:3]:
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, length, D]; got shape {list(t.shape)}")
    b, hq, t_new, d = q.shape
    _, hkv, n, _ = k_cache.shape
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache {list(v_cache.shape)} must have the shape of k_cache {list(k_cache.shape)}")
    if k_cache.shape[0] != b or k_cache.shape[3] != d:
        raise ValueError(f"k_cache {list(k_cache.shape)} does not match q {list(q.shape)} in batch or head dim")
    if hkv < 1 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if (q.dtype not in DTYPES) if kernel else not q.dtype.is_floating_point:
        raise ValueError(f"q dtype {q.dtype} is not supported; supported: {_one_of(DTYPES)}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q, k_cache, v_cache must share a dtype; got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if kernel and d not in HEAD_DIMS:
        raise ValueError(f"head dim {d} is not supported; supported: {_one_of(HEAD_DIMS)}")
    if block_index.dtype != torch.int32 or block_index.dim() != 3 or tuple(block_index.shape[:2]) != (b, hkv):
        raise ValueError(f"block_index must be int32 [B, Hkv, S] = [{b}, {hkv}, S]; got {block_index.dtype} "
                         f"{list(block_index.shape)}")
    if cache_seqlens.dtype != torch.int32 or tuple(cache_seqlens.shape) != (b,):
        raise ValueError(f"cache_seqlens must be int32 [B] = [{b}]; got {cache_seqlens.dtype} "
                         f"{list(cache_seqlens.shape)}")
    return b, hq, hkv, t_new, n, d


def check_decode_values(block_index: torch.Tensor, cache_seqlens: torch.Tensor, t_new: int, n: int,
                        block_size: int) -> None:
    """The values: every ``block_index`` entry is ``-1`` or a block of the cache (``< ceil(N / block_size)``), and
    ``T <= cache_seqlens <= N``. Reads four numbers on the host (one synchronisation)."""
    nb = -(-n // block_size)
    stats = [block_index.min(), block_index.max()] if block_index.numel() else []
    stats += [cache_seqlens.min(), cache_seqlens.max()] if cache_seqlens.numel() else []
    if not stats:
        return
    values = torch.stack([s.to(torch.int64) for s in stats]).tolist()
    if block_index.numel():
        lo, hi, *values = values
        if lo < -1:
            raise ValueError(f"block_index entry {lo} is not a block: entries are 0..{nb - 1} or -1 (padding)")
        if hi >= nb:
            raise ValueError(f"block_index entry {hi} is beyond the cache: N={n} holds {nb} blocks of {block_size} "
                             f"tokens (entries 0..{nb - 1}, -1 for padding)")
    if values:
        lo, hi = values
        if hi > n:
            raise ValueError(f"cache_seqlens entry {hi} is beyond the cache length N={n}")
        if lo < t_new:
            raise ValueError(f"cache_seqlens entry {lo} is below T={t_new}: the new tokens are part of the cache")


def block_index_from_mask(block_mask: torch.Tensor) -> torch.Tensor:
    """``block_index`` int32 ``[B, Hkv, nb]`` from a bool block mask ``[B, Hkv, nb]``: each row's selected blocks in
    ascending order, then ``-1``."""
    if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool or block_mask.dim() != 3:
        raise ValueError(f"block_mask must be a bool tensor [B, Hkv, nb]; got "
                         f"{getattr(block_mask, 'dtype', type(block_mask).__name__)} "
                         f"{list(getattr(block_mask, 'shape', []))}")
    nb = block_mask.shape[-1]
    cols = torch.arange(nb, dtype=torch.int32, device=block_mask.device)
    idx = torch.where(block_mask, cols, nb).sort(-1).values
    return torch.where(idx == nb, -1, idx).to(torch.int32)


def block_index_from_scores(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``block_index`` int32 ``[B, Hkv, k]`` of the ``k`` highest-scoring blocks of each row of ``scores``
    ``[B, Hkv, nb]`` (float), ascending, ``-1`` in place of blocks scored ``-inf`` (blocks that may not be picked,
    e.g. past a sequence's end) and past ``nb``."""
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point() or scores.dim() != 3:
        raise ValueError(f"scores must be a float tensor [B, Hkv, nb]; got "
                         f"{getattr(scores, 'dtype', type(scores).__name__)} {list(getattr(scores, 'shape', []))}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int (blocks per KV head), got {k!r}")
    nb = scores.shape[-1]
    val, idx = scores.topk(min(k, nb), dim=-1)
    idx = torch.where(torch.isneginf(val), nb, idx).sort(-1).values
    idx = torch.where(idx == nb, -1, idx).to(torch.int32)
    if k > nb:
        idx = torch.nn.functional.pad(idx, (0, k - nb), value=-1)
    return idx
