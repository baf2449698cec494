"""experiments/row_cap_window.py, an experiment wrapper: every row of a threshold keeps at most ``max_row_share`` x
the window's blocks (its largest shares, forced blocks kept), and the wrapper swaps both names the threshold is read
by."""

import pytest
import torch

from seer.sparsity import calibration, masks


@pytest.fixture
def window(experiment):
    return experiment("row_cap_window")


def test_each_row_keeps_its_largest_shares_up_to_the_windows_cap(window):
    g = torch.Generator().manual_seed(4)
    nb, share, threshold = 20, 0.2, 0.02
    probs = masks.row_probs(torch.randn(2, 3, nb, nb, generator=g) * 0.3)
    got = window.window_cap_mask_from_probs(probs, threshold, sink_blocks=1, dense_last_rows=1, max_row_share=share)
    cap = round(share * nb)
    for b in range(2):
        for h in range(3):
            for r in range(nb - 1):  # the last row is kept whole
                row = probs[b, h, r, :r + 1].double()
                forced = {0, r}
                others = sorted((i for i in range(r + 1) if i not in forced and row[i] > threshold),
                                key=lambda i: (-row[i].item(), i))
                want = forced | set(others[:max(0, cap - len(forced))])
                assert set(torch.nonzero(got[b, h, r]).view(-1).tolist()) == want, (b, h, r)
    assert got[..., -1, :].all()
    uncapped = masks.threshold_mask_from_probs(probs, threshold, sink_blocks=1, dense_last_rows=1)
    assert (got <= uncapped).all() and got.sum() < uncapped.sum()  # the cap binds here


def test_the_wrapper_swaps_the_threshold_and_runs_the_command(window, monkeypatch, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text("import sys\nprint(sys.argv[1:])\n")
    monkeypatch.setattr(masks, "threshold_mask_from_probs", masks.threshold_mask_from_probs)  # restored after
    monkeypatch.setattr(calibration, "threshold_mask_from_probs", calibration.threshold_mask_from_probs)
    monkeypatch.setattr("sys.argv", ["x"])
    window.main([str(script), "a=1"])
    assert masks.threshold_mask_from_probs is window.window_cap_mask_from_probs
    assert calibration.threshold_mask_from_probs is window.window_cap_mask_from_probs
    # seer's callers reach the swapped function with every argument they pass (the floor under the cap included)
    from seer.sparsity import SparsityConfig

    scores = torch.randn(1, 2, 20, 20, generator=torch.Generator().manual_seed(5))
    want = window.window_cap_mask_from_probs(masks.row_probs(scores), 0.02, 0, 0, 1, 0.2, cap_min_blocks=5)
    assert torch.equal(masks.threshold_mask(scores, 0.02, 0, 0, 1, 0.2, cap_min_blocks=5), want)
    config = SparsityConfig(method="threshold", target_density=0.1, max_row_share=0.2, cap_min_blocks=5)
    got = calibration._density_of_knob(scores, config)(torch.full((2,), 0.02))
    assert torch.allclose(got, want.float().sum((0, 2, 3)) / (20 * 21 / 2))
