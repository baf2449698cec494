"""Training-stage schemas (Hydra group ``stage``; see :mod:`seer.config`), one per stage, chosen by ``name``.

``distill`` (:class:`DistillConfig`): post-training gate distillation against the frozen model's own block
attention map. A stage's options share :class:`StageConfig`'s optimiser and image fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from seer.config import ConfigError, build, fail, is_int

GT_SOURCES = ("auto", "reference", "triton")
GT_MODES = ("auto", "fast", "lowmem")
LOSSES = ("kl", "mse")
TARGETS = ("maxpool", "mass")


@dataclass
class StageConfig:
    """What every training stage has: AdamW on the trained parameters with linear warmup then cosine decay to
    ``min_lr_ratio * lr``, and gate-versus-ground-truth images every ``image_every_n_steps`` (0: none)."""

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
class DistillConfig(StageConfig):
    """Post-training gate distillation: ``loss_scale`` x the sum over layers of ``loss`` (``kl``: KL(GT ||
    softmax(gate)), the release; ``mse``: paper v1) between gate logits and the row-normalised block ground truth.

    ``target``: what the gate learns: ``maxpool`` (the paper's ground truth, the largest attention probability in
    each block) or ``mass`` (the share of each query-block row's attention in each block, the mean over its rows:
    what recall, threshold and top-p budgets reason about). ``skip_first_rows``: share of query-block rows left out of
    the loss (the release drops 0.25). ``gt``: where the
    ground truth comes from: ``triton`` (fused FlashAttention kernel that emits the block map), ``reference``
    (chunked PyTorch) or ``auto`` (triton on CUDA). ``gt_mode``: the Triton kernel's memory mode, ``fast`` (a
    scratch of per-row tile maxima), ``lowmem`` (a second pass once the log-sum-exp is known) or ``auto`` (from
    free GPU memory).
    """

    name: str = "distill"
    target: str = "maxpool"
    loss: str = "kl"
    loss_scale: float = 10.0
    row_normalize: bool = True
    skip_first_rows: float = 0.0
    gt: str = "auto"
    gt_mode: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target not in TARGETS:
            fail("stage", "target", self.target, f"choose from {TARGETS}")
        if self.loss not in LOSSES:
            fail("stage", "loss", self.loss, f"choose from {LOSSES}")
        if self.gt not in GT_SOURCES:
            fail("stage", "gt", self.gt, f"choose from {GT_SOURCES}")
        if self.gt_mode not in GT_MODES:
            fail("stage", "gt_mode", self.gt_mode, f"choose from {GT_MODES}")
        if not self.loss_scale > 0:
            fail("stage", "loss_scale", self.loss_scale, "must be > 0")
        if not 0 <= self.skip_first_rows < 1:
            fail("stage", "skip_first_rows", self.skip_first_rows, "is a fraction of query-block rows; use [0, 1)")


STAGES: dict[str, type[StageConfig]] = {"distill": DistillConfig}


def stage_config(values: Mapping[str, Any] | StageConfig | None) -> StageConfig:
    """The schema of the stage that ``values["name"]`` names (default ``distill``), built from ``values``."""
    if isinstance(values, StageConfig):
        return values
    values = dict(values or {})
    name = values.get("name", "distill")
    if name not in STAGES:
        raise ConfigError(f"stage.name={name!r}: choose from {sorted(STAGES)}")
    return build(STAGES[name], "stage", values)
