"""Packing documents into fixed-length token rows, with a held-out split by document.

Documents are tokenised in batches without special tokens, joined with EOS after each document into one
stream per split, and cut into rows of exactly `seq_len` tokens; when `add_bos` is on, every row starts with
BOS (counted in `seq_len`). Whether a document goes to training or validation is decided by a hash of its
text, so no document lands in both. Reading stops as soon as both splits have their rows; a progress bar counts them.

`packing="documents"` keeps the boundaries: a row is the same stream of whole documents, a document that runs over
the row's end continuing in the next row as a piece of its own; each piece starts with BOS when `add_bos` is on
(unless only one token of the row is left), and the rows' piece starts are kept (`PackedRows.train_starts`), from
which a training batch gets position ids that restart at each piece (:func:`document_positions`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from tqdm import tqdm

from seer.checks import ConfigError

log = logging.getLogger(__name__)

# Documents are tokenised in batches of at most this many documents or characters, whichever comes first:
# big enough for the fast tokenizer's parallelism, small enough not to tokenise many books past the need.
_BATCH_DOCUMENTS = 64
_BATCH_CHARS = 2_000_000

PACKINGS = ("concat", "documents")  # documents joined into one stream; or kept apart, their boundaries known


@dataclass(frozen=True)
class PackedRows:
    """Token rows of one packing run: int32 tensors [rows, seq_len] for each split, and with `packing="documents"`
    bool tensors of the same shape, True where a document (piece) starts."""

    train: torch.Tensor
    val: torch.Tensor
    train_starts: torch.Tensor | None = None
    val_starts: torch.Tensor | None = None


def document_positions(starts: torch.Tensor) -> torch.Tensor:
    """Position ids (int64, same shape as the bool `starts`) counting from 0 at each document start along the last
    dimension; the first token of a row always starts one."""
    index = torch.arange(starts.shape[-1], device=starts.device).expand_as(starts)
    begins = torch.where(starts, index, torch.zeros_like(index))
    return index - begins.cummax(-1).values


def tokenizer_fingerprint(tokenizer) -> str:
    """Identity of a tokenizer for cache keys: its name or path, vocabulary size, special ids and a vocab hash."""
    vocab = sorted(tokenizer.get_vocab().items())
    vocab_hash = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]
    return json.dumps(dict(name_or_path=tokenizer.name_or_path, vocab_size=len(tokenizer), vocab=vocab_hash,
                           bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id), sort_keys=True)


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts an encoded text with BOS by itself: the sign that its model expects one."""
    bos_id = tokenizer.bos_token_id
    return bos_id is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos_id]


def resolve_add_bos(tokenizer, add_bos: bool | None) -> bool:
    """`add_bos=None` (auto): start rows with BOS when the tokenizer has one and adds it itself (Llama, Mistral)
    but not when it does not (Qwen has no BOS; SmolLM2's BOS is a chat marker). True without a BOS token fails."""
    if add_bos is None:
        return tokenizer_adds_bos(tokenizer)
    if add_bos and tokenizer.bos_token_id is None:
        raise ValueError(f"add_bos=True but the tokenizer {tokenizer.name_or_path!r} has no BOS token; "
                         f"use add_bos=null (auto) or false")
    return bool(add_bos)


def is_validation_document(text: str, val_fraction: float) -> bool:
    """Deterministic split by document: a hash of the text, read as a number in [0, 1), below val_fraction."""
    digest = hashlib.blake2b(text.encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < val_fraction


class _RowCutter:
    """Collects one split's token stream and cuts it into rows of `seq_len` (BOS first when `bos_id` is set)."""

    def __init__(self, seq_len: int, wanted: int, bos_id: int | None):
        self.body_len = seq_len - (bos_id is not None)
        self.prefix = [] if bos_id is None else [bos_id]
        self.wanted = wanted
        self.rows: list[torch.Tensor] = []  # int32 rows: a 0.5B-token run would not fit as Python ints
        self.pending: list[int] = []
        self.tokens_seen = 0

    @property
    def full(self) -> bool:
        return len(self.rows) >= self.wanted

    def add(self, tokens: list[int]) -> None:
        self.tokens_seen += len(tokens)
        self.pending.extend(tokens)
        start = 0
        while not self.full and len(self.pending) - start >= self.body_len:
            self.rows.append(torch.tensor(self.prefix + self.pending[start:start + self.body_len], dtype=torch.int32))
            start += self.body_len
        self.pending = [] if self.full else self.pending[start:]

    def tensor(self, seq_len: int) -> torch.Tensor:
        return torch.stack(self.rows) if self.rows else torch.empty(0, seq_len, dtype=torch.int32)

    def starts(self, seq_len: int) -> torch.Tensor | None:
        """Where documents start in each row: None, the rows being one stream."""
        return None


class _DocumentRowCutter(_RowCutter):
    """Fills rows of `seq_len` with whole documents, in order; a document that runs over a row's end goes on in the
    next row as a piece of its own. Each piece starts with the prefix (BOS) when it fits beside a token."""

    def __init__(self, seq_len: int, wanted: int, bos_id: int | None):
        super().__init__(seq_len, wanted, bos_id)
        self.seq_len = seq_len
        self.row: list[int] = []
        self.row_starts: list[int] = []
        self.start_rows: list[torch.Tensor] = []

    def add(self, tokens: list[int]) -> None:
        self.tokens_seen += len(tokens)
        while tokens and not self.full:
            room = self.seq_len - len(self.row)
            prefix = self.prefix if room > len(self.prefix) else []
            piece = prefix + tokens[:room - len(prefix)]
            tokens = tokens[len(piece) - len(prefix):]
            self.row_starts.append(len(self.row))
            self.row.extend(piece)
            if len(self.row) == self.seq_len:
                starts = torch.zeros(self.seq_len, dtype=torch.bool)
                starts[self.row_starts] = True
                self.rows.append(torch.tensor(self.row, dtype=torch.int32))
                self.start_rows.append(starts)
                self.row, self.row_starts = [], []

    def starts(self, seq_len: int) -> torch.Tensor:
        return torch.stack(self.start_rows) if self.start_rows else torch.empty(0, seq_len, dtype=torch.bool)


def _batches(documents: Iterable[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for text in documents:
        batch.append(text)
        chars += len(text)
        if len(batch) >= _BATCH_DOCUMENTS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def pack_documents(documents: Iterable[str], tokenizer, seq_len: int, train_sequences: int, val_sequences: int,
                   val_fraction: float, add_bos: bool, packing: str = "concat",
                   augment: Callable[[str], str] | None = None) -> PackedRows:
    """Tokenise `documents` and pack them into `train_sequences` + `val_sequences` rows of `seq_len` tokens.

    Each document is followed by EOS; a document may run over into the next row. `packing` (one of `PACKINGS`):
    `concat` cuts one stream, `documents` keeps where each document (piece) starts (see the module docstring).
    `augment` (e.g. `seer.data.retrieval.RetrievalAugmentation`) rewrites each training document after the split was
    decided on its original text; validation documents are packed as they are.
    Raises ValueError naming the numbers when the documents run out before every row is built.
    """
    if packing not in PACKINGS:
        raise ValueError(f"packing={packing!r}: choose from {PACKINGS}")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError(f"the tokenizer {tokenizer.name_or_path!r} has no EOS token to put between documents")
    bos_id = tokenizer.bos_token_id if add_bos else None
    row_cutter = _DocumentRowCutter if packing == "documents" else _RowCutter
    splits = {"train": row_cutter(seq_len, train_sequences, bos_id), "val": row_cutter(seq_len, val_sequences, bos_id)}
    documents_read = 0
    log.info("tokenising: %d + %d rows of %d tokens", train_sequences, val_sequences, seq_len)
    with tqdm(total=train_sequences + val_sequences, desc="tokenising", unit="row", disable=None,
              mininterval=1.0) as progress:
        for batch in _batches(documents):
            documents_read += len(batch)
            kept = [(text, splits["val" if is_validation_document(text, val_fraction) else "train"]) for text in batch]
            kept = [(augment(text) if augment is not None and cutter is splits["train"] else text, cutter)
                    for text, cutter in kept if not cutter.full]
            if kept:
                encoded = tokenizer([text for text, _ in kept], add_special_tokens=False, verbose=False)["input_ids"]
                for ids, (_, cutter) in zip(encoded, kept):
                    cutter.add(ids + [eos_id])
            progress.update(sum(len(c.rows) for c in splits.values()) - progress.n)
            if all(cutter.full for cutter in splits.values()):
                train, val = splits["train"], splits["val"]
                return PackedRows(train=train.tensor(seq_len), val=val.tensor(seq_len),
                                  train_starts=train.starts(seq_len), val_starts=val.starts(seq_len))
    train, val = splits["train"], splits["val"]
    advice = "Lower data.train_sequences, data.val_sequences or data.seq_len, or use a larger corpus."
    if val_sequences and (documents_read < 2 or not val.tokens_seen):
        advice = (f"Too few documents to hold one out for validation (whole documents are, by a hash of their text, "
                  f"val_fraction={val_fraction} of them): split the text into more documents (text files: "
                  f"data.corpus.split_on, e.g. '(?m)^(?=CHAPTER )' for a book's chapters), or train without "
                  f"validation (data.val_sequences=0 trainer.limit_val_batches=0).")
    raise ConfigError(
        f"data: the corpus ran out after {documents_read} documents: built {len(train.rows)} of {train_sequences} "
        f"training rows ({train.tokens_seen} tokens) and {len(val.rows)} of {val_sequences} validation rows "
        f"({val.tokens_seen} tokens) of seq_len={seq_len}, val_fraction={val_fraction}. {advice}")
