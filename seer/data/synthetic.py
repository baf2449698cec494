"""Random token rows: data for random-weight models (speed and memory tests) that needs no tokenizer."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from seer.data.resumable import ResumableShuffle


class _Rows(Dataset):
    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.rows[i]}


class RandomTokensDataModule(ResumableShuffle, L.LightningDataModule):
    """Uniform random token ids in ``[0, vocab_size)``, ``train_sequences`` + ``val_sequences`` rows of ``seq_len``."""

    def __init__(self, vocab_size: int, seq_len: int = 1024, batch_size: int = 1, train_sequences: int = 8,
                 val_sequences: int = 1, seed: int = 0):
        super().__init__()
        for name, value, low in (("vocab_size", vocab_size, 2), ("seq_len", seq_len, 2), ("batch_size", batch_size, 1),
                                 ("train_sequences", train_sequences, 1), ("val_sequences", val_sequences, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"data.{name}={value!r} must be an integer >= {low}")
        self.vocab_size, self.seq_len, self.batch_size = vocab_size, seq_len, batch_size
        self.train_sequences, self.val_sequences, self.seed = train_sequences, val_sequences, seed
        self.train_rows: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_rows is not None:
            return
        g = torch.Generator().manual_seed(self.seed)
        rows = torch.randint(0, self.vocab_size, (self.train_sequences + self.val_sequences, self.seq_len), generator=g)
        self.train_rows, self.val_rows = rows[: self.train_sequences], rows[self.train_sequences:]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Rows(self.train_rows), batch_size=self.batch_size,
                          sampler=self.train_sampler(len(self.train_rows), self.batch_size, self.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Rows(self.val_rows), batch_size=self.batch_size)
