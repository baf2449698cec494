"""experiments/rerank_mix.py, an experiment wrapper: the rerank's masses mixed with the proposal's probabilities on the
candidates (renormalised), the plain rerank at mix 0, the proposal alone at mix 1, and the wrapper's swap."""

import pytest
import torch

from seer.kernels import reference
from seer.sparsity import selectors


@pytest.fixture
def mix(experiment, monkeypatch):
    rerank_mix = experiment("rerank_mix")
    monkeypatch.setattr(selectors, "sampled_rows_mass", selectors.sampled_rows_mass)  # restored after each test
    monkeypatch.setattr(selectors, "top_p_candidates", selectors.top_p_candidates)
    return rerank_mix


def _inputs(seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    nb, bs = 5, 16
    q = torch.randn(1, 4, nb * bs, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, nb * bs, 16, generator=g, dtype=torch.float64)
    logits = torch.randn(1, 4, nb, nb, generator=g, dtype=torch.float64)
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    proposal = torch.log_softmax(logits.masked_fill(~causal, float("-inf")), -1)
    return selectors.LayerInputs(q, k, bs, 0.25), proposal


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_the_mix_is_the_convex_combination_on_the_candidates(mix, weight):
    x, proposal = _inputs()
    cand = selectors.top_p_candidates(proposal, 0.8)
    mass = reference.sampled_rows_mass(x.q, x.k, cand, 4, x.block_size, x.scale)
    got = mix.mixed_masses(mass, proposal, cand, weight)
    p = proposal.exp() * cand
    want = torch.zeros_like(mass)
    for h in range(4):  # by hand, row by row
        for i in range(5):
            row_p = p[0, h, i] / p[0, h, i].sum()
            want[0, h, i] = (1 - weight) * mass[0, h, i] + weight * row_p
    torch.testing.assert_close(got, want.to(got.dtype))
    assert torch.all(got[~cand] == 0)
    torch.testing.assert_close(got.sum(-1), torch.ones(1, 4, 5, dtype=got.dtype))  # rows of masses stay masses
    if weight == 0.0:
        torch.testing.assert_close(got, mass)


def test_the_wrapper_mixes_what_the_last_top_p_call_proposed(mix, monkeypatch, tmp_path):
    monkeypatch.setenv("SEER_RERANK_MIX", "0.4")
    script = tmp_path / "probe.py"
    script.write_text("from seer.sparsity import selectors\n"
                      "print(selectors.sampled_rows_mass.__name__, selectors.top_p_candidates.__name__)\n")
    monkeypatch.setattr("sys.argv", ["x"])
    mix.main([str(script)])
    assert mix.MIX == 0.4
    assert selectors.sampled_rows_mass is mix.mixed_sampled_rows_mass
    x, proposal = _inputs(7)
    cand = selectors.top_p_candidates(proposal, 0.9)  # through the module, as the gate and the selector call it
    got = selectors.sampled_rows_mass(x, cand, 4)
    mass = reference.sampled_rows_mass(x.q, x.k, cand, 4, x.block_size, x.scale)
    torch.testing.assert_close(got, mix.mixed_masses(mass, proposal, cand, 0.4))
    with pytest.raises(RuntimeError, match="no proposal"):  # each proposal serves one rerank
        selectors.sampled_rows_mass(x, cand, 4)


@pytest.mark.parametrize("raw", ["x", "1.5", "-0.1"])
def test_a_bad_mix_is_refused_by_name(mix, monkeypatch, raw):
    monkeypatch.setenv("SEER_RERANK_MIX", raw)
    with pytest.raises(SystemExit, match="SEER_RERANK_MIX"):
        mix.mix_weight()
