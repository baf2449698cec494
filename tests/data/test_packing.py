"""Packing: exact row lengths, BOS at row starts, EOS after each document, a split by document, early stop."""

import itertools

import pytest
import torch

from seer.data.packing import (document_positions, is_validation_document, pack_documents, resolve_add_bos,
                               tokenizer_fingerprint)
from tests.data.conftest import bos_adding_tokenizer
from tests.tiny import tiny_tokenizer

BOS, EOS = 1, 2


def make_documents(count: int) -> list[str]:
    return [f"def f{i}(x):\n    return x + {i} * {i}\n" * (1 + i % 3) for i in range(count)]


def expected_stream(tok, documents, val_fraction, want_val):
    stream = []
    for text in documents:
        if is_validation_document(text, val_fraction) == want_val:
            stream += tok(text, add_special_tokens=False)["input_ids"] + [EOS]
    return stream


@pytest.mark.parametrize("add_bos", [True, False])
def test_rows_are_the_documents_joined_with_eos_and_cut_to_seq_len(tok, add_bos):
    documents, seq_len, val_fraction = make_documents(60), 33, 0.2
    rows = pack_documents(documents, tok, seq_len=seq_len, train_sequences=10, val_sequences=3,
                          val_fraction=val_fraction, add_bos=add_bos)
    assert rows.train.shape == (10, seq_len) and rows.val.shape == (3, seq_len)
    for split, want_val in ((rows.train, False), (rows.val, True)):
        if add_bos:
            assert (split[:, 0] == BOS).all()
            body = split[:, 1:].flatten().tolist()
        else:
            body = split.flatten().tolist()
        assert BOS not in body
        assert body == expected_stream(tok, documents, val_fraction, want_val)[:len(body)]
        assert EOS in body


def test_decoded_rows_show_eos_between_documents(tok):
    documents = ["x = 1\n", "y = 2\n", "z = 3\n", "w = 4\n"]
    rows = pack_documents(documents, tok, seq_len=9, train_sequences=2, val_sequences=0, val_fraction=0.0,
                          add_bos=True)
    assert [tok.decode(row).startswith("<s>") for row in rows.train.tolist()] == [True, True]
    text = tok.decode(rows.train[:, 1:].flatten().tolist())
    assert text.startswith("x = 1\n</s>y = 2\n</s>")


def test_no_document_is_in_both_splits(tok):
    documents = make_documents(200)
    val_docs = [text for text in documents if is_validation_document(text, 0.3)]
    assert 0 < len(val_docs) < len(documents)
    assert is_validation_document(documents[0], 0.0) is False
    # packing with each split alone gives the same rows: a document's split never depends on the others
    both = pack_documents(documents, tok, seq_len=16, train_sequences=8, val_sequences=8, val_fraction=0.3,
                          add_bos=False)
    val_stream = [t for text in val_docs for t in tok(text, add_special_tokens=False)["input_ids"] + [EOS]]
    assert both.val.flatten().tolist() == val_stream[:both.val.numel()]
    assert EOS in both.val.flatten().tolist()


def test_packing_is_deterministic(tok):
    documents = make_documents(40)
    first = pack_documents(documents, tok, 20, 6, 2, 0.25, True)
    second = pack_documents(list(documents), tok, 20, 6, 2, 0.25, True)
    assert (first.train == second.train).all() and (first.val == second.val).all()


def test_reading_stops_once_the_rows_are_built(tok):
    read = []

    def endless():
        for i in itertools.count():
            read.append(i)
            yield f"value_{i} = {i}\n"

    rows = pack_documents(endless(), tok, seq_len=16, train_sequences=4, val_sequences=1, val_fraction=0.1,
                          add_bos=True)
    assert rows.train.shape == (4, 16)
    assert len(read) < 1000


def test_too_small_a_corpus_names_the_numbers(tok):
    with pytest.raises(ValueError, match=r"after 3 documents.*of 50 training rows.*of 0 validation rows.*seq_len=64"):
        pack_documents(["a = 1\n", "b = 2\n", "c = 3\n"], tok, seq_len=64, train_sequences=50, val_sequences=0,
                       val_fraction=0.0, add_bos=True)


def test_a_corpus_of_one_document_says_how_to_hold_some_out(tok):
    from seer.checks import ConfigError

    book = "def f(x):\n    return x + 1\n" * 400
    with pytest.raises(ConfigError, match=r"data: the corpus ran out after 1 documents.*Too few documents to hold "
                                          r"one out.*data.corpus.split_on"):
        pack_documents([book], tok, seq_len=64, train_sequences=2, val_sequences=1, val_fraction=0.05, add_bos=True)


def test_add_bos_auto_follows_the_tokenizer(tok):
    assert tok("x")["input_ids"][0] == BOS
    assert resolve_add_bos(tok, None) is True
    assert resolve_add_bos(tok, False) is False
    has_bos_but_does_not_add_it = tiny_tokenizer()  # like SmolLM2, whose BOS is a chat marker
    assert resolve_add_bos(has_bos_but_does_not_add_it, None) is False
    assert resolve_add_bos(has_bos_but_does_not_add_it, True) is True
    no_bos = tiny_tokenizer()
    no_bos.bos_token = None
    assert resolve_add_bos(no_bos, None) is False
    with pytest.raises(ValueError, match="no BOS"):
        resolve_add_bos(no_bos, True)


def test_tokenizer_fingerprint_tells_vocabularies_apart(tok):
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(bos_adding_tokenizer())
    assert tokenizer_fingerprint(tok) != tokenizer_fingerprint(bos_adding_tokenizer(vocab_size=300))


def test_documents_packing_keeps_the_concat_rows_and_marks_where_documents_start(tok):
    documents = make_documents(40)
    args = dict(seq_len=33, train_sequences=6, val_sequences=0, val_fraction=0.0, add_bos=False)
    concat = pack_documents(documents, tok, **args)
    kept = pack_documents(documents, tok, packing="documents", **args)
    assert concat.train_starts is None and torch.equal(kept.train, concat.train)  # without BOS: the same stream
    after_eos = torch.cat([torch.ones(6, 1, dtype=torch.bool), kept.train[:, :-1] == EOS], dim=1)
    assert torch.equal(kept.train_starts, after_eos)
    assert document_positions(torch.tensor([True, False, False, True, True, False])).tolist() == [0, 1, 2, 0, 0, 1]


def test_documents_packing_starts_each_piece_with_bos(tok):
    documents = ["x = 1\n", "y = 2\n" * 5, "z = 3\n"]
    rows = pack_documents(documents, tok, seq_len=9, train_sequences=3, val_sequences=0, val_fraction=0.0,
                          add_bos=True, packing="documents")
    starts = rows.train_starts
    assert (rows.train[starts] == BOS).all() and (rows.train[~starts] != BOS).all()
    assert starts[:, 0].all()
    with pytest.raises(ValueError, match="packing='rows'"):
        pack_documents(documents, tok, seq_len=9, train_sequences=1, val_sequences=0, val_fraction=0.0,
                       add_bos=True, packing="rows")
