"""Training order that survives a resume and splits across ranks: a seeded permutation per epoch, sharded by rank,
and the position saved in checkpoints.

A LightningDataModule that mixes in :class:`ResumableShuffle` and builds its training loader with
:meth:`ResumableShuffle.train_sampler` sees, after ``ckpt_path=`` resumes, exactly the batches the uninterrupted run
would have seen, in this epoch and every later one: Lightning stores the datamodule's ``state_dict()`` (batches
consumed so far) in each checkpoint and hands it back through ``load_state_dict()`` before the training loader is
built; Lightning names each epoch to the sampler (``set_epoch``) and counts the batches of the resumed epoch from
where the checkpoint left off, so the sampler keeps the epoch's full length and only leaves out, in the resumed
epoch, the rows already seen.

Under several processes (DDP, FSDP) every rank builds the same permutation and takes its own share of it (rank
``r`` of ``w`` takes positions ``r, r + w, ...``), so no row is seen twice in an epoch; the ``n % w`` rows left at
the end of each epoch's permutation are left out (a different few each epoch). The Trainer must then keep
Lightning from replacing the sampler (``use_distributed_sampler: false``, the default in ``conf/trainer``).
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """Epoch ``e`` visits this rank's share of ``randperm(n)`` drawn from a generator seeded with ``(seed, e)``; in
    epoch ``resume_epoch`` the first ``skip`` of them are left out (they were seen before the checkpoint).
    ``len()`` is always the whole epoch's share."""

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1, resume_epoch: int = 0, skip: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if n < world_size:
            raise ValueError(f"{n} training rows cannot be shared by {world_size} processes; use more rows")
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.resume_epoch, self.skip = resume_epoch, skip
        self.epoch = resume_epoch

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before each epoch."""
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        share = torch.randperm(self.n, generator=g)[: len(self) * self.world_size][self.rank::self.world_size]
        start = self.skip if self.epoch == self.resume_epoch else 0
        return iter(share[start:].tolist())

    def __len__(self) -> int:
        return self.n // self.world_size


class ResumableShuffle:
    """Mixin for LightningDataModules with a shuffled training loader (see the module docstring)."""

    _resume_batches: int = 0

    def state_dict(self) -> dict:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        return {"consumed_batches": int(trainer.global_step) * int(trainer.accumulate_grad_batches),
                "world_size": int(trainer.world_size)}

    def load_state_dict(self, state_dict: dict) -> None:
        trainer = getattr(self, "trainer", None)
        saved_world = state_dict.get("world_size", 1)
        if trainer is not None and saved_world != trainer.world_size:
            raise ValueError(f"the checkpoint was written by {saved_world} processes and this run has "
                             f"{trainer.world_size}: the data order would differ; resume with the same number of "
                             f"devices (trainer.devices x trainer.num_nodes)")
        self._resume_batches = int(state_dict.get("consumed_batches", 0))

    def train_sampler(self, n: int, batch_size: int, seed: int) -> EpochShuffleSampler:
        """The sampler of the training loader for ``n`` rows, positioned after the batches a restored checkpoint
        consumed, and sharded by the trainer's rank."""
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        per_epoch = math.ceil((n // world) / batch_size)
        epoch, batch = divmod(self._resume_batches, per_epoch)
        return EpochShuffleSampler(n, seed, rank, world, epoch, batch * batch_size)
