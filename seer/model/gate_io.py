"""Gate checkpoints: the gates' weights as safetensors plus a small JSON (base model, its shape, gate config).

Files are written atomically (a temporary file, then ``os.replace``), so a crash never leaves a half-written
checkpoint. ``gates.json`` holds the sha256 of ``gates.safetensors``: reading a gate file checks it, so a truncated or
altered file (or one whose ``gates.json`` is missing or describes other gates) is refused, naming its path.
:func:`load_gates` refuses a file made for another model shape, another gate config or another RoPE (e.g. gates
fine-tuned with YaRN loaded onto the unscaled model), saying which field differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from seer.gates.config import INFERENCE_FIELDS, GateConfig
from seer.checks import ConfigError, build
from seer.files import atomic_write, atomic_write_text
from seer.model.attention import attach_gates, attention_layers, gates, layer_count, layer_shape
from seer.model.rope_scaling import rope_settings

WEIGHTS = "gates.safetensors"
META = "gates.json"
FORMAT = "seer-gates/1"
CHECKSUM = "weights_sha256"


def model_signature(model: nn.Module) -> dict:
    """What a gate file must match: layer count, heads, key/value heads and head dim of the base model."""
    heads, kv_heads, head_dim = layer_shape(model, attention_layers(model)[0])
    return {"model_type": getattr(model.config, "model_type", None), "num_layers": layer_count(model),
            "num_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim}


def config_signature(config) -> dict:
    """:func:`model_signature` read from a transformers config, before any weights load."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    return {"model_type": getattr(config, "model_type", None), "num_layers": text.num_hidden_layers,
            "num_heads": heads, "num_kv_heads": getattr(text, "num_key_value_heads", None) or heads,
            "head_dim": getattr(text, "head_dim", None) or text.hidden_size // heads}


def check_gates_fit(meta: dict, weights: Path, signature: dict, rope: dict, allow_rope_change: bool = False) -> None:
    """Refuses (ConfigError naming the field) gates whose metadata ``meta`` was made for another model shape
    (``signature``) or, unless ``allow_rope_change``, another RoPE (``rope``)."""
    for key, value in meta["model"].items():
        if signature.get(key) != value:
            raise ConfigError(f"gate file {weights} was made for {meta['base_model']} with {key}={value}, but this "
                              f"model has {key}={signature.get(key)}")
    for key, value in meta.get("rope", {}).items():  # files written before rope was recorded have none
        if rope[key] != value and not allow_rope_change:
            raise ConfigError(f"gate file {weights} was made for {meta['base_model']} with {key}={value}, but this "
                              f"model has {key}={rope[key]}")


def layer_state_dict(modules: dict[int, nn.Module]) -> dict[str, torch.Tensor]:
    """The weights of per-layer modules ``{layer: module}`` on the CPU, keyed ``layers.<i>.<name>``; sharded ones
    (FSDP) gathered in full, which is a collective: every process must call it."""
    return {f"layers.{i}.{name}": (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().contiguous().cpu()
            for i, module in modules.items() for name, t in module.state_dict().items()}


def gate_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every prefill gate's weights (:func:`layer_state_dict` of the model's gates)."""
    return layer_state_dict(gates(model))


def save_gates(folder: str | os.PathLike, model: nn.Module, model_name: str, extra: dict | None = None,
               state: dict[str, torch.Tensor] | None = None) -> Path:
    """Writes ``gates.safetensors`` and ``gates.json`` into ``folder`` (``state``: the weights, when
    :func:`gate_state_dict` was already called); returns the weights' path."""
    ctx = model.seer_context
    meta = {"format": FORMAT, "base_model": model_name, "model": model_signature(model),
            "gate": dataclasses.asdict(ctx.gate_config), "rope": rope_settings(model.config), **(extra or {})}
    return write_gate_files(folder, meta, gate_state_dict(model) if state is None else state)


def write_gate_files(folder: str | os.PathLike, meta: dict, state: dict[str, torch.Tensor], weights: str = WEIGHTS,
                     meta_file: str = META) -> Path:
    """Writes ``state`` (keyed ``layers.<i>.<name>``) as ``weights`` (``gates.safetensors``) with ``meta`` inside it,
    and ``meta`` plus the file's sha256 as ``meta_file`` (``gates.json``); returns the weights' path."""
    from safetensors.torch import save

    folder = Path(folder)
    digest = {}

    def write(tmp: str) -> None:  # bytes written into atomic_write's file: save_file would recreate it as 0600
        data = save(state, metadata={"seer": json.dumps(meta, default=str)})
        Path(tmp).write_bytes(data)
        digest[CHECKSUM] = hashlib.sha256(data).hexdigest()

    atomic_write(folder / weights, write)
    atomic_write_text(folder / meta_file, json.dumps({**meta, **digest}, indent=2, default=str))
    return folder / weights


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _weights_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS
    if not path.exists():
        raise FileNotFoundError(f"no gate checkpoint at {path}")
    return path


def verify_gates(path: str | os.PathLike) -> Path:
    """Checks a gate file against the sha256 in the ``gates.json`` beside it; returns the weights' path. A
    :class:`~seer.checks.ConfigError` names a file that was truncated or altered after it was written, or that has
    no ``gates.json`` beside it (nothing to check it against); one written before checksums were stored is loaded
    with a warning."""
    weights = _weights_path(path)
    meta_path = weights.parent / META
    if not meta_path.is_file():
        raise ConfigError(f"gate file {weights}: no {META} beside it, so its sha256 cannot be checked; copy the "
                          f"{META} written with it into {weights.parent}")
    try:
        expected = json.loads(meta_path.read_text()).get(CHECKSUM)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"gate file {meta_path}: not readable JSON ({exc})") from exc
    if expected is None:
        warnings.warn(f"gate file {weights} has no checksum in {meta_path} (written before checksums were "
                      f"stored): not checked", stacklevel=2)
    elif _sha256(weights) != expected:
        raise ConfigError(f"gate file {weights}: its sha256 differs from the one in {meta_path}; the file was "
                          f"truncated or altered after it was written")
    return weights


def read_gate_meta(path: str | os.PathLike) -> dict:
    """The metadata stored in a gate checkpoint (a folder or its ``gates.safetensors``), after
    :func:`verify_gates`; a ``gates.json`` that describes other gates than the weights file (edited) is refused,
    naming the field."""
    from safetensors import safe_open

    weights = verify_gates(path)
    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = json.loads(f.metadata()["seer"])
    except Exception as exc:
        raise ConfigError(f"gate file {weights}: not a seer gate file ({type(exc).__name__}: {exc})") from exc
    beside = json.loads((weights.parent / META).read_text())
    for key in ("base_model", "model", "gate", "rope"):
        if key in beside and beside[key] != meta.get(key):
            raise ConfigError(f"gate file {weights.parent / META}: {key}={beside[key]} differs from what "
                              f"{weights.name} was written with ({meta.get(key)}); restore the {META} written with it")
    return meta


def load_gates(model: nn.Module, path: str | os.PathLike, expected_gate: GateConfig | None = None,
               allow_rope_change: bool = False) -> dict:
    """Loads gate weights into ``model`` (attaching gates with the file's config if it has none yet).

    Raises ``ConfigError`` naming the mismatch when the file was made for another model shape, for another RoPE
    (unless ``allow_rope_change``: starting a context extension from gates of the unscaled model; the block RoPE
    always follows the model it is attached to) or, if ``expected_gate`` is given (or the model already has
    gates), another gate config. Returns the metadata."""
    from safetensors.torch import load_file

    weights = _weights_path(path)
    meta = read_gate_meta(weights)
    check_gates_fit(meta, weights, model_signature(model), rope_settings(model.config), allow_rope_change)
    file_gate = build(GateConfig, "gate", meta["gate"])
    have = getattr(model, "seer_context", None)
    expected = expected_gate or (have.gate_config if have is not None else None)
    if expected is not None:
        for name in expected.architecture_differences(file_gate):
            raise ValueError(f"gate file {weights} has gate.{name}={getattr(file_gate, name)!r}, but "
                             f"gate.{name}={getattr(expected, name)!r} was asked for")
        file_gate = dataclasses.replace(file_gate, **{k: getattr(expected, k) for k in INFERENCE_FIELDS})
    if have is None:
        attach_gates(model, file_gate)
    try:
        state = load_file(str(weights))
    except Exception as exc:
        raise ConfigError(f"gate file {weights}: not readable ({type(exc).__name__}: {exc})") from exc
    for i, gate in gates(model).items():
        prefix = f"layers.{i}."
        gate.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    return meta
