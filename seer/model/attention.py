"""Block selection inside a Hugging Face model: a registered attention function, and gates or selectors per layer.

:func:`prepare_model` switches every attention layer of a model (Llama, Qwen2, Qwen3, Mistral, Gemma-3, ...: README) to
the ``"seer"`` attention function registered in transformers' ``AttentionInterface`` (no modeling file is copied)
and gives the model a shared :class:`SeerContext`. :func:`attach_gates` also gives every layer an
:class:`~seer.gates.AttnGate` (submodule ``seer_gate``) and hooks its Q and K *before* RoPE (the output of
``q_proj``/``k_proj``, through ``q_norm``/``k_norm`` where the model has them, so Qwen2's bias and Qwen3's norm are
included). Models whose attention seer cannot stand in for are refused (:func:`check_model`: capped logits, learned
sinks, no full-attention layer); layers that attend within a sliding or chunked window (:func:`attention_windows`:
Gemma-3's, Llama-4's, EXAONE-4's local layers) keep the model's own attention in every mode and get no gate (nor
decode gate): seer selects blocks in the full-attention layers, and densities and calibrations count those. Block
scores come from ``context.selector`` (a training-free scorer of :mod:`seer.sparsity.selectors`, which reads Q and K
after RoPE) or, when it is None, from the layer's gate (blended with a training-free estimate when
``gate_config.blend`` names one); in ``observe`` and ``sparse`` modes a layer of ``context.layer_selectors`` is scored
by its own selector instead (``{layer: selector}``: which layers' selections cost the quality is measured by giving a
group of them the oracle). What the function does depends on the context's ``mode``, set like every other setting
through the context's checks: for a block of code (``with context.running("sparse", sparsity=...):``,
:meth:`SeerContext.observing`) or for good (:meth:`SeerContext.update`):

* ``dense`` - plain SDPA; gates and selectors are idle.
* ``distill`` - dense attention plus the block ground truth (``gt_target``: the block max-pool from the ``reference``
  PyTorch code or the fused ``triton`` kernel, the block attention mass, or that of ``gt_rows`` sampled rows per
  block); the gate's logits (with grad) and the ground truth go to ``context.consumer(LayerRecord(...))``.
* ``observe`` - dense attention; each layer's block scores (and, with ``context.want_mass``, its true block attention
  mass) go to ``context.consumer(LayerObservation(...))``: what calibration and measurements read.
* ``sparse`` - scores -> block mask (:func:`seer.sparsity.select_blocks`, with the knob of ``context.calibration``
  when the budget is calibrated) -> block-sparse attention; the achieved density of each layer is kept
  (``context.densities()``), and with a consumer the layer's observation (scores, mask, true mass) is handed on.
* ``train_sparse`` - attention through the gate's selected blocks *with* gradients in Q, K and V (fine-tuning):
  the Triton kernel's backward on CUDA (``kernel="triton"``), autograd through the PyTorch reference elsewhere;
  with a consumer, the gate's logits (with grad, from detached Q/K) and the dense ground truth (the ``distill``
  path) go to it as a :class:`LayerRecord`. Each layer's mask is made once per step and kept in
  ``context.train_masks`` (clear it before each step), so a recomputation under activation checkpointing reuses
  it and computes no second gate or ground truth. A ``dense`` budget (or a layer in ``dense_layers``) runs SDPA.

A causal prefill (queries == keys) is gated, unpadded or padded: a padded batch (left or right padding, an
``attention_mask`` with one run of real tokens per row) is scored, selected and attended sequence by sequence in
``sparse`` and ``observe`` modes (the Triton path attends all of them in one packed launch), each on its own tokens
with blocks starting at its first one, so it gets what it gets alone (give left-padded rows their positions, as
``generate`` does) and the density counts its own causal blocks; a consumer gets one observation per sequence, and
padding rows' outputs are 0. Decode steps, masks with holes and packed rows fall back to dense SDPA; distillation
needs an unpadded prefill.

Rows packed from several documents (``data.packing=documents``) are trained with ``context.documents`` set (the
``(start, end)`` of each document of each row, :func:`document_spans` of position ids that restart at each
document): in ``distill`` and ``train_sparse`` modes each document is gated, given its ground truth and attended
alone, its blocks starting at its first token, and the consumer gets one :class:`LayerRecord` per document and
layer. The attention mask transformers builds for such position ids is not read; the ``train_sparse`` attention of
all documents of the batch is one call of the varlen block-sparse kernel (``cu_seqlens``), the ground truth is
computed document by document (the fused kernel has no varlen mode).

A layer with decode gates whose budget is on (:meth:`seer.model.decode.DecodeContext.enable`) hands decode
steps to them and shows them the keys of every prefill that keeps a KV cache, in any mode.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import nn

from seer.gates import AttnGate, rope_frequencies
from seer.gates.config import GateConfig
from seer.sparsity import attention_mass, select_blocks
from seer.sparsity.calibration import Calibration
from seer.sparsity.config import SparsityConfig

ATTN_IMPLEMENTATION = "seer"
MODES = ("dense", "distill", "observe", "sparse", "train_sparse")


@dataclass
class LayerRecord:
    """What one layer hands the trainer in distill mode: gate logits (with grad), ground truth, and the layer's
    post-RoPE Q and K with the softmax scale (to measure attention mass, or the blend's estimate, when needed)."""

    layer_idx: int
    logits: torch.Tensor
    gt: torch.Tensor
    query: torch.Tensor
    key: torch.Tensor
    scale: float


@dataclass
class LayerObservation:
    """What one layer hands ``context.consumer`` in observe and sparse modes: its block scores ``[B, H, nb, nb]``,
    the mask it ran (sparse mode; None in observe mode), and its true block attention mass (``want_mass``; else
    None)."""

    layer_idx: int
    scores: torch.Tensor
    mask: torch.Tensor | None = None
    mass: torch.Tensor | None = None


@dataclass
class SeerContext:
    """State shared by all gated layers of one model. Its settings change only through :meth:`update` (for good) or
    :meth:`running` (for a block of code), which check them; the attention layers write ``density`` and
    ``train_masks``, cleared by :meth:`clear_step`."""

    block_size: int
    num_layers: int = 0  # the model's layers (0: unknown; layer_count); a per-layer gate.blend_weight has one for each
    gate_config: GateConfig | None = None
    mode: str = "dense"
    selector: Any = None  # a seer.sparsity.selectors.Selector; None: the layers' gates
    layer_selectors: dict[int, Any] = field(default_factory=dict)  # observe, sparse: {layer: Selector} scoring it
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    calibration: Calibration | None = None
    gt_source: str = "reference"  # distill: "reference" or "triton"
    gt_mode: str = "auto"  # distill with triton: "fast", "lowmem" or "auto"
    gt_target: str = "maxpool"  # distill, train_sparse: "maxpool" (the paper's block max), "mass" (block mass) or
    # "rows" (the block mass of gt_rows query rows per block spread evenly, the rows the rerank reads)
    gt_rows: int = 16
    kernel: str = "reference"  # sparse, train_sparse: "reference" or "triton"
    want_mass: bool = False
    documents: tuple[tuple[tuple[int, int], ...], ...] | None = None  # distill, train_sparse: each row's documents
    consumer: Callable[[Any], None] | None = None
    timer: list | None = None  # sparse mode on CUDA: (start, selected, attended) CUDA events of each layer
    density: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)
    train_masks: dict[int, torch.Tensor | None] = field(default_factory=dict)  # train_sparse: this step's masks

    def densities(self) -> dict[int, float]:
        """Achieved block density of each gated layer in the last sparse forward (kept share of causal blocks)."""
        return {layer: float(kept) / total for layer, (kept, total) in sorted(self.density.items())}

    def mean_density(self) -> float:
        """Achieved density of the last sparse forward averaged over layers (nan before any)."""
        dens = self.densities()
        return sum(dens.values()) / len(dens) if dens else float("nan")

    @property
    def scorer_name(self) -> str:
        """The name calibrations are stored under (:func:`scorer_name`)."""
        return scorer_name(self.selector, self.gate_config, self.layer_selectors)

    def clear_step(self) -> None:
        """Forgets the densities and ``train_sparse`` masks of the last forward (before a new step or batch)."""
        self.density.clear()
        self.train_masks.clear()

    def update(self, **settings: Any) -> None:
        """Changes the given settings (``mode``, ``sparsity``, ``calibration``, ``selector``, ``consumer``, ...)
        after checking them together: a mode of :data:`MODES`, known ground-truth and kernel names, layer selectors
        (:func:`_check_layer_selectors`) only outside ``distill`` and ``train_sparse``, and a calibrated budget in
        ``sparse`` mode with the calibration fitted for it and this context's scorer (``train_sparse`` calibrates
        each layer on its batch). A budget that needs no calibration drops the one given."""
        unknown = sorted(set(settings) - SETTINGS)
        if unknown:
            raise ValueError(f"unknown seer context setting(s) {unknown}; known: {sorted(SETTINGS)}")
        new = {name: settings.get(name, getattr(self, name)) for name in SETTINGS}
        for name, allowed in _CHOICES.items():
            if new[name] not in allowed:
                raise ValueError(f"{name} {new[name]!r} is not one of {allowed}")
        if isinstance(new["gt_rows"], bool) or not isinstance(new["gt_rows"], int) or new["gt_rows"] < 1:
            raise ValueError(f"gt_rows {new['gt_rows']!r} must be an integer >= 1")
        if self.gate_config is not None and new["gate_config"] is not self.gate_config:
            changed = self.gate_config.architecture_differences(new["gate_config"])
            if changed:
                raise ValueError(f"gate_config may change only how the gates' scores are used at inference "
                                 f"(blend), not {changed}: the gates' weights are built for it")
        if new["gate_config"] is not None and new["gate_config"] is not self.gate_config and self.num_layers:
            new["gate_config"].check_layers(self.num_layers)
        new["layer_selectors"] = _check_layer_selectors(new["layer_selectors"], self.num_layers)
        if new["layer_selectors"] and new["mode"] in ("distill", "train_sparse"):
            raise ValueError(f"layer_selectors score the observe and sparse modes only, not {new['mode']!r} "
                             "(which trains the gates of every layer)")
        sparsity, calibration = new["sparsity"], new["calibration"]
        selector = scorer_name(new["selector"], new["gate_config"], new["layer_selectors"])
        if calibration is not None and sparsity.calibrated and not calibration.matches(sparsity, selector):
            raise ValueError(f"the calibration given was made for {calibration.sparsity.describe()} with the "
                             f"{calibration.selector} scorer, not for {sparsity.describe()} with {selector}")
        if new["mode"] == "sparse" and sparsity.calibrated and calibration is None:
            raise ValueError(f"sparsity {sparsity.describe()} needs a calibration (seer.sparsity.calibration) "
                             f"for the {selector} scorer")
        new["calibration"] = calibration if sparsity.calibrated else None
        for name, value in new.items():
            setattr(self, name, value)

    @contextlib.contextmanager
    def running(self, mode: str | None = None, **settings: Any) -> Iterator[SeerContext]:
        """Runs the model in ``mode`` (default: the current one) with ``settings`` (:meth:`update`'s) inside the
        block; every setting is restored when it ends, however it ends."""
        if mode is not None:
            settings["mode"] = mode
        before = {name: getattr(self, name) for name in SETTINGS}
        self.update(**settings)
        try:
            yield self
        finally:
            self.update(**before)

    @contextlib.contextmanager
    def observing(self, want_mass: bool = False, sparse: bool = False, **settings: Any) -> Iterator[ObservedScores]:
        """Runs the model dense in ``observe`` mode inside the block (``settings`` as :meth:`running`'s, e.g. a
        ``selector``), collecting every layer's block scores (and, ``want_mass``, true block masses); ``sparse``:
        running sparse instead (``settings`` then name the ``sparsity`` and its ``calibration``), so that each layer's
        scores are those of the sparse model's inputs."""
        observed = ObservedScores()
        with self.running("sparse" if sparse else "observe", consumer=observed, want_mass=want_mass, **settings):
            yield observed


class ObservedScores:
    """The block scores (and true block masses, when observed) that layers hand over in ``observe`` (or ``sparse``)
    mode, by layer: what calibration reads."""

    def __init__(self) -> None:
        self._scores: dict[int, list[torch.Tensor]] = {}
        self._masses: dict[int, list[torch.Tensor]] = {}

    def __call__(self, observation: LayerObservation) -> None:
        self._scores.setdefault(observation.layer_idx, []).append(observation.scores.float())
        if observation.mass is not None:
            self._masses.setdefault(observation.layer_idx, []).append(observation.mass.float())

    def scores(self) -> dict[int, torch.Tensor]:
        """``{layer: [rows, H, nb, nb]}`` float32, the batches observed stacked."""
        return {i: torch.cat(s) for i, s in self._scores.items()}

    def masses(self) -> dict[int, torch.Tensor] | None:
        """``{layer: [rows, H, nb, nb]}`` float32 true block masses, or None when none were observed."""
        return {i: torch.cat(m) for i, m in self._masses.items()} or None


def scorer_name(selector, gate_config: GateConfig | None, layer_selectors=None) -> str:
    """The scorer's name in calibrations and results: the selector's, or for the gates (``selector`` None) ``gate`` or
    its blend (:attr:`GateConfig.scorer_name`); then, for ``layer_selectors`` (``{layer: selector}``), each of their
    selectors' names with the layers it scores, e.g. ``gate+vertical_slash@0.5 oracle@0-3,8``."""
    name = selector.name if selector is not None else gate_config.scorer_name if gate_config is not None else "gate"
    by_name: dict[str, list[int]] = {}
    for layer, layer_selector in sorted((layer_selectors or {}).items()):
        by_name.setdefault(layer_selector.name, []).append(layer)
    return " ".join([name, *(f"{other}@{layer_ranges(layers)}" for other, layers in by_name.items())])


def layer_ranges(layers) -> str:
    """Layer indices, sorted, as comma-separated runs: ``[8, 0, 1, 2, 3]`` -> ``0-3,8``."""
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ",".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)


def _check_layer_selectors(layer_selectors, num_layers: int) -> dict[int, Any]:
    """``layer_selectors`` (a mapping, None for none) as a dict sorted by layer, after checking that every key is a
    layer of the model (``0 <= layer < num_layers``, when the context knows it) and every value a selector."""
    from seer.sparsity.selectors import Selector

    checked = {}
    for layer, selector in (layer_selectors or {}).items():
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0 or num_layers and layer >= num_layers:
            known = f" (layers 0-{num_layers - 1})" if num_layers else ""
            raise ValueError(f"layer_selectors: layer {layer!r} is not a layer of this model{known}")
        if not isinstance(selector, Selector):
            raise ValueError(f"layer_selectors: layer {layer} is given {selector!r}, not a "
                             "seer.sparsity.selectors.Selector")
        checked[layer] = selector
    return dict(sorted(checked.items()))


SETTINGS = frozenset({"mode", "selector", "layer_selectors", "gate_config", "sparsity", "calibration", "gt_source",
                      "gt_mode", "gt_target", "gt_rows", "kernel", "want_mass", "documents", "consumer", "timer"})
_CHOICES = {"mode": MODES, "gt_source": ("reference", "triton"), "gt_mode": ("auto", "fast", "lowmem"),
            "gt_target": ("maxpool", "mass", "rows"), "kernel": ("reference", "triton")}


class _PreRopeStash:
    """Holds the latest pre-RoPE Q and K of one layer, written by forward hooks, taken by the attention function."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        self.shape = {"q": num_heads, "k": num_kv_heads}
        self.head_dim = head_dim
        self.q: torch.Tensor | None = None
        self.k: torch.Tensor | None = None

    def hook(self, which: str, norm: nn.Module | None = None):
        """A forward hook for the layer's ``q_proj`` / ``k_proj`` (output ``[B, N, heads * D]``) that stores its
        output as ``[B, heads, N, D]``, through the layer's ``norm`` (``q_norm`` / ``k_norm``) where it has one: over
        the whole projection (a 1-d weight of ``heads * D``: OLMo-2), else per head on ``[B, N, heads, D]`` (a weight of
        ``D``: Qwen3, EXAONE-4, Apertus; or ``[heads, D]``: Cohere), whatever layout the model applies it in (a
        per-head norm gives the same values before or after the heads' transpose, so this needs no knowledge of where
        the model calls it)."""
        weight = getattr(norm, "weight", None)
        whole = isinstance(weight, torch.Tensor) and weight.dim() == 1 and weight.numel() \
            == self.shape[which] * self.head_dim

        def store(_module, _inputs, output):
            b, s = output.shape[:2]
            x = output.view(b, s, self.shape[which], self.head_dim) if not whole else \
                norm(output).view(b, s, self.shape[which], self.head_dim)
            setattr(self, which, (norm(x) if norm is not None and not whole else x).transpose(1, 2))
        return store

    def attach(self, layer: nn.Module) -> None:
        """Hooks ``layer``'s Q and K projections (see :meth:`hook`)."""
        layer.q_proj.register_forward_hook(self.hook("q", getattr(layer, "q_norm", None)))
        layer.k_proj.register_forward_hook(self.hook("k", getattr(layer, "k_norm", None)))

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, self.q, self.k = self.q, self.k, None, None
        if q is None or k is None:
            raise RuntimeError("the gate found no pre-RoPE Q/K for this layer: was the attention layer's forward "
                               "bypassed?")
        return q, k


def unsupported_attention(config) -> str | None:
    """Why seer's attention cannot stand in for that of the model of ``config`` (a transformers config: the checks
    that need no weights), or None. seer's kernels compute causal softmax attention (any scale, GQA); they do not cap
    the logits (Gemma-2's ``attn_logit_softcapping``), and seer needs a full-attention layer to select blocks in
    (every layer of Mistral-7B-v0.1 slides a window: :func:`attention_windows`). Learned attention sinks are refused
    by :func:`check_model`, which sees the layers."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    kind = getattr(text, "model_type", None) or type(text).__name__
    cap = getattr(text, "attn_logit_softcapping", None)
    if cap is not None:
        return (f"{kind} caps its attention logits (attn_logit_softcapping={cap}), which seer's attention does not: "
                "its outputs would change")
    windows = attention_windows(config)
    if windows and len(windows) == text.num_hidden_layers:
        return (f"every attention layer of {kind} attends within a window ({min(w.size for w in windows.values())} "
                "tokens, sliding or chunked): seer has no full-attention layer to select blocks in")
    return None


class Window(NamedTuple):
    """The keys a windowed layer attends: the last ``size`` (sliding: keys ``k`` with ``q - size < k <= q``) or those
    of the query's own ``size``-token chunk (``chunked``: ``k // size == q // size``, ``k <= q``)."""

    size: int
    chunked: bool = False


def attention_windows(config) -> dict[int, Window]:
    """``{layer index: window}`` of the layers of the model of ``config`` that attend within a window of keys:
    ``layer_types``' ``sliding_attention`` layers (``sliding_window``) and ``chunked_attention`` layers (Llama-4's
    ``attention_chunk_size``); without ``layer_types``, every layer when ``sliding_window`` is set and
    ``use_sliding_window`` is not false (Mistral-7B-v0.1). Such a layer keeps the model's own attention under seer
    (its cost is bounded by the window already); seer selects blocks in the others."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    sizes = {"sliding_attention": getattr(text, "sliding_window", None),
             "chunked_attention": getattr(text, "attention_chunk_size", None)}
    types = getattr(text, "layer_types", None)
    if types is not None:
        return {i: Window(int(sizes[kind]), kind == "chunked_attention") for i, kind in enumerate(types)
                if sizes.get(kind)}
    window = sizes["sliding_attention"]
    if not window or getattr(text, "use_sliding_window", True) is False:
        return {}
    return dict.fromkeys(range(text.num_hidden_layers), Window(int(window)))


def _window_mask(window: Window, queries: int, keys: int, device) -> torch.Tensor:
    """bool ``[1, 1, queries, keys]``: what the last ``queries`` of ``keys`` positions attend in a layer with
    ``window``, for the dense path when no mask came (seer's mask function skips it while tracing)."""
    q = torch.arange(keys - queries, keys, device=device)[:, None]
    k = torch.arange(keys, device=device)[None, :]
    inside = k // window.size == q // window.size if window.chunked else k > q - window.size
    return ((k <= q) & inside)[None, None]


def check_model(model: nn.Module) -> list[nn.Module]:
    """``model``'s attention layers (:func:`attention_layers`), each given its ``seer_window``
    (:func:`attention_windows`; None: full attention), or a ValueError saying why seer's attention cannot stand in for
    theirs: :func:`unsupported_attention`, or learned sink logits (gpt-oss' ``sinks``)."""
    problem = unsupported_attention(model.config)
    if problem is not None:
        raise ValueError(problem)
    layers = attention_layers(model)
    sinks = [layer.layer_idx for layer in layers if isinstance(getattr(layer, "sinks", None), torch.Tensor)]
    if sinks:
        raise ValueError(f"{type(model).__name__}'s attention learns sink logits (`sinks`, layers {sinks}), which "
                         "seer's attention does not add: its outputs would change")
    windows = attention_windows(model.config)
    for layer in layers:
        layer.seer_window = windows.get(layer.layer_idx)
    return layers


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The causal self-attention modules of ``model`` (those with ``q_proj``, ``k_proj``, ``layer_idx`` and
    ``is_causal`` true, as transformers marks them), in layer order. Others keep their own attention: cross-attention
    (Mllama's; no ``is_causal``), bidirectional or prefix-LM attention (PaliGemma's: ``is_causal`` false)."""
    layers = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "k_proj") and hasattr(m, "layer_idx")
              and getattr(m, "is_causal", None) is True]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no causal self-attention layers with q_proj/k_proj/layer_idx; "
                         "seer supports models with separate Q and K projections (Llama, Qwen2, Qwen3, Mistral, "
                         "Gemma-3, ...: the README's 'Which models')")
    return sorted(layers, key=lambda m: m.layer_idx)


def layer_count(model: nn.Module) -> int:
    """The model's layer count (``num_hidden_layers``; its layers' ``layer_idx`` run below it): what per-layer settings
    and gate files count, also where some layers have no causal self-attention (Mllama's cross-attention layers)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return cfg.num_hidden_layers


def layer_shape(model: nn.Module, layer: nn.Module) -> tuple[int, int, int]:
    """``(query heads, key/value heads, head dim)`` of one attention layer of ``model``."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(layer, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return heads, kv_heads, head_dim


def prepare_model(model: nn.Module, block_size: int) -> SeerContext:
    """Switches ``model`` to the ``"seer"`` attention function with a fresh :class:`SeerContext` (dense mode, no
    gates: set ``context.selector`` to score blocks with a training-free selector). Returns the context."""
    if getattr(model, "seer_context", None) is not None:
        raise ValueError("this model is already prepared for seer")
    layers = check_model(model)
    register_attention()
    ctx = SeerContext(block_size=block_size, num_layers=layer_count(model))
    for layer in layers:
        layer.seer_context = ctx
    model.seer_context = ctx
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return ctx


def attach_gates(model: nn.Module, gate_config: GateConfig,
                 make_gate: Callable[[nn.Module], nn.Module] | None = None) -> SeerContext:
    """Adds a gate to every attention layer of ``model`` (in place; preparing it first if needed) and returns the
    shared context.

    Gates are float32 and live on the model's device (the CPU for a model on the meta device); the base model's own
    parameters are left as they are (freeze them with :func:`freeze_base_model`). ``make_gate(layer)`` gives a
    layer's gate instead of a new :class:`AttnGate` (any module mapping the layer's pre-RoPE Q and K to block logits
    ``[B, Hq, nb, nb]``, e.g. :class:`seer.gates.decode_gate.SharedPrefillGate`)."""
    ctx = getattr(model, "seer_context", None) or prepare_model(model, gate_config.block_size)
    if ctx.gate_config is not None:
        raise ValueError("this model already has seer gates attached")
    if ctx.block_size != gate_config.block_size:
        raise ValueError(f"gate.block_size={gate_config.block_size} differs from the model's seer block size "
                         f"{ctx.block_size}")
    gate_config.check_layers(ctx.num_layers)
    if make_gate is None:
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        inv_freq, rope_scale = rope_frequencies(cfg, gate_config.hidden_size) if gate_config.block_rope \
            else (None, 1.0)
        dynamic = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type") == "dynamic"
        at_length = partial(rope_frequencies, cfg, gate_config.hidden_size) if dynamic else None  # as the model's
        device = next(model.parameters()).device
        device = torch.device("cpu") if device.type == "meta" else device  # a base drawn later (sharded runs)

        def make_gate(layer: nn.Module) -> nn.Module:
            heads, kv_heads, head_dim = layer_shape(model, layer)
            return AttnGate(gate_config, head_dim, heads, kv_heads, inv_freq, rope_scale, at_length).to(device)
    for layer in attention_layers(model):
        if layer.seer_window is not None:  # keeps the model's own windowed attention: no gate
            continue
        layer.seer_gate = make_gate(layer)
        layer.seer_stash = stash = _PreRopeStash(*layer_shape(model, layer))
        stash.attach(layer)
    ctx.gate_config = gate_config
    return ctx


def gates(model: nn.Module) -> dict[int, AttnGate]:
    """``{layer_idx: gate}`` of a model prepared by :func:`attach_gates`."""
    return {layer.layer_idx: layer.seer_gate for layer in attention_layers(model) if hasattr(layer, "seer_gate")}


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for g in gates(model).values() for p in g.parameters()]


def freeze_base_model(model: nn.Module) -> None:
    """Freezes every parameter but the gates' and puts the model in eval mode (no dropout)."""
    for name, p in model.named_parameters():
        p.requires_grad_(".seer_gate." in f".{name}")
    model.eval()


def _dense(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def _output_buffer(query: torch.Tensor) -> torch.Tensor:
    """An empty ``[B, N, Hq, D]`` tensor: the layout o_proj reads, which the Triton kernels write in place (through
    its ``[B, Hq, N, D]`` transposed view), so no copy follows them."""
    b, hq, n, d = query.shape
    return torch.empty(b, n, hq, d, dtype=query.dtype, device=query.device)


def _scores(module, ctx: SeerContext, query, key, scale: float, pre_rope) -> torch.Tensor:
    """Block scores of one layer (no grad): the layer's own selector (``ctx.layer_selectors``) or the context's on
    post-RoPE Q/K, or the layer's gate on the pre-RoPE Q/K its hooks stashed (``pre_rope``), blended with a
    training-free estimate when the gate config names one (``gate_config.blend``)."""
    selector = ctx.layer_selectors.get(module.layer_idx, ctx.selector)
    if selector is not None:
        from seer.sparsity.selectors import LayerInputs

        return selector.scores(LayerInputs(query, key, ctx.block_size, scale, module.layer_idx))
    gate: AttnGate | None = getattr(module, "seer_gate", None)
    if gate is None:
        raise RuntimeError("no block scorer: the model has no gates and context.selector is None")
    return blend_gate_scores(ctx.gate_config, gate(*pre_rope), query, key, ctx.block_size, scale, module.layer_idx)


def blend_gate_scores(gate_config: GateConfig, scores: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                      block_size: int, scale: float, layer_idx: int) -> torch.Tensor:
    """A gate's block ``scores`` blended with the training-free estimate ``gate_config.blend`` names (``scores``
    as they are when it names none), the estimate computed without grad from the layer's post-RoPE ``query`` and
    ``key``: what inference selects with, and what blend-aware distillation (``stage.loss_through_blend``) trains
    through, so gradients reach the gate alone.

    At inference on CUDA (no gradient wanted for ``scores``), with the fused selection kernels on (the default,
    :data:`seer.sparsity.selectors.FUSED_SELECTION_ON_CUDA`), a ``vertical_slash`` blend runs as one fused kernel
    (:func:`seer.kernels.vs_blend.vertical_slash_blend`) on the estimate's per-block vectors, the ``[nb, nb]`` mass
    grid never built; elsewhere (training through the blend, CPU, other estimates) :func:`blend_mass` on the grid.
    The estimate's share is the layer's (:meth:`GateConfig.layer_weight`).

    With ``gate_config.rerank_rows``, at inference only, the (blended) scores only propose candidates, their
    top-``rerank_top_p`` blocks of each row (at most ``rerank_max_share`` of its causal blocks), and a few query rows of
    each block rank those by exact attention (:func:`seer.sparsity.selectors.sampled_rows_mass`). The rerank passes
    no gradient, so training through the blend (scores that need one) gets the blend without it."""
    inference = not (torch.is_grad_enabled() and scores.requires_grad)
    rerank = gate_config.rerank_rows and inference
    if gate_config.blend is None and not rerank:
        return scores
    from seer.sparsity import selectors
    from seer.sparsity.selectors import LayerInputs, blend_mass, build_selector

    x = LayerInputs(query, key, block_size, scale, layer_idx)
    if gate_config.blend is not None:
        selector = build_selector(gate_config.blend)
        if selectors.FUSED_SELECTION_ON_CUDA and gate_config.blend == "vertical_slash" and scores.is_cuda \
                and inference:
            from seer.kernels.vs_blend import vertical_slash_blend

            scores = vertical_slash_blend(scores, *selector.vectors(x), gate_config.layer_weight(layer_idx))
        else:
            scores = blend_mass(scores, selector.mass(x), gate_config.layer_weight(layer_idx))
    if not rerank:
        return scores
    with torch.no_grad():
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        proposal = torch.log_softmax(scores.float().masked_fill(~causal, float("-inf")), dim=-1)
        candidates = selectors.top_p_candidates(proposal, gate_config.rerank_top_p, gate_config.rerank_max_share)
        return selectors.log_mass(selectors.sampled_rows_mass(x, candidates, gate_config.rerank_rows))


def seer_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                   **kwargs):
    """The ``"seer"`` attention function (transformers' AttentionInterface signature): q ``[B, Hq, N, D]`` after RoPE,
    k/v ``[B, Hkv, N_kv, D]``; returns ``([B, N, Hq, D], None)``. A padded prefill (a mask :func:`seer_mask` made
    for one run of real tokens per row) is selected and attended sequence by sequence in ``sparse`` and ``observe``
    modes (:func:`_padded_prefill`)."""
    ctx: SeerContext | None = getattr(module, "seer_context", None)
    stash = getattr(module, "seer_stash", None)
    decode = getattr(module, "seer_decode", None)  # seer.model.decode.DecodeContext: sparse decode when enabled
    window: Window | None = getattr(module, "seer_window", None)
    if window is not None:  # the model's own windowed attention, in every mode
        if attention_mask is None and key.shape[2] > window.size:  # seer's mask function skips it while tracing
            attention_mask = _window_mask(window, query.shape[2], key.shape[2], query.device)
        return _dense(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if decode is not None:
        out = decode.handle(module, query, key, value, attention_mask, scaling, **kwargs)
        if out is not None:
            if stash is not None:
                stash.q = stash.k = None
            return out, None
    if attention_mask is None and 1 < query.shape[2] < key.shape[2]:
        # a prefill into a preallocated cache (StaticCache): transformers drops the causal mask of several queries
        # over more keys only when no key is cached before them, so the keys after the queries are empty
        key, value = key[:, :, :query.shape[2]], value[:, :, :query.shape[2]]
    spans = getattr(attention_mask, "seer_spans", None) if ctx is not None and ctx.mode in ("sparse", "observe") \
        else None
    documents = ctx.documents if ctx is not None and ctx.mode in ("distill", "train_sparse") else None
    prefill = (attention_mask is None or spans is not None or documents is not None) \
        and query.shape[2] == key.shape[2]
    if ctx is None or ctx.mode == "dense" or not prefill:
        if ctx is not None and ctx.mode == "distill":
            raise ValueError("gate distillation needs an unpadded causal prefill (no attention mask, no KV cache); "
                             "got an attention mask or cached keys")
        if stash is not None:
            stash.q = stash.k = None
        return _dense(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if query.dtype != value.dtype:  # float32 rotary tables under autocast give float32 q/k beside bf16 v
        query, key = query.to(value.dtype), key.to(value.dtype)
    if documents is not None:
        _check_documents(documents, query.shape[0], query.shape[2])
    if ctx.mode == "train_sparse":
        return _train_sparse(module, ctx, query, key, value, scaling, scale, documents)
    if ctx.mode == "distill":
        q_pre, k_pre = stash.take()
        if documents is None:
            return _distill(module, ctx, query, key, value, q_pre, k_pre, scaling, scale), None
        out = _output_buffer(query)
        for b, rows in _document_rows(documents):
            out[b:b + 1, rows] = _distill(module, ctx, *(x[:, :, rows][b:b + 1] for x in (query, key, value, q_pre,
                                                                                           k_pre)), scaling, scale)
        return out, None
    pre_rope = stash.take() if stash is not None and ctx.selector is None else None
    if spans is None:
        events = [torch.cuda.Event(enable_timing=True) for _ in range(3)] \
            if ctx.timer is not None and ctx.mode == "sparse" and query.is_cuda else None
        out, kept, total = _select_and_attend(module, ctx, query, key, value, scaling, scale, pre_rope, events)
    else:
        out, kept, total = _padded_prefill(module, ctx, query, key, value, scaling, scale, pre_rope, spans)
    if ctx.mode == "sparse":
        # kept blocks (masks are block-causal); reductions without host sync: densities() divides later
        ctx.density[module.layer_idx] = (kept, total)
    return out, None


def _padded_prefill(module, ctx: SeerContext, query, key, value, scaling, scale: float, pre_rope, spans):
    """The selection of :func:`_select_and_attend` on each row's real tokens ``spans[b] = (first, end)`` alone, so
    blocks start at each sequence's first token and padding is never scored, selected or counted; then attention
    sequence by sequence, or with the Triton kernel all sequences in one launch, packed
    (:func:`_attend_packed`). The outputs of padding rows are 0. Returns ``(out [B, N, Hq, D], kept blocks, causal
    blocks)`` summed over the sequences."""
    packed = ctx.kernel == "triton" and ctx.mode == "sparse" and not ctx.sparsity.runs_dense(module.layer_idx)
    out = _output_buffer(query).zero_()
    kept, total = torch.zeros((), dtype=torch.int64, device=query.device), 0
    masks = []
    for b, (first, end) in enumerate(spans):
        if end == first:
            masks.append(None)
            continue
        rows = slice(b, b + 1), slice(None), slice(first, end)
        seq_pre = None if pre_rope is None else (pre_rope[0][rows], pre_rope[1][rows])
        mask, seq_kept, seq_total = _select(module, ctx, query[rows], key[rows], scale, seq_pre)
        if packed:
            masks.append(mask)
        else:
            out[b, first:end] = _attend(module, ctx, query[rows], key[rows], value[rows], mask, scaling)[0]
        kept, total = kept + seq_kept, total + seq_total
    if packed and any(mask is not None for mask in masks):
        _attend_packed(query, key, value, spans, masks, ctx.block_size, scaling, out)
    return out, kept, total


def _select(module, ctx: SeerContext, query, key, scale: float, pre_rope):
    """Scores -> block mask of one unpadded prefill (None in ``observe`` mode and for dense layers), handed to the
    consumer with the scores. Returns ``(mask, kept blocks, causal blocks)``."""
    layer = module.layer_idx
    with torch.no_grad():
        scores = _scores(module, ctx, query, key, scale, pre_rope)
        mass = attention_mass(query, key, ctx.block_size, scale) if ctx.want_mass and ctx.consumer is not None \
            else None
        nb = scores.shape[-1]
        total = scores.shape[0] * scores.shape[1] * nb * (nb + 1) // 2
        mask = None
        if ctx.mode == "sparse" and not ctx.sparsity.runs_dense(layer):
            knob = ctx.calibration.knob(layer, scores.device) if ctx.calibration is not None else None
            mask = select_blocks(scores, ctx.sparsity, knob)
    if ctx.consumer is not None:
        ctx.consumer(LayerObservation(layer, scores, mask, mass))
    return mask, torch.tensor(total) if mask is None else mask.sum(), total


def _attend(module, ctx: SeerContext, query, key, value, mask, scaling) -> torch.Tensor:
    """Attention ``[B, N, Hq, D]`` of one unpadded prefill through the blocks of ``mask`` (dense SDPA for None)."""
    if mask is None:
        return _dense(module, query, key, value, None, 0.0, scaling)[0]
    if ctx.kernel == "triton":
        from seer.kernels import block_sparse_attn

        out = _output_buffer(query)
        block_sparse_attn(query, key, value, mask, block_size=ctx.block_size, sm_scale=scaling,
                          out=out.transpose(1, 2))
        return out
    from seer.kernels.reference import block_sparse_sdpa

    out = block_sparse_sdpa(query, key, value, mask, block_size=ctx.block_size, sm_scale=scaling)
    return out.transpose(1, 2).contiguous()


def _attend_packed(query, key, value, spans, masks, block_size: int, scaling, out: torch.Tensor) -> None:
    """Writes into ``out [B, N, Hq, D]`` the attention of each row's real tokens ``spans[b]`` through its mask
    ``masks[b]`` (``[1, H, nb_b, nb_b]``, None for an empty row): the tokens packed in one row, one launch of
    :func:`seer.kernels.block_sparse_attn_varlen`."""
    from seer.kernels import block_sparse_attn_varlen

    b, hq, n, d = query.shape
    lengths = [end - first for first, end in spans]
    tokens = torch.cat([torch.arange(row * n + first, row * n + end) for row, (first, end) in enumerate(spans)])
    tokens = tokens.to(query.device)
    q, k, v = (x.transpose(1, 2).reshape(b * n, x.shape[1], d)[tokens] for x in (query, key, value))
    cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=query.device)
    heads = next(m.shape[1] for m in masks if m is not None)
    nb = -(-max(lengths) // block_size)
    packed_mask = torch.zeros(len(spans), heads, nb, nb, dtype=torch.bool, device=query.device)
    for row, mask in enumerate(masks):
        if mask is not None:
            packed_mask[row, :, :mask.shape[2], :mask.shape[3]] = mask[0]
    packed_out, _ = block_sparse_attn_varlen(q, k, v, cu_seqlens, packed_mask, block_size=block_size,
                                             sm_scale=scaling, seqlens=lengths)
    out.view(b * n, hq, d)[tokens] = packed_out


def _select_and_attend(module, ctx: SeerContext, query, key, value, scaling, scale: float, pre_rope, events):
    """The ``sparse`` and ``observe`` modes on an unpadded prefill: scores -> mask -> block-sparse attention (dense
    SDPA in ``observe`` mode and for dense layers). Returns ``(out [B, N, Hq, D], kept blocks, causal blocks)``;
    ``events`` (CUDA events, or None) time the selection and the attention into ``ctx.timer``."""
    if events:
        events[0].record()
    mask, kept, total = _select(module, ctx, query, key, scale, pre_rope)
    if mask is None:
        return _attend(module, ctx, query, key, value, None, scaling), kept, total
    if events:
        events[1].record()
    out = _attend(module, ctx, query, key, value, mask, scaling)
    if events:
        events[2].record()
        ctx.timer.append(events)
    return out, kept, total


def _check_documents(documents, batch: int, length: int) -> None:
    """``documents`` (``context.documents``) holds one tuple of ``(start, end)`` per row, each row's documents
    covering its ``length`` tokens in order."""
    def covers(row) -> bool:
        return bool(row) and row[0][0] == 0 and row[-1][1] == length and all(
            end > start and end == following for (start, end), (following, _) in zip(row, [*row[1:], (length, 0)]))

    if len(documents) != batch or not all(covers(row) for row in documents):
        raise ValueError(f"context.documents must give each of the {batch} rows non-empty (start, end) spans "
                         f"covering its {length} tokens in order; got {documents!r:.200}")


def _document_rows(documents) -> Iterator[tuple[int, slice]]:
    """``(row, token slice)`` of every document of ``context.documents``, row by row."""
    for b, row in enumerate(documents):
        for start, end in row:
            yield b, slice(start, end)


def _distill(module, ctx: SeerContext, query, key, value, q_pre, k_pre, scaling, scale: float) -> torch.Tensor:
    """The ``distill`` mode on one causal sequence per row: dense attention ``[B, N, Hq, D]`` (returned) and the
    layer's :class:`LayerRecord` (gate logits with grad, ground truth) to the consumer."""
    out, gt = _dense_with_gt(module, ctx, query, key, value, scaling)
    with torch.enable_grad():
        logits = module.seer_gate(q_pre.detach(), k_pre.detach())
    if ctx.consumer is not None:
        ctx.consumer(LayerRecord(module.layer_idx, logits, gt, query, key, scale))
    return out


def _dense_with_gt(module, ctx: SeerContext, query, key, value, scaling):
    """Dense attention output ``[B, N, Hq, D]`` and the block ground truth of ``ctx.gt_target``: the block attention
    mass, the block mass of ``ctx.gt_rows`` evenly spread query rows per block over every causal block (the rerank's
    rows, :func:`seer.sparsity.selectors.sampled_rows_mass`), or the block max from the fused Triton kernel or the
    PyTorch reference (``ctx.gt_source``); no grad."""
    if ctx.gt_target in ("mass", "rows"):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        lse = None
        if ctx.gt_source == "triton":
            from seer.kernels.flash_gt import flash_attn

            out = _output_buffer(query)
            _, lse = flash_attn(query, key, value, sm_scale=scaling, out=out.transpose(1, 2))
        else:
            out, _ = _dense(module, query, key, value, None, 0.0, scaling)
        if ctx.gt_target == "mass":
            return out, attention_mass(query, key, ctx.block_size, scale, lse=lse)
        from seer.sparsity.selectors import LayerInputs, sampled_rows_mass

        nb = -(-query.shape[2] // ctx.block_size)
        every_block = torch.ones(nb, nb, dtype=torch.bool, device=query.device).tril()
        x = LayerInputs(query, key, ctx.block_size, scale, module.layer_idx)
        return out, sampled_rows_mass(x, every_block.expand(*query.shape[:2], nb, nb), ctx.gt_rows)
    if ctx.gt_source == "triton":
        from seer.kernels import flash_attn_with_gt

        out = _output_buffer(query)
        _, _, gt = flash_attn_with_gt(query, key, value, block_size=ctx.block_size, sm_scale=scaling,
                                      mode=ctx.gt_mode, out=out.transpose(1, 2))
        return out, gt
    from seer.kernels.reference import block_gt

    out, _ = _dense(module, query, key, value, None, 0.0, scaling)
    return out, block_gt(query, key, ctx.block_size, sm_scale=scaling)


def _train_sparse(module, ctx: SeerContext, query, key, value, scaling, scale: float, documents):
    """The ``train_sparse`` mode of :func:`seer_attention` (see the module docstring); with ``documents``, each
    document's mask is made alone and all documents attend in one varlen call."""
    layer = module.layer_idx
    q_pre, k_pre = module.seer_stash.take()
    if layer not in ctx.train_masks:  # the layer's first pass this step (not a checkpointing recomputation)
        with torch.no_grad():
            if documents is None:
                mask, kept, total = _train_mask(module, ctx, query, key, value, q_pre, k_pre, scaling, scale)
            else:
                masks, kept, total = [], 0, 0
                for b, rows in _document_rows(documents):
                    doc_mask, doc_kept, doc_total = _train_mask(
                        module, ctx, *(x[:, :, rows][b:b + 1] for x in (query, key, value, q_pre, k_pre)), scaling,
                        scale)
                    masks.append(doc_mask)
                    kept, total = kept + doc_kept, total + doc_total
                mask = _packed_document_masks(masks, documents, query.shape[1], ctx.block_size, query.device)
            ctx.density[layer] = (kept, total)
        ctx.train_masks[layer] = mask
    mask = ctx.train_masks[layer]
    if documents is not None:
        out = _attend_documents(ctx, query, key, value, documents, mask, scaling)
    elif mask is None:
        return _dense(module, query, key, value, None, 0.0, scaling)
    else:
        if ctx.kernel == "triton":
            from seer.kernels import block_sparse_attn
        else:
            from seer.kernels.reference import block_sparse_attn
        out, _ = block_sparse_attn(query, key, value, mask, block_size=ctx.block_size, sm_scale=scaling)
        out = out.transpose(1, 2).contiguous()
    if torch.is_grad_enabled() and query.requires_grad and not out.requires_grad:
        raise RuntimeError("seer.kernels.block_sparse_attn gave no gradient (its Triton backward is not in this "
                           "build); fine-tune with the PyTorch reference instead (stage.kernel=reference)")
    return out, None


def _train_mask(module, ctx: SeerContext, query, key, value, q_pre, k_pre, scaling, scale: float):
    """A layer's first pass in ``train_sparse`` mode on one causal sequence per row (no grad): with a consumer, the
    gate's logits (with grad, from detached Q/K) and the dense ground truth go to it as a :class:`LayerRecord`; then
    the gate's mask (None for a dense budget or layer). Returns ``(mask, kept blocks, causal blocks)``."""
    layer = module.layer_idx
    nb = -(-query.shape[2] // ctx.block_size)
    total = query.shape[0] * query.shape[1] * nb * (nb + 1) // 2
    if ctx.consumer is not None:
        _, gt = _dense_with_gt(module, ctx, query, key, value, scaling)
        with torch.enable_grad():
            logits = module.seer_gate(q_pre.detach(), k_pre.detach())
        ctx.consumer(LayerRecord(layer, logits, gt, query.detach(), key.detach(), scale))
        scores = logits.detach()
    if ctx.sparsity.runs_dense(layer):
        return None, torch.tensor(total), total
    if ctx.consumer is None:
        scores = module.seer_gate(q_pre, k_pre)
    knob = None
    if ctx.sparsity.calibrated:  # calibrated on this layer's scores of this batch (no host sync)
        from seer.sparsity.calibration import fit_knob

        knob = fit_knob(scores, ctx.sparsity)
    mask = select_blocks(scores, ctx.sparsity, knob)
    return mask, mask.sum(), total


def _packed_document_masks(masks, documents, heads: int, block_size: int, device) -> torch.Tensor:
    """The documents' masks (``[1, H, nb_d, nb_d]``, None: all blocks) as one ``[S, H, nb, nb]`` bool tensor for
    :func:`seer.kernels.block_sparse_attn_varlen`, each in its top-left corner."""
    lengths = [end - start for row in documents for start, end in row]
    heads = next((m.shape[1] for m in masks if m is not None), heads)
    nb = -(-max(lengths) // block_size)
    packed = torch.zeros(len(lengths), heads, nb, nb, dtype=torch.bool, device=device)
    for d, (mask, length) in enumerate(zip(masks, lengths)):
        doc_nb = -(-length // block_size)
        packed[d, :, :doc_nb, :doc_nb] = True if mask is None else mask[0]
    return packed


def _attend_documents(ctx: SeerContext, query, key, value, documents, mask, scaling) -> torch.Tensor:
    """Attention ``[B, N, Hq, D]`` of every document of the batch through its blocks of the packed ``mask``, in one
    call of the varlen kernel (Triton, or the PyTorch reference), differentiable in Q, K and V."""
    if ctx.kernel == "triton":
        from seer.kernels import block_sparse_attn_varlen
    else:
        from seer.kernels.reference import block_sparse_attn_varlen
    b, hq, n, d = query.shape
    ends = [row * n + end for row, spans in enumerate(documents) for _, end in spans]
    cu_seqlens = torch.tensor([0, *ends], dtype=torch.int32, device=query.device)
    q, k, v = (x.transpose(1, 2).reshape(b * n, x.shape[1], d) for x in (query, key, value))
    out, _ = block_sparse_attn_varlen(q, k, v, cu_seqlens, mask, block_size=ctx.block_size, sm_scale=scaling,
                                      seqlens=[stop - start for start, stop in zip([0, *ends], ends)])
    return out.view(b, n, hq, d)


def seer_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
              mask_function=None, attention_mask: torch.Tensor | None = None, local_size: int | None = None,
              allow_is_causal_skip: bool = True, **kwargs):
    """The ``"seer"`` mask function: SDPA's, except that a plain causal prefill (no padding mask given, no cached
    keys, no sliding window) gets no mask, decided from shapes alone, and that the mask of a padded causal prefill
    carries ``seer_spans``, the ``(first, end)`` of each row's real tokens (:func:`padding_spans`), which the
    attention function gates sequence by sequence.

    SDPA's own decision looks at tensor values (is the padding mask all ones, do position ids restart, i.e. are
    several sequences packed in a row); under CUDA-graph capture or ``torch.compile`` it cannot, and builds a full
    mask, which would send every gated layer to the dense fallback. There seer assumes one sequence per row, as
    block-causal gating does anyway: packed rows are not supported in gated layers. A step after cached keys (decode)
    whose padding mask is not one run of real tokens per row (a right-padded prompt) is refused. The mask of a padded
    prompt into a preallocated cache (StaticCache: more keys than queries, none cached before them) is marked
    ``seer_static_prefill``, which sparse decode refuses."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask
    from transformers.utils.import_utils import is_tracing

    mask_function = mask_function or causal_mask_function
    causal = mask_function is causal_mask_function and local_size is None
    # shapes first: a StaticCache's q_offset can be a device tensor, read here only for a step of several tokens
    plain = q_length == kv_length and kv_offset == 0 and q_offset == 0
    static_prefill = attention_mask is not None and 1 < q_length < kv_length and not is_tracing() \
        and int(q_offset) == 0
    if plain and attention_mask is None and (causal and allow_is_causal_skip or is_tracing()):
        return None  # (a windowed layer then builds its window's mask itself: seer_attention)
    spans = padding_spans(attention_mask) if attention_mask is not None and attention_mask.dim() == 2 \
        and not is_tracing() else None
    if attention_mask is not None and not plain and spans is None and attention_mask.dim() == 2 \
            and not is_tracing():
        raise ValueError("a padded batch continued after its prompt (generate) needs left padding "
                         "(tokenizer.padding_side = 'left'): some row has padding between real tokens")
    mask = sdpa_mask(batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset,
                     mask_function=mask_function, attention_mask=attention_mask, local_size=local_size,
                     allow_is_causal_skip=allow_is_causal_skip, **kwargs)
    if mask is not None and causal and plain and spans is not None:
        mask.seer_spans = spans
    if mask is not None and static_prefill:
        mask.seer_static_prefill = True
    return mask


def document_spans(position_ids: torch.Tensor) -> tuple[tuple[tuple[int, int], ...], ...]:
    """``(start, end)`` of each document of each row of ``[B, N]`` position ids that restart at 0 at each document
    (``data.packing=documents`` batches): every row starts at 0 and every other position is 0 or one more than the
    last. Raises ValueError naming the first position that is neither."""
    pos = position_ids.long().cpu()
    before = torch.cat([torch.full((pos.shape[0], 1), -1), pos[:, :-1]], dim=1)
    bad = (pos != 0) & (pos != before + 1)
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"position_ids of packed documents must restart at 0 at each document and count up by one; "
                         f"row {row} has {int(pos[row, col])} at {col} after {int(before[row, col])}")
    spans = []
    for starts in (pos == 0):
        begins = starts.nonzero().flatten().tolist()
        spans.append(tuple(zip(begins, begins[1:] + [pos.shape[1]])))
    return tuple(spans)


def padding_spans(attention_mask: torch.Tensor) -> tuple[tuple[int, int], ...] | None:
    """``(first, end)`` of the real tokens of each row of a ``[B, N]`` padding mask (nonzero: a real token), or None
    when some row's real tokens are not one run (left padding, right padding and none are; holes are not)."""
    real = attention_mask.bool()
    count = real.sum(-1)
    first = real.int().argmax(-1)
    pos = torch.arange(real.shape[-1], device=real.device)
    run = (pos >= first[:, None]) & (pos < (first + count)[:, None])
    if not torch.equal(run, real):
        return None
    return tuple((int(f), int(f + c)) for f, c in zip(first.tolist(), count.tolist()))


def register_attention() -> None:
    """Registers ``"seer"`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(ATTN_IMPLEMENTATION, seer_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, seer_mask)
