"""Sequence pooling of Q or K into blocks: avg, max, min and last, over the tokens each block has.

On CUDA (when no gradient must flow back to ``x``) the pools come from one Triton pass over ``x``
(:func:`seer.kernels.block_pool.block_pool`); the PyTorch code below is the CPU path and the kernel's reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pool_blocks(x: torch.Tensor, block_size: int, kinds: list[str],
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pools ``x [B, H, N, D]`` over blocks of ``block_size`` tokens along N.

    Returns ``[B, H, nb, D * len(kinds)]``: the pools side by side on the channel axis, in the order given.
    A last partial block is pooled over the tokens it has (its average divides by its own length). Averages
    accumulate in float32; the result has ``out_dtype`` (default: ``x``'s dtype; on CUDA the kernel writes it
    directly, so averages are not rounded to ``x``'s dtype first).
    """
    if x.is_cuda and not (x.requires_grad and torch.is_grad_enabled()):
        from seer.kernels.block_pool import block_pool

        return block_pool(x, block_size, kinds, out_dtype=out_dtype)
    b, h, n, d = x.shape
    nb = (n + block_size - 1) // block_size
    pad = nb * block_size - n
    out = []
    for kind in kinds:
        if kind == "avg":
            s = F.pad(x, (0, 0, 0, pad)).reshape(b, h, nb, block_size, d).sum(3, dtype=torch.float32)
            counts = torch.full((nb,), block_size, dtype=torch.float32, device=x.device)
            counts[-1] = n - (nb - 1) * block_size
            out.append((s / counts[:, None]).to(x.dtype))
        elif kind == "max":
            out.append(F.pad(x, (0, 0, 0, pad), value=float("-inf")).reshape(b, h, nb, block_size, d).amax(3))
        elif kind == "min":
            out.append(F.pad(x, (0, 0, 0, pad), value=float("inf")).reshape(b, h, nb, block_size, d).amin(3))
        elif kind == "last":
            last = torch.clamp(torch.arange(1, nb + 1, device=x.device) * block_size, max=n) - 1
            out.append(x[:, :, last])
        else:
            raise ValueError(f"unknown pooling type {kind!r}")
    return torch.cat(out, dim=-1).to(out_dtype or x.dtype)
