"""A tiny random Llama, a tokenizer built in code and a little held-out text, shared by the evaluation tests."""

import pytest
import torch

from seer.data.corpora import Corpus
from tests.tiny import tiny_model, tiny_tokenizer

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon "
         "phi chi psi omega def return class import print").split()


class ListCorpus(Corpus):
    """Documents given in a list (a corpus for tests)."""

    def __init__(self, docs):
        self.docs = list(docs)

    @property
    def fingerprint(self) -> str:
        return f"ListCorpus({hash(tuple(self.docs))})"

    def documents(self):
        yield from self.docs


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def corpus():
    gen = torch.Generator().manual_seed(0)
    docs = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (400,), generator=gen).tolist())
            for _ in range(12)]
    return ListCorpus(docs)


@pytest.fixture
def model():
    return tiny_model("llama", seed=0, max_position_embeddings=4096)
