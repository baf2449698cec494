"""Experiment logging on W&B (offline unless an API key is set; ``WANDB_MODE`` wins), imported lazily.

:func:`start_wandb_run` starts, or resumes by id, one W&B run with a flat config (``sparsity.method``,
``gate.k_pool``, ...), a short name, a group and tags: what the training and evaluation entry points both use, so
their runs can be filtered, grouped and compared on the same keys. :func:`wandb_logger` wraps it for Lightning;
:func:`flat_config` turns a composed config into those flat keys; :func:`run_name` makes the short unique name.
"""

from __future__ import annotations

import os
import re
import secrets
import string
from collections.abc import Iterable, Mapping
from typing import Any

TAG_CHARS = 64  # W&B refuses longer tags
NAME_CHARS = 64
_ID_ALPHABET = string.ascii_lowercase + string.digits
SKIPPED_GROUPS = ("hydra", "callbacks", "logger")  # how a run is logged, not what it is


def wandb_mode(mode: str | None = None) -> str:
    """``WANDB_MODE`` if set, else ``mode``, else online when ``WANDB_API_KEY`` is set and offline otherwise."""
    return os.environ.get("WANDB_MODE") or mode or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


def new_run_id() -> str:
    """A fresh W&B-style run id: 8 lowercase letters and digits."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))


def flat_config(cfg: Any) -> dict[str, Any]:
    """The resolved config as ``{"group.key": value}`` (lists kept whole), without the ``hydra``, ``callbacks`` and
    ``logger`` nodes."""
    from omegaconf import DictConfig, OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping) and node:
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            out[prefix] = node

    walk("", {k: v for k, v in plain.items() if k not in SKIPPED_GROUPS})
    return out


def _short(text: str) -> str:
    """``text`` with characters W&B names and folder names dislike replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_.=+,:@-]", "_", text)


def run_name(task: str, swept: Mapping[str, Any], run_id: str) -> str:
    """``task-key=value-...-id``: the swept values (the last part of each key) between the task and the run id,
    cut to fit 64 characters (the id always stays, so names are unique)."""
    values = "-".join(f"{key.rsplit('.', 1)[-1]}={_short(str(value))}" for key, value in swept.items())
    head = f"{task}-{values}" if values else task
    return f"{head[:NAME_CHARS - len(run_id) - 1]}-{run_id}"


def override_tags(overrides: Iterable[str]) -> list[str]:
    """The command-line overrides as W&B tags (each cut to the 64 characters W&B accepts)."""
    return [o[:TAG_CHARS] for o in overrides]


def start_wandb_run(*, project: str, save_dir: str, name: str, config: Mapping[str, Any] | None = None,
                    group: str | None = None, tags: Iterable[str] = (), run_id: str | None = None,
                    job_type: str | None = None, mode: str | None = None, flush_interval_s: float = 5.0):
    """Starts a W&B run (resumes it when ``run_id`` names an existing one) whose files go under
    ``save_dir/wandb``. History reaches the run's file every ``flush_interval_s`` seconds, so a killed process keeps
    what it logged until then."""
    import wandb

    os.makedirs(save_dir, exist_ok=True)
    settings = wandb.Settings(x_transaction_log_flush_interval=flush_interval_s)
    return wandb.init(project=project, dir=save_dir, name=name, config=dict(config or {}), group=group,
                      tags=list(tags), id=run_id or new_run_id(), resume="allow", job_type=job_type,
                      mode=wandb_mode(mode), settings=settings)


def wandb_logger(*, project: str, save_dir: str, name: str, run_config: Mapping[str, Any] | None = None,
                 group: str | None = None, tags: Iterable[str] = (), run_id: str | None = None,
                 mode: str | None = None, flush_interval_s: float = 5.0, job_type: str = "train"):
    """Lightning's WandbLogger on a run from :func:`start_wandb_run` (``run_config``: its config), with
    ``trainer/global_step`` as every metric's x-axis. Only global rank 0 starts a run (one W&B run per job, not per
    process); other ranks get a logger whose experiment is Lightning's no-op."""
    from lightning.pytorch.loggers import WandbLogger
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank != 0:
        return WandbLogger(project=project, save_dir=save_dir, name=name, id=run_id)
    run = start_wandb_run(project=project, save_dir=save_dir, name=name, config=run_config, group=group, tags=tags,
                          run_id=run_id, job_type=job_type, mode=mode, flush_interval_s=flush_interval_s)
    run.define_metric("trainer/global_step")
    run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
    return WandbLogger(experiment=run, project=project, save_dir=save_dir, name=name, id=run.id)


def finish_wandb(exit_code: int = 0) -> None:
    """Closes the current W&B run, if any, as succeeded (0) or failed (any other code)."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=exit_code)
