"""The compressed-K cache of the decode gates (SeerAttention-R), kept beside the model's KV cache.

Per layer and sequence it holds the gate keys of every *full* key block (pooled, projected and rotated by the
layer's :class:`~seer.gates.decode_gate.DecodeGate`: ``hidden_size`` values per KV head and block) and the pre-RoPE
keys of the sequence's newest block (1 to ``block_size`` tokens: the block being filled, or the last full one).
:meth:`DecodeKeyCache.update` takes each step's new keys, after a prefill of any length or one decode token, with
rows of a batch adding different numbers of tokens (prompts of different lengths); a block's gate key is made once,
when it fills. :meth:`DecodeKeyCache.scores` gives a decoding token's gate logits over its sequence's blocks, the
newest block pooled over its keys so far: what :class:`~seer.gates.decode_gate.DecodeGate` gives the last token of
the whole sequence.

Static shapes: the gate keys live in a buffer ``[B, Hkv, capacity, E]`` allocated for ``max_length`` tokens (or, without
it, grown at a prefill and, in eager decode loops, doubled when the longest row would pass it), the newest blocks in
one tensor ``[B, Hkv, block_size, D]`` (float32), and each row's length as int32 on the gates' device
(:attr:`DecodeKeyCache.seqlens`, the decode kernel's ``cache_seqlens``). A decode step (one token for every row) is
batched tensor work with no Python loop over rows, no host read and no shape that depends on device values: the new
key is written into each row's newest block at its length, the masked pool of that block gives its gate key
(written at the block every step: final once the block fills), and :meth:`~DecodeKeyCache.scores` covers all
``capacity`` blocks, ``-inf`` after each row's newest. So a decode step can be captured in a CUDA graph and replayed.
A prefill (per-row counts) works row by row on the host; it runs once.

With ``bounds_dtype`` the cache also keeps Quest's key bounds (Tang et al., 2024) for a training-free estimate
(``DecodeSparsityConfig.estimate="quest"``): per row, KV head and block the elementwise min and max of the block's
post-RoPE keys (``key_min``/``key_max [B, Hkv, capacity, D]``, in the KV cache's dtype, grown with the gate keys), the
newest block's over its keys so far. :meth:`DecodeKeyCache.update` then takes each step's post-RoPE keys beside the
pre-RoPE ones; a one-token step folds its key into its block's bounds in place (:func:`step_key_bounds`), and
:func:`key_bound_scores` turns a query into the blocks' bounds of ``q.k``.

With ``key_stats=("moments",)`` it keeps instead the keys' first two moments per block (``key_sum``/``key_sq``, float32
sums of the keys and of their squares: :func:`step_key_moments`, :func:`key_moment_scores`), and with
``("bounds", "moments")`` both (to compare the estimates on one prefill).

Without decode gates (training-free decode, Quest alone: :func:`seer.model.decode.attach_quest_decode`) each layer's
entry is a :class:`BoundsOnly` (its head counts, head dim and block size) instead of a gate: the cache then keeps only
the key bounds and the row lengths (no gate keys, no newest-block keys), and takes only post-RoPE keys.

The host keeps per layer only bounds of the row lengths (the longest and the shortest row, exact after a prefill, one
more after each decode step) for the capacity and the input checks; under CUDA-graph replay they are not advanced,
which is harmless (with ``max_length`` given, no step grows the buffer).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from seer.gates.decode_gate import DecodeGate
from seer.gates.pooling import pool_blocks


def pool_prefix(x: torch.Tensor, counts: torch.Tensor, kinds: list[str]) -> torch.Tensor:
    """Pools ``x [B, H, S, D]`` over each row's first ``counts[b]`` (``[B]``, 1..S) slots along S, the others
    ignored: ``[B, H, 1, D * len(kinds)]`` in ``x``'s dtype, as :func:`~seer.gates.pooling.pool_blocks` pools a block
    of that many tokens (averages accumulate in float32)."""
    b, _, s, _ = x.shape
    after = (torch.arange(s, device=x.device)[None, :] >= counts[:, None])[:, None, :, None]  # [B, 1, S, 1]
    out = []
    for kind in kinds:
        if kind == "avg":  # float32 sum / integer count (promoted to float32)
            total = x.masked_fill(after, 0).sum(2, keepdim=True, dtype=torch.float32)
            out.append((total / counts[:, None, None, None]).to(x.dtype))
        elif kind == "max":
            out.append(x.masked_fill(after, float("-inf")).amax(2, keepdim=True))
        elif kind == "min":
            out.append(x.masked_fill(after, float("inf")).amin(2, keepdim=True))
        elif kind == "last":
            last = (counts.long() - 1)[:, None, None, None].expand(b, x.shape[1], 1, x.shape[3])
            out.append(x.gather(2, last))
        else:
            raise ValueError(f"unknown pooling type {kind!r}")
    return torch.cat(out, dim=-1)


@dataclass(frozen=True)
class BoundsOnly:
    """A layer of a :class:`DecodeKeyCache` without a decode gate (training-free decode: the key bounds only): what
    the cache needs to know of the layer."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int


def layer_block_size(layer: DecodeGate | BoundsOnly) -> int:
    """The block size of a cache layer's entry (a decode gate's, or a :class:`BoundsOnly`'s)."""
    return layer.block_size if isinstance(layer, BoundsOnly) else layer.config.block_size


def step_position(seqlens: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Advances each row's length (``seqlens [B]`` int32, in place) by its new token; returns that token's position
    and block (``[B]`` int64). No host read."""
    pos = seqlens.long()
    seqlens.add_(1)
    return pos, pos // block_size


def step_keys(gate: DecodeGate, store: torch.Tensor, tails: torch.Tensor, seqlens: torch.Tensor,
              k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tensor work of a one-token step of one layer's cache (:meth:`DecodeKeyCache.update`), in place: the key
    ``k [B, Hkv, 1, D]`` of every row written into its newest block (``tails [B, Hkv, bs, D]``) at its length
    (``seqlens [B]`` int32, advanced by one), that block's gate key written into ``store [B, Hkv, capacity, E]``.
    Returns that gate key ``[B, Hkv, 1, E]`` (as :meth:`~DecodeKeyCache.scores` reads it), the new token's position
    and its block (``[B]`` int64). No host read, no host state: a function of tensors (``torch.compile``-able). Both
    writes are indexed assignments (``index_put_``), which inductor keeps in place on the graph inputs; a ``scatter_``
    there becomes a copy of the whole buffer, scattered, then copied back."""
    bs = gate.config.block_size
    pos, block = step_position(seqlens, bs)  # the new token's position in its row, and its block
    slot = pos % bs
    rows = torch.arange(len(pos), device=pos.device)
    tails[rows, :, slot] = k[:, :, 0].to(tails.dtype)
    key = gate.gate_keys(pool_prefix(tails, slot + 1, gate.config.k_pool), (block * bs)[:, None])  # [B, Hkv, 1, E]
    # written every step, final once the block fills (scores() overwrites the newest block's logit)
    block = block.clamp(max=store.shape[2] - 1)
    stored = key.to(store.dtype)
    store[rows, :, block] = stored[:, :, 0]
    if store.dtype != key.dtype:  # scores() reads a full block's key as stored
        key = torch.where((slot == bs - 1)[:, None, None, None], stored.to(key.dtype), key)
    return key, pos, block


def step_key_bounds(key_min: torch.Tensor, key_max: torch.Tensor, k: torch.Tensor, position: torch.Tensor,
                    block: torch.Tensor, block_size: int) -> None:
    """Folds the post-RoPE key ``k [B, Hkv, 1, D]`` of each row's new token (at ``position [B]``, in ``block [B]``,
    int64: what :func:`step_keys` returned) into its block's bounds ``key_min``/``key_max [B, Hkv, capacity, D]``, in
    place: ``min(bound so far, k)``, ``max(bound so far, k)``, or ``k`` itself for a block's first key. No host read;
    indexed assignments (``index_put_``), which inductor keeps in place."""
    rows = torch.arange(len(position), device=position.device)
    key = k[:, :, 0].to(key_min.dtype)  # [B, Hkv, D]
    first = (position % block_size == 0)[:, None, None]
    key_min[rows, :, block] = torch.where(first, key, torch.minimum(key_min[rows, :, block], key))
    key_max[rows, :, block] = torch.where(first, key, torch.maximum(key_max[rows, :, block], key))


def step_key_moments(key_sum: torch.Tensor, key_sq: torch.Tensor, k: torch.Tensor, position: torch.Tensor,
                     block: torch.Tensor, block_size: int) -> None:
    """Adds the post-RoPE key ``k [B, Hkv, 1, D]`` of each row's new token (at ``position [B]``, in ``block [B]``) to
    its block's sums ``key_sum`` and ``key_sq [B, Hkv, capacity, D]`` (float32: of the keys and of their squares), in
    place (``k`` itself for a block's first key). No host read; indexed assignments, as :func:`step_key_bounds`."""
    rows = torch.arange(len(position), device=position.device)
    key = k[:, :, 0].float()
    first = (position % block_size == 0)[:, None, None]
    key_sum[rows, :, block] = torch.where(first, key, key_sum[rows, :, block] + key)
    key_sq[rows, :, block] = torch.where(first, key * key, key_sq[rows, :, block] + key * key)


def key_moment_scores(q: torch.Tensor, key_sum: torch.Tensor, key_sq: torch.Tensor, seqlens: torch.Tensor,
                      block_size: int, sm_scale: float | None = None) -> torch.Tensor:
    """Block scores ``[B, Hkv, capacity]`` (float32) of each row's newest token (post-RoPE ``q [B, Hq, 1, D]``) from
    the first two moments of each block's keys (``key_sum``/``key_sq``: their sums and the sums of their squares over
    the block's ``n_b`` valid keys, each row's first ``seqlens[b]`` valid): per query head the log of the block's
    attention mass if its logits were Gaussian with the keys' per-channel mean ``mu`` and variance ``var``,
    ``log n_b + s q.mu + s^2/2 sum_d q_d^2 var_d`` (``s = sm_scale``, default ``1 / sqrt(D)``), turned into a softmax
    over the row's blocks and averaged over the KV head's group (as ``key_bound_scores(group="mass")``); ``-inf`` for
    blocks with no valid key. Reads two vectors per block, as Quest's bounds."""
    b, hq, _, d = q.shape
    hkv, capacity = key_sum.shape[1], key_sum.shape[2]
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    starts = torch.arange(capacity, device=q.device)[None, :] * block_size
    count = (seqlens[:, None].long() - starts).clamp(0, block_size)  # [B, capacity]
    valid = (count > 0)[:, None, None]
    n = count.clamp(min=1)[:, None, :, None].float()  # [B, 1, capacity, 1]
    mean = key_sum.float() / n
    var = (key_sq.float() / n - mean * mean).clamp(min=0)
    grouped = q.float().reshape(b, hkv, hq // hkv, d)
    logits = (torch.matmul(grouped, mean.transpose(-1, -2)) * scale
              + torch.matmul(grouped * grouped, var.transpose(-1, -2)) * (scale * scale / 2)
              + torch.log(count.clamp(min=1).float())[:, None, None, :])  # [B, Hkv, group, capacity]
    per_head = torch.log_softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)
    return torch.logsumexp(per_head, dim=2) - math.log(hq // hkv)


def key_bound_scores(q: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor, newest: torch.Tensor,
                     sm_scale: float | None = None, group: str = "max") -> torch.Tensor:
    """Quest's block scores ``[B, Hkv, capacity]`` (float32) of each row's token (post-RoPE ``q [B, Hq, 1, D]``), from
    each query head's bound ``u_h = sm_scale * sum_d max(q_d * min_d, q_d * max_d)`` of a block, an upper bound of the
    block's largest logit ``sm_scale * q.k`` (equal to it for a block of one key), computed from the bounds
    ``key_min``/``key_max [B, Hkv, capacity, D]``; ``-inf`` after each row's newest block (``newest [B]``). Per KV
    head, over its group of G query heads (``group``):

    * ``"max"``: ``max_h u_h`` (Quest's bound for the group);
    * ``"mass"``: ``log(1/G sum_h softmax(u_h))``, the softmax over the row's blocks: each head's bounds as a block
      distribution first, so that a head whose logits run larger does not decide for the group alone.

    ``sm_scale``: the attention's (default ``1 / sqrt(D)``). Query head ``h`` reads KV head ``h // (Hq / Hkv)``.
    Computed as ``q+ . max + q- . min`` (``q+ = max(q, 0)``, ``q- = min(q, 0)``): two matmuls, no ``[.., D]``
    intermediate per block."""
    b, hq, _, d = q.shape
    hkv = key_min.shape[1]
    grouped = q.float().reshape(b, hkv, hq // hkv, d)
    bound = torch.matmul(grouped.clamp(min=0), key_max.float().transpose(-1, -2)) \
        + torch.matmul(grouped.clamp(max=0), key_min.float().transpose(-1, -2))  # [B, Hkv, group, capacity]
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    after = (torch.arange(key_min.shape[2], device=q.device)[None, :] > newest[:, None])[:, None]
    if group == "max":
        return (bound.amax(2) * scale).masked_fill(after, float("-inf"))
    if group == "mass":
        per_head = torch.log_softmax((bound * scale).masked_fill(after[:, None], float("-inf")), dim=-1)
        return torch.logsumexp(per_head, dim=2) - math.log(hq // hkv)
    raise ValueError(f"key_bound_scores: group must be 'max' or 'mass', got {group!r}")


def _group_attention(q: torch.Tensor, key: torch.Tensor, valid: torch.Tensor, sm_scale: float | None) -> torch.Tensor:
    """``[B, Hkv, M]`` (float32): the softmax attention of each row's token (post-RoPE ``q [B, Hq, 1, D]``) over the
    keys ``key [B, Hkv, M, D]`` where ``valid`` (``[B, 1 or Hkv, M]``), averaged over each KV head's group of query
    heads (query head ``h`` reads KV head ``h // (Hq / Hkv)``)."""
    b, hq, _, d = q.shape
    hkv = key.shape[1]
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    logits = torch.matmul(q.float().reshape(b, hkv, hq // hkv, d), key.float().transpose(-1, -2)) * scale
    return torch.softmax(logits.masked_fill(~valid[:, :, None], float("-inf")), dim=-1).mean(2)


def true_block_scores(q: torch.Tensor, key: torch.Tensor, seqlens: torch.Tensor, block_size: int, capacity: int,
                      sm_scale: float | None = None, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """The oracle's block scores ``[B, Hkv, capacity]`` (float32) of each row's newest token (post-RoPE ``q [B, Hq, 1,
    D]``): the log of each key block's share of the token's true attention, ``log(1/G sum_h sum_{j in block}
    softmax_j(sm_scale * q_h . k_j))`` over the KV head's group of G query heads, from the whole KV cache ``key [B, Hkv,
    N, D]`` (each row's keys from position 0; the first ``seqlens[b]`` valid, this token's included); ``-inf`` for
    the blocks with no valid key. ``sm_scale``: the attention's (default ``1 / sqrt(D)``). ``offsets [B]`` (int64):
    where each row's keys start in ``key`` instead (its left padding). It reads every key at every step, so it is a
    yardstick for the estimates (what a perfect block ranking keeps at a budget), not a speedup."""
    b, hkv, n = key.shape[:3]
    if offsets is not None:  # each row's keys from its offset on (past the end: invalid anyway)
        index = (torch.arange(n, device=key.device)[None, :] + offsets[:, None]).clamp(max=n - 1)
        key = key.gather(2, index[:, None, :, None].expand(-1, hkv, -1, key.shape[3]))
    valid = torch.arange(n, device=q.device)[None, None, :] < seqlens[:, None, None]  # [B, 1, N]
    width = capacity * block_size
    probs = torch.nn.functional.pad(_group_attention(q, key, valid, sm_scale)[..., :width], (0, max(0, width - n)))
    mass = probs.view(b, hkv, capacity, block_size).sum(-1)
    blocks = torch.arange(capacity, device=q.device)[None, :] * block_size < seqlens[:, None]  # [B, capacity]
    return mass.clamp_min(1e-30).log().masked_fill(~blocks[:, None], float("-inf"))  # valid blocks stay finite


def reranked_block_scores(q: torch.Tensor, key: torch.Tensor, seqlens: torch.Tensor, scores: torch.Tensor,
                          candidates: int, block_size: int, sm_scale: float | None = None,
                          offsets: torch.Tensor | None = None) -> torch.Tensor:
    """``scores [B, Hkv, capacity]`` (an estimate's block scores, ``-inf`` for invalid blocks) ranked again exactly:
    per KV head its top ``candidates`` blocks get the log of their share of the token's true attention over the
    candidates' keys alone (as :func:`true_block_scores`, from the KV cache ``key [B, Hkv, N, D]``, each row's first
    ``seqlens[b]`` keys valid); every other valid block ranks below them all, in the estimate's order (its score
    less the row's largest and 1e4); invalid blocks stay ``-inf``. ``offsets [B]`` (int64): where each row's keys
    start in ``key`` (its left padding). It reads ``candidates x block_size`` keys per KV head, not the cache.
    Float32."""
    b, hkv, capacity = scores.shape
    top_scores, top = scores.topk(min(candidates, capacity), dim=-1)  # [B, Hkv, c]
    c, n = top.shape[-1], key.shape[2]
    pos = (top[..., None] * block_size + torch.arange(block_size, device=top.device)).flatten(-2)  # [B, Hkv, c * bs]
    chosen = torch.isfinite(top_scores)
    valid = (pos < seqlens[:, None, None]) & chosen.repeat_interleave(block_size, dim=-1)
    at = pos if offsets is None else pos + offsets[:, None, None]
    keys = key.gather(2, at.clamp(max=n - 1)[..., None].expand(-1, -1, -1, key.shape[3]))
    mass = _group_attention(q, keys, valid, sm_scale).view(b, hkv, c, block_size).sum(-1)
    exact = mass.clamp_min(1e-30).log().masked_fill(~chosen, float("-inf"))
    below = scores.float() - scores.float().amax(-1, keepdim=True) - 1e4  # the estimate's order, under every candidate
    return below.scatter(-1, top, exact)


def prompt_block_pins(query: torch.Tensor, key: torch.Tensor, blocks: int, block_size: int,
                      sm_scale: float | None = None, skip_first: bool = False) -> torch.Tensor:
    """One row's pinned prompt blocks ``[Hkv, nb]`` (bool; ``DecodeSparsityConfig.prompt_blocks``): per KV head the
    ``blocks`` key blocks that the prompt's last queries ``query [Hq, w, D]`` (post-RoPE, tokens ``n - w .. n - 1``)
    attend most, by their causal softmax attention over the prompt's keys ``key [Hkv, n, D]`` at ``sm_scale``
    (default ``1 / sqrt(D)``), summed over the ``w`` queries, the KV head's group of query heads and each block's
    keys (SnapKV's observation window). ``skip_first``: block 0 is not chosen (it is kept anyway). Every block when the
    prompt has no more (of those that may be chosen). Query head ``h`` reads KV head ``h // (Hq / Hkv)``."""
    hq, w, d = query.shape
    hkv, n, _ = key.shape
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    q = query.float().reshape(hkv, hq // hkv * w, d)  # each KV head's group of query heads, their w queries each
    logits = torch.matmul(q, key.float().transpose(-1, -2)) * scale  # [Hkv, G * w, n]
    position = (n - w + torch.arange(w, device=key.device)).repeat(hq // hkv)  # [G * w]
    logits = logits.masked_fill(torch.arange(n, device=key.device) > position[:, None], float("-inf"))
    mass = torch.softmax(logits, dim=-1).sum(1)  # [Hkv, n]
    nb = -(-n // block_size)
    mass = torch.nn.functional.pad(mass, (0, nb * block_size - n)).view(hkv, nb, block_size).sum(-1)
    if skip_first:
        mass[:, 0] = float("-inf")
    top = mass.topk(min(blocks, nb - skip_first), dim=-1).indices
    return torch.zeros(hkv, nb, dtype=torch.bool, device=key.device).scatter_(1, top, True)


def newest_scores(gate: DecodeGate, store: torch.Tensor, q: torch.Tensor, key: torch.Tensor, position: torch.Tensor,
                  newest: torch.Tensor) -> torch.Tensor:
    """Gate logits ``[B, Hkv, capacity]`` of each row's newest token (pre-RoPE ``q [B, Hq, 1, D]`` at ``position``
    ``[B]``) over the gate keys ``store``, the newest block's (``newest [B]``) from its gate key so far (``key
    [B, Hkv, 1, E]``); ``-inf`` after it (:meth:`DecodeKeyCache.scores`). A function of tensors."""
    qg = gate.gate_queries(q, position[:, None])  # [B, Hkv, 1, E]
    scale = 1.0 / math.sqrt(qg.shape[-1])
    logits = torch.matmul(qg, store.to(qg.dtype).transpose(-1, -2)).squeeze(2) * scale  # [B, Hkv, capacity]
    own = (qg * key.to(qg.dtype)).sum(-1) * scale  # [B, Hkv, 1]
    logits = logits.scatter(-1, newest[:, None, None].expand(*own.shape), own)
    after = torch.arange(store.shape[2], device=q.device)[None, :] > newest[:, None]
    return logits.masked_fill(after[:, None], float("-inf"))


class DecodeKeyCache:
    """Compressed keys of ``batch_size`` sequences for the decode ``gates`` (``{layer_idx: DecodeGate}``, one block
    size), stored in ``dtype`` (default: the gates'), with room for ``max_length`` tokens a row (None: grown as
    needed, see the module docstring). ``seqlens[layer]`` (int32 on the device) holds each row's cached keys. With
    ``bounds_dtype`` (the KV cache's dtype) it takes the post-RoPE keys too and keeps their ``key_stats``: Quest's
    key bounds (``"bounds"``: ``key_min``, ``key_max``), their moments (``"moments"``: ``key_sum``, ``key_sq``) or
    both (see the module docstring). ``gates`` may instead hold a :class:`BoundsOnly` for every layer (no decode
    gates): then the cache keeps only those (``bounds_dtype`` needed) and ``device`` says where (default: the CPU)."""

    def __init__(self, gates: dict[int, DecodeGate | BoundsOnly], batch_size: int, dtype: torch.dtype | None = None,
                 max_length: int | None = None, bounds_dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, key_stats: tuple[str, ...] = ("bounds",)):
        if not gates:
            raise ValueError("a decode key cache needs at least one decode gate")
        kinds = {isinstance(g, BoundsOnly) for g in gates.values()}
        if len(kinds) != 1:
            raise ValueError("a decode key cache has a decode gate in every layer or in none (BoundsOnly)")
        sizes = {layer_block_size(g) for g in gates.values()}
        if len(sizes) != 1:
            raise ValueError(f"decode gates of one model must share a block size; got {sorted(sizes)}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1 (tokens a row), got {max_length}")
        self.gated = not kinds.pop()
        if not self.gated and bounds_dtype is None:
            raise ValueError("a decode key cache without decode gates keeps only key bounds: give bounds_dtype")
        if not key_stats or not set(key_stats) <= {"bounds", "moments"}:
            raise ValueError(f"key_stats names 'bounds', 'moments' or both; got {key_stats!r}")
        self.gates, self.batch_size, self.max_length = gates, batch_size, max_length
        self.block_size = bs = sizes.pop()
        gated = {i: g for i, g in gates.items() if self.gated}
        gate = next(iter(gated.values()), None)
        self.dtype = dtype or (gate.k_weight.dtype if gate is not None else torch.float32)
        device = gate.k_weight.device if gate is not None else torch.device(device or "cpu")
        capacity = -(-max_length // bs) if max_length is not None else 0
        self.keys = {i: torch.zeros(batch_size, g.num_kv_heads, capacity, g.config.hidden_size, dtype=self.dtype,
                                    device=device) for i, g in gated.items()}
        self.tails = {i: torch.zeros(batch_size, g.num_kv_heads, bs, g.head_dim, device=device)
                      for i, g in gated.items()}
        self.seqlens = {i: torch.zeros(batch_size, dtype=torch.int32, device=device) for i in gates}
        self.post_keys = bounds_dtype is not None  # takes post-RoPE keys and keeps their statistics

        def per_block(dtype: torch.dtype | None, kept: bool) -> dict[int, torch.Tensor]:
            return {i: torch.zeros(batch_size, g.num_kv_heads, capacity, g.head_dim, dtype=dtype, device=device)
                    for i, g in gates.items()} if self.post_keys and kept else {}

        self.key_min = per_block(bounds_dtype, "bounds" in key_stats)  # Quest's bounds, in the KV cache's dtype
        self.key_max = {i: t.clone() for i, t in self.key_min.items()}
        self.moments = self.post_keys and "moments" in key_stats  # the sums of the keys and of their squares
        self.key_sum = per_block(torch.float32, self.moments)
        self.key_sq = {i: t.clone() for i, t in self.key_sum.items()}
        self.pinned: dict[int, torch.Tensor] = {}  # [B, Hkv, capacity] bool: the prompt blocks kept (pin_prompt)
        self.longest = {i: 0 for i in gates}  # host bounds of the row lengths (see the module docstring)
        self.shortest = {i: 0 for i in gates}
        self._newest: dict[int, tuple | None] = {i: None for i in gates}  # the last decode step's, for scores()
        self.offsets = [0] * batch_size  # where each row's keys start in the model's KV cache (its left padding)

    @property
    def capacity(self) -> int:
        """Blocks a row has room for (the gate-key buffer's, or without gates the key statistics', length)."""
        return next(iter(self._blocks().values())).shape[2]

    def _blocks(self) -> dict[int, torch.Tensor]:
        """Per layer a buffer ``[B, Hkv, capacity, ...]``: the gate keys', or without gates a key statistic's."""
        return self.keys or self.key_min or self.key_sum

    def update(self, layer: int, k: torch.Tensor | None, new_tokens: torch.Tensor | None = None,
               k_post: torch.Tensor | None = None) -> None:
        """Appends pre-RoPE keys ``k [B, Hkv, T, D]`` of layer ``layer``: ``new_tokens [B]`` of them for each row
        (the first ones; default all ``T``); every block this fills gets its gate key. ``k_post``: the same keys
        after RoPE, for the key bounds (given exactly when the cache keeps them). Without decode gates ``k`` is None
        (only ``k_post`` is read). One token for every row (a decode step) takes the batched path, which reads
        nothing from the device."""
        if not self.gated:
            if k is not None or k_post is None:
                raise ValueError(f"layer {layer}: a decode key cache without decode gates takes the post-RoPE keys "
                                 f"only (k=None, k_post=[B, Hkv, T, D])")
            k = k_post
        self._check_keys(layer, k)
        if (k_post is not None) != self.post_keys or k_post is not None and k_post.shape != k.shape:
            raise ValueError(f"layer {layer}: post-RoPE keys of the shape of the keys {tuple(k.shape)} are "
                             f"{'needed' if self.post_keys else 'not taken'} (key statistics "
                             f"{'' if self.post_keys else 'not '}kept); got "
                             f"{None if k_post is None else tuple(k_post.shape)}")
        if new_tokens is None and k.shape[2] == 1:
            self._step(layer, k, k_post)
        else:
            self._append(layer, k, new_tokens, k_post)

    def _check_keys(self, layer: int, k: torch.Tensor) -> None:
        gate = self.gates[layer]
        if k.dim() != 4 or k.shape[0] != self.batch_size or k.shape[1] != gate.num_kv_heads \
                or k.shape[3] != gate.head_dim:
            raise ValueError(f"layer {layer}: keys must be [{self.batch_size}, {gate.num_kv_heads}, T, "
                             f"{gate.head_dim}]; got {tuple(k.shape)}")

    def _check_query(self, layer: int, q: torch.Tensor) -> None:
        gate = self.gates[layer]
        if q.dim() != 4 or q.shape[:3] != (self.batch_size, gate.num_heads, 1):
            raise ValueError(f"layer {layer}: q must be [{self.batch_size}, {gate.num_heads}, 1, {gate.head_dim}]; "
                             f"got {tuple(q.shape)}")

    def _room(self, layer: int, length: int) -> None:
        """Makes room in ``layer``'s gate-key buffer for the blocks of rows of ``length`` tokens, the newest partial
        one included (host decision; with ``max_length`` the buffer never grows)."""
        if self.max_length is not None:
            if length > self.max_length:
                raise ValueError(f"layer {layer}: a row of {length} tokens passes the decode key cache's "
                                 f"max_length {self.max_length}")
            return
        blocks, capacity = -(-length // self.block_size), self._blocks()[layer].shape[2]
        if blocks <= capacity:
            return
        for buffers in (self.keys, self.key_min, self.key_max, self.key_sum, self.key_sq, self.pinned):
            if layer in buffers:
                store = buffers[layer]
                grown = store.new_zeros(*store.shape[:2], max(blocks, 2 * capacity), *store.shape[3:])
                grown[:, :, :capacity] = store
                buffers[layer] = grown

    def _step(self, layer: int, k: torch.Tensor, k_post: torch.Tensor | None) -> None:
        """One key ``k [B, Hkv, 1, D]`` (and its post-RoPE ``k_post``) for every row, batched (no host read, static
        shapes)."""
        self._room(layer, self.longest[layer] + 1)
        if self.gated:
            newest = step_keys(self.gates[layer], self.keys[layer], self.tails[layer], self.seqlens[layer], k)
        else:
            newest = (None, *step_position(self.seqlens[layer], self.block_size))
        _, position, block = newest
        if self.key_min:
            step_key_bounds(self.key_min[layer], self.key_max[layer], k_post, position, block, self.block_size)
        if self.moments:
            step_key_moments(self.key_sum[layer], self.key_sq[layer], k_post, position, block, self.block_size)
        self.stepped(layer, newest)

    def check_step(self, layer: int, k: torch.Tensor, q: torch.Tensor) -> None:
        """The host part of a one-token step before its tensor work (:func:`step_keys`, :func:`newest_scores`): the
        input checks of :meth:`update` and :meth:`scores` (without decode gates: of the post-RoPE key and query),
        and room for the new token."""
        self._check_keys(layer, k)
        if k.shape[2] != 1:
            raise ValueError(f"layer {layer}: a one-token step takes keys [B, Hkv, 1, D]; got {tuple(k.shape)}")
        self._check_query(layer, q)
        self._room(layer, self.longest[layer] + 1)

    def stepped(self, layer: int, newest: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        """The host part of a one-token step after its tensor work: ``newest`` (what :func:`step_keys` returned, the
        new token's gate key, position and block) kept for :meth:`scores`, the host bounds of the lengths advanced."""
        self._newest[layer] = newest
        self.longest[layer] += 1
        self.shortest[layer] += 1

    def _append(self, layer: int, k: torch.Tensor, new_tokens: torch.Tensor | None,
                k_post: torch.Tensor | None) -> None:
        """Per-row counts (a prefill, or a step of several tokens): row by row on the host (without decode gates
        only the key statistics and lengths)."""
        gate, bs = self.gates[layer], self.block_size
        counts = [k.shape[2]] * self.batch_size if new_tokens is None else new_tokens.tolist()
        if len(counts) != self.batch_size or min(counts) < 0 or max(counts) > k.shape[2]:
            raise ValueError(f"layer {layer}: new_tokens must be {self.batch_size} counts in [0, {k.shape[2]}]; "
                             f"got {counts}")
        tails, seqlens = self.tails.get(layer), self.seqlens[layer]
        lengths = seqlens.tolist()
        made, bounded = [], []
        for row, count in enumerate(counts):
            if not count:
                continue
            if k_post is not None:
                keys, skipped = k_post[row, :, :count], lengths[row] % bs
                bounded.append((row, lengths[row],
                                *(_block_bounds(keys, skipped, bs) if self.key_min else (None, None)),
                                *(_block_moments(keys, skipped, bs) if self.moments else (None, None))))
            if not self.gated:
                lengths[row] += count
                continue
            partial = lengths[row] % bs  # tokens of an unfinished newest block
            tokens = torch.cat((tails[row, :, :partial], k[row, :, :count].to(tails.dtype)), dim=1)
            full = tokens.shape[1] // bs
            if full:
                pooled = pool_blocks(tokens[None, :, :full * bs], bs, gate.config.k_pool)
                first = lengths[row] // bs
                starts = (first + torch.arange(full, device=k.device)) * bs
                made.append((row, first, gate.gate_keys(pooled, starts)[0].to(self.dtype)))
            rest = tokens.shape[1] - full * bs
            newest = tokens[:, full * bs:] if rest else tokens[:, (full - 1) * bs:full * bs]
            tails[row, :, :newest.shape[1]] = newest
            lengths[row] += count
        seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))
        self.longest[layer], self.shortest[layer] = max(lengths), min(lengths)
        self._newest[layer] = None
        self._room(layer, max(lengths))
        for row, first, keys in made:
            self.keys[layer][row, :, first:first + keys.shape[1]] = keys
        for row, length, low, high, total, squares in bounded:  # the first block's so far folded in when it has keys
            first = length // bs
            if low is not None:
                blocks = slice(first, first + low.shape[1])
                if length % bs:
                    low[:, 0] = torch.minimum(low[:, 0], self.key_min[layer][row, :, first])
                    high[:, 0] = torch.maximum(high[:, 0], self.key_max[layer][row, :, first])
                self.key_min[layer][row, :, blocks] = low
                self.key_max[layer][row, :, blocks] = high
            if total is not None:
                blocks = slice(first, first + total.shape[1])
                if length % bs:
                    total[:, 0] += self.key_sum[layer][row, :, first]
                    squares[:, 0] += self.key_sq[layer][row, :, first]
                self.key_sum[layer][row, :, blocks] = total
                self.key_sq[layer][row, :, blocks] = squares

    def pin_prompt(self, layer: int, pins: list[torch.Tensor]) -> None:
        """Keeps each row's prompt blocks ``pins[b] [Hkv, nb_b]`` (bool, :func:`prompt_block_pins`; after the
        prefill's :meth:`update`, which made room for them) as ``pinned[layer] [B, Hkv, capacity]``, replacing any
        earlier ones."""
        if len(pins) != self.batch_size:
            raise ValueError(f"layer {layer}: pins for {self.batch_size} rows are needed, got {len(pins)}")
        store = self._blocks()[layer]
        pinned = torch.zeros(*store.shape[:3], dtype=torch.bool, device=store.device)
        for row, pin in enumerate(pins):
            if pin.shape[0] != store.shape[1] or pin.shape[1] > store.shape[2]:
                raise ValueError(f"layer {layer}: row {row}'s pins {tuple(pin.shape)} do not fit [{store.shape[1]}, "
                                 f"<= {store.shape[2]}]")
            pinned[row, :, :pin.shape[1]] = pin
        self.pinned[layer] = pinned

    def scores(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Gate logits ``[B, Hkv, capacity]`` of each row's newest token (pre-RoPE ``q [B, Hq, 1, D]``, its key
        already in the cache) over the blocks the cache has room for; ``-inf`` after a row's newest block."""
        gate, bs = self.gates[layer], self.block_size
        if not self.gated:
            raise ValueError("this decode key cache has no decode gates, only key bounds: use bound_scores")
        if self.shortest[layer] < 1:
            raise ValueError(f"layer {layer}: every row needs a cached key (its own) before scoring; lengths "
                             f"{self.seqlens[layer].tolist()}")
        self._check_query(layer, q)
        store = self.keys[layer]
        if self._newest[layer] is None:  # after a prefill: the newest block pooled over its keys so far
            position = self.seqlens[layer].long() - 1  # each row's newest token, on the device
            newest = (position // bs).clamp(max=store.shape[2] - 1)
            key = gate.gate_keys(pool_prefix(self.tails[layer], position % bs + 1, gate.config.k_pool),
                                 (position // bs * bs)[:, None])
            full = ((position % bs) == bs - 1)[:, None, None, None]
            key = torch.where(full, key.to(store.dtype).to(key.dtype), key)
        else:
            key, position, newest = self._newest[layer]
        return newest_scores(gate, store, q, key, position, newest)

    def bound_scores(self, layer: int, q: torch.Tensor, sm_scale: float | None = None) -> torch.Tensor:
        """Quest's block scores ``[B, Hkv, capacity]`` of each row's newest token (post-RoPE ``q [B, Hq, 1, D]``, its
        key already in the cache; :func:`key_bound_scores`); ``-inf`` after a row's newest block."""
        if not self.key_min:
            raise ValueError("this decode key cache keeps no key bounds (give bounds_dtype, and 'bounds' in "
                             "key_stats)")
        if self.shortest[layer] < 1:
            raise ValueError(f"layer {layer}: every row needs a cached key (its own) before scoring; lengths "
                             f"{self.seqlens[layer].tolist()}")
        self._check_query(layer, q)
        newest = ((self.seqlens[layer].long() - 1) // self.block_size).clamp(max=self.capacity - 1)
        return key_bound_scores(q, self.key_min[layer], self.key_max[layer], newest, sm_scale)

    def clone(self) -> DecodeKeyCache:
        """A copy that later steps of either do not change (the gates shared)."""
        new = copy.copy(self)
        new.keys = {i: t.clone() for i, t in self.keys.items()}
        new.tails = {i: t.clone() for i, t in self.tails.items()}
        new.seqlens = {i: t.clone() for i, t in self.seqlens.items()}
        new.key_min = {i: t.clone() for i, t in self.key_min.items()}
        new.key_max = {i: t.clone() for i, t in self.key_max.items()}
        new.key_sum = {i: t.clone() for i, t in self.key_sum.items()}
        new.key_sq = {i: t.clone() for i, t in self.key_sq.items()}
        new.pinned = {i: t.clone() for i, t in self.pinned.items()}
        new.longest, new.shortest, new._newest = dict(self.longest), dict(self.shortest), dict(self._newest)
        new.offsets = list(self.offsets)
        return new

    def copy_(self, other: DecodeKeyCache) -> DecodeKeyCache:
        """Puts ``other``'s contents (a :meth:`clone` of this cache, same capacity) into this cache's tensors in
        place, so that a CUDA graph captured over them replays from there."""
        for mine, theirs in ((self.keys, other.keys), (self.tails, other.tails), (self.seqlens, other.seqlens),
                             (self.key_min, other.key_min), (self.key_max, other.key_max),
                             (self.key_sum, other.key_sum), (self.key_sq, other.key_sq), (self.pinned, other.pinned)):
            if mine.keys() != theirs.keys() or any(mine[i].shape != theirs[i].shape for i in mine):
                raise ValueError("copy_ needs a decode key cache of the same layers, batch and capacity")
            for i, t in mine.items():
                t.copy_(theirs[i])
        self.longest, self.shortest, self._newest = dict(other.longest), dict(other.shortest), dict(other._newest)
        self.offsets = list(other.offsets)
        return self

    def memory_bytes(self) -> int:
        """Bytes the cache holds for the gates: the gate-key buffers (as allocated) and the newest blocks' keys."""
        return sum(t.numel() * t.element_size() for d in (self.keys, self.tails) for t in d.values())

    def bounds_memory_bytes(self) -> int:
        """Bytes of the key bounds and moments (as allocated; 0 without them)."""
        return sum(t.numel() * t.element_size() for d in (self.key_min, self.key_max, self.key_sum, self.key_sq)
                   for t in d.values())


def _block_bounds(keys: torch.Tensor, skipped: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The elementwise min and max ``[Hkv, blocks, D]`` of the keys ``[Hkv, T, D]`` per block, the first block's
    first ``skipped`` slots (keys before these) left out."""
    h, t, d = keys.shape
    blocks = -(-(skipped + t) // block_size)
    slots = (skipped, blocks * block_size - skipped - t)
    low = torch.nn.functional.pad(keys, (0, 0, *slots), value=float("inf"))
    high = torch.nn.functional.pad(keys, (0, 0, *slots), value=float("-inf"))
    return low.view(h, blocks, block_size, d).amin(2), high.view(h, blocks, block_size, d).amax(2)


def _block_moments(keys: torch.Tensor, skipped: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sums of the keys ``[Hkv, T, D]`` and of their squares per block, ``[Hkv, blocks, D]`` float32, the first
    block's first ``skipped`` slots (keys before these) left out."""
    h, t, d = keys.shape
    blocks = -(-(skipped + t) // block_size)
    padded = torch.nn.functional.pad(keys.float(), (0, 0, skipped, blocks * block_size - skipped - t))
    padded = padded.view(h, blocks, block_size, d)
    return padded.sum(2), (padded * padded).sum(2)
