"""An experiment, not a product option: every attention layer's softmax at a temperature, to tell a sparse budget's
gain from a sharper softmax.

On Qwen2.5-Coder-0.5B a budget that keeps each row to its largest blocks (top-k, or a threshold capped per row) puts
held-out prose 7-14% *under* dense at 16k and 32k (docs/results/qwen/capped.md). Dropping blocks renormalises each
row's softmax over the kept ones, which sharpens it; if a plain dense model with a sharper softmax scored as well, the
gain would be the temperature's, not the selection's. This wrapper divides every attention layer's logits by
``T = SEER_ATTN_TEMPERATURE`` (``T < 1`` sharpens) by scaling the layer's ``scaling`` (the softmax scale the layer hands
to its attention function, dense and sparse alike) once the model is loaded, then runs a command:

    SEER_ATTN_TEMPERATURE=0.9 python experiments/attention_temperature.py -m seer.eval eval.dense_cache=false ...

``eval.dense_cache=false``: the dense pass is measured at the temperature, so a cached one (at T = 1) must not be read
or written. ``SEER_ATTN_LOGN=L`` instead sharpens only long rows, as log-n attention scaling does: the query at position
``p`` (its index in the row) times ``max(1, ln(p + 1) / ln(L))``, so rows up to ``L`` tokens keep their softmax and a
row of ``n`` tokens is at temperature ``ln(L) / ln(n)`` (positions count from each row's first token: windows, not
padded prompts).
"""

from __future__ import annotations

import math
import os
import sys

import torch
from run_patched import run_command

from seer.model import loading
from seer.model.attention import attention_layers


def temperature() -> float:
    """``SEER_ATTN_TEMPERATURE`` (default 1) as a float > 0."""
    raw = os.environ.get("SEER_ATTN_TEMPERATURE", "1")
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise ValueError(f"SEER_ATTN_TEMPERATURE must be a number > 0, got {raw!r}")
    return value


def set_temperature(model: torch.nn.Module, t: float) -> int:
    """Divides the softmax logits of every attention layer of ``model`` by ``t`` (its ``scaling`` times ``1 / t``);
    returns the number of layers changed."""
    layers = attention_layers(model)
    for layer in layers:
        layer.scaling = layer.scaling / t
    return len(layers)


def logn_length() -> int | None:
    """``SEER_ATTN_LOGN`` (unset: None) as an integer >= 2."""
    raw = os.environ.get("SEER_ATTN_LOGN")
    if raw is None:
        return None
    if not raw.isdigit() or int(raw) < 2:
        raise ValueError(f"SEER_ATTN_LOGN must be an integer >= 2 (a row length), got {raw!r}")
    return int(raw)


def set_logn(model: torch.nn.Module, length: int) -> int:
    """Multiplies the query of position ``p`` of every attention layer of ``model`` by ``max(1, ln(p + 1) /
    ln(length))`` (a forward hook on its ``q_proj``: RoPE is linear in q, so this scales the row's logits); returns the
    number of layers changed."""
    def scale_queries(_module, _inputs, out: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(1, out.shape[1] + 1, device=out.device, dtype=torch.float32)
        factor = (pos.log() / math.log(length)).clamp_min(1.0).to(out.dtype)
        return out * factor[:, None]

    layers = attention_layers(model)
    for layer in layers:
        layer.q_proj.register_forward_hook(scale_queries)
    return len(layers)


def main() -> None:
    t, length = temperature(), logn_length()
    load = loading.load_causal_lm

    def load_at_temperature(*args, **kwargs):
        model = load(*args, **kwargs)
        done = set_temperature(model, t)
        if length is not None:
            set_logn(model, length)
        print(f"[attention_temperature] T={t:g}, log-n from {length} on {done} attention layers", file=sys.stderr)
        return model

    loading.load_causal_lm = load_at_temperature
    run_command(sys.argv[1:])


if __name__ == "__main__":
    main()
