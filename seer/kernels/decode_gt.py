"""The decode gates' ground truth (SeerAttention-R), in PyTorch, chunked over query rows.

For every query token ``t`` and KV head ``g``: the causal attention probabilities of the group's query heads,
max-pooled over each key block's tokens and over the group's heads, then normalised over blocks so that each token's
row sums to 1. Only ``rows x N`` scores of one chunk of query rows exist at a time, never ``N x N``.
"""

from __future__ import annotations

import torch

from seer.kernels.common import check_qkv_shapes, softmax_scale


def decode_block_gt(q: torch.Tensor, k: torch.Tensor, block_size: int, sm_scale: float | None = None,
                    chunk_rows: int | None = None, budget_elems: int = 1 << 26) -> torch.Tensor:
    """Ground truth ``[B, Hkv, N, nb]`` (float32, float64 for float64 inputs) of post-RoPE ``q [B, Hq, N, D]``
    against ``k [B, Hkv, N, D]``, causal; rows sum to 1, blocks after a token's own block hold 0. ``chunk_rows``
    query rows at a time (default: about ``budget_elems`` scores a chunk)."""
    b, hq, hkv, n, d = check_qkv_shapes(q, k)
    scale = softmax_scale(sm_scale, d)
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    nb = -(-n // block_size)
    if chunk_rows is None:
        chunk_rows = max(1, budget_elems // max(1, b * hq * n))
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    kt = k.to(dt).unsqueeze(2).transpose(-1, -2)  # [B, Hkv, 1, D, N]
    keys = torch.arange(n, device=q.device)
    out = torch.empty(b, hkv, n, nb, dtype=dt, device=q.device)
    with torch.autocast(q.device.type, enabled=False):
        for start in range(0, n, chunk_rows):
            stop = min(n, start + chunk_rows)
            qg = (q[:, :, start:stop].to(dt) * scale).reshape(b, hkv, hq // hkv, stop - start, d)
            s = torch.matmul(qg, kt)  # [B, Hkv, G, rows, N]
            s.masked_fill_(keys[None, :] > torch.arange(start, stop, device=q.device)[:, None], float("-inf"))
            p = torch.softmax(s, dim=-1)
            p = torch.nn.functional.pad(p, (0, nb * block_size - n))
            pooled = p.reshape(*p.shape[:-1], nb, block_size).amax(-1).amax(2)  # blocks, then the group's heads
            out[:, :, start:stop] = pooled / pooled.sum(-1, keepdim=True)
    return out
