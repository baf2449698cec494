"""seer.evaluation.hybrid_fit: each group of layers gets the scorer of lowest calibration PPL past a margin."""

import pytest

from seer.evaluation.hybrid_fit import check_groups, describe_layers, pick_hybrid


def test_each_group_gets_its_best_scorer_past_the_margin_and_the_picks_are_united():
    table = {((0,), "vertical_slash"): 9.95, ((0,), "dense"): 9.90,  # 1% better: dense
             ((1, 2, 3), "vertical_slash"): 9.99, ((1, 2, 3), "flexprefill"): 10.2,  # 0.1% better: within the margin
             ((8, 9, 10, 11), "flexprefill"): 9.7, ((8, 9, 10, 11), "vertical_slash"): 9.5}
    fit = pick_hybrid(10.0, table, margin=0.002)
    assert fit.picks == {(0,): "dense", (8, 9, 10, 11): "vertical_slash"}
    assert fit.layers == {0: "dense", 8: "vertical_slash", 9: "vertical_slash", 10: "vertical_slash",
                          11: "vertical_slash"}
    assert list(fit.layers) == [0, 8, 9, 10, 11] and fit.describe() == "dense@0 vertical_slash@8-11"
    assert [(c["group"], c["scorer"], c["picked"]) for c in fit.candidates] == [
        ([0], "vertical_slash", False), ([0], "dense", True), ([1, 2, 3], "vertical_slash", False),
        ([1, 2, 3], "flexprefill", False), ([8, 9, 10, 11], "flexprefill", False),
        ([8, 9, 10, 11], "vertical_slash", True)]
    assert fit.candidates[1]["ppl"] == 9.90 and fit.candidates[1]["change"] == pytest.approx(-0.01)
    record = fit.record()
    assert record["picked"] == "dense@0 vertical_slash@8-11" and record["layers"]["8"] == "vertical_slash"
    assert record["baseline_ppl"] == 10.0 and record["margin"] == 0.002 and len(record["candidates"]) == 6
    # a wider margin keeps only the bigger gain; no margin takes group 1-3's small one too
    assert pick_hybrid(10.0, table, margin=0.02).picks == {(8, 9, 10, 11): "vertical_slash"}
    assert pick_hybrid(10.0, table, margin=0.0).picks[(1, 2, 3)] == "vertical_slash"


def test_a_gain_of_exactly_the_margin_is_not_enough_and_ties_go_to_the_first_scorer():
    assert pick_hybrid(10.0, {((0,), "dense"): 7.5}, margin=0.25).picks == {}
    assert pick_hybrid(10.0, {((0,), "dense"): 7.4}, margin=0.25).picks == {(0,): "dense"}
    tie = {((0,), "vertical_slash"): 9.0, ((0,), "flexprefill"): 9.0}
    assert pick_hybrid(10.0, tie).picks == {(0,): "vertical_slash"}
    assert pick_hybrid(10.0, dict(reversed(tie.items()))).picks == {(0,): "flexprefill"}


def test_no_candidate_better_than_the_baseline_picks_nothing():
    fit = pick_hybrid(10.0, {((0,), "dense"): 10.0, ((1, 2), "vertical_slash"): 10.5, ((3,), "flexprefill"): 11.0})
    assert fit.picks == {} and fit.layers == {} and fit.describe() == "none"
    assert not any(c["picked"] for c in fit.candidates) and len(fit.candidates) == 3
    assert pick_hybrid(10.0, {}).layers == {}
    unmeasured = pick_hybrid(10.0, {((0,), "dense"): None, ((0,), "vertical_slash"): 9.0, ((1,), "dense"): None})
    assert unmeasured.picks == {(0,): "vertical_slash"}
    assert [(c["ppl"], c["change"], c["picked"]) for c in unmeasured.candidates] == [
        (None, None, False), (9.0, pytest.approx(-0.1), True), (None, None, False)]


def test_overlapping_groups_are_refused_naming_them():
    with pytest.raises(ValueError, match=r"groups of layers 0-3 and 2-5 overlap \(layer 2\)"):
        pick_hybrid(10.0, {((0, 1, 2, 3), "dense"): 9.0, ((2, 3, 4, 5), "dense"): 9.5})
    with pytest.raises(ValueError, match="overlap"):
        check_groups([(0,), (1, 2), (2,)])
    check_groups([(0,), (1, 2), (1, 2), (3,)])  # one group with several scorers is fine
    with pytest.raises(ValueError, match="margin -0.1"):
        pick_hybrid(10.0, {}, margin=-0.1)
    with pytest.raises(ValueError, match="baseline PPL 0"):
        pick_hybrid(0, {})


def test_layers_are_described_by_scorer_in_the_order_of_their_first_layer():
    assert describe_layers({9: "vertical_slash", 8: "vertical_slash", 0: "dense", 4: "vertical_slash"}) == \
        "dense@0 vertical_slash@4,8-9"
    assert describe_layers({}) == ""
