"""Block-level rotary embedding for the gate: the base model's RoPE recipe at the gate's width.

The gate rotates its block-pooled Q and K by the position of each block's first token, with the base model's
rope settings (theta and scaling type, e.g. Llama-3's ``llama3`` or YaRN), but at ``dim`` = the gate's hidden
size rather than the model's head dim. ``dynamic`` (NTK) frequencies depend on the sequence length, as the model's
do: :func:`seer.model.attention.attach_gates` gives such gates :func:`rope_frequencies` at each length.
"""

from __future__ import annotations

import copy

import torch


def rope_frequencies(model_config, dim: int, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[dim // 2]`` and the cos/sin scale that ``model_config``'s RoPE uses at width ``dim``
    (for a sequence of ``seq_len`` tokens: dynamic NTK depends on it); with RoPE settings per layer type, those of
    the full-attention layers, where gates sit."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = copy.deepcopy(model_config)
    cfg.head_dim = dim
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    if params and all(isinstance(v, dict) for v in params.values()):  # one set per layer type (Gemma-3): the gates
        params = dict(params.get("full_attention") or next(iter(params.values())))  # sit on the full-attention layers
    if not params:  # older configs keep rope_theta / rope_scaling as attributes
        params = dict(getattr(cfg, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    params["partial_rotary_factor"] = 1.0
    rope_type = params["rope_type"]
    if rope_type == "default":
        inv_freq = 1.0 / (float(params["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        return inv_freq, 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope type {rope_type!r} of the base model is not supported by the gate's block RoPE")
    cfg.rope_parameters = params
    inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](cfg, None, seq_len=seq_len)
    return inv_freq.float(), float(scale)


def register_block_rope(module: torch.nn.Module, dim: int, inv_freq: torch.Tensor | None, scale: float,
                        enabled: bool = True) -> None:
    """Gives a gate ``module`` its block-RoPE frequencies (``rope_inv_freq`` ``[dim / 2]``, a non-persistent buffer;
    None when not ``enabled``; the plain ``theta = 10000`` table when none is given) and ``rope_scale``."""
    if enabled:
        if inv_freq is None:
            inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        if inv_freq.shape != (dim // 2,):
            raise ValueError(f"rope_inv_freq must have shape [{dim // 2}], got {tuple(inv_freq.shape)}")
        module.register_buffer("rope_inv_freq", inv_freq.float().clone(), persistent=False)
    else:
        module.rope_inv_freq = None
    module.rope_scale = float(scale)


def rotary_tables(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float = 1.0,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and signed ``sin`` tables ``[n, dim]`` (``dim = 2 * len(inv_freq)``) of ``dtype`` for
    :func:`rotate` at ``positions [n]``: computed once, shared by every tensor rotated at those positions."""
    freqs = positions[:, None] * inv_freq.to(positions.device, torch.float32)[None, :]  # float32 for any positions
    cos, sin = freqs.cos(), freqs.sin()
    if scale != 1.0:  # x * 1.0 is x: no op for the usual scale
        cos, sin = cos * scale, sin * scale
    cos, sin = cos.to(dtype), sin.to(dtype)
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half layout, as in Hugging Face models) of ``x [..., n, dim]`` with the tables of
    :func:`rotary_tables`: ``x * cos + rotate_half(x) * sin``, the sign of ``rotate_half`` folded into ``sin``."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)
