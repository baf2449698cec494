"""Retrieval rows: long-range lookups written into training documents, so the gates see retrieval attention.

Novels and library code hold few long-range lookups, so gates distilled on them rarely see the attention of a
retrieval (a value read back thousands of tokens after it was stated) and miss it on retrieval and multi-hop tasks.
`RetrievalAugmentation` rewrites a seeded-random share of the training documents, inserting at paragraph
boundaries (prose) or before blank-line-separated definitions (code), in the document's own register:

- facts and their recalls: a key (a word or name of the document; upper-case identifiers in code) is given a value
  (a random number, a word of the document or a short random code) in the document's first half, and lines in its
  second half name the key again and restate the value, so under teacher forcing the value tokens attend back to
  the fact (on the Austen chapters, about 1.8k tokens back at the median and 3.9k at the 90th percentile);
- chains (multi-hop): ``A`` gets a value, later ``B`` takes A's, ``C`` takes B's, ..., and the end recalls the
  last one's value;
- repeated spans: a run of whole sentences (prose) or lines (code) of 20-80 words copied verbatim further on.

Phrasings vary (several templates per kind, prose-like for text and assignment/assert-like for code). What is
inserted stays under ``max_share`` of the document's characters, so the language statistics stay those of the
corpus. The rewrite is a pure function of (settings, document text): the same document gets the same insertions
in every run and process. `PackedTextDataModule` applies it to training documents only, after the held-out split
was decided on the original text, so the validation rows are exactly those of a run without it.
"""

from __future__ import annotations

import hashlib
import json
import keyword
import random
import re
import string
from dataclasses import dataclass

VALUE_KINDS = ("number", "word", "code")

# Prose. A key precedes its value in every recall, so predicting the value needs the fact.
_PROSE_FACTS = (
    "Let it be noted that the {kind} belonging to {key} is {value}.",
    "{key} was given the {kind} {value}, and it was written down.",
    "(A small record: {key}, {kind} {value}.)",
    "Someone had marked {key} with the {kind} {value}.",
    "It is worth remembering that {key} goes with the {kind} {value}.",
    "For the record, the {kind} of {key} was {value}.",
)
_PROSE_RECALLS = (
    "The {kind} belonging to {key}, as noted before, is {value}.",
    "And {key}? Its {kind} was {value}.",
    "Looking back, {key} had been marked with the {kind} {value}.",
    "Recall that {key} went with the {kind} {value}.",
    "Once more: the {kind} of {key} is {value}.",
    "Whoever asked about {key} was told the {kind} {value}.",
)
_PROSE_LINKS = (
    "{new} has the same {kind} as {old}.",
    "{new} was given whatever {kind} {old} had.",
    "The {kind} of {new} is copied from {old}.",
    "{new} shares its {kind} with {old}.",
    "Whatever {kind} {old} has, {new} has it too.",
)
# Code: one statement or comment per line, indented like the definition it is inserted before.
_CODE_FACTS = (
    "{key} = {value}",
    "{key}: Final = {value}",
    "{key} = {value}  # set once, read later",
    'globals()["{key}"] = {value}',
    "{key} = ({value})",
    "# {key} is {value}",
)
_CODE_RECALLS = (
    "assert {key} == {value}",
    'assert {key} == {value}, "{key} changed"',
    "# {key} still holds {value} here",
    "_check({key}, expected={value})",
    "print({key})  # -> {value}",
    'assert globals()["{key}"] == {value}',
)
_CODE_LINKS = (
    "{new} = {old}",
    "{new}: Final = {old}",
    "{new} = {old}  # alias",
    '{new} = globals()["{old}"]',
)

_CODE_MARKERS = re.compile(r"^(?:def |class |import \w|from [\w.]+ import )", re.M)
_PARAGRAPH_STARTS = re.compile(r"\n[ \t]*\n(?=[ \t]*\S)")
_LINE_STARTS = re.compile(r"\n(?=[ \t]*\S)")
_DEFINITIONS = re.compile(r"\n[ \t]*\n(?=([ \t]*)(?:@|def |class |async def ))")
_SENTENCES = re.compile(r"[^\s.!?][^.!?]*[.!?]+[\"'\u201d\u2019)]*")
_NAMES = re.compile(r"(?<=[a-z,;] )([A-Z][a-z]{3,11})\b")  # capitalised mid-sentence: names, places
_NOUNS = re.compile(r"\b[Tt]he ([a-z]{4,12})\b")  # what follows "the": mostly nouns and adjectives
_NOT_NOUNS = frozenset({"best", "first", "last", "least", "more", "most", "next", "only", "other", "same", "very",
                        "whole"})
_IDENTIFIERS = re.compile(r"\b([a-z][a-z0-9]*(?:_[a-z0-9]+)*)\s*[=(]")  # names assigned or called
_CODE_ALPHABET = string.ascii_uppercase + string.digits


@dataclass(frozen=True)
class Insertion:
    """``text`` (its separator included) inserted at character ``position`` of the original document."""

    position: int
    text: str


@dataclass(frozen=True)
class Structure:
    """One inserted lookup: a fact and its recalls (one key), a chain (its keys in order: the first is given
    ``value``, each next one takes the previous one's, the last is recalled) or a repeated span (no keys; its value
    is the copied text)."""

    kind: str
    keys: tuple[str, ...]
    value: str
    insertions: tuple[Insertion, ...]  # in reading order, at increasing positions


def _range(name: str, value, low: int) -> tuple[int, int]:
    """``value`` (an int, or a [min, max] pair) as a (min, max) tuple with ``low <= min <= max``."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair) or not low <= pair[0] <= pair[1]:
        raise ValueError(f"RetrievalAugmentation: {name} must be an int or a [min, max] pair of ints with "
                         f"{low} <= min <= max, got {value!r}")
    return pair


class RetrievalAugmentation:
    """Inserts facts and recalls, chains and repeated spans into a seeded-random share of documents.

    Args:
        share: the share of documents rewritten (each decided by a hash of its text and `seed`), in [0, 1].
        seed: with the document text, seeds every choice (which documents, keys, values, templates, positions).
        facts: how many key-value facts a rewritten document gets (an int or a [min, max] pair).
        recalls: how many recalls each fact gets, at later boundaries.
        chains: how many chains (multi-hop lookups) a rewritten document gets.
        hops: how many links (``B = A``) each chain has after its first fact.
        spans: how many repeated spans a rewritten document gets.
        span_words: how many words a repeated span holds (whole sentences or lines; a [min, max] pair).
        max_share: the most that the insertions may add, as a share of the document's characters, in (0, 1);
            structures that would pass it are left out.
        min_chars: documents shorter than this are left as they are.
        value_kinds: which values facts take, drawn uniformly: ``number``, ``word`` (of the document), ``code``.
    """

    def __init__(self, share: float = 0.5, seed: int = 0, facts=(2, 6), recalls=(1, 2), chains=(0, 1),
                 hops=(2, 4), spans=(1, 2), span_words=(20, 80), max_share: float = 0.06, min_chars: int = 4000,
                 value_kinds=VALUE_KINDS):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"RetrievalAugmentation: share must be in [0, 1], got {share}")
        if not 0.0 < max_share < 1.0:
            raise ValueError(f"RetrievalAugmentation: max_share must be in (0, 1), got {max_share}")
        if not isinstance(min_chars, int) or min_chars < 0:
            raise ValueError(f"RetrievalAugmentation: min_chars must be an int >= 0, got {min_chars!r}")
        value_kinds = tuple(value_kinds)
        if not value_kinds or set(value_kinds) - set(VALUE_KINDS):
            raise ValueError(f"RetrievalAugmentation: value_kinds must be a non-empty list drawn from {VALUE_KINDS}, "
                             f"got {list(value_kinds)}")
        self.share = float(share)
        self.seed = int(seed)
        self.facts = _range("facts", facts, 0)
        self.recalls = _range("recalls", recalls, 1)
        self.chains = _range("chains", chains, 0)
        self.hops = _range("hops", hops, 1)
        self.spans = _range("spans", spans, 0)
        self.span_words = _range("span_words", span_words, 1)
        self.max_share = float(max_share)
        self.min_chars = min_chars
        self.value_kinds = value_kinds

    def settings(self) -> dict:
        return dict(share=self.share, seed=self.seed, facts=self.facts, recalls=self.recalls, chains=self.chains,
                    hops=self.hops, spans=self.spans, span_words=self.span_words, max_share=self.max_share,
                    min_chars=self.min_chars, value_kinds=self.value_kinds)

    @property
    def fingerprint(self) -> str:
        """Names the settings (and so the rewrite): the token cache keys on it."""
        digest = hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode("utf-8")).hexdigest()[:16]
        return f"RetrievalAugmentation({digest})"

    def __repr__(self) -> str:
        return f"RetrievalAugmentation({', '.join(f'{k}={v!r}' for k, v in self.settings().items())})"

    def _rng(self, text: str) -> random.Random:
        digest = hashlib.blake2b(f"{self.seed}\0{text}".encode("utf-8", errors="surrogatepass"), digest_size=8)
        return random.Random(int.from_bytes(digest.digest(), "big"))

    def structures(self, text: str) -> list[Structure]:
        """What `__call__` inserts into ``text``: nothing for a document left as it is."""
        rng = self._rng(text)
        if rng.random() >= self.share or len(text) < self.min_chars:
            return []
        doc = _Document(text, rng)
        budget = int(self.max_share * len(text))
        kinds = (["span"] * rng.randint(*self.spans) + ["chain"] * rng.randint(*self.chains)
                 + ["fact"] * rng.randint(*self.facts))
        rng.shuffle(kinds)
        chosen = []
        for kind in kinds:
            structure = self._structure(doc, kind, rng)
            size = 0 if structure is None else sum(len(i.text) for i in structure.insertions)
            if structure is not None and size <= budget:
                chosen.append(structure)
                budget -= size
        return chosen

    def _structure(self, doc: _Document, kind: str, rng: random.Random) -> Structure | None:
        """A new structure of ``kind`` in ``doc`` (None when it has too few boundaries or words for one)."""
        if kind == "span":
            return doc.span(self.span_words)
        if kind == "chain":  # a chain's value is a number or a code: a word would read as one more key
            kinds = [k for k in self.value_kinds if k != "word"] or ["number"]
            return doc.chain(rng.randint(*self.hops), rng.choice(kinds))
        return doc.fact(rng.randint(*self.recalls), rng.choice(self.value_kinds))

    def __call__(self, text: str) -> str:
        """``text`` with its structures inserted (the text itself when the document is left as it is)."""
        insertions = sorted((ins.position, n, k, ins.text) for n, s in enumerate(self.structures(text))
                            for k, ins in enumerate(s.insertions))
        pieces, start = [], 0
        for position, _, _, inserted in insertions:
            pieces += [text[start:position], inserted]
            start = position
        return "".join(pieces) + text[start:]


class _Document:
    """One document being rewritten: where lines may go, the words keys and values are made of (identifiers in
    code; nouns and names in prose), and the keys it has used."""

    def __init__(self, text: str, rng: random.Random):
        self.text = text
        self.rng = rng
        self.code = len(_CODE_MARKERS.findall(text)) >= 2
        self.used: set[str] = set()
        if self.code:
            found = [(m.end(), m.group(1)) for m in _DEFINITIONS.finditer(text)]
            top = [b for b in found if not b[1]]
            self.boundaries = top if len(top) >= 6 else found  # (position, indentation)
            self.words = sorted({w for w in _IDENTIFIERS.findall(text) if 4 <= len(w) <= 16
                                 and not keyword.iskeyword(w)})
            self.names: list[str] = []
            self.units = [(m.start(), m.end()) for m in re.finditer(r"[^\n]*\S[^\n]*", text)]
            self.separator = "\n"
        else:  # paragraphs, or lines when the text has few paragraphs
            paragraphs = [(m.end(), "") for m in _PARAGRAPH_STARTS.finditer(text)]
            lines = [(m.end(), "") for m in _LINE_STARTS.finditer(text)]
            self.boundaries, self.separator = (paragraphs, "\n\n") if len(paragraphs) >= 8 else (lines, "\n")
            self.words = sorted(set(_NOUNS.findall(text)) - _NOT_NOUNS)
            self.names = sorted(set(_NAMES.findall(text)))
            self.units = [(m.start(), m.end()) for m in _SENTENCES.finditer(text)]

    def _key(self) -> str | None:
        for _ in range(20):
            if self.code:
                key = "_".join(self.rng.sample(self.words, 2)).upper() if len(self.words) >= 2 else None
            elif self.names and (not self.words or self.rng.random() < 0.5):
                key = self.rng.choice(self.names)
            else:
                key = f"the {self.rng.choice(self.words)}" if self.words else None
            if key is not None and key not in self.used:
                self.used.add(key)
                return key
        return None

    def _value(self, kind: str) -> str:
        if kind == "word" and self.words:
            value = self.rng.choice(self.words)
        elif kind == "code" or kind == "word":
            value = "".join(self.rng.choice(_CODE_ALPHABET) for _ in range(self.rng.randint(5, 8)))
        else:
            digits = self.rng.randint(2, 6)
            return str(self.rng.randrange(10 ** (digits - 1), 10 ** digits))
        return f'"{value}"' if self.code else value

    def _positions(self, count: int) -> list[tuple[int, str]] | None:
        """``count`` distinct boundaries in reading order: the first in the document's first half, the others in
        its second, so what refers back is often thousands of tokens from what it refers to."""
        half = len(self.boundaries) // 2
        if half < 1 or len(self.boundaries) - half < count - 1:
            return None
        return [self.rng.choice(self.boundaries[:half]), *sorted(self.rng.sample(self.boundaries[half:], count - 1))]

    def _line(self, template: str, boundary: tuple[int, str], **fields: str) -> Insertion:
        line = template.format(**fields)
        if not self.code:
            line = line[0].upper() + line[1:]
        return Insertion(boundary[0], f"{boundary[1]}{line}{self.separator}")

    def fact(self, recalls: int, value_kind: str) -> Structure | None:
        key, positions = self._key(), self._positions(1 + recalls)
        if key is None or positions is None:
            return None
        value, kind = self._value(value_kind), value_kind
        facts, recall_lines = (_CODE_FACTS, _CODE_RECALLS) if self.code else (_PROSE_FACTS, _PROSE_RECALLS)
        lines = [self._line(self.rng.choice(facts), positions[0], key=key, value=value, kind=kind)]
        lines += [self._line(self.rng.choice(recall_lines), p, key=key, value=value, kind=kind) for p in positions[1:]]
        return Structure("fact", (key,), value, tuple(lines))

    def chain(self, hops: int, value_kind: str) -> Structure | None:
        keys, positions = [self._key() for _ in range(hops + 1)], self._positions(hops + 2)
        if None in keys or positions is None:
            return None
        value, kind = self._value(value_kind), value_kind
        facts, links, recalls = ((_CODE_FACTS, _CODE_LINKS, _CODE_RECALLS) if self.code
                                 else (_PROSE_FACTS, _PROSE_LINKS, _PROSE_RECALLS))
        lines = [self._line(self.rng.choice(facts), positions[0], key=keys[0], value=value, kind=kind)]
        lines += [self._line(self.rng.choice(links), p, new=new, old=old, kind=kind)
                  for p, old, new in zip(positions[1:-1], keys, keys[1:])]
        lines.append(self._line(self.rng.choice(recalls), positions[-1], key=keys[-1], value=value, kind=kind))
        return Structure("chain", tuple(keys), value, tuple(lines))

    def span(self, words: tuple[int, int]) -> Structure | None:
        """Whole sentences (lines) from the first 60% of the document, copied to a later boundary."""
        for _ in range(10):
            if not self.units:
                return None
            first = self.rng.randrange(max(1, int(0.6 * len(self.units))))
            last, count = first, 0
            while last < len(self.units) and count < words[0]:
                count += len(self.text[slice(*self.units[last])].split())
                last += 1
            if not words[0] <= count <= words[1]:
                continue
            start, end = self.units[first][0], self.units[last - 1][1]
            later = [b for b in self.boundaries if b[0] >= end]
            if later:
                copied = self.text[start:end]
                position = self.rng.choice(later)[0]
                return Structure("span", (), copied, (Insertion(position, f"{copied}{self.separator}"),))
        return None
