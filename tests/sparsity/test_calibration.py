"""Calibration reaches its target density on the calibration rows, for every budget and allocation."""

import pytest
import torch

from seer.sparsity import SparsityConfig, causal_blocks, head_density, select_blocks, threshold_mask
from seer.sparsity.masks import row_budgets, row_probs, threshold_mask_from_probs
from seer.sparsity.calibration import (Calibration, calibrate, calibrate_in_rounds, find_calibration, fit_knob,
                                       load_calibrations, save_calibration)


def _scores(layers=3, rows=2, heads=4, nb=64, seed=0):
    """Scores whose sharpness differs by head and layer (sharp heads want few blocks, flat ones many)."""
    gen = torch.Generator().manual_seed(seed)
    sharp = torch.linspace(0.3, 3.0, heads).view(1, heads, 1, 1)
    return {i: torch.randn(rows, heads, nb, nb, generator=gen) * sharp * (1 + i / 2) for i in range(layers)}


def _mean_density(scores, config, cal):
    per_layer = []
    for i, s in scores.items():
        if i in config.dense_layers:
            per_layer.append(1.0)
        else:
            per_layer.append(float(head_density(select_blocks(s, config, cal.knob(i))).mean()))
    return sum(per_layer) / len(per_layer)


@pytest.mark.parametrize("method", ["threshold", "topp", "topk"])
@pytest.mark.parametrize("allocation", ["global", "uniform", "oracle"])
@pytest.mark.parametrize("target", [0.1, 0.3])
def test_calibration_hits_the_target(method, allocation, target):
    scores = _scores()
    masses = {i: torch.softmax(s.masked_fill(~causal_blocks(64), float("-inf")) * 0.7, -1) for i, s in scores.items()}
    config = SparsityConfig(method=method, target_density=target, allocation=allocation, sink_blocks=1)
    cal = calibrate(scores, config, masses, selector="test", seq_len=2048)
    assert abs(cal.density - target) < 0.01
    assert cal.density == pytest.approx(_mean_density(scores, config, cal), abs=1e-6)
    assert set(cal.knobs) == set(scores) and all(len(k) == 4 for k in cal.knobs.values())
    if allocation == "global":
        assert len({v for k in cal.knobs.values() for v in k}) == 1
    if allocation == "uniform":  # every head near the target
        for i, s in scores.items():
            assert torch.allclose(head_density(select_blocks(s, config, cal.knob(i))), torch.tensor(target), atol=0.03)
    if allocation == "oracle":  # each head near what one global threshold on the true mass gives it
        truth = SparsityConfig(method="threshold", target_density=target, sink_blocks=1)
        tau = calibrate({i: m.log() for i, m in masses.items()}, truth).knobs[0][0]
        for i, s in scores.items():
            want = head_density(threshold_mask(masses[i].log(), tau, sink_blocks=1,
                                               dense_last_rows=truth.dense_last_rows))
            got = head_density(select_blocks(s, config, cal.knob(i)))
            assert torch.allclose(got, want, atol=0.03), (i, got, want)


@pytest.mark.parametrize("method", ["threshold", "topp", "topk"])
@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_per_batch_knob_is_the_calibrations(method, allocation):
    # what a fine-tune step computes per layer and batch: the knob of calibrate() on that layer alone, as a tensor
    scores = _scores(layers=1, seed=3)[0]
    config = SparsityConfig(method=method, target_density=0.2, allocation=allocation, sink_blocks=1, local_blocks=1)
    knob = fit_knob(scores, config)
    want = calibrate({5: scores}, config).knob(5)
    assert knob.shape == (scores.shape[1],) and torch.equal(knob, want)
    assert torch.equal(select_blocks(scores, config, knob), select_blocks(scores, config, want))


def test_threshold_from_probs_is_the_threshold_mask():
    scores = _scores(layers=1, seed=4)[0]
    for knob in (0.001, torch.tensor([0.0, 0.01, 0.05, 0.5])):
        want = threshold_mask(scores, knob, sink_blocks=1, local_blocks=2, dense_last_rows=1)
        got = threshold_mask_from_probs(row_probs(scores), knob, sink_blocks=1, local_blocks=2, dense_last_rows=1)
        assert torch.equal(got, want)


@pytest.mark.parametrize("floor", [0, 6])
def test_a_capped_threshold_calibrates_and_caps_every_row(floor):
    scores = _scores(seed=5)
    config = SparsityConfig(method="threshold", target_density=0.15, max_row_share=0.2, sink_blocks=1,
                            cap_min_blocks=floor)
    cal = calibrate(scores, config, selector="test", seq_len=2048)
    assert abs(cal.density - 0.15) < 0.01
    assert cal.density == pytest.approx(_mean_density(scores, config, cal), abs=1e-6)
    budgets = row_budgets(64, 0.2).clamp(min=floor)
    for i, s in scores.items():
        kept = select_blocks(s, config, cal.knob(i)).sum(-1)[..., :-config.dense_last_rows]
        assert (kept <= torch.clamp(budgets[:-1], min=2)).all()  # the sink and the diagonal are kept beyond it
    uncapped = calibrate(scores, SparsityConfig(method="threshold", target_density=0.15, sink_blocks=1))  # another knob
    assert {tuple(k) for k in cal.knobs.values()} != {tuple(k) for k in uncapped.knobs.values()}


def test_rounds_refit_on_what_the_model_running_under_the_last_calibration_scores():
    config = SparsityConfig(method="threshold", target_density=0.15, max_row_share=0.2, calibration_rounds=2)
    dense = _scores(seed=1)
    seen = []

    def observe(under):  # a model whose scores sharpen the more its last knob keeps (as a sparse model's would move)
        seen.append(under)
        if under is None:
            return dense, None
        knob = sum(k for knobs in under.knobs.values() for k in knobs) / sum(map(len, under.knobs.values()))
        return {i: s * (1 + 50 * knob) for i, s in dense.items()}, None

    cal = calibrate_in_rounds(observe, config, selector="test", seq_len=2048)
    assert len(seen) == 3 and seen[0] is None and seen[1] is not None and seen[2] is not seen[1]
    assert cal == calibrate(observe(seen[2])[0], config, selector="test", seq_len=2048)  # the last round's fit
    assert cal.knobs != seen[1].knobs and cal.seq_len == 2048 and abs(cal.density - 0.15) < 0.01
    no_rounds = SparsityConfig(method="threshold", target_density=0.15, max_row_share=0.2)
    assert calibrate_in_rounds(observe, no_rounds).knobs == seen[1].knobs  # no rounds: the dense fit


def test_dense_layers_count_in_the_mean():
    scores = _scores(layers=4)
    config = SparsityConfig(method="threshold", target_density=0.3, dense_layers=[0])
    cal = calibrate(scores, config)
    assert 0 not in cal.knobs and abs(cal.density - 0.3) < 0.01
    sparse_mean = sum(float(head_density(select_blocks(scores[i], config, cal.knob(i))).mean()) for i in (1, 2, 3)) / 3
    assert sparse_mean == pytest.approx((0.3 * 4 - 1) / 3, abs=0.01)
    with pytest.raises(ValueError, match="below what dense_layers"):
        calibrate(scores, SparsityConfig(method="threshold", target_density=0.1, dense_layers=[0]))


def test_save_find_and_refuse(tmp_path):
    scores = _scores(layers=2)
    a = calibrate(scores, SparsityConfig(method="threshold", target_density=0.2))
    b = calibrate(scores, SparsityConfig(method="topp", target_density=0.2, allocation="uniform"))
    save_calibration(tmp_path, a)
    save_calibration(tmp_path, b)
    save_calibration(tmp_path, a)  # replaces, does not duplicate
    stored = load_calibrations(tmp_path)
    assert len(stored) == 2
    found = find_calibration(tmp_path, SparsityConfig(method="topp", target_density=0.2, allocation="uniform"))
    assert found == b and isinstance(found, Calibration)
    with pytest.raises(ValueError, match=r"no calibration for sparsity threshold target_density=0.3 .*stored: .*"
                                         r"threshold target_density=0.2 \(global\) \[dense_last_rows=1\] with gate "
                                         r"at 0 tokens"):
        find_calibration(tmp_path, SparsityConfig(method="threshold", target_density=0.3))
    (tmp_path / "calibration.json").write_text("[{\"knobs\": 3}]")
    with pytest.raises(ValueError, match="is not a seer calibration file"):
        load_calibrations(tmp_path)


def test_nothing_to_calibrate():
    with pytest.raises(ValueError, match="no target density"):
        calibrate(_scores(), SparsityConfig(method="threshold", target_density=None))


def test_an_unreachable_target_is_warned_about_once(caplog):
    scores = _scores(layers=2, nb=5)  # 5 blocks a row: the diagonal alone keeps 0.33 of the causal blocks
    config = SparsityConfig(method="threshold", target_density=0.11)
    with caplog.at_level("WARNING", logger="seer.sparsity.calibration"):
        for _ in range(3):
            assert calibrate(scores, config).density > 0.3
    warned = [r for r in caplog.records if "below what the forced blocks alone keep" in r.getMessage()]
    assert len(warned) == 1 and "sparsity.target_density=0.11" in warned[0].getMessage()
