"""What every training stage's LightningModule shares (:class:`Stage`): AdamW over its parameter groups with linear
warmup and cosine decay, sharding when the strategy asks for it, and checkpoints that keep the trained parameters
and the loss history only. A stage's schema names its module (``StageConfig.module``), which builds itself from the
run's config and the loaded base model (:meth:`Stage.from_run`)."""

from __future__ import annotations

import abc
from pathlib import Path

import lightning as L
import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from seer.config import RunConfig
from seer.model.gate_io import gate_state_dict, save_gates
from seer.sparsity import SparsityConfig
from seer.training.config import StageConfig
from seer.training.parallel import configure_sharding


class Stage(L.LightningModule, abc.ABC):
    """A training stage of ``model`` (a Hugging Face causal LM, or a peft model around one) with the ``stage``
    schema; ``sparsity`` is the budget it trains or measures with, ``gt_source`` where the ground truth comes from
    (``triton`` or ``reference``)."""

    def __init__(self, model: torch.nn.Module, stage: StageConfig, sparsity: SparsityConfig, gt_source: str,
                 model_name: str = "unknown"):
        super().__init__()
        self.model = model
        self.stage, self.sparsity, self.gt_source, self.model_name = stage, sparsity, gt_source, model_name
        self.strict_loading = False  # checkpoints hold the trained parameters only
        self.loss_history: list[float] = []  # the loss of each training step

    @classmethod
    @abc.abstractmethod
    def from_run(cls, run: RunConfig, model: torch.nn.Module, *, gt_source: str, device: torch.device, tokenizer,
                 out_dir: Path, model_name: str) -> Stage:
        """The stage's module for the loaded base ``model`` of ``run`` (gates attached, what trains marked)."""

    @abc.abstractmethod
    def param_groups(self) -> list[dict]:
        """AdamW's parameter groups (each may set its own ``lr``; the others train at ``stage.lr``)."""

    def configure_optimizers(self):
        groups = [g for g in self.param_groups() if g["params"]]
        if not groups:
            raise RuntimeError(f"the {self.stage.name} stage has no parameters to train")
        opt = torch.optim.AdamW(groups, lr=self.stage.lr, betas=self.stage.betas, weight_decay=self.stage.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = get_cosine_with_min_lr_schedule_with_warmup(opt, min(self.stage.warmup_steps, total), total,
                                                            min_lr_rate=self.stage.min_lr_ratio)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def gate_state(self) -> dict[str, torch.Tensor]:
        """The trained gates' weights for their files (a collective under FSDP: every process calls it)."""
        return gate_state_dict(self.model)

    def save_gate_files(self, folder: str, state: dict[str, torch.Tensor], extra: dict) -> None:
        """Writes the gates' files (``state`` from :meth:`gate_state`) into ``folder``, with ``extra`` metadata."""
        save_gates(folder, self.model, self.model_name, extra=extra, state=state)

    def configure_model(self) -> None:
        """Shards the model when the strategy asks for it (``trainer=fsdp``, :mod:`seer.training.parallel`)."""
        configure_sharding(self)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Lightning checkpoints keep the trained parameters only (the rest reloads from the model's source)."""
        trained = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}
        checkpoint["seer_loss_history"] = list(self.loss_history)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.loss_history = list(checkpoint.get("seer_loss_history", []))
