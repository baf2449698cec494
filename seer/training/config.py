"""Training-stage schemas (Hydra group ``stage``; see :mod:`seer.config`), one per stage, chosen by ``name``.

``distill`` (:class:`DistillConfig`): post-training gate distillation against the frozen model's own block
attention map. ``finetune`` (:class:`FinetuneConfig`): long-context fine-tuning of the model through the gates'
block-sparse attention, with the gates' distillation loss beside the language-model loss. A stage's options share
:class:`StageConfig`'s optimiser and image fields; both stages share :class:`GateTargetConfig`'s gate loss and
ground-truth fields. What a stage needs of the other groups is checked by :mod:`seer.preflight`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from seer.backends import BACKENDS
from seer.checks import ConfigError, build, fail, is_int, is_number
from seer.gates.config import GateConfig
from seer.gates.decode_config import DecodeGateConfig
from seer.sparsity.decode import DecodeSparsityConfig

GT_MODES = ("auto", "fast", "lowmem")
LOSSES = ("kl", "mse", "logmse")
TARGETS = ("maxpool", "mass", "rows")


@dataclass
class StageConfig:
    """What every training stage has: AdamW on the trained parameters with linear warmup then cosine decay to
    ``min_lr_ratio * lr``, and gate-versus-ground-truth images every ``image_every_n_steps`` (0: none). ``module``:
    the stage's LightningModule (a :class:`seer.training.stage.Stage`), by import path, as a ``_target_``."""

    module: ClassVar[str]
    uses_prefill_budget: ClassVar[bool] = True  # the ``sparsity`` group applies (calibrated at the end of fit)
    keeps_documents_apart: ClassVar[bool] = False  # trains on ``data.packing=documents`` rows (attention per document)
    name: str = "distill"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 5
    min_lr_ratio: float = 0.0
    image_every_n_steps: int = 10
    image_layers: list[int] = field(default_factory=lambda: [0, -1])

    def __post_init__(self) -> None:
        if self.name not in STAGES:
            fail("stage", "name", self.name, f"choose from {sorted(STAGES)}")
        if not self.lr > 0:
            fail("stage", "lr", self.lr, "must be > 0")
        if self.weight_decay < 0:
            fail("stage", "weight_decay", self.weight_decay, "must be >= 0")
        if not is_int(self.warmup_steps) or self.warmup_steps < 0:
            fail("stage", "warmup_steps", self.warmup_steps, "must be an integer >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            fail("stage", "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            fail("stage", "betas", self.betas, "must be two numbers in [0, 1)")
        if not is_int(self.image_every_n_steps) or self.image_every_n_steps < 0:
            fail("stage", "image_every_n_steps", self.image_every_n_steps, "must be an integer >= 0 (0: no images)")


@dataclass
class GateTargetConfig(StageConfig):
    """The gates' distillation loss: ``loss`` (``kl``: KL(GT || softmax(gate)), the release; ``mse``: paper v1;
    ``logmse``: squared log errors weighted by the square root of the mass, :func:`seer.training.losses.gate_loss`)
    between gate logits and the row-normalised block ground truth.

    ``target``: what the gate learns: ``maxpool`` (the paper's ground truth, the largest attention probability in
    each block), ``mass`` (the share of each query-block row's attention in each block, the mean over its rows:
    what recall, threshold and top-p budgets reason about) or ``rows`` (the same share averaged over ``target_rows``
    query rows of each block spread evenly from its first row to its last, every causal block scored: the rows
    ``gate.rerank_rows`` reads, :func:`seer.kernels.reference.sampled_rows_mass`). ``skip_first_rows``: share of
    query-block rows left out of the loss (the release drops 0.25). ``gt``: where the
    ground truth comes from: ``triton`` (fused FlashAttention kernel that emits the block map), ``reference``
    (chunked PyTorch) or ``auto`` (triton on CUDA). ``gt_mode``: the Triton kernel's memory mode, ``fast`` (a
    scratch of per-row tile maxima), ``lowmem`` (a second pass once the log-sum-exp is known) or ``auto`` (from
    free GPU memory).

    Both stages take ``data.packing=documents`` rows: each document of a row is attended, gated and given its
    ground truth alone (blocks from its first token), and its gate loss counts with the weight of its query-block
    rows.
    """

    keeps_documents_apart: ClassVar[bool] = True
    target: str = "maxpool"
    target_rows: int = 16
    loss: str = "kl"
    row_normalize: bool = True
    skip_first_rows: float = 0.0
    gt: str = "auto"
    gt_mode: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target not in TARGETS:
            fail("stage", "target", self.target, f"choose from {TARGETS}")
        if isinstance(self.target_rows, bool) or not isinstance(self.target_rows, int) or self.target_rows < 1:
            fail("stage", "target_rows", self.target_rows, "must be an integer >= 1 (query rows per block; "
                 "more than the block size counts every row)")
        if self.loss not in LOSSES:
            fail("stage", "loss", self.loss, f"choose from {LOSSES}")
        if self.gt not in BACKENDS:
            fail("stage", "gt", self.gt, f"choose from {BACKENDS}")
        if self.gt_mode not in GT_MODES:
            fail("stage", "gt_mode", self.gt_mode, f"choose from {GT_MODES}")
        if not 0 <= self.skip_first_rows < 1:
            fail("stage", "skip_first_rows", self.skip_first_rows, "is a fraction of query-block rows; use [0, 1)")


@dataclass
class DistillConfig(GateTargetConfig):
    """Post-training gate distillation of a frozen model: ``loss_scale`` x the sum over layers of the gate loss.

    ``loss_through_blend``: the loss (and the selection metrics) take the gate's scores blended as inference uses
    them, ``(1 - gate.blend_weight) softmax(gate) + gate.blend_weight * estimate`` with the ``gate.blend`` estimate
    from the layer's Q/K (no grad), so the gate learns what the estimate misses; needs a ``gate.blend``."""

    module: ClassVar[str] = "seer.training.distill.GateDistillation"
    name: str = "distill"
    loss_scale: float = 10.0
    loss_through_blend: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.loss_scale > 0:
            fail("stage", "loss_scale", self.loss_scale, "must be > 0")
        if not isinstance(self.loss_through_blend, bool):
            fail("stage", "loss_through_blend", self.loss_through_blend, "must be true or false")

    def check_gate(self, gate: GateConfig) -> None:
        """Refuses ``loss_through_blend`` for gates used without a blend. A rerank (``gate.rerank_rows``) is no
        obstacle: it passes no gradient, so the loss takes the blend without it (the rerank is an inference step)."""
        if self.loss_through_blend and gate.blend is None:
            fail("stage", "loss_through_blend", True, "trains through the gates' blend, but gate.blend=null; "
                 "choose a gate.blend (e.g. vertical_slash) or stage.loss_through_blend=false")


@dataclass
class FinetuneConfig(GateTargetConfig):
    """Long-context fine-tuning through the gates' block-sparse attention (SeerAttention paper v1: YaRN 8k -> 32k,
    400 steps at lr 1e-5, gate loss weight 10, about 90% sparsity): loss = the language-model loss of the model
    attending only to the blocks its gates select (the ``sparsity`` group's budget) + ``gate_loss_weight`` x the
    sum over layers of the gate loss against the dense ground truth (gates fed detached Q/K).

    ``trainable``: glob patterns (``fnmatch``) of the base model's parameter names that train (default all);
    the gates always train when ``gate_loss_weight > 0``. ``lora_rank`` > 0 adds LoRA adapters (``peft``,
    ``pip install 'seer[finetune]'``) of that rank and ``lora_alpha`` to the ``lora_modules`` (module names),
    merged into the weights when the model is saved; ``trainable`` then names base parameters trained in full
    besides them (``conf/stage/finetune_lora.yaml``: none). Base weights train at ``lr``, the gates at ``gate_lr``.
    ``float32_master_weights``: a half-precision model's trained parameters become float32 (AdamW updates of
    ``lr`` 1e-5 survive; 16 bytes a parameter with the optimiser state); false trains them in the model's dtype
    (8 bytes a parameter: what fits the whole 8B model on one GPU, ``experiment=finetune_8b_memory``).

    ``gate_loss_weight`` 0 trains without the gate loss (a dense fine-tune with ``sparsity=dense``, or sparse with
    gates from ``init_gates`` kept fixed). ``gt_every_n_steps``: the ground truth (one extra dense attention
    forward per layer) and the gate loss are computed every n-th step only. ``init_gates``: a gate checkpoint to
    start from (e.g. a distill run's ``gates`` folder, made before the context was extended: the block RoPE
    follows the model it is attached to); None: fresh gates. ``dense_warmup_steps``: the first steps attend
    densely (density 1.0), the gate loss running, before the sparse budget applies. ``kernel``: the sparse
    attention's implementation, ``triton`` (forward and backward kernels), ``reference`` (PyTorch autograd,
    memory quadratic in the length) or ``auto`` (triton on CUDA). ``gradient_checkpointing``: recompute each
    decoder layer in the backward (transformers' ``gradient_checkpointing_enable``). ``loss_chunk_tokens``: the
    language-model head and cross-entropy run over this many positions at a time, recomputed in the backward, so
    no ``[tokens, vocab]`` float32 logits exist whole. This stage draws no gate images.
    """

    module: ClassVar[str] = "seer.training.finetune.Finetune"
    name: str = "finetune"
    lr: float = 1e-5
    gate_lr: float = 1e-3
    gate_loss_weight: float = 10.0
    gt_every_n_steps: int = 1
    trainable: list[str] = field(default_factory=lambda: ["*"])
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    init_gates: Optional[str] = None
    dense_warmup_steps: int = 0
    kernel: str = "auto"
    gradient_checkpointing: bool = False
    loss_chunk_tokens: int = 4096
    float32_master_weights: bool = True
    image_every_n_steps: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not is_number(self.gate_lr) or not self.gate_lr > 0:
            fail("stage", "gate_lr", self.gate_lr, "must be > 0")
        if not is_number(self.gate_loss_weight) or self.gate_loss_weight < 0:
            fail("stage", "gate_loss_weight", self.gate_loss_weight, "must be >= 0 (0: no gate loss)")
        for key in ("gt_every_n_steps", "loss_chunk_tokens"):
            if not is_int(getattr(self, key)) or getattr(self, key) < 1:
                fail("stage", key, getattr(self, key), "must be an integer >= 1")
        for key in ("lora_rank", "dense_warmup_steps"):
            if not is_int(getattr(self, key)) or getattr(self, key) < 0:
                fail("stage", key, getattr(self, key), "must be an integer >= 0")
        self.trainable, self.lora_modules = list(self.trainable), list(self.lora_modules)
        if self.lora_rank and "*" in self.trainable:
            fail("stage", "trainable", self.trainable, "with LoRA (lora_rank > 0) list only the base parameters to "
                 "train in full besides the adapters (e.g. [] or ['*norm*'])")
        if self.lora_rank and not self.lora_modules:
            fail("stage", "lora_modules", self.lora_modules, "LoRA needs at least one module name (e.g. q_proj)")
        if not self.lora_alpha > 0:
            fail("stage", "lora_alpha", self.lora_alpha, "must be > 0")
        if self.kernel not in BACKENDS:
            fail("stage", "kernel", self.kernel, f"choose from {BACKENDS}")
        if self.image_every_n_steps:
            fail("stage", "image_every_n_steps", self.image_every_n_steps, "the finetune stage draws no images; use 0")


@dataclass
class DistillDecodeConfig(StageConfig):
    """Decode-gate distillation (SeerAttention-R) of a frozen model on teacher-forced text rows: ``loss_scale`` x
    the sum over layers of the mean over tokens and KV heads of KL(GT || softmax(decode gate)) over the blocks
    not after each token's own. ``decode_gate``: the gates' architecture. ``skip_first_tokens``: share of each row's
    first tokens left out of the loss. ``decode_sparsity``: the decode budget ``val/recall`` is measured at (a
    calibrated threshold is fitted on the batch itself). ``gt``: the ground truth from the FlashAttention kernel's
    log-sum-exp and one Triton pass (``triton``), the PyTorch reference chunked over query rows (``reference``) or
    ``auto`` (triton on CUDA). The ``sparsity`` group does not apply; no images."""

    module: ClassVar[str] = "seer.training.distill_decode.DecodeGateDistillation"
    uses_prefill_budget: ClassVar[bool] = False
    name: str = "distill_decode"
    decode_gate: DecodeGateConfig = field(default_factory=DecodeGateConfig)
    decode_sparsity: DecodeSparsityConfig = field(default_factory=DecodeSparsityConfig)
    loss_scale: float = 10.0
    skip_first_tokens: float = 0.0
    gt: str = "auto"
    image_every_n_steps: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.decode_gate = build(DecodeGateConfig, "stage.decode_gate", self.decode_gate)
        self.decode_sparsity = build(DecodeSparsityConfig, "stage.decode_sparsity", self.decode_sparsity)
        self.decode_sparsity.check_block_size(self.decode_gate.block_size)
        if self.decode_sparsity.estimate is not None:  # val/recall and the calibration score the gate alone
            fail("stage", "decode_sparsity.estimate", self.decode_sparsity.estimate,
                 "is mixed in at inference only (seer.load's decode_sparsity); distillation measures the gate alone "
                 "(use null)")
        if self.decode_sparsity.prompt_blocks:  # pins come from a prefill's last queries: none in teacher forcing
            fail("stage", "decode_sparsity.prompt_blocks", self.decode_sparsity.prompt_blocks,
                 "pins prompt blocks at inference only (seer.load's decode_sparsity); distillation measures the gate "
                 "alone (use 0)")
        if not is_number(self.loss_scale) or not self.loss_scale > 0:
            fail("stage", "loss_scale", self.loss_scale, "must be > 0")
        if not is_number(self.skip_first_tokens) or not 0 <= self.skip_first_tokens < 1:
            fail("stage", "skip_first_tokens", self.skip_first_tokens, "is a fraction of a row's tokens; use [0, 1)")
        if self.gt not in BACKENDS:
            fail("stage", "gt", self.gt, f"choose from {BACKENDS}")
        if self.image_every_n_steps:
            fail("stage", "image_every_n_steps", self.image_every_n_steps, "distill_decode draws no images; use 0")


# the one registry of stages: name -> schema (which names the stage's module)
STAGES: dict[str, type[StageConfig]] = {"distill": DistillConfig, "finetune": FinetuneConfig,
                                        "distill_decode": DistillDecodeConfig}


def stage_config(values: Mapping[str, Any] | StageConfig | None) -> StageConfig:
    """The schema of the stage that ``values["name"]`` names (default ``distill``), built from ``values``."""
    if isinstance(values, StageConfig):
        return values
    values = dict(values or {})
    name = values.get("name", "distill")
    if name not in STAGES:
        raise ConfigError(f"stage.name={name!r}: choose from {sorted(STAGES)}")
    return build(STAGES[name], "stage", values)
