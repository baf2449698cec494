"""experiments/oracle_pool.py, an experiment wrapper: the oracle's per-row block masses pooled by a power mean over
each query block's rows (p = 1 is the oracle's mean, ``max`` the largest row's), checked against a float64 loop."""

import pytest
import torch

from seer.kernels import reference
from seer.sparsity import selectors


@pytest.fixture
def pool(experiment, monkeypatch):
    module = experiment("oracle_pool")
    monkeypatch.setattr(selectors.Oracle, "scores", selectors.Oracle.scores)  # restored after each test
    return module


def naive(q, k, block, scale, power, first=1.0):
    """The definition, one row at a time, in float64."""
    b, hq, n, _ = q.shape
    g = hq // k.shape[1]
    nb = -(-n // block)
    out = torch.zeros(b, hq, nb, nb, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            rows = []
            for r in range(n):
                p = torch.softmax(q[bi, h, r].double() @ k[bi, h // g, :r + 1].double().T * scale, -1)
                m = torch.zeros(nb, dtype=torch.float64)
                m.index_add_(0, torch.arange(r + 1) // block, p)
                rows.append(m)
            rows = torch.stack(rows)
            for i in range(nb):
                part = rows[i * block:(i + 1) * block]
                w = torch.ones(len(part), dtype=torch.float64)
                w[0] = first
                out[bi, h, i] = part.amax(0) if power == float("inf") else \
                    (part.pow(power) * w[:, None]).sum(0).div(w.sum()).pow(1 / power)
    return out


@pytest.mark.parametrize("power, first", [(1.0, 1.0), (2.0, 1.0), (float("inf"), 1.0), (1.0, 4.0), (2.0, 0.5)])
def test_pooled_mass_is_the_power_mean_of_the_rows_masses(pool, power, first):
    g = torch.Generator().manual_seed(11)
    q = torch.randn(1, 4, 37, 16, generator=g) * 2  # a short last block (37 = 4 x 8 + 5)
    k = torch.randn(1, 2, 37, 16, generator=g) * 2
    got = pool.pooled_mass(q, k, 8, 0.25, power, first)
    want = naive(q, k, 8, 0.25, power, first)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    if first != 1.0:
        return
    if power == 1.0:  # the oracle's own masses
        torch.testing.assert_close(got, reference.block_attn_mass(q, k, 8, sm_scale=0.25), rtol=1e-5, atol=1e-6)
    if power > 1:  # a power mean is at least the mean, and strictly above it somewhere
        mean = reference.block_attn_mass(q, k, 8, sm_scale=0.25)
        assert (got >= mean - 1e-6).all() and (got > mean + 1e-4).any()


def test_the_setting_is_read_and_bad_ones_refused(pool, monkeypatch):
    monkeypatch.setenv("SEER_ORACLE_POOL", "max")
    assert pool.pool_setting() == (float("inf"), 1.0)
    monkeypatch.setenv("SEER_ORACLE_POOL", "3")
    assert pool.pool_setting() == (3.0, 1.0)
    monkeypatch.setenv("SEER_ORACLE_POOL", "first:4")
    assert pool.pool_setting() == (1.0, 4.0)
    for bad in ("0.5", "two", "nan", "first:0", "first:x", "first:inf"):
        monkeypatch.setenv("SEER_ORACLE_POOL", bad)
        with pytest.raises(ValueError, match="SEER_ORACLE_POOL"):
            pool.pool_setting()


def test_the_wrapper_swaps_the_oracles_scores(pool, monkeypatch):
    monkeypatch.setenv("SEER_ORACLE_POOL", "max")
    monkeypatch.setattr(pool, "run_command", lambda argv: None)
    pool.main(["-m", "seer.eval"])
    g = torch.Generator().manual_seed(5)
    x = selectors.LayerInputs(q=torch.randn(1, 2, 32, 8, generator=g), k=torch.randn(1, 1, 32, 8, generator=g),
                              block_size=8, scale=0.3)
    want = selectors.log_mass(pool.pooled_mass(x.q, x.k, 8, x.scale, float("inf"), 1.0))
    torch.testing.assert_close(selectors.Oracle().scores(x), want)
