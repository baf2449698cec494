"""The harness on a tiny random model: every scorer with every budget, dense equivalence, calibration, recall."""

import math

import pytest
import torch

from seer.evaluation.config import EvalConfig
from seer.evaluation.data import HeldOutText
from seer.evaluation.harness import ROW_KEYS, Evaluator
from seer.gates.config import GateConfig
from seer.model.attention import attach_gates, prepare_model
from seer.sparsity import SparsityConfig
from seer.sparsity.calibration import calibrate
from seer.sparsity.selectors import SELECTORS, build_selector

CFG = dict(seq_lens=[256], windows=2, calibration_windows=1, passkey=2, copy=2, copy_span=8, timing=False,
           dense_cache=False)


def _evaluator(model, tokenizer, corpus, **over):
    text = HeldOutText(corpus, tokenizer, split="all", progress=False)
    return Evaluator(model, tokenizer, text, EvalConfig(**{**CFG, **over}), progress=False)


def test_every_scorer_with_every_budget(model, tokenizer, corpus):
    prepare_model(model, 16)
    ev = _evaluator(model, tokenizer, corpus, passkey=0, copy=0)
    dense = ev.dense()
    for name in sorted(SELECTORS):
        selector = build_selector(name)
        for sparsity in (SparsityConfig(method="topk", target_density=0.3),
                         SparsityConfig(method="threshold", target_density=0.3),
                         SparsityConfig(method="topp", target_density=0.3, allocation="uniform")):
            (row,) = ev.evaluate(selector, sparsity, dense)
            assert set(row) >= set(ROW_KEYS) and row["selector"] == name
            assert math.isfinite(row["ppl"]) and row["ppl_dense"] == dense[256]["ppl"]
            assert 0 < row["density"] <= 1 and 0 < row["recall"] <= row["oracle_recall"] + 1e-6
            assert abs(row["density"] - 0.3) < 0.15, (name, sparsity.method, row["density"])
            if sparsity.calibrated:
                assert abs(row["calibrated_density"] - 0.3) < 0.01 and row["knob_min"] <= row["knob_max"]


def test_oracle_at_full_density_is_dense(model, tokenizer, corpus):
    prepare_model(model, 16)
    ev = _evaluator(model, tokenizer, corpus)
    dense = ev.dense()[256]
    for sparsity in (SparsityConfig(method="dense"), SparsityConfig(method="topk", target_density=1.0)):
        (row,) = ev.evaluate(build_selector("oracle"), sparsity)
        assert row["ppl"] == pytest.approx(dense["ppl"], rel=1e-5) and row["density"] == pytest.approx(1.0)
        assert row["recall"] == pytest.approx(1.0) and row["passkey"] == dense["passkey"]
        assert row["copy_nll"] == pytest.approx(dense["copy_nll"], rel=1e-4)


def test_sparse_changes_quality_and_recall_tracks_the_oracle(model, tokenizer, corpus):
    prepare_model(model, 16)
    ev = _evaluator(model, tokenizer, corpus, passkey=0, copy=0)
    oracle = build_selector("oracle")
    budget = dict(target_density=0.15, dense_last_rows=0)  # no forced row: the oracle bound below is exact
    (topk,) = ev.evaluate(oracle, SparsityConfig(method="topk", **budget))
    (rand,) = ev.evaluate(build_selector("random"), SparsityConfig(method="topk", **budget))
    (best,) = ev.evaluate(oracle, SparsityConfig(method="threshold", **budget))
    # a threshold on the true mass keeps each layer's most massive blocks: the bound itself
    assert best["recall"] == pytest.approx(best["oracle_recall"], abs=1e-4)
    assert rand["recall"] < topk["recall"] <= topk["oracle_recall"] + 1e-6
    assert topk["ppl"] != pytest.approx(topk["ppl_dense"], rel=1e-6)


def test_gates_and_stored_calibrations(model, tokenizer, corpus):
    attach_gates(model, GateConfig(block_size=16, hidden_size=16))
    ev = _evaluator(model, tokenizer, corpus, passkey=0, copy=0)
    sparsity = SparsityConfig(method="threshold", target_density=0.4, allocation="uniform")
    cal = ev.calibrate(None, sparsity, 256)
    assert abs(cal.density - 0.4) < 0.01 and cal.selector == "gate"
    (row,) = ev.evaluate(None, sparsity, calibrations={256: cal})
    assert row["selector"] == "gate" and row["calibrated_density"] == cal.density
    with pytest.raises(ValueError, match="made for .* with the gate scorer, not for"):
        ev.evaluate(None, SparsityConfig(method="topp", target_density=0.4), calibrations={256: cal})


def test_windows_longer_than_the_context_are_refused(tokenizer, corpus):
    from tests.tiny import tiny_model

    small = tiny_model("llama", seed=0, max_position_embeddings=128)
    prepare_model(small, 16)
    with pytest.raises(ValueError, match=r"eval.seq_lens=\[256\]: longer than the model's context \(128"):
        _evaluator(small, tokenizer, corpus)
    assert torch.is_tensor(small.lm_head.weight)


def test_blend_weights_fitted_on_observed_calibration_rows_are_evaluated_per_layer(model, tokenizer, corpus):
    import dataclasses

    from seer.sparsity.blend_fit import fit_blend_weights

    ctx = attach_gates(model, GateConfig(block_size=16, hidden_size=16))
    ev = _evaluator(model, tokenizer, corpus, passkey=0, copy=0)
    gate, masses = ev.observe(None, 256, want_mass=True)
    partner, _ = ev.observe(build_selector("vertical_slash"), 256, want_mass=False)
    sparsity = SparsityConfig(method="threshold", target_density=0.3)
    weights = fit_blend_weights(gate, partner, masses, 0.3, sparsity=sparsity)
    assert len(weights) == len(gate) == ctx.num_layers
    ctx.update(gate_config=dataclasses.replace(ctx.gate_config, blend="vertical_slash", blend_weight=weights))
    ev.forget(None)
    (row,) = ev.evaluate(None, sparsity)
    assert row["selector"] == ctx.gate_config.scorer_name and "@layers-" in row["selector"]
    assert abs(row["calibrated_density"] - 0.3) < 0.02


def test_layer_selectors_are_observed_calibrated_and_named_apart_from_the_gates(model, tokenizer, corpus):
    attach_gates(model, GateConfig(block_size=16, hidden_size=16))
    ev = _evaluator(model, tokenizer, corpus, passkey=0, copy=0)
    oracle = {0: build_selector("oracle")}
    sparsity = SparsityConfig(method="threshold", target_density=0.3)
    gate_scores, _ = ev.observe(None, 256, want_mass=False)
    hybrid_scores, _ = ev.observe(None, 256, want_mass=False, layer_selectors=oracle)
    oracle_scores, _ = ev.observe(build_selector("oracle"), 256, want_mass=False)
    torch.testing.assert_close(hybrid_scores[0], oracle_scores[0])  # observed dense: each layer on its own
    torch.testing.assert_close(hybrid_scores[1], gate_scores[1])
    gate_cal = ev.calibrate(None, sparsity, 256)
    hybrid_cal = ev.calibrate(None, sparsity, 256, oracle)
    assert (gate_cal.selector, hybrid_cal.selector) == ("gate", "gate oracle@0")
    assert gate_cal.knobs != hybrid_cal.knobs
    (row,) = ev.evaluate(None, sparsity, layer_selectors=oracle)
    assert row["selector"] == "gate oracle@0" and abs(row["density"] - 0.3) < 0.15
    assert len(row["density_by_layer"]) == 2 and sum(row["density_by_layer"]) / 2 == pytest.approx(row["density"])
    with pytest.raises(ValueError, match="with the gate scorer, not for .* with gate oracle@0"):
        ev.evaluate(None, sparsity, calibrations={256: gate_cal}, layer_selectors=oracle)
    ev.forget(None)  # new gate weights: the hybrids' observations go too
    assert [selector for selector, *_ in ev._observed] == [repr(build_selector("oracle"))]


def test_calibration_ppl_is_the_perplexity_of_the_calibration_windows(model, tokenizer, corpus):
    attach_gates(model, GateConfig(block_size=16, hidden_size=16))
    ev = _evaluator(model, tokenizer, corpus, passkey=0, copy=0, windows=1)
    oracle = {0: build_selector("oracle")}
    sparsity = SparsityConfig(method="threshold", target_density=0.3)
    cal = ev.calibrate(None, sparsity, 256, oracle)
    got = ev.calibration_ppl(None, sparsity, 256, cal, layer_selectors=oracle)
    assert got["calibrated_density"] == cal.density and got["tokens"] == 255
    assert ev.calibration_ppl(None, sparsity, 256, layer_selectors=oracle) == got  # a fresh calibration: the same
    no_calibration = {256: {}}
    (evaluated,) = ev.evaluate(None, sparsity, no_calibration, {256: cal}, layer_selectors=oracle)
    assert evaluated["ppl"] != pytest.approx(got["ppl"], rel=1e-6)  # the evaluated window is another one
    calibration_row, evaluated_row = ev.windows[256]
    ev.windows[256] = torch.stack([evaluated_row, calibration_row])  # the calibration window evaluated
    (swapped,) = ev.evaluate(None, sparsity, no_calibration, {256: cal}, layer_selectors=oracle)
    assert swapped["ppl"] == pytest.approx(got["ppl"], rel=1e-6)
    assert swapped["density"] == pytest.approx(got["density"], rel=1e-6)
    assert swapped["density_by_layer"] == pytest.approx(got["density_by_layer"], rel=1e-6)
    with pytest.raises(ValueError, match="needs eval.calibration_windows >= 1"):
        _evaluator(model, tokenizer, corpus, passkey=0, copy=0, calibration_windows=0).calibration_ppl(
            None, SparsityConfig(method="topk", target_density=0.3), 256)


def test_calibration_rounds_refit_on_the_scores_of_the_model_running_sparse(model, tokenizer, corpus):
    prepare_model(model, 16)
    ev = _evaluator(model, tokenizer, corpus, passkey=0, copy=0, windows=1)
    oracle = build_selector("oracle")
    once = SparsityConfig(method="threshold", target_density=0.25, max_row_share=0.35)
    refit = SparsityConfig(method="threshold", target_density=0.25, max_row_share=0.35, calibration_rounds=1)
    first, cal = ev.calibrate(oracle, once, 256), ev.calibrate(oracle, refit, 256)
    with model.seer_context.observing(sparse=True, selector=oracle, sparsity=once, calibration=first) as observed:
        with torch.no_grad():
            model.base_model(input_ids=ev.windows[256][:1], use_cache=False)
    dense_scores, _ = ev.observe(oracle, 256, False)
    assert not torch.allclose(observed.scores()[1], dense_scores[1])  # layer 1 sees the sparse layer 0's output
    assert torch.equal(observed.scores()[0], dense_scores[0])
    assert cal.knobs == calibrate(observed.scores(), refit, selector="oracle", seq_len=256).knobs != first.knobs
    assert cal.matches(refit, "oracle", 256) and abs(cal.density - 0.25) < 0.01
    assert len(ev._observed) == 1  # only the dense observation is cached
