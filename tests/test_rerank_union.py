"""experiments/rerank_union.py, an experiment wrapper: the union it ranks is each key head's union of its query heads'
candidates, the masses are the reference's over that union, and the wrapper swaps the selectors' rerank for it."""

import pytest
import torch

from seer.kernels import reference
from seer.sparsity import selectors


@pytest.fixture
def union(experiment):
    return experiment("rerank_union")


def test_the_union_is_each_key_heads_and_the_masses_the_references(union):
    g = torch.Generator().manual_seed(3)
    nb = 5
    cand = (torch.rand(1, 6, nb, nb, generator=g) < 0.3) | torch.eye(nb, dtype=torch.bool)
    cand &= torch.ones(nb, nb, dtype=torch.bool).tril()
    got = union.group_union(cand, 2)
    for h in range(6):  # query heads 0-2 share key head 0, 3-5 key head 1
        group = cand[:, 3 * (h // 3):3 * (h // 3) + 3]
        assert torch.equal(got[:, h], group.any(1))
    q = torch.randn(1, 6, 80, 16, generator=g)
    k = torch.randn(1, 2, 80, 16, generator=g)
    x = selectors.LayerInputs(q, k, 16, 0.25)
    want = reference.sampled_rows_mass(q, k, got, 4, 16, 0.25)
    torch.testing.assert_close(union.union_sampled_rows_mass(x, cand, 4), want)
    assert not torch.equal(want, reference.sampled_rows_mass(q, k, cand, 4, 16, 0.25))


def test_the_wrapper_swaps_the_rerank_and_runs_the_command(union, monkeypatch, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text("import sys\nfrom seer.sparsity import selectors\n"
                      "print(selectors.sampled_rows_mass.__name__, sys.argv[1:])\n")
    monkeypatch.setattr(selectors, "sampled_rows_mass", selectors.sampled_rows_mass)  # restored after the test
    monkeypatch.setattr("sys.argv", ["x"])
    union.main([str(script), "a=1"])
    assert selectors.sampled_rows_mass is union.union_sampled_rows_mass
