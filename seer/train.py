"""Training entry point: ``python -m seer.train [group=option ...] [key=value ...]`` (``-m`` for sweeps).

Composes ``conf/train.yaml`` with Hydra and hands it to :func:`seer.training.run.run_training`.
"""

import hydra
from omegaconf import DictConfig

from seer.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from seer.training.run import run_training

    summary = run_training(cfg)
    return summary.get("loss_end")


if __name__ == "__main__":
    main()
