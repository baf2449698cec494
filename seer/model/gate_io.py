"""Gate checkpoints: the gates' weights as safetensors plus a small JSON (base model, its shape, gate config).

Files are written atomically (a temporary file, then ``os.replace``), so a crash never leaves a half-written
checkpoint. :func:`load_gates` refuses a file made for another model shape, another gate config or another RoPE
(e.g. gates fine-tuned with YaRN loaded onto the unscaled model), saying which field differs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from torch import nn

from seer.gates.config import GateConfig
from seer.config import build
from seer.files import atomic_write, atomic_write_text
from seer.model.attention import attach_gates, attention_layers, gates, layer_shape
from seer.model.rope_scaling import rope_settings

WEIGHTS = "gates.safetensors"
META = "gates.json"


def model_signature(model: nn.Module) -> dict:
    """What a gate file must match: layer count, heads, key/value heads and head dim of the base model."""
    layers = attention_layers(model)
    heads, kv_heads, head_dim = layer_shape(model, layers[0])
    return {"model_type": getattr(model.config, "model_type", None), "num_layers": len(layers),
            "num_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim}


def gate_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"layers.{i}.{name}": t.detach().contiguous().cpu()
            for i, gate in gates(model).items() for name, t in gate.state_dict().items()}


def save_gates(folder: str | os.PathLike, model: nn.Module, model_name: str, extra: dict | None = None) -> Path:
    """Writes ``gates.safetensors`` and ``gates.json`` into ``folder``; returns the weights' path."""
    from safetensors.torch import save_file

    folder = Path(folder)
    ctx = model.seer_context
    meta = {"format": "seer-gates/1", "base_model": model_name, "model": model_signature(model),
            "gate": dataclasses.asdict(ctx.gate_config), "rope": rope_settings(model.config), **(extra or {})}
    state = gate_state_dict(model)
    atomic_write(folder / WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"seer": json.dumps(meta)}))
    atomic_write_text(folder / META, json.dumps(meta, indent=2, default=str))
    return folder / WEIGHTS


def _weights_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS
    if not path.exists():
        raise FileNotFoundError(f"no gate checkpoint at {path}")
    return path


def read_gate_meta(path: str | os.PathLike) -> dict:
    """The metadata stored in a gate checkpoint (a folder or its ``gates.safetensors``)."""
    from safetensors import safe_open

    with safe_open(str(_weights_path(path)), framework="pt") as f:
        return json.loads(f.metadata()["seer"])


def load_gates(model: nn.Module, path: str | os.PathLike, expected_gate: GateConfig | None = None,
               allow_rope_change: bool = False) -> dict:
    """Loads gate weights into ``model`` (attaching gates with the file's config if it has none yet).

    Raises ``ValueError`` naming the mismatch when the file was made for another model shape, for another RoPE
    (unless ``allow_rope_change``: starting a context extension from gates of the unscaled model; the block RoPE
    always follows the model it is attached to) or, if ``expected_gate`` is given (or the model already has
    gates), another gate config. Returns the metadata."""
    from safetensors.torch import load_file

    weights = _weights_path(path)
    meta = read_gate_meta(weights)
    mine = model_signature(model)
    for key, value in meta["model"].items():
        if mine.get(key) != value:
            raise ValueError(f"gate file {weights} was made for {meta['base_model']} with {key}={value}, but this "
                             f"model has {key}={mine.get(key)}")
    rope = rope_settings(model.config)
    for key, value in meta.get("rope", {}).items():  # files written before rope was recorded have none
        if rope[key] != value and not allow_rope_change:
            raise ValueError(f"gate file {weights} was made for {meta['base_model']} with {key}={value}, but this "
                             f"model has {key}={rope[key]}")
    file_gate = build(GateConfig, "gate", meta["gate"])
    have = getattr(model, "seer_context", None)
    expected = expected_gate or (have.gate_config if have is not None else None)
    if expected is not None:
        for f in dataclasses.fields(GateConfig):
            if getattr(expected, f.name) != getattr(file_gate, f.name):
                raise ValueError(f"gate file {weights} has gate.{f.name}={getattr(file_gate, f.name)!r}, but "
                                 f"gate.{f.name}={getattr(expected, f.name)!r} was asked for")
    if have is None:
        attach_gates(model, file_gate)
    state = load_file(str(weights))
    for i, gate in gates(model).items():
        prefix = f"layers.{i}."
        gate.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    return meta
