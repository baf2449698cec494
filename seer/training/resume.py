"""Resuming a run from a Lightning checkpoint (``ckpt_path=``), checked before anything is loaded.

Every checkpoint carries the run's flat config and W&B identity (``checkpoint["seer"]``, written by
:class:`seer.training.callbacks.RunRecord`). :func:`read_resume` opens the checkpoint before the model loads and
refuses a resumed run whose config differs in anything that shapes the gates or the order of the data
(:data:`FIXED_ON_RESUME`), naming each key; everything else (``trainer.max_steps``, validation cadence, logging,
sparsity used for the metrics) may change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seer.config import ConfigError

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
