"""Attention kernels for seer: fused Triton kernels and their plain-PyTorch references.

* :func:`flash_attn_with_gt` - causal FlashAttention forward that also emits the block max-pooled attention
  map (the gate-distillation ground truth), in ``seer/kernels/flash_gt.py``.
* :func:`block_sparse_attn` - block-sparse causal FlashAttention over the key blocks a mask selects, in
  ``seer/kernels/block_sparse.py``; differentiable in q, k, v (Triton backward in ``block_sparse_bwd.py``).
* :func:`seer.kernels.block_pool.block_pool` - the gate's block pooling of Q or K (avg/max/min/last in one
  pass), in ``seer/kernels/block_pool.py``.
* :func:`seer.kernels.block_topk.topk_block_mask` - per-row top-k block selection to a bool mask, in
  ``seer/kernels/block_topk.py``.
* :mod:`seer.kernels.reference` - the same contracts in PyTorch, chunked so memory stays ``O(N * block)``.

This package is a leaf: it imports only torch and triton, never the rest of seer. Importing it makes no GPU
driver call, so ``TRITON_INTERPRET=1`` (the CPU interpreter) can still be set before the first kernel launch.
"""

from seer.kernels import reference
from seer.kernels.block_sparse import block_sparse_attn
from seer.kernels.flash_gt import flash_attn_with_gt

__all__ = ["block_sparse_attn", "flash_attn_with_gt", "reference"]
