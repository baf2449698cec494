"""experiments/decode_estimates.py: the per-layer proxies on random tensors (the oracle keeps the most mass, a budget
of every block is exact) and its arguments."""

from __future__ import annotations


import pytest
import torch


@pytest.fixture
def study(experiment):
    return experiment("decode_estimates")


def _layer(seed: int, hq: int = 4, hkv: int = 2, n: int = 150, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(hq, 6, d, generator=g) * 2, torch.randn(hkv, n, d, generator=g) * 2,
            torch.randn(hkv, n, d, generator=g))


def test_the_oracle_keeps_the_most_mass_and_every_block_is_exact(study):
    query, key, value = _layer(0)
    rows = study.layer_rows(query, key, value, budget=48, block_size=16, reranks=[4], sm_scale=0.4)
    assert set(rows) == {f"{e}{r}" for e in study.ESTIMATES for r in ("", "+rerank4")}
    for name, (mass, error) in rows.items():
        assert 0 < mass <= rows["oracle"][0] + 1e-6 and 0 < error < float("inf"), name
    assert rows["quest"] != rows["moments"]
    whole = study.layer_rows(query, key, value, budget=160, block_size=16, reranks=[10], sm_scale=0.4)
    for name, (mass, error) in whole.items():
        assert mass == pytest.approx(1.0, abs=1e-5) and error < 1e-5, name


def test_arguments(study):
    base = ["--model-dir", "/m", "--eval-novel", "e"]
    assert study.parse_args(base).rerank_blocks == [16]
    for bad in (["--queries", "0"], ["--queries", "9000"], ["--budget", "32"], ["--rerank-blocks", "2"]):
        with pytest.raises((SystemExit, ValueError)):
            study.parse_args([*base, *bad])
