"""Tokenizers for the data tests: the tiny one from tests/tiny.py, made to add BOS itself as Llama's does."""

import pytest
from tokenizers import processors

from tests.tiny import tiny_tokenizer


def bos_adding_tokenizer(vocab_size: int = 320):
    """tiny_tokenizer whose encodings start with <s> (id 1), so add_bos=None (auto) means BOS."""
    tokenizer = tiny_tokenizer(vocab_size)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.bos_token_id)])
    return tokenizer


@pytest.fixture(scope="session")
def tok():
    return bos_adding_tokenizer()
