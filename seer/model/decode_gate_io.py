"""Decode-gate files, the sibling of :mod:`seer.model.gate_io`: ``decode_gates.safetensors`` plus
``decode_gates.json`` (base model, its shape and RoPE, the decode-gate config, the weights' sha256), written
atomically. Loading checks the sha256 and refuses a file made for another model shape, RoPE or decode-gate config,
naming the field."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from torch import nn

from seer.checks import ConfigError, build
from seer.gates.decode_config import DecodeGateConfig
from seer.model.decode import attach_decode_gates, decode_gates
from seer.model.gate_io import (CHECKSUM, _sha256, check_gates_fit, layer_state_dict, model_signature,
                                write_gate_files)
from seer.model.rope_scaling import rope_settings

WEIGHTS = "decode_gates.safetensors"
META = "decode_gates.json"
FORMAT = "seer-decode-gates/1"


def decode_gate_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every decode gate's weights (:func:`~seer.model.gate_io.layer_state_dict` of the model's decode gates)."""
    return layer_state_dict(decode_gates(model))


def save_decode_gates(folder: str | os.PathLike, model: nn.Module, model_name: str, extra: dict | None = None,
                      state: dict[str, torch.Tensor] | None = None) -> Path:
    """Writes ``decode_gates.safetensors`` and ``decode_gates.json`` into ``folder``; returns the weights' path."""
    meta = {"format": FORMAT, "base_model": model_name, "model": model_signature(model),
            "decode_gate": dataclasses.asdict(model.seer_decode.config), "rope": rope_settings(model.config),
            **(extra or {})}
    state = decode_gate_state_dict(model) if state is None else state
    return write_gate_files(folder, meta, state, WEIGHTS, META)


def read_decode_gate_meta(path: str | os.PathLike) -> dict:
    """The metadata of a decode-gate file (a folder or its ``decode_gates.safetensors``), after checking it is whole
    (the sha256 in ``decode_gates.json``) and of this format; no model needed."""
    from safetensors import safe_open

    weights = decode_weights_path(path)
    meta_path = weights.parent / META
    if not Path(path).exists():
        raise ConfigError(f"decode_gates={str(path)!r}: no decode gates there (a gates folder written by "
                          f"stage=distill_decode, outputs/<run>/gates)")
    if not weights.is_file() or not meta_path.is_file():
        raise ConfigError(f"decode gate file {weights}: needs {WEIGHTS} and {META} side by side in {weights.parent}")
    expected = json.loads(meta_path.read_text()).get(CHECKSUM)
    if expected != _sha256(weights):
        raise ConfigError(f"decode gate file {weights}: its sha256 differs from the one in {meta_path}; the file "
                          "was truncated or altered after it was written")
    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = json.loads(f.metadata()["seer"])
    except Exception as exc:
        raise ConfigError(f"decode gate file {weights}: not a seer file ({type(exc).__name__}: {exc})") from exc
    if meta.get("format") != FORMAT:
        raise ConfigError(f"decode gate file {weights}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def decode_weights_path(path: str | os.PathLike) -> Path:
    """``decode_gates.safetensors`` of a folder, or ``path`` itself when it names a file."""
    return Path(path) / WEIGHTS if Path(path).is_dir() else Path(path)


def load_decode_gates(model: nn.Module, path: str | os.PathLike) -> dict:
    """Loads decode-gate weights (a folder or its ``decode_gates.safetensors``) into ``model``, attaching decode
    gates with the file's config if it has none. Returns the metadata."""
    from safetensors.torch import load_file

    weights = decode_weights_path(path)
    meta = read_decode_gate_meta(weights)
    check_gates_fit(meta, weights, model_signature(model), rope_settings(model.config))
    file_config = build(DecodeGateConfig, "decode_gate", meta["decode_gate"])
    have = getattr(model, "seer_decode", None)
    if have is None:
        attach_decode_gates(model, file_config)
    elif have.config != file_config:
        raise ConfigError(f"decode gate file {weights} has decode_gate={file_config}, but the model's decode gates "
                          f"have {have.config}")
    state = load_file(str(weights))
    for i, gate in decode_gates(model).items():
        prefix = f"layers.{i}."
        gate.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    return meta
