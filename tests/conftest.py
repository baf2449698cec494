"""Shared test setup: the Triton interpreter on machines without a CUDA GPU, and the `gpu` marker."""

import importlib
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():  # must happen before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def experiment(monkeypatch):
    """Imports a script of ``experiments/`` by module name, as when it runs as a file (its sibling scripts
    importable): ``experiment("quality_qwen")``."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "experiments"))
    return importlib.import_module
