"""seer.eval with decode gates: passkey and RULER answered through sparse decode, the dense reference dense."""

import pytest

import seer.model.loading
from seer.checks import ConfigError
from seer.config import compose
from seer.eval import run_eval
from seer.evaluation import ruler
from seer.evaluation.harness import Evaluator
from tests.evaluation.test_eval_entry import BASE
from tests.test_generate import _gate_and_decode_gate_folder

RUN = [o for o in BASE if not o.startswith(("eval.seq_lens", "eval.ruler", "eval.passkey"))] + [
    "eval.seq_lens=[1024]", "eval.windows=1", "eval.passkey=2", "eval.copy=0", "eval.recall=false",
    "eval.perplexity=false", "eval.ruler=[niah_single_1]", "eval.ruler_samples=2", "eval.batch_size=2",
    "data=text_files", "selector=streaming", "sparsity=topk", "sparsity.target_density=0.5"]


@pytest.fixture
def text_files(tmp_path, corpus):
    for i, doc in enumerate(corpus.docs):
        (tmp_path / f"doc{i}.txt").write_text(doc)
    return f"data.corpus.paths={tmp_path}/*.txt"


@pytest.fixture
def generations(monkeypatch, tokenizer):
    """Every generation of the harness (passkey and RULER) as ``(answers, decode density model.seer_decode reports
    right after it, or None when decode ran dense)``."""
    seen = []

    def decode_density(model):
        decode = getattr(model, "seer_decode", None)
        return decode.mean_density() if decode is not None and decode.sparsity is not None else None

    greedy, answers = Evaluator._greedy, ruler.greedy_answers

    def passkey(self, ids, steps):
        out = greedy(self, ids, steps)
        seen.append((out.tolist(), decode_density(self.model)))
        return out

    def ruler_answers(model, prompts, max_new_tokens, stop_ids):
        out = answers(model, prompts, max_new_tokens, stop_ids)
        seen.append((out, decode_density(model)))
        return out

    monkeypatch.setattr(Evaluator, "_greedy", passkey)
    monkeypatch.setattr(ruler, "greedy_answers", ruler_answers)
    monkeypatch.setattr(seer.model.loading, "load_tokenizer", lambda _cfg: tokenizer)
    return seen


def test_decode_gates_answer_the_generated_measures(tmp_path, text_files, generations):
    folder = _gate_and_decode_gate_folder(tmp_path / "g")  # decode budget stored with them: 32 tokens (2 blocks)
    over = RUN + [text_files, f"paths.cache_dir={tmp_path}/c"]
    plain = run_eval(compose(over + [f"paths.output_dir={tmp_path}/p"], "eval"))[0]
    assert plain["decode"] is None and plain["decode_density"] is None and plain["decode_gates"] is None
    half = len(generations) // 2  # dense, then sparse prefill: 3 passkey batches (5 depths) and one RULER batch
    assert half == 4 and all(d is None for _, d in generations)
    dense_answers, sparse_answers = generations[:half], generations[half:]
    generations.clear()
    # a budget covering every block: the same answers, every block kept; dense read from the same cache
    full = run_eval(compose(over + [f"decode_gates={folder}", "decode_sparsity.token_budget=4096",
                                    f"paths.output_dir={tmp_path}/f"], "eval"))[0]
    assert [a for a, _ in generations] == [a for a, _ in sparse_answers]
    assert len(list((tmp_path / "c" / "eval").glob("dense-*.json"))) == 1
    assert [d for _, d in generations] == [1.0] * half
    assert full["decode"] == "token_budget=4096" and full["decode_density"] == 1.0
    assert full["decode_gates"] == str(folder.resolve())
    for key in ("passkey", "passkey_dense", "ruler", "ruler_dense", "ruler/niah_single_1", "ruler_density"):
        assert full[key] == plain[key], key
    generations.clear()
    # the stored budget, dense measured again (no cache): dense stays dense, decode sparse
    small = run_eval(compose(over + [f"decode_gates={folder}", "eval.dense_cache=false",
                                     f"paths.output_dir={tmp_path}/s"], "eval"))[0]
    assert generations[:half] == dense_answers
    reported = [d for _, d in generations[half:]]
    assert all(0 < d < 1 for d in reported) and small["decode"] == "token_budget=32"
    assert small["decode_density"] == pytest.approx(sum(reported) / len(reported))
    assert (small["passkey_dense"], small["ruler_dense"]) == (plain["passkey_dense"], plain["ruler_dense"])


def test_bad_decode_input_is_refused_before_loading(tmp_path, monkeypatch, text_files, generations):
    folder = _gate_and_decode_gate_folder(tmp_path / "g")
    other = _gate_and_decode_gate_folder(tmp_path / "g3", ["model.architecture.num_hidden_layers=3"])
    monkeypatch.setattr(seer.model.loading, "load_causal_lm", lambda *a, **k: pytest.fail("the model was loaded"))

    def refused(*overrides):
        with pytest.raises(ConfigError) as info:
            run_eval(compose(RUN + [text_files, f"paths.output_dir={tmp_path}/r", *overrides], "eval"))
        assert "\n" not in str(info.value)
        return str(info.value)

    assert refused(f"decode_gates={other}") == (
        f"gate file {other / 'decode_gates.safetensors'} was made for tiny with num_layers=3, but this model has "
        f"num_layers=2")
    assert refused(f"decode_gates={folder}", "decode_sparsity.token_budget=8") == (
        "decode_sparsity.token_budget=8: is below one block (16 tokens); the budget is whole blocks")
    assert refused(f"decode_gates={folder}", "decode_sparsity.method=threshold",
                   "decode_sparsity.target_density=0.2").startswith(
        "decode_sparsity.target_density=0.2: no decode calibration for threshold target_density=0.2 in")
    assert refused("decode_gates=/no/decode") == ("decode_gates='/no/decode': no decode gates there (a gates folder "
                                                  "written by stage=distill_decode, outputs/<run>/gates)")
    assert refused("decode_sparsity.token_budget=2048").startswith(
        "decode_sparsity.estimate=None: sparse decode without decode gates scores the blocks by a training-free "
        "estimate")
    assert refused(*QUEST_ALONE, "decode_sparsity.token_budget=8") == (  # the selector's blocks: 16 tokens
        "decode_sparsity.token_budget=8: is below one block (16 tokens); the budget is whole blocks")


QUEST_ALONE = ["decode_sparsity.estimate=quest", "decode_sparsity.estimate_weight=1"]


def test_quest_alone_answers_the_generated_measures_without_decode_gates(tmp_path, text_files, generations):
    """A training-free decode budget: sparse decode steps (two of the 16-token blocks of the selector), the dense
    measures as without it."""
    over = RUN + [text_files, f"paths.cache_dir={tmp_path}/c"]
    plain = run_eval(compose(over + [f"paths.output_dir={tmp_path}/p"], "eval"))[0]
    generations.clear()
    row = run_eval(compose(over + [*QUEST_ALONE, "decode_sparsity.token_budget=32",
                                   f"paths.output_dir={tmp_path}/q"], "eval"))[0]
    assert row["decode"] == "token_budget=32, quest@1" and row["decode_gates"] is None
    assert 0 < row["decode_density"] < 1
    assert all(0 < d < 1 for _, d in generations)
    for key in ("passkey_dense", "ruler_dense", "density"):
        assert row[key] == plain[key], key


def test_a_shared_gate_scores_the_prefill_with_the_decode_gates(tmp_path, text_files, generations):
    """shared_gate=true: the decode gates select the prefill's blocks (calibrated here to the target, never stored)
    and decode the generated answers; the row names the shared scorer and no prefill gates."""
    folder = _gate_and_decode_gate_folder(tmp_path / "g")
    over = [o for o in RUN if not o.startswith(("selector=", "sparsity"))] + [
        text_files, f"paths.cache_dir={tmp_path}/c", "selector=gate", "sparsity=threshold",
        "sparsity.target_density=0.6", "eval.perplexity=true", "eval.calibration_windows=1", f"decode_gates={folder}",
        "shared_gate=true"]
    before = {f.name: f.read_bytes() for f in folder.iterdir()}
    row = run_eval(compose(over + [f"paths.output_dir={tmp_path}/o"], "eval"))[0]
    assert row["selector"] == "shared_gate" and row["gates"] is None
    assert row["decode_gates"] == str(folder.resolve()) and row["decode"] == "token_budget=32"
    assert abs(row["density"] - 0.6) < 0.15 and row["ppl"] > 0
    assert all(0 < d < 1 for _, d in generations[len(generations) // 2:])
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before  # nothing stored beside the gates
    for bad, message in ((["shared_gate=true", "gates=null", "decode_gates=null"], "give decode_gates=PATH"),
                         ([f"gates={folder}"], "give decode_gates=PATH and gates=null"),
                         (["selector=oracle"], "give selector=gate, not selector=oracle")):
        with pytest.raises(ConfigError, match=message):
            run_eval(compose(over + bad + [f"paths.output_dir={tmp_path}/x"], "eval"))
