"""Training entry point: ``python -m seer.train [group=option ...] [key=value ...]`` (``-m`` for sweeps).

Composes ``conf/train.yaml`` with Hydra and hands it to :func:`seer.training.run.run_training`. A bad value is printed
as its message alone (``HYDRA_FULL_ERROR=1`` for the trace); a sweep lists every failed job at the end; Ctrl-C saves
a checkpoint and exits with status 130.
"""

import sys

import hydra
from omegaconf import DictConfig

from seer.cli import user_errors
from seer.config import register_configs
from seer.sweeps import sweep_report

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from seer.training.run import run_training

    with user_errors():
        summary = run_training(cfg)
    return summary.get("loss_end")


if __name__ == "__main__":
    with sweep_report():
        try:
            main()
        except KeyboardInterrupt:
            sys.exit(130)
