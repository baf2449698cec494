"""Retrieval tasks built from held-out text, seeded: passkey (find a number hidden in filler) and copy (repeat a
random span seen earlier).

Each case is exactly ``seq_len`` tokens and starts with the start token, so cases of one length batch together
without padding. Filler is taken from the held-out token stream at a seeded offset per case, so evaluation never
uses training text (the training side, if it ever adds such rows, must draw from its own split and seeds).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

PASSKEY_INTRO = "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
PASSKEY_NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"
COPY_MARKER = "\n\nCopy this exactly: "


@dataclass
class PasskeyCase:
    """``input_ids`` (``seq_len`` tokens) ask for ``key``, hidden at ``depth`` of the filler; the needle's tokens
    start at ``needle_pos``."""

    input_ids: torch.Tensor
    key: str
    depth: float
    needle_pos: int


@dataclass
class CopyCase:
    """``input_ids`` (``seq_len`` tokens) hold ``span`` twice: at ``source_pos`` and, as the window's last tokens,
    at ``repeat_pos``; the repeat is what is scored."""

    input_ids: torch.Tensor
    span: torch.Tensor
    source_pos: int
    repeat_pos: int


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _filler(stream: torch.Tensor, count: int, rng: random.Random) -> list[int]:
    if count > len(stream):
        raise ValueError(f"a case needs {count} filler tokens; the held-out stream has {len(stream)}")
    start = rng.randrange(0, len(stream) - count + 1)
    return stream[start:start + count].tolist()


def passkey_cases(tokenizer, stream: torch.Tensor, start_id: int, seq_len: int, depths: list[float], count: int,
                  seed: int = 0) -> list[PasskeyCase]:
    """``count`` passkey cases of ``seq_len`` tokens, depths taken in turn from ``depths``; 5-digit keys."""
    rng = random.Random(f"passkey-{seed}-{seq_len}")
    intro, question = _encode(tokenizer, PASSKEY_INTRO), _encode(tokenizer, PASSKEY_QUESTION)
    cases = []
    for i in range(count):
        key = str(rng.randrange(10000, 100000))
        needle = _encode(tokenizer, PASSKEY_NEEDLE.format(key=key))
        depth = depths[i % len(depths)]
        room = seq_len - 1 - len(intro) - len(needle) - len(question)
        if room < 1:
            raise ValueError(f"seq_len={seq_len} is too short for a passkey case ({seq_len - room} tokens of prompt)")
        filler = _filler(stream, room, rng)
        cut = round(depth * room)
        ids = [start_id, *intro, *filler[:cut], *needle, *filler[cut:], *question]
        cases.append(PasskeyCase(torch.tensor(ids), key, depth, 1 + len(intro) + cut))
    return cases


def copy_cases(tokenizer, stream: torch.Tensor, start_id: int, seq_len: int, count: int, span: int,
               seed: int = 0, source_depth: float = 0.1) -> list[CopyCase]:
    """``count`` copy cases of ``seq_len`` tokens: a span of ``span`` tokens drawn at random from the stream's
    token ids (a random word salad only copying predicts) after a marker at ``source_depth`` of the window, and the
    marker and span again at the end."""
    rng = random.Random(f"copy-{seed}-{seq_len}")
    marker = _encode(tokenizer, COPY_MARKER)
    vocab = stream.unique().tolist()
    cases = []
    for _ in range(count):
        words = torch.tensor([vocab[rng.randrange(len(vocab))] for _ in range(span)])
        room = seq_len - 1 - 2 * (len(marker) + span)
        if room < 2:
            raise ValueError(f"seq_len={seq_len} is too short for a copy case of a {span}-token span")
        filler = _filler(stream, room, rng)
        cut = round(source_depth * room)
        ids = [start_id, *filler[:cut], *marker, *words.tolist(), *filler[cut:], *marker, *words.tolist()]
        cases.append(CopyCase(torch.tensor(ids), words, 1 + cut + len(marker), seq_len - span))
    return cases
