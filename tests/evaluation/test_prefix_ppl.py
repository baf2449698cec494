"""experiments/prefix_ppl.py, an experiment wrapper: the prefixes cover the scored positions once; dense attention and a
selection made per query block score the same through prefixes as in one forward; a selection from the window's last
rows does not; the wrapper patches the harness and refuses a bad chunk by name."""

import math

import pytest
import torch

from seer.evaluation import harness
from seer.evaluation.config import EvalConfig
from seer.evaluation.data import HeldOutText
from seer.model.attention import prepare_model
from seer.sparsity import SparsityConfig
from seer.sparsity.selectors import build_selector


@pytest.fixture
def prefix(experiment, monkeypatch):
    prefix_ppl = experiment("prefix_ppl")
    for name in ("_perplexity", "_row", "_dense_cache_path"):  # restored after each test
        monkeypatch.setattr(harness.Evaluator, name, getattr(harness.Evaluator, name))
    monkeypatch.setattr(prefix_ppl, "CHUNK", 32)
    return prefix_ppl


@pytest.mark.parametrize("n, block, chunk", [(256, 16, 32), (256, 16, 48), (256, 16, 112), (192, 32, 32)])
def test_the_prefixes_cover_the_scored_positions_once(prefix, n, block, chunk):
    spans = prefix.prefix_ends(n, block, chunk)
    covered = [j for _, lo, hi in spans for j in range(lo, hi)]
    assert covered == list(range(n // 2, n - block))
    for e, lo, hi in spans:
        assert hi == e - block and hi - lo <= chunk and e <= n  # each scores the columns before its last block
    assert spans[-1][0] == n


def test_a_chunk_off_the_block_grid_is_refused(prefix, monkeypatch):
    with pytest.raises(SystemExit, match="multiple of the block size 16"):
        prefix.prefix_ends(256, 16, 24)
    for raw in ("0", "x", "-5"):
        monkeypatch.setenv("SEER_PREFIX_CHUNK", raw)
        with pytest.raises(SystemExit, match="SEER_PREFIX_CHUNK"):
            prefix.chunk_tokens()


def _evaluator(model, tokenizer, corpus):
    text = HeldOutText(corpus, tokenizer, split="all", progress=False)
    config = EvalConfig(seq_lens=[256], windows=2, calibration_windows=1, passkey=0, copy=0, timing=False,
                        dense_cache=False, batch_size=2)
    return harness.Evaluator(model, tokenizer, text, config, progress=False)


def test_dense_and_per_block_selections_score_alike_through_prefixes(prefix, model, tokenizer, corpus):
    prepare_model(model, 16)
    ev = _evaluator(model, tokenizer, corpus)
    rows = ev.windows[256][1:]
    with ev.ctx.running("dense"):
        got = prefix.prefix_measures(ev, rows)
        by_hand = ev._forward_nll(rows)[:, 128:240]
    assert got["ppl_prefix"] == got["ppl_p"] == pytest.approx(math.exp(float(by_hand.mean())), rel=1e-6)
    # the oracle under a threshold decides each query block from its own rows: prefixes change nothing
    oracle = build_selector("oracle")
    budget = SparsityConfig(method="threshold", target_density=0.3)
    calibration = ev._calibration(oracle, budget, 256, None, None)
    with ev._sparse(oracle, budget, calibration, None):
        got = prefix.prefix_measures(ev, rows)
    assert got["ppl_prefix"] == pytest.approx(got["ppl_p"], rel=1e-5)
    assert got["ppl_p"] != pytest.approx(math.exp(float(by_hand.mean())), rel=1e-4)  # and it is sparse
    assert 0 < got["density_prefix"] < 1


def test_a_selection_from_the_last_rows_scores_otherwise_through_prefixes(prefix, model, tokenizer, corpus):
    prepare_model(model, 16)
    ev = _evaluator(model, tokenizer, corpus)
    rows = ev.windows[256][1:]
    selector = build_selector("vertical_slash")
    budget = SparsityConfig(method="topk", target_density=0.2)
    with ev._sparse(selector, budget, None, None):
        got = prefix.prefix_measures(ev, rows)
    assert got["ppl_prefix"] != pytest.approx(got["ppl_p"], rel=1e-4)


def test_the_wrapper_adds_the_measures_to_every_row(prefix, model, tokenizer, corpus, monkeypatch, tmp_path):
    monkeypatch.setenv("SEER_PREFIX_CHUNK", "32")
    script = tmp_path / "probe.py"
    script.write_text("")
    prefix.main([str(script)])
    prepare_model(model, 16)
    ev = _evaluator(model, tokenizer, corpus)
    dense = ev.dense()[256]
    assert dense["ppl_p"] == dense["ppl_prefix"]
    with ev.ctx.running("dense"):  # the kept NLL of the harness's own pass is the single forward's
        by_hand = ev._forward_nll(ev.windows[256][1:])[:, 128:240]
    assert dense["ppl_p"] == pytest.approx(math.exp(float(by_hand.mean())), rel=1e-6)
    (row,) = ev.evaluate(build_selector("vertical_slash"), SparsityConfig(method="topk", target_density=0.2))
    assert row["ppl_p_dense"] == dense["ppl_p"] and row["prefix_chunk"] == 32
    assert row["ppl_p"] > 0 and row["ppl_prefix"] > 0 and 0 < row["density_prefix"] < 1
    assert torch.isfinite(torch.tensor([row["ppl"], row["ppl_p"], row["ppl_prefix"]])).all()
