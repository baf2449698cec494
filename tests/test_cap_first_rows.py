"""experiments/cap_first_rows.py, an experiment wrapper: a threshold's row cap (and its floor) only in the rows of
fewer than SEER_CAP_ROWS causal blocks; the wrapper swaps both names the threshold is read by."""

import pytest
import torch

from seer.sparsity import calibration, masks


@pytest.fixture
def first_rows(experiment):
    return experiment("cap_first_rows")


def _brute_force(probs, threshold, share, floor, cap_rows, sink_blocks=1, dense_last_rows=1):
    """The mask row by row in float64: forced blocks, then the blocks over the threshold by falling share, up to the
    row's budget where the row is shorter than ``cap_rows`` blocks (every one of them otherwise)."""
    *lead, nb, _ = probs.shape
    budgets = masks.row_budgets(nb, share)  # itself checked against its definition in tests/sparsity
    out = torch.zeros(*lead, nb, nb, dtype=torch.bool)
    for b in range(lead[0]):
        for h in range(lead[1]):
            for r in range(nb):
                if r >= nb - dense_last_rows:
                    out[b, h, r, :r + 1] = True
                    continue
                row = probs[b, h, r, :r + 1].double()
                forced = set(range(min(sink_blocks, r + 1))) | {r}
                others = sorted((i for i in range(r + 1) if i not in forced and row[i] > threshold),
                                key=lambda i: (-row[i].item(), i))
                if r + 1 < cap_rows:
                    others = others[:max(0, max(int(budgets[r]), floor) - len(forced))]
                out[b, h, r, sorted(forced | set(others))] = True
    return out


@pytest.mark.parametrize("cap_rows, floor", [(9, 0), (9, 3), (1, 0), (40, 0)])
def test_only_the_rows_shorter_than_cap_rows_are_capped(first_rows, cap_rows, floor):
    g = torch.Generator().manual_seed(7 + cap_rows + floor)
    nb, share, threshold = 24, 0.2, 0.015
    probs = masks.row_probs(torch.randn(2, 3, nb, nb, generator=g) * 0.3)
    got = first_rows.first_rows_cap_mask_from_probs(probs, threshold, sink_blocks=1, dense_last_rows=1,
                                                    max_row_share=share, cap_min_blocks=floor, cap_rows=cap_rows)
    assert torch.equal(got, _brute_force(probs, threshold, share, floor, cap_rows))
    capped = masks.threshold_mask_from_probs(probs, threshold, 1, 0, 1, share, cap_min_blocks=floor)
    uncapped = masks.threshold_mask_from_probs(probs, threshold, 1, 0, 1)
    if cap_rows == 1:  # no row is capped
        assert torch.equal(got, uncapped)
    elif cap_rows > nb:  # every row is: the product's capped mask
        assert torch.equal(got, capped)
    else:  # capped rows as the product caps them, the others as without a cap, and the cap binds in both parts
        short = slice(0, cap_rows - 1)
        assert torch.equal(got[..., short, :], capped[..., short, :])
        assert torch.equal(got[..., cap_rows - 1:, :], uncapped[..., cap_rows - 1:, :])
        assert capped[..., short, :].sum() < uncapped[..., short, :].sum()
        assert capped[..., cap_rows - 1:, :].sum() < uncapped[..., cap_rows - 1:, :].sum()


@pytest.mark.parametrize("value", ["", "0", "x", "-3"])
def test_a_bad_cap_rows_stops_before_the_command(first_rows, monkeypatch, value):
    monkeypatch.setenv("SEER_CAP_ROWS", value)
    with pytest.raises(SystemExit, match=f"SEER_CAP_ROWS={value!r}"):
        first_rows.main(["never_run.py"])


def test_the_wrapper_swaps_the_threshold_and_seers_callers_reach_it(first_rows, monkeypatch, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text("import sys\nprint(sys.argv[1:])\n")
    monkeypatch.setattr(masks, "threshold_mask_from_probs", masks.threshold_mask_from_probs)  # restored after
    monkeypatch.setattr(calibration, "threshold_mask_from_probs", calibration.threshold_mask_from_probs)
    monkeypatch.setenv("SEER_CAP_ROWS", "8")
    monkeypatch.setattr("sys.argv", ["x"])
    first_rows.main([str(script), "a=1"])
    assert masks.threshold_mask_from_probs is first_rows.first_rows_cap_mask_from_probs
    assert calibration.threshold_mask_from_probs is first_rows.first_rows_cap_mask_from_probs
    from seer.sparsity import SparsityConfig

    scores = torch.randn(1, 2, 20, 20, generator=torch.Generator().manual_seed(5))
    want = first_rows.first_rows_cap_mask_from_probs(masks.row_probs(scores), 0.02, 0, 0, 1, 0.2, cap_min_blocks=2,
                                                     cap_rows=8)
    assert torch.equal(masks.threshold_mask(scores, 0.02, 0, 0, 1, 0.2, cap_min_blocks=2), want)
    config = SparsityConfig(method="threshold", target_density=0.1, max_row_share=0.2, cap_min_blocks=2)
    got = calibration._density_of_knob(scores, config)(torch.full((2,), 0.02))
    assert torch.allclose(got, want.float().sum((0, 2, 3)) / (20 * 21 / 2))
