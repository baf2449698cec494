"""experiments/output_oracle.py, an analysis script: its block scores equal their definitions (a float64 loop), its
selection keeps the right number of causal blocks with the diagonal, and a density covering every block gives the
dense output."""

import pytest
import torch


@pytest.fixture
def study(experiment):
    return experiment("output_oracle")


def _attention(h, n, d, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(h, n, n, generator=gen, dtype=torch.float64) * 2
    logits = logits.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(logits, -1), torch.randn(h, n, d, generator=gen, dtype=torch.float64)


def test_block_scores_match_their_definitions(study):
    h, n, d, block = 2, 24, 5, 4
    p, v = _attention(h, n, d, seed=1)
    o = p @ v
    got = {scorer: study.block_score(scorer, p, v, o, block) for scorer in study.SCORERS}
    nb = n // block
    for head in range(h):
        for i in range(nb):
            for j in range(nb):
                mass, change = 0.0, 0.0
                for t in range(i * block, (i + 1) * block):
                    cols = range(j * block, (j + 1) * block)
                    p_tj = sum(p[head, t, s].item() for s in cols)
                    u = sum(p[head, t, s] * v[head, s] for s in cols)
                    mass += p_tj / block
                    change += (p_tj * o[head, t] - u).norm().item() / block
                assert got["mass"][head, i, j].item() == pytest.approx(mass, abs=1e-12)
                assert got["output"][head, i, j].item() == pytest.approx(change, abs=1e-12)


@pytest.mark.parametrize("density", [0.05, 0.3, 1.0])
def test_selection_keeps_the_diagonal_and_the_row_budget(study, density):
    h, nb = 3, 9
    scores = torch.rand(h, nb, nb, generator=torch.Generator().manual_seed(2))
    kept = study.keep_blocks(scores, density)
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    assert not (kept & ~causal).any()
    assert kept[:, torch.arange(nb), torch.arange(nb)].all()
    for i in range(nb):
        want = max(1, -(-int(round(density * (i + 1) * 1000)) // 1000))  # ceil without float noise at these sizes
        assert (kept[:, i].sum(-1) == want).all()
        others = list(range(i))
        for head in range(h):  # the kept off-diagonal blocks are the best-scored ones
            picked = [j for j in others if kept[head, i, j]]
            dropped = [j for j in others if not kept[head, i, j]]
            if picked and dropped:
                assert min(scores[head, i, picked]) >= max(scores[head, i, dropped])


def test_full_density_is_dense_attention(study):
    class Layer:
        layer_idx = 0

    h, n, d = 2, 16, 4
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, n, d, generator=gen) for _ in range(3))
    dense = study.Selection(block=4, density=1.0)
    want, _ = dense.attention(Layer(), q, k, v, None)
    sparse = study.Selection(block=4, density=1.0)
    sparse.scorer = "output"
    got, _ = sparse.attention(Layer(), q, k, v, None)
    ref = torch.softmax((q @ k.transpose(-1, -2)) * d ** -0.5
                        + torch.full((n, n), float("-inf")).triu(1), -1) @ v
    torch.testing.assert_close(want, ref.transpose(1, 2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert sparse.kept == [1.0] and sparse.errors[0][0] < 1e-6


def test_bad_arguments_are_refused(study, tmp_path):
    novel = tmp_path / "novel.txt"
    novel.write_text("text")
    for argv in (["--seq-len", "100"], ["--density", "0"], ["--seq-len", "64"]):
        with pytest.raises(SystemExit):
            study.parse_args(["--eval-novel", str(novel), *argv])
    with pytest.raises(SystemExit):
        study.parse_args(["--eval-novel", str(tmp_path / "missing.txt")])
