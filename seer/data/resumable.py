"""Training order that survives a resume: a seeded permutation per epoch, and the position saved in checkpoints.

A LightningDataModule that mixes in :class:`ResumableShuffle` and builds its training loader with
:meth:`ResumableShuffle.train_sampler` sees, after ``ckpt_path=`` resumes, exactly the batches the uninterrupted run
would have seen: Lightning stores the datamodule's ``state_dict()`` (batches consumed so far) in each checkpoint and
hands it back through ``load_state_dict()`` before the training loader is built.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """Epoch ``e`` visits ``randperm(n)`` drawn from a generator seeded with ``(seed, e)``; the first epoch iterated
    starts ``skip`` samples in. Each ``iter()`` is the next epoch."""

    def __init__(self, n: int, seed: int, epoch: int = 0, skip: int = 0):
        self.n, self.seed, self.epoch, self.skip = n, seed, epoch, skip

    def __iter__(self):
        epoch, skip = self.epoch, self.skip
        self.epoch, self.skip = epoch + 1, 0
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return iter(torch.randperm(self.n, generator=g)[skip:].tolist())

    def __len__(self) -> int:
        return self.n - self.skip


class ResumableShuffle:
    """Mixin for LightningDataModules with a shuffled training loader (see the module docstring)."""

    _resume_batches: int = 0

    def state_dict(self) -> dict:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        return {"consumed_batches": int(trainer.global_step) * int(trainer.accumulate_grad_batches)}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume_batches = int(state_dict.get("consumed_batches", 0))

    def train_sampler(self, n: int, batch_size: int, seed: int) -> EpochShuffleSampler:
        """The sampler of the next training loader, positioned after the batches a restored checkpoint consumed."""
        epoch, batch = divmod(self._resume_batches, max(1, math.ceil(n / batch_size)))
        self._resume_batches = 0
        return EpochShuffleSampler(n, seed, epoch, batch * batch_size)
