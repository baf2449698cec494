"""The SeerAttention authors' published prefill AttnGates (github.com/microsoft/SeerAttention), read as seer gates.

A release folder holds the base model's ``config.json`` extended with ``base_model`` and the ``seerattn_*`` fields,
and ``attn_gate_weights.pth`` (a ``torch.save`` of the gate tensors keyed by their names in the authors' model,
``model.layers.<i>.self_attn.attn_gate.mask_linear_{q,k}.weight``, each ``[heads, in, hidden]``) or the same
tensors as ``attn_gate_weights.safetensors``. The weights are read with ``torch.load(weights_only=True)``: a
pickle that holds anything but plain tensors is refused, never run.

How the release maps onto :class:`~seer.gates.AttnGate` (docs/authors_gates.md has the table):

* ``seerattn_gate_type`` ``Q<pools>_K<pools>``: pools concatenated on the channel axis in the order named, each an
  ordered pick of max, min, avg (the release builds its gate classes from those combinations only);
* a Q projection exists when Q has several pools, ``hidden != head_dim`` or ``seerattn_gate_force_double``; then
  the K projection is per key/value head (repeated here to its query heads, which computes the same), otherwise K
  is repeated to the query heads before a per-query-head projection;
* block RoPE at each block's first token with the model's rope settings, scores scaled by ``hidden ** -0.5``;
* ``seerattn_sparsity_method`` ``threshold`` -> ``threshold`` at ``seerattn_threshold`` (no calibration),
  ``nz_ratio`` -> ``topk`` with ``nz_formula``; ``seerattn_last_block_dense`` -> ``dense_last_rows=2`` (the release
  makes its last two query-block rows dense). Blending stays off (``blend=None``): the authors' own policy.

:func:`convert_release` writes the gates once as a seer gate folder (``gates.safetensors`` + ``gates.json``) under
the cache (``$SEER_CACHE_DIR/releases``, default ``~/.cache/seer``), keyed by the release files' sha256, so every
loader, check and calibration of seer works on it unchanged. Decode-gate releases (SeerAttention-R) are refused:
seer's sparse attention is prefill-only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from seer.checks import ConfigError
from seer.gates.config import GateConfig
from seer.kernels.common import BLOCK_SIZES
from seer.model.gate_io import FORMAT, META, read_gate_meta, write_gate_files
from seer.sparsity.config import SparsityConfig

CONFIG = "config.json"
WEIGHT_FILES = ("attn_gate_weights.pth", "attn_gate_weights.safetensors")
POOLS = ("max", "min", "avg")  # the release's pool names, in the order its gate types combine them
GATE_TYPE = re.compile(r"Q((?:max|min|avg)+)_K((?:max|min|avg)+)")
WEIGHT_KEY = re.compile(r"(?:.*\.)?layers\.(\d+)\.self_attn\.attn_gate\.mask_linear_([qk])\.weight")
# fields of the decode-gate releases (SeerAttention-R: seer_attn/decode_sparse/*/configuration_*_seerattn.py)
DECODE_FIELDS = ("seerattn_k_seq_pooling_type", "seerattn_q_head_pooling_type", "seerattn_token_budget")
# the release's defaults (seer_attn/prefill_sparse/*/configuration_*_seerattn.py) for a field a config leaves out
DEFAULTS = {"seerattn_sparsity_method": "threshold", "seerattn_threshold": 0.0, "seerattn_nz_ratio": 1.0,
            "seerattn_gate_type": "Qavg_Kmaxminavg", "seerattn_gate_block_size": 64,
            "seerattn_gate_hidden_size": 128, "seerattn_last_block_dense": True, "seerattn_gate_force_double": False}
LAST_DENSE_ROWS = 2  # seerattn_last_block_dense keeps the last two query-block rows dense


@dataclass
class Release:
    """A release folder, read and checked: the gate and budget it maps to, the base model and its shape."""

    folder: Path
    weights: Path
    base_model: str
    gate: GateConfig
    sparsity: SparsityConfig
    signature: dict  # model_type, num_layers, num_heads, num_kv_heads, head_dim (as seer's gate files record them)
    q_linear: bool
    k_heads: int  # heads of the release's K projection: num_kv_heads with a Q projection, num_heads without


def is_release(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a SeerAttention release: a ``config.json`` with ``seerattn_*`` fields."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        return False
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(config, dict) and any(k.startswith("seerattn_") for k in config)


def parse_gate_type(value, where: str) -> tuple[list[str], list[str]]:
    """The Q and K pools of a release gate type such as ``Qavg_Kmaxminavg``; anything the release does not define is
    refused naming ``where``."""
    match = GATE_TYPE.fullmatch(value) if isinstance(value, str) else None
    pools = [re.findall("max|min|avg", g) for g in match.groups()] if match else None
    if pools is None or any(p != [x for x in POOLS if x in p] or len(set(p)) != len(p) for p in pools):
        raise ConfigError(f"{where}: seerattn_gate_type={value!r}: unknown; the release's prefill gates are "
                          f"Q<pools>_K<pools>, each an ordered pick of max, min, avg (e.g. Qavg_Kmaxminavg)")
    return pools[0], pools[1]


def read_release(folder: str | os.PathLike) -> Release:
    """Reads and checks a release folder's ``config.json`` (no weights are read); refuses a decode-gate release, an
    unknown gate type or budget, and a block size or width seer's gate cannot take, each naming the field."""
    folder = Path(folder)
    where = str(folder / CONFIG)
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: not a readable JSON config ({exc})") from exc
    decode = [k for k in DECODE_FIELDS if k in config]
    if decode:
        raise ConfigError(f"{where}: {decode[0]}={config[decode[0]]!r}: a decode-gate release (SeerAttention-R); "
                          f"seer's sparse attention is prefill-only (decode runs dense), so decode gates cannot be "
                          f"used yet")
    field = {k: config.get(k, default) for k, default in DEFAULTS.items()}
    q_pool, k_pool = parse_gate_type(field["seerattn_gate_type"], where)
    block, hidden = field["seerattn_gate_block_size"], field["seerattn_gate_hidden_size"]
    if block not in BLOCK_SIZES:
        raise ConfigError(f"{where}: seerattn_gate_block_size={block!r}: seer's kernels take blocks of {BLOCK_SIZES}")
    base = config.get("base_model")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{where}: base_model={base!r}: a release names the model its gates belong to")
    try:
        heads = int(config["num_attention_heads"])
        signature = {"model_type": config.get("model_type"), "num_layers": int(config["num_hidden_layers"]),
                     "num_heads": heads, "num_kv_heads": int(config.get("num_key_value_heads") or heads),
                     "head_dim": int(config.get("head_dim") or int(config["hidden_size"]) // heads)}
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: the base model's shape is incomplete ({type(exc).__name__}: {exc})") from exc
    rope_dim = config.get("head_dim") or hidden  # the width the release's block rotary embedding is built for
    if not isinstance(hidden, int) or hidden < 2 or hidden % 2 or rope_dim != hidden:
        raise ConfigError(f"{where}: seerattn_gate_hidden_size={hidden!r}: seer rotates the whole gate width, the "
                          f"release rotates {rope_dim} channels; only an even width equal to that maps exactly")
    force_double = bool(field["seerattn_gate_force_double"])
    q_linear = len(q_pool) > 1 or hidden != signature["head_dim"] or force_double
    gate = GateConfig(block_size=block, q_pool=q_pool, k_pool=k_pool, hidden_size=hidden, q_linear=q_linear,
                      block_rope=True, blend=None)
    sparsity = _budget(field, where)
    weights = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not weights:
        raise ConfigError(f"{folder}: no gate weights; a release holds {' or '.join(WEIGHT_FILES)}")
    return Release(folder, weights[0], base, gate, sparsity, signature, q_linear,
                   signature["num_kv_heads"] if q_linear else heads)


def _budget(field: dict, where: str) -> SparsityConfig:
    method = field["seerattn_sparsity_method"]
    last = LAST_DENSE_ROWS if field["seerattn_last_block_dense"] else 0
    if method == "threshold" and field["seerattn_threshold"] == 0:
        warnings.warn(f"{where}: seerattn_threshold=0 keeps every causal block (dense); the authors pass a threshold "
                      f"when loading (5e-4 .. 5e-3 in their README): give sparsity={{'method': 'threshold', "
                      f"'target_density': None, 'threshold': 5e-4, 'dense_last_rows': {last}}}", stacklevel=3)
    try:
        if method == "threshold":
            return SparsityConfig(method="threshold", target_density=None, threshold=field["seerattn_threshold"],
                                  dense_last_rows=last)
        if method == "nz_ratio":
            return SparsityConfig(method="topk", target_density=field["seerattn_nz_ratio"], nz_formula=True,
                                  dense_last_rows=last)
    except ConfigError as exc:
        raise ConfigError(f"{where}: seerattn_{method}: {exc}") from exc
    raise ConfigError(f"{where}: seerattn_sparsity_method={method!r}: unknown; the release has threshold and nz_ratio")


def read_release_weights(release: Release) -> dict[str, torch.Tensor]:
    """The release's gate tensors, keyed by the names it stored them under: a ``.pth`` through
    ``torch.load(weights_only=True)`` (which refuses any pickled object but plain tensors and containers) holding a
    dict of tensors, or a safetensors file."""
    path = release.weights
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise ConfigError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"{path}: not a plain tensor dict (torch.load(weights_only=True) refused it: "
                          f"{str(exc).splitlines()[0]})") from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ConfigError(f"{path}: holds a {type(state).__name__}, not a dict of tensors keyed by name")
    return state


def seer_state_dict(release: Release, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The release's tensors as seer's gate state (``layers.<i>.q_weight`` / ``k_weight``, ``[Hq, in, hidden]``);
    refuses a missing layer or projection, a tensor of another shape and any gate tensor it does not know."""
    sig, gate = release.signature, release.gate
    heads, kv_heads, head_dim = sig["num_heads"], sig["num_kv_heads"], sig["head_dim"]
    found: dict[tuple[int, str], torch.Tensor] = {}
    for key, value in tensors.items():
        match = WEIGHT_KEY.fullmatch(key)
        if match is None or int(match[1]) >= sig["num_layers"] or (match[2] == "q" and not release.q_linear):
            raise ConfigError(f"{release.weights}: tensor {key!r} is not a gate weight of this release "
                              f"({sig['num_layers']} layers, {gate.q_pool}/{gate.k_pool} pools, Q projection "
                              f"{'on' if release.q_linear else 'off'})")
        found[int(match[1]), match[2]] = value
    expected = {"k": (release.k_heads, head_dim * len(gate.k_pool), gate.hidden_size)}
    if release.q_linear:
        expected["q"] = (heads, head_dim * len(gate.q_pool), gate.hidden_size)
    state = {}
    for layer in range(sig["num_layers"]):
        for which, shape in expected.items():
            name = f"layers.{layer}.self_attn.attn_gate.mask_linear_{which}.weight"
            weight = found.get((layer, which))
            if weight is None:
                raise ConfigError(f"{release.weights}: no {name} (the gate weights of layer {layer} are missing)")
            if tuple(weight.shape) != shape:
                raise ConfigError(f"{release.weights}: {name} has shape {list(weight.shape)}, but this release's "
                                  f"config makes it {list(shape)}")
            if which == "k" and release.k_heads != heads:  # per key/value head -> per query head of its group
                weight = weight.repeat_interleave(heads // kv_heads, dim=0)
            state[f"layers.{layer}.{which}_weight"] = weight.contiguous()
    return state


def release_digest(release: Release) -> str:
    """The sha256 of the release's config and weight files: what names its converted folder."""
    h = hashlib.sha256()
    for path in (release.folder / CONFIG, release.weights):
        h.update(path.name.encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def release_cache() -> Path:
    """Where converted releases are kept: ``$SEER_CACHE_DIR/releases`` (default ``~/.cache/seer/releases``)."""
    return Path(os.environ.get("SEER_CACHE_DIR") or "~/.cache/seer").expanduser() / "releases"


def convert_release(folder: str | os.PathLike, cache: str | os.PathLike | None = None) -> Path:
    """The seer gate folder of the release in ``folder`` (under ``cache``, default :func:`release_cache`), written
    on first use and reused while the release's files are unchanged."""
    release = read_release(folder)
    digest = release_digest(release)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", release.base_model).strip("-")
    out = Path(cache or release_cache()) / f"{name}-{digest[:16]}"
    if (out / META).is_file():
        try:
            read_gate_meta(out)  # whole and unaltered: reuse
            return out
        except ConfigError:
            pass  # damaged: written again below
    state = seer_state_dict(release, read_release_weights(release))
    meta = {"format": FORMAT, "base_model": release.base_model, "model": release.signature,
            "gate": dataclasses.asdict(release.gate), "sparsity": dataclasses.asdict(release.sparsity),
            "source": {"format": "seerattention-release", "folder": str(Path(folder).resolve()),
                       "weights": release.weights.name, "sha256": digest}}
    write_gate_files(out, meta, state)
    return out
