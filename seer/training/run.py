"""One training job from a composed config: validate -> data -> model + gates -> Lightning fit -> summary."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from seer.config import RunConfig, validate

log = logging.getLogger(__name__)


def resolve_gt_source(requested: str, device: torch.device) -> str:
    """``auto`` -> the fused Triton kernel on CUDA, the PyTorch reference elsewhere."""
    if requested == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if requested == "triton" and device.type != "cuda":
        raise ValueError("stage.gt=triton needs a CUDA GPU; use stage.gt=reference (or auto) on CPU")
    return requested


def training_device(cfg: DictConfig) -> torch.device:
    accel = str(cfg.trainer.get("accelerator", "auto"))
    if accel in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if accel in ("gpu", "cuda"):
        raise ValueError(f"trainer.accelerator={accel} but no CUDA GPU is visible")
    return torch.device("cpu")


def _wandb_group(cfg: DictConfig) -> str | None:
    """All jobs of one multirun share a W&B group named after the sweep folder."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return None
    if hc.mode == RunMode.MULTIRUN:
        return "/".join(Path(hc.sweep.dir).parts[-2:])
    return None


def instantiate_data(node: DictConfig, tokenizer):
    """The data module of ``node``, given the tokenizer when its class takes one (text corpora do, random tokens
    do not)."""
    import inspect

    from hydra.utils import get_class, instantiate

    takes_tokenizer = "tokenizer" in inspect.signature(get_class(node._target_)).parameters
    return instantiate(node, **({"tokenizer": tokenizer} if takes_tokenizer else {}))


def build_distill(run: RunConfig, model, *, gt_source: str, device: torch.device, tokenizer, out_dir: Path,
                  model_name: str):
    """The distill stage's module: gates attached to ``model``, its base frozen."""
    from seer.model.attention import attach_gates, freeze_base_model
    from seer.training.distill import GateDistillation

    attach_gates(model, run.gate)
    freeze_base_model(model)
    return GateDistillation(model, run.stage, run.sparsity, gt_source, model_name=model_name)


def build_finetune(run: RunConfig, model, **kwargs):
    from seer.training.finetune import build_finetune

    return build_finetune(run, model, **kwargs)


# stage name -> builder of its LightningModule from the loaded base model
STAGE_MODULES = {"distill": build_distill, "finetune": build_finetune}


def _instantiate_group(group: DictConfig | None, **extra) -> list:
    from hydra.utils import instantiate

    return [instantiate(node, **extra) for node in (group or {}).values() if node is not None]


def run_training(cfg: DictConfig) -> dict:
    """Runs the training stage ``cfg`` names; returns the run summary (also written to ``summary.json``)."""
    from hydra.utils import instantiate
    import lightning as L

    from seer.model.loading import load_causal_lm, load_tokenizer, model_id
    from seer.training.callbacks import AtomicCheckpointIO, RunSummary
    from seer.training.loggers import finish_wandb

    run: RunConfig = validate(cfg)  # bad values fail here, before anything is loaded
    # the frozen base model is in eval mode on purpose; Lightning warns about it
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    device = training_device(cfg)
    gt_source = resolve_gt_source(run.stage.gt, device)
    out_dir = Path(cfg.paths.output_dir)
    log.info("output folder: %s; device: %s; ground truth: %s", out_dir, device, gt_source)
    print(f"[seer] ground truth source: {gt_source} (stage.gt={run.stage.gt}), device: {device}", flush=True)
    L.seed_everything(cfg.seed, workers=True)

    tokenizer = load_tokenizer(run.model)
    datamodule = instantiate_data(cfg.data, tokenizer)  # validates data arguments before the model loads

    model = load_causal_lm(run.model, device)
    module = STAGE_MODULES[run.stage.name](run, model, gt_source=gt_source, device=device, tokenizer=tokenizer,
                                           out_dir=out_dir, model_name=model_id(run.model))

    if cfg.get("logger") and cfg.logger.get("wandb") is not None and cfg.logger.wandb.get("group") is None:
        OmegaConf.update(cfg, "logger.wandb.group", _wandb_group(cfg), force_add=True)
    try:
        loggers = _instantiate_group(cfg.get("logger"))
        callbacks = _instantiate_group(cfg.get("callbacks"))
        summary = RunSummary(str(out_dir), str(out_dir / "gates"))
        trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=[*callbacks, summary],
                              plugins=[AtomicCheckpointIO()])
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        return summary.summary
    finally:
        finish_wandb()
