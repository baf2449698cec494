"""Corpora: deterministic documents, stable fingerprints, clear errors; the HF corpus runs on an in-memory dataset."""

import os
import sysconfig
import time

import pytest

from seer.checks import ConfigError
from seer.data.corpora import (REDPAJAMA_SAMPLE_FILES, HFDatasetCorpus, StdlibCorpus, TextFilesCorpus,
                               pg19_corpus, redpajama_sample_corpus)


def test_stdlib_corpus_reads_stdlib_sources_deterministically():
    corpus = StdlibCorpus(max_files=4, min_chars=1000)
    first, second = list(corpus.documents()), list(corpus.documents())
    assert len(first) == 4 and first == second
    assert all(len(text) >= 1000 for text in first)
    assert corpus.fingerprint == StdlibCorpus(max_files=4, min_chars=1000).fingerprint


def test_stdlib_corpus_skips_site_packages_and_tests_unless_asked():
    root = sysconfig.get_paths()["stdlib"]
    paths = StdlibCorpus()._candidate_paths()
    relative = [os.path.relpath(p, root).split(os.sep) for p in paths]
    assert paths and all(str(p).endswith(".py") for p in paths)
    assert not any({"site-packages", "dist-packages", "test", "tests"} & set(parts) for parts in relative)
    with_tests = StdlibCorpus(include_tests=True)._candidate_paths()
    assert len(with_tests) > len(paths)
    assert StdlibCorpus(include_tests=True).fingerprint != StdlibCorpus().fingerprint


def test_stdlib_corpus_seed_shuffles_the_file_order():
    in_order = list(StdlibCorpus(max_files=3).documents())
    shuffled = list(StdlibCorpus(max_files=3, seed=1).documents())
    assert shuffled == list(StdlibCorpus(max_files=3, seed=1).documents())
    assert shuffled != in_order
    assert StdlibCorpus(seed=1).fingerprint != StdlibCorpus(seed=2).fingerprint


def test_stdlib_corpus_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_files"):
        StdlibCorpus(max_files=0)


def test_text_files_corpus_globs_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "deep").mkdir()
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b" / "deep" / "c.txt").write_text("gamma")
    (tmp_path / "b" / "b.txt").write_text("beta")
    (tmp_path / "skip.md").write_text("not matched")
    corpus = TextFilesCorpus([str(tmp_path / "**" / "*.txt"), str(tmp_path / "a.txt")])
    assert list(corpus.documents()) == ["alpha", "beta", "gamma"]  # a.txt matched twice, read once


def test_text_files_corpus_fingerprint_follows_file_changes(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("one")
    corpus = TextFilesCorpus(str(tmp_path / "*.txt"))
    before = corpus.fingerprint
    assert corpus.fingerprint == before
    path.write_text("one, edited")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert corpus.fingerprint != before


def test_text_files_corpus_names_a_file_in_another_encoding(tmp_path):
    (tmp_path / "a.txt").write_text("fine")
    (tmp_path / "b.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"b.txt is not valid utf-8 text \(byte 0xe9 at offset 3\); set "
                                          r"data.corpus.encoding"):
        list(TextFilesCorpus(str(tmp_path / "*.txt")).documents())
    assert list(TextFilesCorpus(str(tmp_path / "*.txt"), encoding="latin-1").documents())[1] == "caf\xe9 au lait"


def test_text_files_corpus_names_the_pattern_that_matches_nothing(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    missing = str(tmp_path / "nothing" / "*.txt")
    with pytest.raises(ConfigError, match="data.corpus.paths: no files match the pattern .*nothing"):
        list(TextFilesCorpus([str(tmp_path / "*.txt"), missing]).documents())
    with pytest.raises(ConfigError, match=f"{tmp_path} is a folder: give its files, e.g. "
                                          f"data.corpus.paths='\\[\"{tmp_path}/\\*.txt\"\\]'"):
        list(TextFilesCorpus(str(tmp_path)).documents())


def test_text_files_that_are_all_empty_are_named(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ConfigError, match=f"every file matched is empty \\({tmp_path / 'empty.txt'}\\)"):
        list(TextFilesCorpus(str(tmp_path / "*.txt")).documents())
    (tmp_path / "full.txt").write_text("text")
    assert list(TextFilesCorpus(str(tmp_path / "*.txt")).documents()) == ["text"]


def _edit_keeping_size_and_mtime(path, text):
    stat = path.stat()
    path.write_text(text)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_fingerprints_follow_the_contents_of_local_files(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "first row"}\n')
    (tmp_path / "a.txt").write_text("alpha")
    jsonl = HFDatasetCorpus("json", data_files=str(tmp_path / "*.jsonl"))
    text = TextFilesCorpus(str(tmp_path / "*.txt"))
    before = jsonl.fingerprint, text.fingerprint
    _edit_keeping_size_and_mtime(rows, '{"text": "other row"}\n')
    _edit_keeping_size_and_mtime(tmp_path / "a.txt", "gamma")
    assert jsonl.fingerprint != before[0] and text.fingerprint != before[1]
    assert list(jsonl.documents()) == ["other row"]


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace datasets.load_dataset with in-memory datasets; records the calls."""
    datasets = pytest.importorskip("datasets")  # the optional hub loader (a training extra)
    calls = []
    tables = {
        None: {"text": ["first", "", "second", "third"], "title": ["a", "b", "c", "d"]},
        "one.jsonl": {"text": ["from one"], "meta": ["{}"]},
        "two.jsonl": {"text": ["from two", "again two"], "source": ["x", "y"]},
    }

    def load_dataset(path, name=None, split=None, streaming=False, data_files=None, **kwargs):
        calls.append(dict(path=path, name=name, split=split, streaming=streaming, data_files=data_files, **kwargs))
        dataset = datasets.Dataset.from_dict(tables[data_files])
        return dataset.to_iterable_dataset() if streaming else dataset

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hf_corpus_yields_the_text_field_and_skips_empty_documents(fake_hub):
    corpus = HFDatasetCorpus("some/dataset", name="cfg", split="train", revision="abc")
    assert list(corpus.documents()) == ["first", "second", "third"]
    assert fake_hub[0] == dict(path="some/dataset", name="cfg", split="train", streaming=True, data_files=None,
                               revision="abc")
    assert list(HFDatasetCorpus("some/dataset", max_documents=2).documents()) == ["first", "second"]
    assert list(HFDatasetCorpus("some/dataset", text_field="title", streaming=False).documents()) == list("abcd")


def test_hf_corpus_names_a_missing_text_field_and_the_columns(fake_hub):
    for streaming in (True, False):
        with pytest.raises(KeyError, match=r"'body'.*\['text', 'title'\]"):
            list(HFDatasetCorpus("some/dataset", text_field="body", streaming=streaming).documents())


def test_hf_corpus_loads_each_listed_data_file_on_its_own(fake_hub):
    corpus = HFDatasetCorpus("json", data_files=["one.jsonl", "two.jsonl"])
    assert list(corpus.documents()) == ["from one", "from two", "again two"]
    assert [call["data_files"] for call in fake_hub] == ["one.jsonl", "two.jsonl"]


def test_hf_corpus_fingerprint_depends_on_what_is_read():
    base = HFDatasetCorpus("some/dataset")
    assert base.fingerprint == HFDatasetCorpus("some/dataset").fingerprint
    assert base.fingerprint == HFDatasetCorpus("some/dataset", streaming=False).fingerprint  # same documents
    for other in (HFDatasetCorpus("some/dataset", split="test"), HFDatasetCorpus("some/dataset", max_documents=3),
                  HFDatasetCorpus("some/dataset", revision="abc"), HFDatasetCorpus("other/dataset")):
        assert other.fingerprint != base.fingerprint


def test_presets_point_at_script_free_hub_sources(fake_hub):
    pg19 = pg19_corpus(split="test")
    assert (pg19.path, pg19.split, pg19.text_field) == ("emozilla/pg19", "test", "text")
    sample = redpajama_sample_corpus()
    assert sample.path == "json" and len(sample.data_files) == len(REDPAJAMA_SAMPLE_FILES)
    assert all(f.startswith("hf://datasets/togethercomputer/RedPajama-Data-1T-Sample/") for f in sample.data_files)
    assert redpajama_sample_corpus(files=["c4_sample.jsonl"]).data_files == [
        "hf://datasets/togethercomputer/RedPajama-Data-1T-Sample/c4_sample.jsonl"]
    with pytest.raises(ValueError, match="nope.jsonl"):
        redpajama_sample_corpus(files=["nope.jsonl"])
    assert not fake_hub  # building a corpus touches no network


def test_text_files_split_into_chapters_and_bad_encoding_named(tmp_path):
    (tmp_path / "book.txt").write_text("Title\n\nCHAPTER I\n\nOne.\n\nChapter 2\n\nTwo.\n")
    corpus = TextFilesCorpus(str(tmp_path / "*.txt"), split_on="(?im)^(?=chapter [0-9ivxlc]+)")
    assert list(corpus.documents()) == ["Title\n\n", "CHAPTER I\n\nOne.\n\n", "Chapter 2\n\nTwo.\n"]
    assert corpus.fingerprint != TextFilesCorpus(str(tmp_path / "*.txt")).fingerprint
    with pytest.raises(ValueError, match=r"split_on='\(' is not a regular expression"):
        TextFilesCorpus("x", split_on="(")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt is not valid utf-8 text"):
        list(TextFilesCorpus(str(tmp_path / "latin1.txt")).documents())
