"""Decode gates inside a Hugging Face model: one :class:`~seer.gates.decode_gate.DecodeGate` per attention layer
(submodule ``seer_decode_gate``), fed the layer's pre-RoPE Q and K by forward hooks, as the prefill gates are.

:func:`attach_decode_gates` adds them and a shared :class:`DecodeContext`. For their distillation,
:meth:`DecodeContext.distilling` runs the model through the ``"seer_decode_distill"`` attention function
(registered in transformers' ``AttentionInterface``): dense attention of an unpadded causal prefill (teacher
forcing) plus, per layer, the decode gate's logits for every token (with grad) and their ground truth
(:func:`seer.kernels.decode_gt.decode_block_gt`), handed to the context's consumer as a :class:`DecodeRecord`.

Sparse decode (:meth:`DecodeContext.enable`, on a model prepared for the ``"seer"`` attention function): every
prefill that keeps a KV cache (``use_cache``) starts a :class:`~seer.model.decode_cache.DecodeKeyCache` with each
row's real keys (left, right or no padding); every decode step of one token adds its key there, scores the blocks
of its sequence with the decode gate, keeps the blocks of the budget (:func:`seer.sparsity.decode.decode_step_blocks`)
and attends them over transformers' KV cache with :func:`seer.kernels.block_sparse_decode` (Triton) or its PyTorch
reference. The KV cache is a DynamicCache (``[B, Hkv, N, D]``, the newest token last; a left-padded row's sequence
starts after its padding, so rows with padding are attended one by one) or a StaticCache (``[B, Hkv, max_cache_len,
D]``, each row's keys from position 0; unpadded prompts only; the compressed-K cache is then sized for
``max_cache_len``). Steps of several tokens over a cache are added to the compressed-K cache and attended densely.
Without decode gates (:func:`attach_quest_decode`) the steps are scored by Quest alone: the cache keeps only the key
bounds, and no pre-RoPE hooks are added. With ``DecodeSparsityConfig.prompt_blocks`` every prefill also pins, per row
and KV head, the blocks its last block of queries attends most (:func:`~seer.model.decode_cache.prompt_block_pins`),
kept at every step.
A budget with a training-free estimate (``DecodeSparsityConfig.estimate="quest"``) makes the compressed-K cache keep
the key bounds of each block too, from the post-RoPE keys of the KV cache, and mixes their bounds of the post-RoPE
query's logits into the gate's block scores (:func:`seer.sparsity.decode.mix_estimate`).
The achieved density (kept share of each token's valid blocks, mean over rows, heads and steps) is summed per layer
on the device, in place, and read only by :meth:`DecodeContext.densities` (until the next prefill).

A one-token decode step reads nothing back from the device and has shapes fixed on the host, so it can be captured
in a CUDA graph (after an eager step, which allocates the density sums): sequence lengths come from the compressed-K
cache (``seqlens`` on the device, advanced in place), its scores cover the cache's fixed capacity of blocks, the block
list has a width fixed on the host (:meth:`~seer.sparsity.decode.DecodeSparsityConfig.max_kept_blocks`), and neither
the budget nor the kernel validates values on the host. Host state used by a step is only what a prefill fixed (each
row's offset in the KV cache, the capacity).

The tensor work of a one-token step of a layer (the compressed-K cache update, the gate scores, the block list and
density, the density sums) is one function of tensors and plain config, :func:`sparse_decode_step`; the host
bookkeeping around it (input checks, the capacity, the host length bounds) stays in :meth:`DecodeContext._step`. With
``DecodeSparsityConfig.compile`` it runs through ``torch.compile`` (``COMPILE_BACKEND``, default inductor;
``dynamic=False``, ``fullgraph=True``), compiled once per process and shape and shared by every layer, so that its
some 70 small kernels a layer become a few fused ones. A compiled step stays capturable in a CUDA graph (no host read
inside; not ``mode="reduce-overhead"``, since the caller captures the whole model step), once an eager step has
compiled it. A DynamicCache whose compressed-K store grows recompiles at each new capacity.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from seer.gates import rope_frequencies
from seer.gates.decode_config import DecodeGateConfig
from seer.gates.config import GateConfig
from seer.gates.decode_gate import DecodeGate, SharedPrefillGate
from seer.kernels.decode_gt import decode_block_gt
from seer.model.attention import (SeerContext, _dense, _PreRopeStash, attach_gates, attention_layers, check_model,
                                  layer_shape, seer_attention, seer_mask)
from seer.model.decode_cache import (BoundsOnly, DecodeKeyCache, key_bound_scores, key_moment_scores,
                                     layer_block_size, newest_scores, prompt_block_pins, reranked_block_scores,
                                     step_key_bounds, step_key_moments, step_keys, step_position, true_block_scores)
from seer.sparsity.decode import ESTIMATE_GROUPS, DecodeSparsityConfig, decode_step_blocks, mix_estimate

DISTILL_ATTENTION = "seer_decode_distill"


@dataclass
class DecodeRecord:
    """What one layer hands the consumer while distilling: decode-gate logits ``[B, Hkv, N, nb]`` (with grad) and
    the normalised ground truth of the same shape."""

    layer_idx: int
    logits: torch.Tensor
    gt: torch.Tensor


@dataclass
class DecodeContext:
    """The decode gates of one model (``gates``, by layer) and their config. While distilling, ``consumer`` takes
    each layer's :class:`DecodeRecord` and ``gt_source`` says where the ground truth comes from. With a decode budget
    (``sparsity``, set by :meth:`enable`) decode steps attend the blocks it keeps (see the module docstring);
    ``cache`` holds the compressed keys of the current generation and ``density`` each layer's ``(sum of step
    densities, steps)`` (device tensors, added to in place). Training-free decode (:func:`attach_quest_decode`) has no
    ``config`` and a :class:`~seer.model.decode_cache.BoundsOnly` for each layer in ``gates``."""

    config: DecodeGateConfig | None
    gates: dict[int, DecodeGate | BoundsOnly] = field(default_factory=dict)
    consumer: Callable[[DecodeRecord], None] | None = None
    gt_source: str = "reference"
    sparsity: DecodeSparsityConfig | None = None
    threshold: float | None = None
    kernel: str = "reference"
    cache: DecodeKeyCache | None = None
    density: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)

    @property
    def block_size(self) -> int:
        """Tokens a key block of the decode selection holds."""
        return self.config.block_size if self.config is not None else layer_block_size(next(iter(self.gates.values())))

    @property
    def gated(self) -> bool:
        """Whether decode gates score the blocks (False: Quest alone, training-free)."""
        return self.config is not None

    @contextlib.contextmanager
    def distilling(self, model: nn.Module, consumer: Callable[[DecodeRecord], None],
                   gt_source: str = "reference") -> Iterator[None]:
        """Inside the block, ``model`` runs dense through the distillation attention function and every layer's
        record goes to ``consumer``, its ground truth from ``gt_source`` (``reference``: SDPA and the chunked PyTorch
        map; ``triton``: the FlashAttention kernel's output and log-sum-exp, then one Triton pass); the model's
        attention function is restored when it ends."""
        if gt_source not in ("reference", "triton"):
            raise ValueError(f"gt_source {gt_source!r} is not one of ('reference', 'triton')")
        before = model.config._attn_implementation
        model.set_attn_implementation(DISTILL_ATTENTION)
        self.consumer, self.gt_source = consumer, gt_source
        try:
            yield
        finally:
            self.consumer, self.gt_source = None, "reference"
            model.set_attn_implementation(before)

    def enable(self, sparsity: DecodeSparsityConfig, kernel: str = "reference", threshold: float | None = None) -> None:
        """Decode steps from now on attend the blocks ``sparsity`` keeps (``threshold``: the calibrated threshold
        of a calibrated budget), with the Triton kernel (``kernel="triton"``) or the PyTorch reference; the model
        must run the ``"seer"`` attention function (:func:`seer.model.attention.prepare_model`)."""
        sparsity.check_block_size(self.block_size)
        if not self.gated:
            sparsity.check_training_free()
        if kernel not in ("reference", "triton"):
            raise ValueError(f"kernel {kernel!r} is not one of ('reference', 'triton')")
        if sparsity.calibrated and threshold is None:
            raise ValueError(f"decode_sparsity.target_density={sparsity.target_density} needs its calibrated "
                             f"threshold (seer.sparsity.decode.find_decode_calibration)")
        self.sparsity, self.kernel = sparsity, kernel
        self.threshold = threshold if sparsity.calibrated else None
        self.cache = None
        self.density.clear()

    def disable(self) -> None:
        """Decode steps attend densely again (the gates idle, no compressed-K cache kept)."""
        self.sparsity, self.threshold, self.cache = None, None, None
        self.density.clear()

    @contextlib.contextmanager
    def running(self, sparsity: DecodeSparsityConfig | None, kernel: str = "reference",
                threshold: float | None = None) -> Iterator[DecodeContext]:
        """Inside the block decode steps attend as :meth:`enable` sets them (``sparsity`` None: densely, as after
        :meth:`disable`); the budget before it is back when it ends."""
        before = self.sparsity, self.kernel, self.threshold
        self._switch(sparsity, kernel, threshold)
        try:
            yield self
        finally:
            self._switch(*before)

    def _switch(self, sparsity: DecodeSparsityConfig | None, kernel: str, threshold: float | None) -> None:
        if sparsity is None:
            self.disable()
        else:
            self.enable(sparsity, kernel, threshold)

    def densities(self) -> dict[int, float]:
        """Achieved decode density of each layer over the decode steps since the last prefill (read from the device
        here, once per layer)."""
        return {layer: float(total) / int(steps) for layer, (total, steps) in sorted(self.density.items())
                if int(steps)}

    def mean_density(self) -> float:
        """:meth:`densities` averaged over layers (nan before any decode step)."""
        dens = self.densities()
        return sum(dens.values()) / len(dens) if dens else float("nan")

    def reset_density(self) -> None:
        """Zeroes the density sums in place (a CUDA graph captured over them keeps adding to the same tensors)."""
        for total, steps in self.density.values():
            total.zero_()
            steps.zero_()

    def handle(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float | None, **kwargs) -> torch.Tensor | None:
        """The decode gates' part of the ``"seer"`` attention function in one layer: with a budget on, a decode step
        (cached keys before the queries) is attended here (its output ``[B, T, Hq, D]`` returned) and a prefill that
        keeps a KV cache (``use_cache``) fills the compressed-K cache; None where the prefill path attends. The
        pre-RoPE Q/K the hooks stashed are always taken, so none outlives its forward.

        A prefill is a forward whose queries are all its keys (DynamicCache), or several queries over more keys with
        no mask: a prefill into a preallocated cache (StaticCache: keys ``[B, Hkv, max_cache_len, D]``), for which
        transformers drops the causal mask only when no key is cached before the queries (its upper-left causal
        alignment). A padded prompt into a StaticCache (:func:`~seer.model.attention.seer_mask` marks its mask) is
        refused. (A one-token prompt into a StaticCache reads as a decode step; it is refused as one before any
        prefill.)"""
        if self.sparsity is not None:
            t, n = query.shape[2], key.shape[2]
            if getattr(attention_mask, "seer_static_prefill", False):
                raise ValueError("sparse decode over a static KV cache (StaticCache) needs unpadded prompts: a "
                                 "left-padded batch's sequences do not start at the cache's first position; use "
                                 "transformers' DynamicCache for padded batches")
            static_prefill = 1 < t < n and attention_mask is None
            if t != n and not static_prefill:
                return self._step(module, query, key, value, attention_mask, scaling, **kwargs)
            if kwargs.get("use_cache"):
                self._prefill(module, query, key, attention_mask, n if static_prefill else None, scaling)
                return None
        if self.gated:
            module.seer_decode_stash.q = module.seer_decode_stash.k = None
        return None

    def _prefill(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                 attention_mask: torch.Tensor | None, max_length: int | None, scaling: float | None) -> None:
        """Puts a prefill's pre-RoPE keys (as many as its queries ``query [B, Hq, T, D]``; each row's real tokens:
        ``attention_mask`` is None or carries ``seer_spans``) into the compressed-K cache, which the first gated layer
        starts afresh (sized for ``max_length`` tokens, a static KV cache's length; None: grown as needed), and with
        an estimate their post-RoPE keys (the KV cache ``key``'s first ones) into its key bounds (without decode
        gates, only those). With ``prompt_blocks``, each row's pinned prompt blocks from its last queries
        (:func:`~seer.model.decode_cache.prompt_block_pins` at the attention's ``scaling``)."""
        k_pre = module.seer_decode_stash.take()[1] if self.gated else None
        layer = module.layer_idx
        quest = self.sparsity.estimate is not None
        tokens = query.shape[2]
        if layer == min(self.gates) or self.cache is None:
            self.cache = DecodeKeyCache(self.gates, key.shape[0], max_length=max_length,
                                        bounds_dtype=key.dtype if quest else None, device=key.device,
                                        key_stats=("moments",) if self.sparsity.estimate == "moments"
                                        else ("bounds",))
            self.density.clear()
        k_post = key[:, :, :tokens] if quest else None
        spans = [(0, tokens)] * key.shape[0]
        if attention_mask is None:
            self.cache.update(layer, k_pre, k_post=k_post)
        else:
            spans = getattr(attention_mask, "seer_spans", None)
            if spans is None:
                raise ValueError("sparse decode needs a prefill without padding or with one run of real tokens per "
                                 "row (left or right padding); this attention mask has holes")
            counts = [end - first for first, end in spans]
            self.cache.offsets = [first for first, _ in spans]  # a left-padded row's sequence starts after its padding
            self.cache.update(layer, None if k_pre is None else _real_tokens(k_pre, spans), torch.tensor(counts),
                              None if k_post is None else _real_tokens(k_post, spans))
        if self.sparsity.prompt_blocks:  # from each row's last block of queries
            bs = self.block_size
            self.cache.pin_prompt(layer, [prompt_block_pins(
                query[row, :, max(first, end - bs):end], key[row, :, first:end], self.sparsity.prompt_blocks, bs,
                scaling, self.sparsity.first_block) for row, (first, end) in enumerate(spans)])

    def _step(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, scaling: float | None, **kwargs) -> torch.Tensor:
        """One decode step of one layer over the KV cache ``key``/``value [B, Hkv, N, D]``: each row's keys from
        its offset (its left padding) on, this step's last (DynamicCache), or from 0 with room after them
        (StaticCache); returns the attention output ``[B, T, Hq, D]``. A one-token step reads nothing from the
        device and has shapes fixed on the host (CUDA-graph capturable once an eager step has run)."""
        q_pre, k_pre = module.seer_decode_stash.take() if self.gated else (None, None)
        layer = module.layer_idx
        cache = self.cache
        if cache is None:
            raise RuntimeError("a decode step before any prefill with use_cache: sparse decode has no compressed keys")
        quest = self.sparsity.estimate is not None
        k_post = _new_keys(cache, layer, key, query.shape[2]) if quest else None
        if query.shape[2] != 1:  # several tokens over a cache (e.g. assisted decoding): dense
            cache.update(layer, k_pre, k_post=k_post)
            return _dense(module, query, key, value, attention_mask, 0.0, scaling, **kwargs)[0]
        cache.check_step(layer, *((k_pre, q_pre) if self.gated else (k_post, query)))
        if key.shape[2] < cache.longest[layer] + 1:
            raise ValueError(f"layer {layer}: the KV cache holds {key.shape[2]} keys, fewer than a sequence's "
                             f"{cache.longest[layer] + 1}; sparse decode needs transformers' DynamicCache or "
                             f"StaticCache")
        seqlens = cache.seqlens[layer]  # each row's real keys, this token's included once stepped (int32, on device)
        if layer not in self.density:  # sums on the device, added to in place
            self.density[layer] = (torch.zeros((), device=seqlens.device), torch.zeros((), dtype=torch.int64,
                                                                                       device=seqlens.device))
        total, steps = self.density[layer]
        step = _compiled_step() if self.sparsity.compile else sparse_decode_step
        estimate = dict(key_min=cache.key_min.get(layer), key_max=cache.key_max.get(layer), k_post=k_post,
                        q_post=query, sm_scale=scaling, key_sum=cache.key_sum.get(layer),
                        key_sq=cache.key_sq.get(layer)) if quest else {}
        if self.sparsity.reads_keys:  # the KV cache's keys, and where each row's start (its left padding), if anywhere
            offsets = torch.tensor(cache.offsets, device=key.device) if any(cache.offsets) else None
            estimate.update(q_post=query, sm_scale=scaling, keys=key, key_offsets=offsets)
            if self.sparsity.compile and cache.max_length is None:  # a DynamicCache's keys grow every step:
                torch._dynamo.maybe_mark_dynamic(key, 2)  # one graph for every length
        index, *newest = step(cache.gates[layer], cache.keys.get(layer), cache.tails.get(layer), seqlens, total, steps,
                              k_pre, q_pre, self.sparsity, self.threshold, pinned=cache.pinned.get(layer), **estimate)
        cache.stepped(layer, tuple(newest))
        offsets = cache.offsets
        if query.dtype != value.dtype:  # float32 rotary tables under autocast give float32 q beside bf16 v
            query = query.to(value.dtype)
        if not any(offsets):
            out = self._attend(query, key, value, index, seqlens, scaling)
        else:
            out = torch.cat([self._attend(query[r:r + 1], key[r:r + 1, :, first:], value[r:r + 1, :, first:],
                                          index[r:r + 1], seqlens[r:r + 1], scaling)
                             for r, first in enumerate(offsets)])
        return out.transpose(1, 2)

    def _attend(self, query, key, value, index, seqlens, scaling) -> torch.Tensor:
        """``[B, Hq, 1, D]``: the decode kernel (or its reference) over the listed blocks of the KV cache. The lists of
        :func:`~seer.sparsity.decode.decode_step_blocks` never repeat a block (a token budget's are the indices of
        one ``topk`` over each head's blocks, the forced ones among them at ``+inf``; the other methods' list each
        block of a mask at most once), so the kernel skips its repeat check (``unique_blocks``)."""
        bs = self.block_size
        if self.kernel == "triton":
            from seer.kernels import block_sparse_decode

            return block_sparse_decode(query, key, value, index, seqlens, bs, scaling, unique_blocks=True,
                                       validate=False)[0]
        from seer.kernels.reference import block_sparse_decode

        return block_sparse_decode(query, key, value, index, seqlens, bs, scaling, validate=False)[0]


def sparse_decode_step(gate: DecodeGate | BoundsOnly, store: torch.Tensor | None, tails: torch.Tensor | None,
                       seqlens: torch.Tensor, total: torch.Tensor, steps: torch.Tensor, k_pre: torch.Tensor | None,
                       q_pre: torch.Tensor | None,
                       sparsity: DecodeSparsityConfig, threshold: float | None, key_min: torch.Tensor | None = None,
                       key_max: torch.Tensor | None = None, k_post: torch.Tensor | None = None,
                       q_post: torch.Tensor | None = None, sm_scale: float | None = None,
                       pinned: torch.Tensor | None = None, keys: torch.Tensor | None = None,
                       key_offsets: torch.Tensor | None = None, key_sum: torch.Tensor | None = None,
                       key_sq: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tensor work of one layer's one-token sparse decode step, a function of tensors and plain config (no host
    read, no Python state changed), so that ``torch.compile`` can fuse it (``DecodeSparsityConfig.compile``): the new
    pre-RoPE key ``k_pre [B, Hkv, 1, D]`` into the layer's compressed-K cache (``store``, ``tails``, ``seqlens``,
    changed in place: :func:`~seer.model.decode_cache.step_keys`), the gate logits of ``q_pre [B, Hq, 1, D]``
    (:func:`~seer.model.decode_cache.newest_scores`), the budget's block list and density
    (:func:`~seer.sparsity.decode.decode_step_blocks`), the density added to the sums ``total`` and ``steps`` in place.
    With ``sparsity.estimate``: the new post-RoPE key ``k_post [B, Hkv, 1, D]`` folded in place into the key bounds
    ``key_min``, ``key_max`` (:func:`~seer.model.decode_cache.step_key_bounds`) or moments ``key_sum``, ``key_sq``
    (:func:`~seer.model.decode_cache.step_key_moments`), whichever are given, and the scores the mixture of the gate's
    and Quest's (:func:`~seer.model.decode_cache.key_bound_scores` of the post-RoPE ``q_post [B, Hq, 1, D]`` at the
    attention's ``sm_scale``; :func:`~seer.sparsity.decode.mix_estimate`), the gate's left out at ``estimate_weight``
    1. ``pinned [B, Hkv, capacity]``: the prompt blocks kept at every step (``prompt_blocks``), or None. With
    ``estimate="oracle"`` the estimate is the true block mass (:func:`~seer.model.decode_cache.true_block_scores`)
    over the KV cache's post-RoPE ``keys [B, Hkv, N, D]`` (each row's from ``key_offsets [B]``, or 0 when None); with
    ``"moments"`` from the keys' per-block sums ``key_sum``/``key_sq``
    (:func:`~seer.model.decode_cache.key_moment_scores`); with ``rerank_blocks`` the scores' top blocks ranked again by
    their keys there (:func:`~seer.model.decode_cache.reranked_block_scores`).
    Without a decode gate (``gate`` a :class:`~seer.model.decode_cache.BoundsOnly`; ``store``, ``tails``,
    ``k_pre``, ``q_pre`` None) only the lengths advance and Quest's scores are the block scores (``estimate_weight``
    1). Returns the block list ``[B, Hkv, width]`` int32 and what :meth:`DecodeKeyCache.stepped` keeps (the newest
    gate key, None without a gate; position and block)."""
    bs = layer_block_size(gate)
    gated = not isinstance(gate, BoundsOnly)
    if gated:
        key, pos, block = step_keys(gate, store, tails, seqlens, k_pre)
    else:
        key, (pos, block) = None, step_position(seqlens, bs)
    if sparsity.estimate is None:
        scores = newest_scores(gate, store, q_pre, key, pos, block)
    else:
        if key_min is not None:
            step_key_bounds(key_min, key_max, k_post, pos, block, bs)
        if key_sum is not None:
            step_key_moments(key_sum, key_sq, k_post, pos, block, bs)
        if sparsity.estimate == "oracle":
            bounds = true_block_scores(q_post, keys, seqlens, bs, key_min.shape[2], sm_scale, key_offsets)
        elif sparsity.estimate == "moments":
            bounds = key_moment_scores(q_post, key_sum, key_sq, seqlens, bs, sm_scale)
        else:
            bounds = key_bound_scores(q_post, key_min, key_max, block, sm_scale, ESTIMATE_GROUPS[sparsity.estimate])
        mixed = newest_scores(gate, store, q_pre, key, pos, block) if gated and sparsity.estimate_weight != 1 else None
        scores = mix_estimate(mixed, bounds, sparsity.estimate_weight)
    if sparsity.rerank_blocks:
        scores = reranked_block_scores(q_post, keys, seqlens, scores, sparsity.rerank_blocks, bs, sm_scale,
                                       key_offsets)
    index, density = decode_step_blocks(scores, block, sparsity, bs, threshold, pinned)
    total.add_(density)
    steps.add_(1)
    return index, key, pos, block


def _real_tokens(x: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """``x [B, H, N, D]`` with each row's real tokens (``spans``: its ``(first, end)``) moved to its start, zeros
    after them."""
    real = x.new_zeros(*x.shape[:2], max(end - first for first, end in spans), x.shape[3])
    for row, (first, end) in enumerate(spans):
        real[row, :, :end - first] = x[row, :, first:end]
    return real


def _new_keys(cache: DecodeKeyCache, layer: int, key: torch.Tensor, tokens: int) -> torch.Tensor:
    """The post-RoPE keys ``[B, Hkv, tokens, D]`` of a step's ``tokens`` in the KV cache ``key``: its last ones (a
    DynamicCache, whose compressed-K cache has no ``max_length``; copied: a view's strides grow with the cache, which
    would recompile a compiled step every step), or each row's at its length on (a StaticCache, rows from position
    0), found on the device."""
    if cache.max_length is None:
        return key[:, :, -tokens:].contiguous()
    position = cache.seqlens[layer].long()[:, None] + torch.arange(tokens, device=key.device)
    return key[torch.arange(len(position), device=key.device)[:, None], :, position].transpose(1, 2)


COMPILE_BACKEND = "inductor"  # torch.compile's backend for DecodeSparsityConfig.compile (tests on the CPU: aot_eager)
_COMPILED: dict = {}  # the compiled sparse_decode_step by backend: compiled once a process, shared by every layer


def _compiled_step() -> Callable:
    """:func:`sparse_decode_step` through ``torch.compile`` (``COMPILE_BACKEND``, static shapes, one graph: no host
    sync inside, CUDA-graph capturable; not ``mode="reduce-overhead"``: a caller captures the whole model step). The
    first call of a shape compiles (run an eager step before a CUDA-graph capture)."""
    backend = COMPILE_BACKEND
    if backend not in _COMPILED:
        _COMPILED[backend] = torch.compile(sparse_decode_step, backend=backend, dynamic=False, fullgraph=True)
    return _COMPILED[backend]


def _decoded_layers(model: nn.Module) -> list[nn.Module]:
    """The attention layers sparse decode selects in: every one but those that attend within a window (sliding or
    chunked), which keep the model's own attention (their caches hold only the window's keys); a model seer's
    attention cannot stand in for is refused (:func:`~seer.model.attention.check_model`)."""
    return [layer for layer in check_model(model) if layer.seer_window is None]


def attach_decode_gates(model: nn.Module, config: DecodeGateConfig) -> DecodeContext:
    """Adds a float32 decode gate to every attention layer of ``model`` (in place, on the model's device) and
    returns the shared context."""
    if getattr(model, "seer_decode", None) is not None:
        raise ValueError("this model already has seer decode gates attached")
    layers = _decoded_layers(model)
    _register()
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    inv_freq, rope_scale = rope_frequencies(cfg, config.hidden_size) if config.block_rope else (None, 1.0)
    device = next(model.parameters()).device
    device = torch.device("cpu") if device.type == "meta" else device
    ctx = DecodeContext(config)
    for layer in layers:
        heads, kv_heads, head_dim = layer_shape(model, layer)
        layer.seer_decode_gate = ctx.gates[layer.layer_idx] = DecodeGate(config, head_dim, heads, kv_heads, inv_freq,
                                                                         rope_scale).to(device)
        layer.seer_decode_stash = stash = _PreRopeStash(heads, kv_heads, head_dim)
        stash.attach(layer)
        layer.seer_decode = ctx
    model.seer_decode = ctx
    return ctx


QUEST_BLOCK_SIZE = 64  # attach_quest_decode's default key block: the decode kernel's tuned block


def attach_quest_decode(model: nn.Module, block_size: int = QUEST_BLOCK_SIZE) -> DecodeContext:
    """Makes sparse decode of ``model`` training-free: no decode gates, each step's key blocks scored by Quest's key
    bounds alone (a :class:`~seer.model.decode_cache.BoundsOnly` per layer; :meth:`DecodeContext.enable` then takes
    a budget with ``estimate="quest"`` and ``estimate_weight=1``). The model must run the ``"seer"`` attention function
    (:func:`seer.model.attention.prepare_model`, or prefill gates attached); returns the shared context."""
    if getattr(model, "seer_decode", None) is not None:
        raise ValueError("this model already has a seer decode selection attached")
    from seer.kernels.common import BLOCK_SIZES  # imports triton: not at module import

    if block_size not in BLOCK_SIZES or isinstance(block_size, bool):
        raise ValueError(f"block_size={block_size!r}: the decode kernels take key blocks of {BLOCK_SIZES} tokens")
    ctx = DecodeContext(None)
    for layer in _decoded_layers(model):
        ctx.gates[layer.layer_idx] = BoundsOnly(*layer_shape(model, layer), block_size)
        layer.seer_decode = ctx
    model.seer_decode = ctx
    return ctx


def share_decode_gates(model: nn.Module, gate_config: GateConfig | None = None) -> SeerContext:
    """Makes the decode gates of ``model`` (:func:`attach_decode_gates`) score its prefill too: one gate for both
    phases. Each layer's prefill gate is a :class:`~seer.gates.decode_gate.SharedPrefillGate` over its decode gate;
    ``gate_config`` (its ``blend`` and ``blend_weight``; default: the gate alone) says how the scores are used, at
    the decode gates' block size. Returns the prefill context (:func:`seer.model.attention.attach_gates`)."""
    decode = getattr(model, "seer_decode", None)
    if decode is None:
        raise ValueError("share_decode_gates needs a model with decode gates (seer.model.decode_gate_io."
                         "load_decode_gates or attach_decode_gates)")
    block_size = decode.config.block_size
    gate_config = gate_config or GateConfig(block_size=block_size)
    if gate_config.block_size != block_size:
        raise ValueError(f"gate.block_size={gate_config.block_size}: the shared decode gates score blocks of "
                         f"{block_size} tokens")
    return attach_gates(model, gate_config, make_gate=lambda layer: SharedPrefillGate(layer.seer_decode_gate))


def decode_gates(model: nn.Module) -> dict[int, DecodeGate]:
    """``{layer_idx: decode gate}`` of a model prepared by :func:`attach_decode_gates`."""
    return {layer.layer_idx: layer.seer_decode_gate for layer in attention_layers(model)
            if hasattr(layer, "seer_decode_gate")}


def freeze_all_but_decode_gates(model: nn.Module) -> None:
    """Freezes every parameter but the decode gates' and puts the model in eval mode (no dropout)."""
    for name, p in model.named_parameters():
        p.requires_grad_(".seer_decode_gate." in f".{name}")
    model.eval()


def decode_distill_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """The ``"seer_decode_distill"`` attention function: dense SDPA of an unpadded causal prefill, and the layer's
    :class:`DecodeRecord` to the context's consumer."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if getattr(module, "seer_window", None) is not None:  # a windowed layer: the model's own attention, no gate
        return seer_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if attention_mask is not None or query.shape[2] != key.shape[2]:
        raise ValueError(f"decode-gate distillation needs an unpadded causal prefill (no attention mask, no KV "
                         f"cache); got {query.shape[2]} queries over {key.shape[2]} keys, mask "
                         f"{'given' if attention_mask is not None else 'none'}")
    ctx: DecodeContext = module.seer_decode
    q_pre, k_pre = module.seer_decode_stash.take()
    if ctx.gt_source == "triton":
        from seer.kernels.decode_gt_triton import decode_gt_from_lse
        from seer.kernels.flash_gt import flash_attn

        if query.dtype != value.dtype:  # float32 rotary tables under autocast give float32 q/k beside bf16 v
            query, key = query.to(value.dtype), key.to(value.dtype)
        b, hq, n, d = query.shape
        out = torch.empty(b, n, hq, d, dtype=query.dtype, device=query.device)  # the layout o_proj reads
        _, lse = flash_attn(query, key, value, sm_scale=scaling, out=out.transpose(1, 2))
        out = (out, None)
        gt = decode_gt_from_lse(query, key, lse, ctx.config.block_size, sm_scale=scaling) \
            if ctx.consumer is not None else None
    else:
        out = sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
        gt = decode_block_gt(query, key, ctx.config.block_size, sm_scale=scaling) if ctx.consumer is not None \
            else None
    if ctx.consumer is not None:
        with torch.enable_grad():
            logits = module.seer_decode_gate(q_pre.detach(), k_pre.detach())
        ctx.consumer(DecodeRecord(module.layer_idx, logits, gt))
    return out


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(DISTILL_ATTENTION, decode_distill_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(DISTILL_ATTENTION, seer_mask)
