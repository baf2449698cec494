"""PackedTextDataModule: argument checks, batches, seeded shuffling, and the token cache."""

import pytest
import torch

from seer.data import PackedTextDataModule, StdlibCorpus, TextFilesCorpus
from tests.data.conftest import bos_adding_tokenizer


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(40):
        (folder / f"doc{i:02d}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 3)
    return TextFilesCorpus(str(folder / "*.py"))


def make(corpus, tok, **overrides):
    kwargs = dict(seq_len=32, batch_size=4, train_sequences=10, val_sequences=2, val_fraction=0.2)
    return PackedTextDataModule(corpus, tokenizer=tok, **{**kwargs, **overrides})


@pytest.mark.parametrize("bad, message", [
    (dict(seq_len=1), "seq_len must be >= 2, got 1"),
    (dict(batch_size=0), "batch_size must be >= 1, got 0"),
    (dict(train_sequences=0), "train_sequences must be >= 1, got 0"),
    (dict(val_sequences=-1), "val_sequences must be >= 0, got -1"),
    (dict(val_fraction=1.0), r"val_fraction must be in \[0, 1\), got 1.0"),
    (dict(val_fraction=-0.1), r"val_fraction must be in \[0, 1\), got -0.1"),
    (dict(val_fraction=0.0), "val_sequences=2 needs val_fraction > 0"),
    (dict(num_workers=-1), "num_workers must be >= 0, got -1"),
    (dict(add_bos="yes"), "add_bos must be"),
    (dict(packing="rows"), "packing must be one of .'concat', 'documents'., got 'rows'"),
])
def test_bad_arguments_fail_early_naming_the_value(corpus, tok, bad, message):
    with pytest.raises(ValueError, match=message):
        make(corpus, tok, **bad)


def test_corpus_must_be_a_corpus(tok):
    with pytest.raises(TypeError, match="corpus"):
        PackedTextDataModule({"_target_": "seer.data.StdlibCorpus"}, tokenizer=tok)


def test_setup_without_tokenizer_says_how_to_give_one(corpus):
    with pytest.raises(ValueError, match="tokenizer"):
        make(corpus, None).setup()


def test_batches_have_the_promised_shape_and_bos(corpus, tok):
    dm = make(corpus, tok)
    dm.setup("fit")
    train = list(dm.train_dataloader())
    assert dm.num_train_rows == 10 and dm.num_train_batches == len(train) == 3
    batch = train[0]
    assert set(batch) == {"input_ids"}
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (4, 32)
    assert sum(len(b["input_ids"]) for b in train) == 10
    assert all((b["input_ids"][:, 0] == tok.bos_token_id).all() for b in train)
    val = list(dm.val_dataloader())
    assert torch.cat([b["input_ids"] for b in val]).shape == (2, 32)


def test_train_shuffle_is_seeded_and_validation_keeps_its_order(corpus, tok):
    def epoch(dm):
        return torch.cat([b["input_ids"] for b in dm.train_dataloader()])

    first, second, other_seed = make(corpus, tok), make(corpus, tok), make(corpus, tok, seed=1)
    for dm in (first, second, other_seed):
        dm.setup()
    assert torch.equal(epoch(first), epoch(second))
    assert not torch.equal(epoch(first), epoch(other_seed))
    assert not torch.equal(epoch(first), first.rows.train.long())  # shuffled
    assert torch.equal(torch.cat([b["input_ids"] for b in first.val_dataloader()]), first.rows.val.long())


def test_dataloaders_need_setup(corpus, tok):
    with pytest.raises(RuntimeError, match="setup"):
        make(corpus, tok).train_dataloader()


def test_second_setup_loads_from_the_cache_without_tokenising(corpus, tok, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    built = make(corpus, tok, cache_dir=cache_dir)
    built.setup()
    files = list(cache_dir.iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"  # no temporary file left behind

    encode = type(tok).__call__

    def no_tokenising(self, text, *args, **kwargs):
        if isinstance(text, list):  # documents are tokenised in batches; a single probe for BOS is fine
            raise AssertionError("tokenised although the rows were cached")
        return encode(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tok), "__call__", no_tokenising)
    cached = make(corpus, tok, cache_dir=cache_dir)
    cached.setup()
    assert torch.equal(cached.rows.train, built.rows.train) and torch.equal(cached.rows.val, built.rows.val)
    with pytest.raises(AssertionError, match="tokenised"):  # another setting is another key: it must tokenise
        make(corpus, tok, cache_dir=cache_dir, seq_len=16).setup()


def test_cache_key_changes_with_every_setting_the_rows_depend_on(corpus, tok):
    base = make(corpus, tok).packing_settings()
    for change in (dict(seq_len=16), dict(train_sequences=11), dict(val_sequences=3), dict(val_fraction=0.3),
                   dict(add_bos=False)):
        assert make(corpus, tok, **change).packing_settings() != base
    assert make(corpus, bos_adding_tokenizer(vocab_size=300)).packing_settings() != base
    assert make(StdlibCorpus(max_files=3), tok).packing_settings() != base
    assert make(corpus, tok, seed=5, batch_size=1).packing_settings() == base  # loader-only settings


def test_stdlib_default_corpus_packs(tok):
    dm = PackedTextDataModule(StdlibCorpus(max_files=20, seed=0), tokenizer=tok, seq_len=256, train_sequences=8,
                              val_sequences=1, val_fraction=0.1)
    dm.setup()
    assert dm.rows.train.shape == (8, 256) and dm.rows.val.shape == (1, 256)


def test_documents_packing_gives_position_ids_restarting_at_each_document_and_caches_them(corpus, tok, tmp_path):
    concat = make(corpus, tok, cache_dir=tmp_path / "cache")
    concat.setup()
    dm = make(corpus, tok, cache_dir=tmp_path / "cache", packing="documents")
    assert "packing" not in concat.packing_settings() and dm.packing_settings()["packing"] == "documents"
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    ids, positions = batch["input_ids"], batch["position_ids"]
    assert positions.shape == ids.shape and (positions[:, 0] == 0).all()
    starts = positions == 0
    assert (ids[starts] == tok.bos_token_id).all()  # every document (piece) starts with BOS
    after_eos = torch.zeros_like(starts)
    after_eos[:, 1:] = ids[:, :-1] == tok.eos_token_id
    assert (starts[:, 1:] == after_eos[:, 1:]).all()  # a document starts right after the last one's EOS
    assert len(list((tmp_path / "cache").iterdir())) == 2
    again = make(corpus, tok, cache_dir=tmp_path / "cache", packing="documents")
    again.setup()
    assert torch.equal(again.rows.val_starts, dm.rows.val_starts)
    assert "position_ids" not in next(iter(concat.val_dataloader()))
