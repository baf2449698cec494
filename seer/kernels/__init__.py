"""Attention kernels for seer: fused Triton kernels and their plain-PyTorch references.

* :func:`flash_attn_with_gt` - causal FlashAttention forward that also emits the block max-pooled attention
  map (the gate-distillation ground truth), in ``seer/kernels/flash_gt.py`` (kernels in
  ``flash_gt_kernels.py``); also :func:`seer.kernels.flash_gt.flash_attn` (no ground truth) and
  :func:`seer.kernels.flash_gt.gt_from_lse` (the ground truth from a known ``lse``).
* :func:`block_sparse_attn` - block-sparse causal FlashAttention over the key blocks a mask selects, in
  ``seer/kernels/block_sparse.py``; differentiable in q, k, v (Triton backward in ``block_sparse_bwd.py``; both
  walk the block lists of ``block_index.py``); :func:`block_sparse_attn_varlen` - the same over sequences packed
  in one row (``cu_seqlens``, FlashAttention's varlen layout), blocks aligned to each sequence's start, forward and
  backward.
* :func:`block_sparse_decode` - split-KV block-sparse decode attention of new tokens over a KV cache's listed key
  blocks (GQA groups in one program), in ``seer/kernels/decode.py``; block lists from a mask or scores
  in ``decode_index.py``.
* :func:`seer.kernels.block_pool.block_pool` - the gate's block pooling of Q or K (avg/max/min/last in one
  pass), in ``seer/kernels/block_pool.py``.
* :func:`seer.kernels.token_gate.token_gate_logits` - the token-query gate's block logits (``gate.q_tokens``: the
  log-mean-exp over each query block's tokens of their scores against the gate keys, the scores never written), in
  ``seer/kernels/token_gate.py`` (inference, no autograd).
* :func:`seer.kernels.block_topk.topk_block_mask` - per-row top-k block selection to a bool mask, in
  ``seer/kernels/block_topk.py``.
* :func:`vertical_slash_blend` - a gate's block logits blended with MInference's vertical-slash estimate (from its
  per-block vectors, the ``[nb, nb]`` mass grid never built) to normalised block log-scores, in
  ``seer/kernels/vs_blend.py`` (inference, no autograd).
* :func:`last_rows_marginals` - the vertical and slash marginals of the last query rows' causal softmax (the first
  stage of that estimate) without materialising the probabilities, in ``seer/kernels/vs_marginals.py`` (inference,
  no autograd).
* :func:`sampled_rows_mass` - block masses from a few exact query rows per block over each row's candidate blocks
  (the ``reranked`` scorer's and ``gate.rerank_rows``' rerank step), in ``seer/kernels/sampled_rows.py`` (inference,
  no autograd).
* :mod:`seer.kernels.reference` - the same contracts in PyTorch, chunked so memory stays ``O(N * block)``.
* :mod:`seer.kernels.tuning` - the launch configurations of the attention kernels (forward and backward): the
  H100 defaults, timing once per key, and for experiments :func:`~seer.kernels.tuning.force_config`,
  :func:`~seer.kernels.tuning.set_autotune`, :func:`~seer.kernels.tuning.chosen_configs`,
  :func:`~seer.kernels.tuning.last_launch` and the timer :func:`~seer.kernels.tuning.median_ms`.
* :mod:`seer.kernels.common` - supported sizes and dtypes, and the argument checks all kernels share.

Everything that steers the kernels is an argument (e.g. ``flash_attn_with_gt(..., mode="auto",
fast_fraction=0.25)``) or a call of :mod:`seer.kernels.tuning`. The one environment variable that matters is
Triton's own ``TRITON_INTERPRET=1``: set before this package is imported, the kernels run in Triton's CPU
interpreter on CPU tensors (how the tests run without a GPU; :data:`seer.kernels.common.INTERPRET`).

This package is a leaf: it imports only torch and triton, never the rest of seer. Importing it makes no GPU
driver call.
"""

# block_sparse_bwd is imported with the package (not only at the first backward) so that its launch tables are
# known to seer.kernels.tuning (force_config("block_sparse_bwd.dq", ...), kernel_names()) from the start
from seer.kernels import block_sparse_bwd, reference, tuning
from seer.kernels.block_sparse import block_sparse_attn, block_sparse_attn_varlen
from seer.kernels.decode import block_sparse_decode
from seer.kernels.flash_gt import flash_attn_with_gt
from seer.kernels.sampled_rows import sampled_rows_mass
from seer.kernels.vs_blend import vertical_slash_blend
from seer.kernels.vs_marginals import last_rows_marginals

__all__ = ["block_sparse_attn", "block_sparse_attn_varlen", "block_sparse_bwd", "block_sparse_decode",
           "flash_attn_with_gt", "last_rows_marginals", "reference", "sampled_rows_mass", "tuning",
           "vertical_slash_blend"]
