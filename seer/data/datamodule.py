"""`PackedTextDataModule`: a corpus packed into fixed-length token rows, served as a LightningDataModule.

Built by the training entry point (`seer.training.run.instantiate_data`, which passes the tokenizer); `setup()`
loads the rows from the token cache or packs them (and caches them), the train loader shuffles with a seeded
generator, the validation loader keeps its order. Batches are `{"input_ids": LongTensor[batch, seq_len]}`, and with
`packing="documents"` also `"position_ids"` (LongTensor, the same shape) restarting at 0 at each document (piece):
the document boundaries, which the training stages hand the model (attention never crosses them).
"""

from __future__ import annotations

import logging
import math
import os

import lightning
import torch
from torch.utils.data import DataLoader, Dataset

from seer.data.cache import cache_key, cache_path, load_rows, save_rows
from seer.data.corpora import Corpus
from seer.data.packing import (PACKINGS, PackedRows, document_positions, pack_documents, resolve_add_bos,
                               tokenizer_fingerprint)
from seer.data.resumable import ResumableShuffle
from seer.data.retrieval import RetrievalAugmentation

log = logging.getLogger(__name__)


class TokenRowsDataset(Dataset):
    """Rows of a [rows, seq_len] integer tensor as `{"input_ids": LongTensor[seq_len]}` items, with `"position_ids"`
    restarting at each document when `starts` (bool, the same shape: where documents start) is given."""

    def __init__(self, rows: torch.Tensor, starts: torch.Tensor | None = None):
        self.rows = rows
        self.starts = starts

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"input_ids": self.rows[index].long()}
        if self.starts is not None:
            item["position_ids"] = document_positions(self.starts[index])
        return item


class PackedTextDataModule(ResumableShuffle, lightning.LightningDataModule):
    """Training and validation rows of exactly `seq_len` tokens packed from `corpus`.

    Args:
        corpus: where the documents come from (a `seer.data.corpora.Corpus`).
        tokenizer: the base model's tokenizer (also part of the cache key); may be set after construction
            through `.tokenizer`, but `setup()` needs it.
        seq_len: tokens per row, BOS included when rows start with one.
        batch_size: rows per batch (per device).
        train_sequences / val_sequences: how many rows to build for each split.
        val_fraction: the share of documents held out for validation, decided per document by a hash of its
            text; in [0, 1), and above 0 whenever val_sequences > 0.
        cache_dir: folder for the token cache; None packs on every setup.
        seed: seeds the training loader's shuffle (the rows themselves do not depend on it).
        num_workers: DataLoader worker processes.
        add_bos: start each row with BOS; None (auto) does so when the tokenizer has a BOS token and adds it
            to an encoded text itself (as the model's own preprocessing would).
        packing: `concat` (documents joined with EOS into one stream, cut into rows) or `documents` (the same rows
            with each document's start kept: batches carry position ids restarting at each document, and the
            distill and finetune stages keep attention, gates and ground truth inside each document).
        augment: a `RetrievalAugmentation` that rewrites the training documents (facts and recalls, chains and
            repeated spans written in); the held-out split is still decided on the original text and the validation
            documents are packed as they are. None (the default) packs every document as it is.
    """

    def __init__(self, corpus: Corpus, tokenizer=None, seq_len: int = 1024, batch_size: int = 1,
                 train_sequences: int = 64, val_sequences: int = 4, val_fraction: float = 0.05,
                 cache_dir: str | os.PathLike | None = None, seed: int = 0, num_workers: int = 0,
                 add_bos: bool | None = None, packing: str = "concat", augment: RetrievalAugmentation | None = None):
        super().__init__()
        if not isinstance(corpus, Corpus):
            raise TypeError(f"PackedTextDataModule: corpus must be a seer.data Corpus, got {type(corpus).__name__}")
        checks = [
            (seq_len >= 2, f"seq_len must be >= 2, got {seq_len}"),
            (batch_size >= 1, f"batch_size must be >= 1, got {batch_size}"),
            (train_sequences >= 1, f"train_sequences must be >= 1, got {train_sequences}"),
            (val_sequences >= 0, f"val_sequences must be >= 0, got {val_sequences}"),
            (0.0 <= val_fraction < 1.0, f"val_fraction must be in [0, 1), got {val_fraction}"),
            (val_sequences == 0 or val_fraction > 0.0,
             f"val_sequences={val_sequences} needs val_fraction > 0, got {val_fraction}"),
            (num_workers >= 0, f"num_workers must be >= 0, got {num_workers}"),
            (add_bos in (None, True, False), f"add_bos must be true, false or null (auto), got {add_bos!r}"),
            (packing in PACKINGS, f"packing must be one of {PACKINGS}, got {packing!r}"),
            (augment is None or isinstance(augment, RetrievalAugmentation),
             f"augment must be a RetrievalAugmentation or null, got {type(augment).__name__}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"PackedTextDataModule: {message}")
        self.corpus = corpus
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.train_sequences = train_sequences
        self.val_sequences = val_sequences
        self.val_fraction = val_fraction
        self.cache_dir = cache_dir
        self.seed = seed
        self.num_workers = num_workers
        self.add_bos = add_bos
        self.packing = packing
        self.augment = augment
        self.rows: PackedRows | None = None

    @property
    def num_train_rows(self) -> int:
        """Training rows per epoch (known before setup: exactly train_sequences are built)."""
        return self.train_sequences

    @property
    def num_train_batches(self) -> int:
        """Training batches per epoch (the last batch may be smaller)."""
        return math.ceil(self.train_sequences / self.batch_size)

    def packing_settings(self) -> dict:
        """Everything the rows depend on: the cache key is a hash of this."""
        if self.tokenizer is None:
            raise ValueError("PackedTextDataModule: no tokenizer; build it with "
                             "hydra.utils.instantiate(cfg.data, tokenizer=tokenizer) or set .tokenizer")
        settings = dict(corpus=self.corpus.fingerprint, tokenizer=tokenizer_fingerprint(self.tokenizer),
                        seq_len=self.seq_len, add_bos=resolve_add_bos(self.tokenizer, self.add_bos),
                        val_fraction=self.val_fraction, train_sequences=self.train_sequences,
                        val_sequences=self.val_sequences)
        if self.packing != "concat":  # concat rows keep the cache keys they had before packing was a setting
            settings["packing"] = self.packing
        if self.augment is not None:  # likewise for rows packed without augmentation
            settings["augment"] = self.augment.fingerprint
        return settings

    def setup(self, stage: str | None = None) -> None:
        if self.rows is not None:
            return
        settings = self.packing_settings()
        path = None if self.cache_dir is None else cache_path(self.cache_dir, cache_key(**settings))
        if path is not None:
            self.rows = load_rows(path)
            if self.rows is not None:
                log.info("loaded %d + %d token rows from %s", len(self.rows.train), len(self.rows.val), path)
                return
        self.rows = pack_documents(self.corpus.documents(), self.tokenizer, seq_len=self.seq_len,
                                   train_sequences=self.train_sequences, val_sequences=self.val_sequences,
                                   val_fraction=self.val_fraction, add_bos=settings["add_bos"],
                                   packing=self.packing, augment=self.augment)
        if path is not None:
            save_rows(path, self.rows, settings)
            log.info("cached %d + %d token rows at %s", len(self.rows.train), len(self.rows.val), path)

    def _loader(self, rows: torch.Tensor, starts: torch.Tensor | None, shuffle: bool) -> DataLoader:
        sampler = self.train_sampler(len(rows), self.batch_size, self.seed) if shuffle else None
        return DataLoader(TokenRowsDataset(rows, starts), batch_size=self.batch_size, sampler=sampler,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def _built_rows(self) -> PackedRows:
        if self.rows is None:
            raise RuntimeError("PackedTextDataModule: call setup() before asking for a dataloader")
        return self.rows

    def train_dataloader(self) -> DataLoader:
        rows = self._built_rows()
        return self._loader(rows.train, rows.train_starts, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        rows = self._built_rows()
        return self._loader(rows.val, rows.val_starts, shuffle=False)
