"""Running an ``experiments/`` script as a user would, for the tests of the benchmarks on a machine without a GPU."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_experiment(name: str, *args: str) -> subprocess.CompletedProcess:
    """``python experiments/<name> ARGS`` with the repository on ``PYTHONPATH``; its output captured as text."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "experiments" / name), *args], env=env, capture_output=True,
                          text=True, timeout=300)
