"""Held-out windows and the retrieval cases: lengths, start tokens, where the key and the span are."""

import pytest
import torch

from seer.evaluation.data import HeldOutText, start_token_id
from seer.evaluation.tasks import PASSKEY_INTRO, PASSKEY_NEEDLE, PASSKEY_QUESTION, copy_cases, passkey_cases


def test_windows_start_like_documents_and_follow_the_stream(tokenizer, corpus):
    text = HeldOutText(corpus, tokenizer, split="all", progress=False)
    win = text.windows(64, 3)
    assert win.shape == (3, 64) and (win[:, 0] == start_token_id(tokenizer)).all()
    stream = text.tokens(3 * 63)
    assert torch.equal(win[:, 1:].reshape(-1), stream)
    with pytest.raises(ValueError, match="tokens are needed|are needed"):
        text.tokens(10**7)


def test_val_split_keeps_only_held_out_documents(tokenizer, corpus):
    from seer.data.packing import is_validation_document

    text = HeldOutText(corpus, tokenizer, split="val", val_fraction=0.5, progress=False)
    kept = [d for d in corpus.documents() if is_validation_document(d, 0.5)]
    assert 0 < len(kept) < len(corpus.docs)
    n = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in kept)
    assert len(text.tokens(n)) == n
    with pytest.raises(ValueError):
        text.tokens(n + 1)


@pytest.mark.parametrize("seq_len", [256, 301])
def test_passkey_key_sits_at_its_depth(tokenizer, corpus, seq_len):
    stream = HeldOutText(corpus, tokenizer, split="all", progress=False).tokens(2000)
    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    cases = passkey_cases(tokenizer, stream, 1, seq_len, depths, 10, seed=3)
    assert [c.depth for c in cases] == depths * 2
    keys = {c.key for c in cases}
    assert len(keys) > 5 and all(len(k) == 5 and k.isdigit() for k in keys)
    enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    question, intro = enc(PASSKEY_QUESTION), enc(PASSKEY_INTRO)
    for c in cases:
        ids = c.input_ids.tolist()
        assert len(ids) == seq_len and ids[0] == 1 and ids[1:1 + len(intro)] == intro
        assert ids[-len(question):] == question
        needle = enc(PASSKEY_NEEDLE.format(key=c.key))
        assert ids[c.needle_pos:c.needle_pos + len(needle)] == needle  # the key is where the case says
        room = seq_len - 1 - len(intro) - len(needle) - len(question)  # filler tokens around the needle
        assert abs((c.needle_pos - 1 - len(intro)) / room - c.depth) <= 0.5 / room + 1e-9
    # the same seed gives the same cases, another seed others
    again = passkey_cases(tokenizer, stream, 1, seq_len, depths, 10, seed=3)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(cases, again))
    other = passkey_cases(tokenizer, stream, 1, seq_len, depths, 10, seed=4)
    assert [c.key for c in other] != [c.key for c in cases]


def test_copy_repeat_matches_source(tokenizer, corpus):
    stream = HeldOutText(corpus, tokenizer, split="all", progress=False).tokens(2000)
    cases = copy_cases(tokenizer, stream, 1, 300, 4, span=16, seed=1)
    for c in cases:
        ids = c.input_ids
        assert len(ids) == 300 and ids[0] == 1
        assert torch.equal(ids[c.source_pos:c.source_pos + 16], c.span)
        assert torch.equal(ids[c.repeat_pos:], c.span) and c.repeat_pos == 300 - 16
        assert c.source_pos < 0.3 * 300
    assert not torch.equal(cases[0].span, cases[1].span)
