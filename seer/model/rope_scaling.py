"""Rope scaling (context extension) from ``model.rope_scaling``, written into a transformers config.

``model.rope_scaling`` is ``{rope_type, factor, original_max_position_embeddings, ...}``:

* ``yarn`` - YaRN (NTK-by-parts interpolation with attention temperature); extra keys ``beta_fast``,
  ``beta_slow``, ``attention_factor``, ``mscale``, ``mscale_all_dim``, ``truncate`` go to transformers as they are;
* ``linear`` - position interpolation (positions divided by ``factor``);
* ``dynamic`` - dynamic NTK: the rope base grows with the sequence length beyond the original context.

transformers 5.x keeps the rope settings in ``config.rope_parameters`` (``rope_theta`` included; older versions
named it ``rope_scaling``), and builds each model's rotary embedding from it when the model is constructed, so the
scaling is set on the config before the weights load (:func:`seer.model.loading.load_causal_lm`). For ``yarn`` and
``linear`` the model's ``max_position_embeddings`` becomes ``factor x original_max_position_embeddings``; for
``dynamic`` it is the original context (transformers scales from there on). The gates' block RoPE reads the same
config (:func:`seer.gates.rope.rope_frequencies`), and ``save_pretrained`` stores it with the weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from seer.checks import fail, is_int, is_number

ROPE_SCALING_TYPES = ("yarn", "linear", "dynamic")
YARN_KEYS = ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")


def check_rope_scaling(values: Mapping[str, Any]) -> dict:
    """``values`` validated (``type`` is accepted for ``rope_type``); raises ConfigError naming the key."""
    values = dict(values)
    if "type" in values:
        values.setdefault("rope_type", values.pop("type"))
    rope_type = values.get("rope_type")
    if rope_type not in ROPE_SCALING_TYPES:
        fail("model", "rope_scaling.rope_type", rope_type, f"choose from {ROPE_SCALING_TYPES}")
    factor = values.get("factor")
    if not is_number(factor) or factor <= 1:
        fail("model", "rope_scaling.factor", factor, "the context extension factor must be a number > 1")
    original = values.get("original_max_position_embeddings")
    if not is_int(original) or original < 1:
        fail("model", "rope_scaling.original_max_position_embeddings", original,
             "the context the model was trained at must be an integer >= 1")
    allowed = {"rope_type", "factor", "original_max_position_embeddings", *(YARN_KEYS if rope_type == "yarn" else ())}
    unknown = sorted(set(values) - allowed)
    if unknown:
        fail("model", "rope_scaling", unknown, f"unknown key(s) for {rope_type}; known keys: {sorted(allowed)}")
    return values


def extended_context(scaling: Mapping[str, Any]) -> int:
    """The longest context ``scaling`` is meant for: ``factor x original_max_position_embeddings``."""
    return int(scaling["factor"] * scaling["original_max_position_embeddings"])


def apply_rope_scaling(config, scaling: Mapping[str, Any]) -> None:
    """Writes ``scaling`` (a checked ``model.rope_scaling``) into the transformers ``config`` in place, keeping the
    model's ``rope_theta``."""
    scaling = check_rope_scaling(scaling)
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"model.rope_scaling: {getattr(cfg, 'model_type', 'this model')} has RoPE settings per layer "
                         f"type ({', '.join(sorted(params))}), which seer does not rescale; extend its context by its "
                         "own config")
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    new = {k: v for k, v in scaling.items() if k != "original_max_position_embeddings"}
    new["factor"] = float(scaling["factor"])
    if theta is not None:
        new["rope_theta"] = theta
    if scaling["rope_type"] == "yarn":
        new["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
    cfg.rope_parameters = new
    cfg.max_position_embeddings = (scaling["original_max_position_embeddings"] if scaling["rope_type"] == "dynamic"
                                   else extended_context(scaling))


def rope_settings(config) -> dict:
    """What a gate checkpoint records of the model's RoPE: its rope parameters and ``max_position_embeddings``."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    return {"rope_parameters": params, "max_position_embeddings": getattr(cfg, "max_position_embeddings", None)}
