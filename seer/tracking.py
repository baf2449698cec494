"""What every entry point (``seer.train``, ``seer.eval``, the sweep report) knows about the run it is in: the
running Hydra job (options chosen, swept values) and the W&B run (offline unless an API key is set; ``WANDB_MODE``
wins), imported lazily.

:func:`run_identity` names a job (W&B id, short name with the swept values, the sweep's group, overrides as tags,
the flat config); :func:`start_wandb_run` starts, or resumes by id, one W&B run with it, so runs of every entry point
can be filtered, grouped and compared on the same keys. :func:`wandb_logger` wraps it for Lightning;
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


def hydra_runtime():
    """The running job's Hydra config, or None outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def chosen_options() -> dict[str, str]:
    """``{group: option}`` of the running Hydra job (``{"model": "smollm2", ...}``); empty outside Hydra."""
    hc = hydra_runtime()
    return {} if hc is None else {k: v for k, v in hc.runtime.choices.items()
                                  if v is not None and not k.startswith("hydra")}


def swept_values(hydra_cfg) -> dict[str, Any]:
    """``{key: this job's value}`` for each key the current sweep varies (its sweep overrides, read from the sweep's
    ``multirun.yaml``, and ``hydra.sweeper.params``); empty outside a sweep."""
    from pathlib import Path

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    if hydra_cfg.mode != RunMode.MULTIRUN:
        return {}
    keys = list((hydra_cfg.sweeper.get("params") or {}).keys())
    master = Path(hydra_cfg.sweep.dir) / "multirun.yaml"
    if master.is_file():
        args = list(OmegaConf.load(master).hydra.overrides.task)
        keys += [o.get_key_element() for o in OverridesParser.create().parse_overrides(args) if o.is_sweep_override()]
    mine = {o.get_key_element(): o.value() for o in OverridesParser.create().parse_overrides(
        list(hydra_cfg.overrides.task))}
    return {key.lstrip("+~"): mine.get(key.lstrip("+~"), mine.get(key)) for key in dict.fromkeys(keys)}


def run_identity(task: str, config: Mapping[str, Any], run_id: str | None = None,
                 name: str | None = None) -> dict[str, Any]:
    """The W&B identity of this job: ``run_id`` and ``name`` (a resumed run keeps its checkpoint's; new ones
    otherwise), the sweep's group (named after the sweep folder), the overrides as tags, and ``config`` with the
    options chosen, the overrides and the id."""
    from pathlib import Path

    hc = hydra_runtime()
    overrides = list(hc.overrides.task) if hc is not None else []
    swept = swept_values(hc) if hc is not None else {}
    run_id = run_id or new_run_id()
    name = name or run_name(task, swept, run_id)
    group = "/".join(Path(hc.sweep.dir).parts[-2:]) if swept else None
    full = {**config, **{f"choices.{k}": v for k, v in chosen_options().items()}, "run.overrides": overrides,
            "run.id": run_id}
    return {"run_id": run_id, "name": name, "group": group, "tags": override_tags(overrides), "config": full}


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
    # quiet: no history and summary dump at the end, which would push the run's own summary off the screen
    settings = wandb.Settings(x_transaction_log_flush_interval=flush_interval_s, quiet=True)
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
