"""Resuming a run from a Lightning checkpoint (``ckpt_path=``), checked before anything is loaded.

Every checkpoint carries the run's flat config and W&B identity (``checkpoint["seer"]``, written by
:class:`seer.training.callbacks.RunRecord`). :func:`read_resume` opens the checkpoint before the model loads and
refuses a resumed run whose config differs in anything that shapes the gates or the order of the data
(:data:`FIXED_ON_RESUME`), naming each key; everything else (``trainer.max_steps``, validation cadence, logging,
sparsity used for the metrics) may change. :func:`continues_wandb_run` lets only the first run resumed from a
checkpoint continue its W&B run: a second one would log the same steps again into the same history.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seer.checks import ConfigError

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "seer"
# keys (or key prefixes, ending in ".") a resumed run must share with its checkpoint ...
FIXED_ON_RESUME = ("model.", "gate.", "stage.", "data.", "seed", "trainer.accumulate_grad_batches",
                   "trainer.precision", "trainer.gradient_clip_val", "trainer.gradient_clip_algorithm")
# ... except these, which change neither the gates nor the data order
FREE_ON_RESUME = ("stage.image_every_n_steps", "stage.image_layers", "data.num_workers", "data.cache_dir")


def _fixed(key: str) -> bool:
    if key in FREE_ON_RESUME:
        return False
    return any(key.startswith(p) if p.endswith(".") else key == p for p in FIXED_ON_RESUME)


@dataclass
class ResumeInfo:
    """What a checkpoint says about the run it came from."""

    path: Path
    global_step: int
    run_id: str | None = None
    run_name: str | None = None
    config: dict[str, Any] = field(default_factory=dict)


def read_resume(ckpt_path: str, config: dict[str, Any]) -> ResumeInfo:
    """Opens ``ckpt_path`` (memory-mapped: nothing large is read) and checks ``config`` (flat, as
    :func:`seer.tracking.flat_config` gives it) against the config stored in it; a :class:`ConfigError`
    names a missing or unreadable file and every key that may not change."""
    import torch

    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path={ckpt_path!r}: no such file (give the path of a .ckpt file, e.g. "
                          f"outputs/<task>/<run>/checkpoints/last.ckpt)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        step = int(checkpoint["global_step"])
    except Exception as exc:
        raise ConfigError(f"ckpt_path={ckpt_path!r}: not a readable Lightning checkpoint "
                          f"({type(exc).__name__}: {exc})") from exc
    stored = checkpoint.get(CHECKPOINT_KEY)
    if stored is None:
        log.warning("%s was written before checkpoints stored their config: the resumed run's config is not "
                    "checked against it", path)
        return ResumeInfo(path, step)
    before = stored.get("config", {})
    changed = [k for k in sorted(set(before) | set(config)) if _fixed(k) and before.get(k) != config.get(k)]
    if changed:
        details = "; ".join(f"{k}={before.get(k)!r} in the checkpoint, {config.get(k)!r} now" for k in changed)
        raise ConfigError(f"ckpt_path={ckpt_path!r}: a resumed run keeps everything that shapes the gates or the "
                          f"data order, but {details}. Drop those overrides, or start a new run.")
    return ResumeInfo(path, step, stored.get("run_id"), stored.get("run_name"), before)


def continues_wandb_run(info: ResumeInfo) -> bool:
    """Whether a run resumed from ``info`` may continue the checkpoint's W&B run: only the first run resumed from
    that checkpoint does, which it records by creating a marker file beside it (the checkpoint itself is never
    changed); later ones start W&B runs of their own. A folder that cannot take the marker continues the run."""
    if info.run_id is None:
        return False
    target = info.path.resolve()
    marker = target.parent / f".{target.name}.wandb-{info.run_id}.continued"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    except FileExistsError:
        log.warning("%s was resumed before and that run continued W&B run %s: this one starts a W&B run of its own",
                    info.path, info.run_id)
        return False
    except OSError:
        return True
    return True
