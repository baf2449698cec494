"""experiments/rerank_rows.py, an experiment wrapper: the rerank's sampled rows drawn by a seed (distinct, in the
block, the same on every call), and the reference rerank then averages exactly those rows' masses."""

import pytest
import torch

from seer.kernels import reference


@pytest.fixture
def rows(experiment, monkeypatch):
    module = experiment("rerank_rows")
    monkeypatch.setattr(reference, "sampled_offsets", reference.sampled_offsets)  # restored after each test
    return module


def test_offsets_are_distinct_in_the_block_and_fixed_by_the_seed(rows, monkeypatch):
    monkeypatch.setenv("SEER_RERANK_ROWS_SEED", "1")
    got = rows.random_offsets(64, 16)
    assert got == sorted(set(got)) and len(got) == 16 and 0 <= got[0] and got[-1] < 64
    assert rows.random_offsets(64, 16) == got
    assert rows.random_offsets(8, 16) == list(range(8))
    monkeypatch.setenv("SEER_RERANK_ROWS_SEED", "2")
    assert rows.random_offsets(64, 16) != got
    for bad in ("", "x", "1.5"):
        monkeypatch.setenv("SEER_RERANK_ROWS_SEED", bad)
        with pytest.raises(ValueError, match="SEER_RERANK_ROWS_SEED"):
            rows.seed_setting()


def test_the_rerank_averages_the_drawn_rows(rows, monkeypatch):
    monkeypatch.setenv("SEER_RERANK_ROWS_SEED", "3")
    monkeypatch.setattr(rows, "run_command", lambda argv: None)
    rows.main(["-m", "seer.eval"])
    g = torch.Generator().manual_seed(7)
    block, nb = 8, 4
    q = torch.randn(1, 2, block * nb, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, block * nb, 8, generator=g, dtype=torch.float64)
    everything = torch.ones(nb, nb, dtype=torch.bool).tril().expand(1, 2, nb, nb)
    got = reference.sampled_rows_mass(q, k, everything, 3, block, 0.5)
    picked = rows.random_offsets(block, 3)
    for h in range(2):
        for i in range(nb):
            want = torch.zeros(nb, dtype=torch.float64)
            for o in picked:
                r = i * block + o
                p = torch.softmax(q[0, h, r] @ k[0, 0, :r + 1].T * 0.5, -1)
                want.index_add_(0, torch.arange(r + 1) // block, p / len(picked))
            torch.testing.assert_close(got[0, h, i].double(), want, rtol=1e-5, atol=1e-6)
