"""Decode gates inside a Hugging Face model: one :class:`~seer.gates.decode_gate.DecodeGate` per attention layer
(submodule ``seer_decode_gate``), fed the layer's pre-RoPE Q and K by forward hooks, as the prefill gates are.

:func:`attach_decode_gates` adds them and a shared :class:`DecodeContext`. For their distillation,
:meth:`DecodeContext.distilling` runs the model through the ``"seer_decode_distill"`` attention function
(registered in transformers' ``AttentionInterface``): dense attention of an unpadded causal prefill (teacher
forcing) plus, per layer, the decode gate's logits for every token (with grad) and their ground truth
(:func:`seer.kernels.decode_gt.decode_block_gt`), handed to the context's consumer as a :class:`DecodeRecord`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from seer.gates import rope_frequencies
from seer.gates.decode_config import DecodeGateConfig
from seer.gates.decode_gate import DecodeGate
from seer.kernels.decode_gt import decode_block_gt
from seer.model.attention import _PreRopeStash, attention_layers, layer_shape, seer_mask

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
    """The decode gates' config, shared by every layer; while distilling, ``consumer`` takes each layer's
    :class:`DecodeRecord` and ``gt_source`` says where the ground truth comes from."""

    config: DecodeGateConfig
    consumer: Callable[[DecodeRecord], None] | None = None
    gt_source: str = "reference"

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


def attach_decode_gates(model: nn.Module, config: DecodeGateConfig) -> DecodeContext:
    """Adds a float32 decode gate to every attention layer of ``model`` (in place, on the model's device) and
    returns the shared context."""
    if getattr(model, "seer_decode", None) is not None:
        raise ValueError("this model already has seer decode gates attached")
    _register()
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    inv_freq, rope_scale = rope_frequencies(cfg, config.hidden_size) if config.block_rope else (None, 1.0)
    device = next(model.parameters()).device
    device = torch.device("cpu") if device.type == "meta" else device
    ctx = DecodeContext(config)
    for layer in attention_layers(model):
        heads, kv_heads, head_dim = layer_shape(model, layer)
        layer.seer_decode_gate = DecodeGate(config, head_dim, heads, kv_heads, inv_freq, rope_scale).to(device)
        layer.seer_decode_stash = stash = _PreRopeStash(heads, kv_heads, head_dim)
        (getattr(layer, "q_norm", None) or layer.q_proj).register_forward_hook(stash.hook("q"))
        (getattr(layer, "k_norm", None) or layer.k_proj).register_forward_hook(stash.hook("k"))
        layer.seer_decode = ctx
    model.seer_decode = ctx
    return ctx


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
