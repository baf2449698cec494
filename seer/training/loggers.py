"""Experiment loggers: W&B (offline unless an API key is set; ``WANDB_MODE`` wins), imported lazily."""

from __future__ import annotations

import os


def wandb_mode(mode: str | None = None) -> str:
    """``WANDB_MODE`` if set, else ``mode``, else online when ``WANDB_API_KEY`` is set and offline otherwise."""
    return os.environ.get("WANDB_MODE") or mode or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


def wandb_logger(project: str, save_dir: str, name: str | None = None, group: str | None = None,
                 mode: str | None = None, tags: list[str] | None = None, **kwargs):
    """Lightning's WandbLogger with seer's defaults; the run's files go under ``save_dir/wandb``."""
    from lightning.pytorch.loggers import WandbLogger

    os.makedirs(save_dir, exist_ok=True)
    return WandbLogger(project=project, save_dir=save_dir, name=name, group=group, mode=wandb_mode(mode),
                       tags=list(tags or []), **kwargs)


def finish_wandb() -> None:
    """Closes the current W&B run, if any (between the jobs of a multirun, and after a crash)."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()
