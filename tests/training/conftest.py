"""Tiny training runs for the training tests: a random two-layer Llama on random tokens, a few steps."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model=tiny_llama", "data=random_tokens", "gate.block_size=16", "gate.hidden_size=16", "debug=fast",
        "data.seq_len=64", "data.train_sequences=4"]


def train(out_dir: Path, *overrides: str) -> dict:
    """``run_training`` of the tiny config with ``overrides``, writing into ``out_dir``; returns the summary."""
    from seer.config import compose
    from seer.training.run import run_training

    return run_training(compose([*TINY, f"paths.output_dir={out_dir}", *overrides]))


def cli_env(tmp_path: Path) -> dict:
    """Environment of a ``python -m seer.train`` subprocess: this checkout first, W&B offline and quiet, caches under
    ``tmp_path``."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # keeps the caller's path
    return {**os.environ, "PYTHONPATH": path, "WANDB_MODE": "offline", "WANDB_SILENT": "true",
            "WANDB_DATA_DIR": str(tmp_path / "wandb-data"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
            "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "SEER_CACHE_DIR": str(tmp_path / "cache")}


def seer_train(*args: str) -> list[str]:
    return [sys.executable, "-m", "seer.train", *args]


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline, with its staging and cache folders under ``tmp_path``."""
    for key, value in cli_env(tmp_path).items():
        if key.startswith("WANDB_"):
            monkeypatch.setenv(key, value)
