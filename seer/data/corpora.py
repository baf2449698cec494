"""Text corpora: where training documents come from.

Each corpus yields plain-text documents in a deterministic order (`documents()`) and names what it yields
with a stable `fingerprint` string, which the token cache keys on:

Every fingerprint covers the contents of the local files a corpus reads (size and modification time, and a sha256
of files up to `HASHED_FILE_BYTES`), so an edited file is packed again rather than read from a stale cache.

- `StdlibCorpus`: the running interpreter's standard-library `.py` sources (the embedded default; no download).
- `TextFilesCorpus`: local text files matched by glob patterns.
- `HFDatasetCorpus`: a Hugging Face `datasets` dataset (streamed by default), with the `pg19_corpus` and
  `redpajama_sample_corpus` presets.
- `MixedCorpus`: several corpora, their documents taken in turn (e.g. novels and code in one training set).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import re
import sys
import sysconfig
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from seer.checks import ConfigError

HASHED_FILE_BYTES = 1 << 20  # files up to 1 MiB are hashed too: an edit that keeps size and mtime still shows
_TEST_FOLDER_NAMES = frozenset({"test", "tests", "idle_test"})
_THIRD_PARTY_FOLDER_NAMES = frozenset({"site-packages", "dist-packages"})


def _digest(payload: Any) -> str:
    """A short sha256 of a JSON-serialisable payload (keys sorted, so dict order does not matter)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _file_stats(paths: list[Path]) -> list[tuple]:
    """(path, size, mtime in ns, and the sha256 of a file up to ``HASHED_FILE_BYTES``) of each file: what notices
    an edited or replaced file."""
    stats = []
    for path in paths:
        st = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if st.st_size <= HASHED_FILE_BYTES else None
        stats.append((str(path), st.st_size, st.st_mtime_ns, digest))
    return stats


def _local_files(patterns: list[str]) -> list[Path]:
    """The local files the glob ``patterns`` match (files under a folder for a folder); remote ones (``hf://``,
    URLs) match none."""
    found: set[Path] = set()
    for pattern in patterns:
        if "://" in pattern:
            continue
        for match in glob.glob(os.path.expanduser(pattern), recursive=True):
            path = Path(match).resolve()
            found.update([path] if path.is_file() else (p for p in path.rglob("*") if p.is_file()))
    return sorted(found)


class Corpus(ABC):
    """A source of plain-text documents in a deterministic order."""

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """A stable string that changes whenever the documents yielded would change."""

    @abstractmethod
    def documents(self) -> Iterator[str]:
        """The documents, in the same order on every call."""


class StdlibCorpus(Corpus):
    """The standard-library `.py` sources of the running interpreter, read from disk.

    Files are sorted by path (and shuffled deterministically when `seed` is given, so that `max_files` picks a
    mix of modules rather than the alphabetically first ones); third-party folders (site-packages) are never
    included and test folders only with `include_tests`. Files shorter than `min_chars` or not valid UTF-8 are
    skipped; `max_files` caps how many documents are yielded.
    """

    def __init__(self, max_files: int | None = None, min_chars: int = 500, include_tests: bool = False,
                 seed: int | None = None):
        if max_files is not None and max_files < 1:
            raise ValueError(f"StdlibCorpus: max_files must be >= 1 or None, got {max_files}")
        if min_chars < 0:
            raise ValueError(f"StdlibCorpus: min_chars must be >= 0, got {min_chars}")
        self.max_files = max_files
        self.min_chars = min_chars
        self.include_tests = include_tests
        self.seed = seed
        self.root = Path(sysconfig.get_paths()["stdlib"])

    def _candidate_paths(self) -> list[Path]:
        skipped_folders = _THIRD_PARTY_FOLDER_NAMES | {"__pycache__"}
        if not self.include_tests:
            skipped_folders |= _TEST_FOLDER_NAMES
        paths = []
        for folder, subfolders, files in os.walk(self.root):
            subfolders[:] = [name for name in subfolders if name not in skipped_folders]
            paths.extend(Path(folder, name) for name in files if name.endswith(".py"))
        paths.sort()
        if self.seed is not None:
            random.Random(self.seed).shuffle(paths)
        return paths

    @property
    def fingerprint(self) -> str:
        args = dict(max_files=self.max_files, min_chars=self.min_chars, include_tests=self.include_tests,
                    seed=self.seed, python=sys.version, root=str(self.root))
        return f"StdlibCorpus({_digest(args)}, files={_digest(_file_stats(self._candidate_paths()))})"

    def documents(self) -> Iterator[str]:
        yielded = 0
        for path in self._candidate_paths():
            if self.max_files is not None and yielded >= self.max_files:
                return
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:  # a few stdlib files are deliberately in other encodings
                continue
            if len(text) < self.min_chars:
                continue
            yielded += 1
            yield text


class TextFilesCorpus(Corpus):
    """Local text files matched by one or more glob patterns (`**` matches folders recursively).

    Each file is one document, or with ``split_on`` (a regular expression, e.g. ``"(?m)^(?=chapter )"`` with
    ``(?i)``) several: the pieces between its matches, so a book's chapters are held out by hash like any other
    documents. Files are yielded sorted by path, each once even if several patterns match it.
    """

    def __init__(self, paths: str | list[str], encoding: str = "utf-8", split_on: str | None = None):
        self.patterns = [paths] if isinstance(paths, str) else [str(p) for p in paths]
        if not self.patterns:
            raise ValueError("TextFilesCorpus: paths is empty; give at least one glob pattern")
        self.encoding = encoding
        try:
            self.split_on = None if split_on is None else re.compile(split_on)
        except re.error as exc:
            raise ValueError(f"TextFilesCorpus: split_on={split_on!r} is not a regular expression: {exc}") from exc

    def _matched_paths(self) -> list[Path]:
        matched: set[Path] = set()
        for pattern in self.patterns:
            found = [Path(p).resolve() for p in glob.glob(os.path.expanduser(pattern), recursive=True)]
            files = [p for p in found if p.is_file()]
            if not files:
                folder = pattern.rstrip("/")
                hint = (f"{pattern} is a folder: give its files, e.g. data.corpus.paths='[\"{folder}/*.txt\"]'"
                        if found else f"relative patterns resolve from {os.getcwd()}")
                raise ConfigError(f"data.corpus.paths: no files match the pattern {pattern!r} ({hint})")
            matched.update(files)
        return sorted(matched)

    @property
    def fingerprint(self) -> str:
        stats = _file_stats(self._matched_paths())
        split = None if self.split_on is None else self.split_on.pattern
        return f"TextFilesCorpus({_digest(dict(encoding=self.encoding, split_on=split))}, files={_digest(stats)})"

    def documents(self) -> Iterator[str]:
        paths = self._matched_paths()
        empty = [p for p in paths if p.stat().st_size == 0]
        if len(empty) == len(paths):
            raise ConfigError(f"data.corpus.paths={self.patterns}: every file matched is empty "
                              f"({', '.join(str(p) for p in empty[:3])}{', ...' if len(empty) > 3 else ''})")
        for path in paths:
            if path in empty:
                continue
            try:
                text = path.read_text(encoding=self.encoding)
            except UnicodeDecodeError as exc:
                raise ConfigError(
                    f"data.corpus.paths: {path} is not valid {self.encoding} text (byte 0x{exc.object[exc.start]:02x} "
                    f"at offset {exc.start}); set data.corpus.encoding to its encoding (e.g. latin-1) or leave the "
                    f"file out") from exc
            if self.split_on is None:
                yield text
            else:
                yield from (piece for piece in self.split_on.split(text) if piece.strip())


class HFDatasetCorpus(Corpus):
    """Documents from the `text_field` column of a Hugging Face dataset, loaded with `datasets.load_dataset`.

    `datasets` is imported only when documents are first read. With `streaming=True` (the default) nothing is
    downloaded beyond what is read, and reading stops as soon as the packer has enough rows. When `data_files`
    is a list, each entry is loaded as a dataset of its own, one after the other, so that files whose columns
    differ (the RedPajama sample's sources do) can still be read; a string is passed to `load_dataset` as is.
    Empty documents are skipped. The fingerprint is built from the arguments and the contents of the local files
    read (``data_files``, or the files under a local folder ``path``); pin `revision=` (passed on to `load_dataset`)
    for a cache that cannot go stale when the hub copy changes. Local JSONL, JSON, CSV or parquet files:
    ``HFDatasetCorpus("json", data_files="rows/*.jsonl")`` (``data=dataset_files``).
    """

    def __init__(self, path: str, name: str | None = None, split: str = "train", text_field: str = "text",
                 streaming: bool = True, max_documents: int | None = None,
                 data_files: str | list[str] | None = None, **load_kwargs: Any):
        if max_documents is not None and max_documents < 1:
            raise ValueError(f"HFDatasetCorpus: max_documents must be >= 1 or None, got {max_documents}")
        self.path = path
        self.name = name
        self.split = split
        self.text_field = text_field
        self.streaming = streaming
        self.max_documents = max_documents
        if isinstance(data_files, Mapping):
            data_files = {str(k): v if isinstance(v, str) else list(v) for k, v in data_files.items()}
        elif isinstance(data_files, Sequence) and not isinstance(data_files, str):
            data_files = list(data_files)
        self.data_files = data_files
        self.load_kwargs = dict(load_kwargs)

    @property
    def fingerprint(self) -> str:
        args = dict(path=self.path, name=self.name, split=self.split, text_field=self.text_field,
                    max_documents=self.max_documents, data_files=self.data_files, load_kwargs=self.load_kwargs)
        files = _file_stats(_local_files([self.path, *self._data_file_patterns()]))
        return f"HFDatasetCorpus({self.path}, {_digest(args)}" + (f", files={_digest(files)})" if files else ")")

    def _data_file_patterns(self) -> list[str]:
        """``data_files`` as a list of patterns (a string, a list, or a ``{split: files}`` mapping)."""
        files = self.data_files
        if files is None:
            return []
        if isinstance(files, str):
            return [files]
        if isinstance(files, Mapping):
            return [str(f) for v in files.values() for f in ([v] if isinstance(v, str) else v)]
        return [str(f) for f in files]

    def _load(self, data_files: str | None):
        import datasets  # lazily: the rest of seer.data works without it

        return datasets.load_dataset(self.path, self.name, split=self.split, streaming=self.streaming,
                                     data_files=data_files, **self.load_kwargs)

    def _texts(self, dataset, source: str) -> Iterator[str]:
        columns = dataset.column_names  # None for a stream whose features are not known up front
        if columns is not None and self.text_field not in columns:
            raise KeyError(self._missing_field_message(source, columns))
        for row in dataset:
            if self.text_field not in row:
                raise KeyError(self._missing_field_message(source, list(row)))
            yield row[self.text_field]

    def _missing_field_message(self, source: str, columns: list[str]) -> str:
        return (f"HFDatasetCorpus: the dataset {source} has no text field {self.text_field!r}; "
                f"its columns are {sorted(columns)}. Set text_field to one of them.")

    def documents(self) -> Iterator[str]:
        sources = self.data_files if isinstance(self.data_files, list) else [self.data_files]
        yielded = 0
        for data_files in sources:
            source = f"{self.path!r} (split {self.split!r}" + (f", data_files {data_files!r})" if data_files else ")")
            for text in self._texts(self._load(data_files), source):
                if not text:
                    continue
                yield text
                yielded += 1
                if self.max_documents is not None and yielded >= self.max_documents:
                    return


class MixedCorpus(Corpus):
    """The documents of several corpora taken in turn (one of each, then the next of each, ...); a corpus that runs
    out drops out and the others go on."""

    def __init__(self, corpora: list[Corpus]):
        corpora = list(corpora)
        if not corpora or not all(isinstance(c, Corpus) for c in corpora):
            raise ValueError(f"MixedCorpus: corpora must be a non-empty list of seer.data Corpus objects, got "
                             f"{[type(c).__name__ for c in corpora]}")
        self.corpora = corpora

    @property
    def fingerprint(self) -> str:
        return f"MixedCorpus({_digest([c.fingerprint for c in self.corpora])})"

    def documents(self) -> Iterator[str]:
        streams = [c.documents() for c in self.corpora]
        while streams:
            for stream in list(streams):
                text = next(stream, None)
                if text is None:
                    streams.remove(stream)
                else:
                    yield text


# PG19 on the hub: `deepmind/pg19` is a loading-script dataset (its script downloads the books from Google
# Cloud Storage) and its dataset viewer is disabled, so it has no `refs/convert/parquet` export; datasets >= 4
# refuses to run the script ("Dataset scripts are no longer supported"). `emozilla/pg19` is a parquet copy of
# the same data (splits train / validation / test with 28602 / 50 / 100 books; columns short_book_title,
# publication_date, url, text) that long-context work (YaRN and others) streams with `load_dataset`.
PG19_HUB_ID = "emozilla/pg19"

# RedPajama-Data-1T-Sample: `togethercomputer/RedPajama-Data-1T-Sample` holds a loading script
# (RedPajama-Data-1T-Sample.py) beside eleven JSONL files at the repository root, one per source. datasets >= 4
# refuses any repository that holds a script (even with data_files=), so we read the JSONL files themselves
# through the packaged `json` builder and `hf://` paths: the same data the script served, no code run. The
# files differ in their `meta` columns (the script turned `meta` into a JSON string, and some rows lack it),
# so each file is loaded on its own (see HFDatasetCorpus's data_files). The script lists the files in this order.
REDPAJAMA_SAMPLE_HUB_ID = "togethercomputer/RedPajama-Data-1T-Sample"
REDPAJAMA_SAMPLE_FILES = [
    "arxiv_sample.jsonl", "book_sample.jsonl", "c4_sample.jsonl", "cc_2019-30_sample.jsonl",
    "cc_2020-05_sample.jsonl", "cc_2021-04_sample.jsonl", "cc_2022-05_sample.jsonl", "cc_2023-06_sample.jsonl",
    "github_sample.jsonl", "stackexchange_sample.jsonl", "wikipedia_sample.jsonl",
]


def pg19_corpus(split: str = "train", streaming: bool = True, max_documents: int | None = None,
                **load_kwargs: Any) -> HFDatasetCorpus:
    """PG19 books (one book per document) from the parquet copy on the hub."""
    return HFDatasetCorpus(PG19_HUB_ID, split=split, text_field="text", streaming=streaming,
                           max_documents=max_documents, **load_kwargs)


def redpajama_sample_corpus(files: list[str] | None = None, streaming: bool = True,
                            max_documents: int | None = None, **load_kwargs: Any) -> HFDatasetCorpus:
    """The 1B-token RedPajama-Data-1T sample (SeerAttention's training data), read from its JSONL files.

    `files` picks some of `REDPAJAMA_SAMPLE_FILES` (all by default), read in the order given.
    """
    names = list(REDPAJAMA_SAMPLE_FILES if files is None else files)
    unknown = sorted(set(names) - set(REDPAJAMA_SAMPLE_FILES))
    if unknown:
        raise ValueError(f"redpajama_sample_corpus: unknown files {unknown}; choose from {REDPAJAMA_SAMPLE_FILES}")
    data_files = [f"hf://datasets/{REDPAJAMA_SAMPLE_HUB_ID}/{name}" for name in names]
    return HFDatasetCorpus("json", split="train", text_field="text", streaming=streaming,
                           max_documents=max_documents, data_files=data_files, **load_kwargs)
