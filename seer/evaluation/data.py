"""Held-out text for evaluation: a corpus's documents as one token stream, cut into windows.

Windows start with a *start token* (BOS when the tokenizer adds one itself, as its model expects; otherwise the
document separator, e.g. SmolLM2's ``<|endoftext|>``), so every window begins like a document does in training
data; documents are joined with the separator. Documents come from a :class:`seer.data.Corpus`; with
``split="val"`` only those the training split holds out (by the same hash of their text), so training and
evaluation never share a document.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from seer.data.corpora import Corpus
from seer.data.packing import is_validation_document, tokenizer_adds_bos


def start_token_id(tokenizer) -> int:
    """BOS when the tokenizer starts encoded text with it, else the EOS/document separator."""
    if tokenizer_adds_bos(tokenizer):
        return tokenizer.bos_token_id
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer {tokenizer.name_or_path!r} has neither a BOS it adds nor an EOS token to "
                         f"start evaluation windows with")
    return tokenizer.eos_token_id


class HeldOutText:
    """The token stream of ``corpus``'s evaluation documents, read lazily (tokenised as far as asked)."""

    def __init__(self, corpus: Corpus, tokenizer, split: str = "val", val_fraction: float = 0.05,
                 progress: bool = True):
        if split == "val" and not 0 < val_fraction < 1:
            raise ValueError(f"split=val needs the data's val_fraction in (0, 1), got {val_fraction}")
        self.corpus, self.tokenizer, self.split, self.val_fraction = corpus, tokenizer, split, val_fraction
        self.start_id = start_token_id(tokenizer)
        self.progress = progress
        self._tokens: list[int] = []
        self._documents = self._held_out()
        self.documents_read = 0

    @property
    def fingerprint(self) -> str:
        """What the stream depends on: the corpus, the split and the share held out."""
        return f"{self.corpus.fingerprint}|{self.split}|{self.val_fraction}"

    def _held_out(self) -> Iterator[str]:
        for text in self.corpus.documents():
            if self.split == "all" or is_validation_document(text, self.val_fraction):
                yield text

    def tokens(self, count: int) -> torch.Tensor:
        """The first ``count`` tokens of the stream (int64); ``ValueError`` when the documents run out first."""
        if len(self._tokens) < count:
            from tqdm.auto import tqdm

            bar = tqdm(total=count, initial=len(self._tokens), desc="tokenising held-out text", unit="tok",
                       disable=not self.progress, leave=False)
            for text in self._documents:
                before = len(self._tokens)
                self._tokens += self.tokenizer(text, add_special_tokens=False)["input_ids"]
                self._tokens.append(self.tokenizer.eos_token_id)
                self.documents_read += 1
                bar.update(min(count, len(self._tokens)) - min(count, before))
                if len(self._tokens) >= count:
                    break
            bar.close()
        if len(self._tokens) < count:
            raise ValueError(f"the held-out text ({self.split} split of {self.corpus.fingerprint}) has "
                             f"{len(self._tokens)} tokens in {self.documents_read} documents; {count} are needed. "
                             f"Use fewer or shorter windows, or more text")
        return torch.tensor(self._tokens[:count], dtype=torch.long)

    def windows(self, seq_len: int, count: int) -> torch.Tensor:
        """``[count, seq_len]`` consecutive windows of the stream, each the start token then ``seq_len - 1`` tokens."""
        body = self.tokens(count * (seq_len - 1)).view(count, seq_len - 1)
        return torch.cat([torch.full((count, 1), self.start_id, dtype=torch.long), body], dim=1)
