"""experiments/quality_qwen.py: a dense pass written by one run is reused by the next only when it was measured with
exactly the same settings."""

import json

import pytest


@pytest.fixture
def study(experiment):
    return experiment("quality_qwen")


def test_dense_is_reused_only_with_the_same_settings(study, tmp_path):
    settings = {"model": "qwen", "texts": ["novel"], "novel": {"seq_lens": (32768,), "batch_size": 4}}
    dense = {"novel": {32768: {"ppl": 54.1, "ruler": 53.8}}}
    path = tmp_path / "dense.json"
    path.write_text(json.dumps({"settings": settings, "dense": dense}))
    assert study.reuse_dense(path, settings) == dense  # length keys back to ints, tuples equal to lists
    other = dict(settings, novel={"seq_lens": [32768], "batch_size": 1})
    with pytest.raises(SystemExit, match="measured with other settings"):
        study.reuse_dense(path, other)


def test_recipes_name_their_gate_sets_and_the_lever_plan_runs_each(study):
    args = study.parse_args(["--model-dir", "/m", "--novels", "n", "--eval-novel", "e", "--recipes", "base=",
                             "wide=gate.hidden_size=256;gate.q_pool=[avg,max]"])
    assert study.recipes(args) == {"base": ["stage.target=mass"],
                                   "wide": ["stage.target=mass", "gate.hidden_size=256", "gate.q_pool=[avg,max]"]}
    assert study.recipes(study.parse_args(["--model-dir", "/m", "--novels", "n", "--eval-novel", "e", "--targets",
                                           "maxpool"])) == {"maxpool": ["stage.target=maxpool"]}
    with pytest.raises(SystemExit, match="NAME=OVERRIDE"):
        study.recipes(study.parse_args(["--model-dir", "/m", "--novels", "n", "--eval-novel", "e", "--recipes",
                                        "a=", "a=x=1"]))
    jobs = study.lever_plan(["gate:base", "gate:wide"], [0.1], [("vertical_slash", 0.5)])
    assert [label for label, *_ in jobs] == ["gate:base+vertical_slash@0.5", "gate:wide+vertical_slash@0.5",
                                             "gate:base", "gate:wide"]


def test_a_fitted_blend_is_parsed_and_planned_like_a_fixed_one(study):
    assert study.parse_blends(["vertical_slash:fit", "vertical_slash:0.5"]) == [("vertical_slash", "fit"),
                                                                                ("vertical_slash", 0.5)]
    for bad in ["vertical_slash", "vertical_slash:1.5", "oracle:fit", "vertical_slash:best"]:
        with pytest.raises(SystemExit, match="give selector:weight"):
            study.parse_blends([bad])
    with pytest.raises(SystemExit, match="given twice"):
        study.parse_blends(["vertical_slash:fit", "vertical_slash:fit"])
    blends = study.parse_blends(["vertical_slash:fit", "vertical_slash:0.5"])
    jobs = study.lever_plan(["gate:mass"], [0.1, 0.05], blends)
    assert [(job.label, job.sparsity.target_density) for job in jobs] == [
        ("gate:mass+vertical_slash@fit", 0.1), ("gate:mass+vertical_slash@0.5", 0.1), ("gate:mass", 0.1),
        ("gate:mass+vertical_slash@fit", 0.05), ("gate:mass+vertical_slash@0.5", 0.05), ("gate:mass", 0.05)]
    assert jobs[0][1:3] == ("gate:mass", ("vertical_slash", "fit"))
    final = study.final_plan(["gate:mass"], [0.1], blends)
    assert [label for label, *_ in final][:2] == ["gate:mass+vertical_slash@fit", "oracle"]
    assert final[0].rerank is None
    rerank = study.preset_rerank("qwen05")  # the recipe's gate preset reranks: the default row does too
    assert rerank is not None and rerank[0] >= 1
    reranked = study.final_plan(["gate:mass"], [0.1], blends, rerank)
    assert reranked[0].label == f"gate:mass+vertical_slash@fit+rerank{rerank[0]}@{rerank[1]:g}"
    assert reranked[0].rerank == rerank and all(job.rerank is None for job in reranked[1:])
    explore = [label for label, *_ in study.plan(["gate:mass"], [0.1], blends, 2)]
    assert explore[:3] == ["gate:mass", "gate:mass", "gate:mass+vertical_slash@fit"]
    assert "gate:mass+vertical_slash@0.5" in explore


def test_fit_blend_observes_the_gates_alone_and_the_estimate_once(study):
    import dataclasses
    from types import SimpleNamespace

    import torch

    from seer.gates.config import GateConfig
    from seer.sparsity import SparsityConfig

    class FakeEvaluator:
        def __init__(self):
            self.ctx = SimpleNamespace(gate_config=GateConfig(blend="vertical_slash"))
            self.ctx.update = lambda gate_config: setattr(self.ctx, "gate_config", gate_config)
            self.observed = []

        def forget(self, selector):
            pass

        def observe(self, selector, seq_len, want_mass):
            self.observed.append((getattr(selector, "name", None), self.ctx.gate_config.blend, want_mass))
            g = torch.Generator().manual_seed(len(self.observed))
            logits = {i: torch.randn(1, 2, 8, 8, generator=g) for i in range(3)}
            scores = {i: torch.log_softmax(s.masked_fill(torch.ones(8, 8).triu(1).bool(), float("-inf")), -1)
                      for i, s in logits.items()}
            return (logits, {i: s.exp() for i, s in scores.items()}) if want_mass else (scores, None)

    ev, cache = FakeEvaluator(), {}
    sparsity = SparsityConfig(method="threshold", target_density=0.3)
    weights, recalls = study.fit_blend(ev, "vertical_slash", sparsity, 32768, [0.25, 0.5, 0.75], cache)
    again, _ = study.fit_blend(ev, "vertical_slash", dataclasses.replace(sparsity), 32768, [0.25, 0.5, 0.75], cache)
    assert ev.observed == [(None, None, True), ("vertical_slash", None, False)]  # the gates alone, then the estimate
    assert len(weights) == 3 and weights == again and set(weights) <= {0.25, 0.5, 0.75}
    record = study.fit_record("g+vertical_slash@fit", sparsity, weights, recalls)
    assert record["weights"] == weights and set(record["recall_single"]) == {"0.25", "0.5", "0.75"}
    assert record["recall"] >= max(record["recall_single"].values()) - 1e-9  # the best per layer beats any one weight


def test_the_lever_plan_takes_baselines_and_only_keeps_the_jobs_named(study):
    args = study.parse_args(["--model-dir", "/m", "--novels", "n", "--eval-novel", "e", "--plan", "lever",
                             "--baselines", "antidiagonal", "--only", "gate:a+vertical_slash@0.5", "antidiagonal"])
    jobs = study.lever_plan(["gate:a", "gate:b"], [0.1], [("vertical_slash", 0.5)], tuple(args.baselines))
    assert [label for label, *_ in jobs] == ["gate:a+vertical_slash@0.5", "gate:b+vertical_slash@0.5", "gate:a",
                                             "gate:b", "antidiagonal"]
    assert jobs[-1][1:3] == ("antidiagonal", None)
    assert [job[0] for job in study.only_jobs(jobs, args.only) if job] == ["gate:a+vertical_slash@0.5", "antidiagonal"]
    with pytest.raises(SystemExit, match="--only gate:c: not a job of this plan"):
        study.only_jobs(jobs, ["gate:c"])
    with pytest.raises(SystemExit):
        study.parse_args(["--model-dir", "/m", "--novels", "n", "--eval-novel", "e", "--baselines", "nonesuch"])


def test_dense_last_rows_set_every_jobs_whole_last_blocks(study):
    base = ["--model", "smollm2", "--model-dir", "/m", "--novels", "n", "--eval-novel", "e", "--recipes", "base=",
            "--blends", "vertical_slash:0.5", "--baselines", "reranked"]
    jobs = study.planned_jobs(study.parse_args([*base, "--plan", "lever", "--dense-last-rows", "3"]))
    assert jobs and {job.sparsity.dense_last_rows for job in jobs} == {3}
    assert jobs[0].sparsity.describe().endswith("[dense_last_rows=3]")  # in every row's label
    default = study.planned_jobs(study.parse_args([*base, "--plan", "lever"]))
    assert {job.sparsity.dense_last_rows for job in default} == {1}
    for bad in (["--plan", "explore", "--dense-last-rows", "2"], ["--plan", "lever", "--dense-last-rows", "-1"]):
        with pytest.raises(SystemExit, match="--dense-last-rows"):
            study.planned_jobs(study.parse_args([*base, *bad]))


def test_budget_method_sets_every_jobs_budget(study):
    base = ["--model", "smollm2", "--model-dir", "/m", "--novels", "n", "--eval-novel", "e", "--recipes", "base=",
            "--blends", "vertical_slash:0.5", "--plan", "final", "--densities", "0.1", "0.2"]
    jobs = study.planned_jobs(study.parse_args([*base, "--budget-method", "topk"]))
    assert jobs and {job.sparsity.method for job in jobs} == {"topk"}
    assert {job.sparsity.target_density for job in jobs} == {0.1, 0.2}
    assert jobs[0].sparsity.describe().startswith("topk target_density=0.1")  # in every row's label
    default = study.planned_jobs(study.parse_args(base))
    assert {job.sparsity.method for job in default} == {"threshold"}
    assert [job.label for job in jobs] == [job.label for job in default]
    with pytest.raises(SystemExit, match="--budget-method topk: not with --plan explore"):
        study.planned_jobs(study.parse_args([*base[:-5], "--budget-method", "topk"]))
    with pytest.raises(SystemExit):
        study.parse_args([*base, "--budget-method", "topp"])
    capped = study.planned_jobs(study.parse_args([*base, "--max-row-share", "0.3", "--calibration-rounds", "2"]))
    assert {(job.sparsity.method, job.sparsity.max_row_share) for job in capped} == {("threshold", 0.3)}
    assert "max_row_share=0.3, calibration_rounds=2" in capped[0].sparsity.describe()
    floored = study.planned_jobs(study.parse_args([*base, "--max-row-share", "0.3", "--cap-min-blocks", "64"]))
    assert {job.sparsity.cap_min_blocks for job in floored} == {64}
    for bad in (["--cap-min-blocks", "64"], ["--max-row-share", "0.3", "--cap-min-blocks", "0"]):
        with pytest.raises(SystemExit, match="--cap-min-blocks"):
            study.planned_jobs(study.parse_args([*base, *bad]))
    for bad in (["--max-row-share", "1"], ["--max-row-share", "0.3", "--budget-method", "topk"]):
        with pytest.raises(SystemExit, match="--max-row-share"):
            study.planned_jobs(study.parse_args([*base, *bad]))
    for bad in (["--calibration-rounds", "0"], ["--calibration-rounds", "1", "--budget-method", "topk"]):
        with pytest.raises(SystemExit, match="--calibration-rounds"):
            study.planned_jobs(study.parse_args([*base, *bad]))


ATTRIBUTION = ["--model", "smollm2", "--model-dir", "/m", "--novels", "n", "--eval-novel", "e", "--recipes", "base=",
               "--plan", "attribution", "--blends", "vertical_slash:0.5", "vertical_slash:0.25", "--densities", "0.1",
               "0.05"]


def test_the_attribution_plan_puts_the_oracle_in_each_group_of_layers_of_the_default(study):
    jobs = study.planned_jobs(study.parse_args([*ATTRIBUTION, "--baselines", "oracle", "--attribution-groups", "0",
                                                "1-14", "15-29"]))
    default = "gate:base+vertical_slash@0.5"
    assert [job.label for job in jobs[:5]] == [default, "oracle", f"{default} oracle@0", f"{default} oracle@1-14",
                                               f"{default} oracle@15-29"]
    assert [job.sparsity.target_density for job in jobs] == [0.1] * 5 + [0.05] * 5
    assert jobs[3].group_layers == tuple(range(1, 15)) and jobs[0].group_layers == jobs[1].group_layers == ()
    assert {job.group_scorer for job in jobs} == {"oracle"} and not any(job.sparsity.dense_layers for job in jobs)
    assert {(job.scorer, job.blend) for job in jobs if job.label != "oracle"} == {("gate:base", ("vertical_slash",
                                                                                               0.5))}
    # default groups: layer 0 alone, then fours, up to SmolLM2's 30 layers; no oracle row without --baselines
    groups = [job.group_layers for job in study.planned_jobs(study.parse_args(ATTRIBUTION))[:10]]
    assert groups[0] == () and groups[1:] == [(0,), (1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11), (12, 13, 14, 15),
                                              (16, 17, 18, 19), (20, 21, 22, 23), (24, 25, 26, 27), (28, 29)]
    only = study.planned_jobs(study.parse_args([*ATTRIBUTION, "--attribution-groups", "0", "--only",
                                                f"{default} oracle@0"]))
    assert [job.label for job in only if job] == [f"{default} oracle@0"] * 2


def test_group_scorers_put_a_training_free_selector_or_dense_layers_in_each_group(study):
    jobs = study.planned_jobs(study.parse_args([*ATTRIBUTION, "--attribution-groups", "0", "2-3", "--group-scorers",
                                                "oracle", "flexprefill", "dense", "--densities", "0.1"]))
    default = "gate:base+vertical_slash@0.5"
    assert [job.label for job in jobs] == [default] + [f"{default} {scorer}@{group}" for scorer in
                                                       ("oracle", "flexprefill", "dense") for group in ("0", "2-3")]
    assert [(job.group_scorer, job.group_layers, job.sparsity.dense_layers) for job in jobs[3:]] == [
        ("flexprefill", (0,), []), ("flexprefill", (2, 3), []), ("dense", (0,), [0]), ("dense", (2, 3), [2, 3])]
    assert {job.sparsity.target_density for job in jobs} == {0.1}
    with pytest.raises(SystemExit, match="--group-scorers: only for --plan attribution, not lever"):
        study.planned_jobs(study.parse_args(["--model-dir", "/m", "--novels", "n", "--eval-novel", "e", "--plan",
                                             "lever", "--group-scorers", "dense"]))
    with pytest.raises(SystemExit):
        study.parse_args([*ATTRIBUTION, "--group-scorers", "nonesuch"])


@pytest.mark.parametrize("groups, message", [
    (["30"], "'30': not layers of the model's 0-29"), (["5-2"], "'5-2': not layers"),
    (["1-x"], "'1-x': give a layer"), (["-1"], "'-1': give a layer"), (["2-3", "2-3"], "'2-3': given twice")])
def test_a_bad_attribution_group_stops_the_plan_naming_it(study, groups, message):
    with pytest.raises(SystemExit, match=f"--attribution-groups {message}"):
        study.planned_jobs(study.parse_args([*ATTRIBUTION, "--attribution-groups", *groups]))


def test_attribution_groups_belong_to_the_attribution_plan(study):
    with pytest.raises(SystemExit, match="--attribution-groups: only for --plan attribution, not lever"):
        study.planned_jobs(study.parse_args(["--model-dir", "/m", "--novels", "n", "--eval-novel", "e", "--plan",
                                             "lever", "--attribution-groups", "0"]))


def test_the_attribution_table_gives_each_group_its_share_of_the_gap_to_the_oracle(study):
    def row(selector, ppl, layers=(), by_layer=(0.1, 0.1, 0.1, 0.1), scorer="oracle"):
        return {"text": "novel", "seq_len": 2048, "target_density": 0.1, "selector": selector, "density": 0.1,
                "density_by_layer": list(by_layer), "ppl": ppl, "ppl_increase": ppl / 10.0 - 1,
                "group_layers": list(layers), "group_scorer": scorer if layers else None}

    default = "gate:base+vertical_slash@0.5"
    rows = [row(default, 10.4), row("oracle", 10.0), row(f"{default} oracle@0", 10.3, [0]),
            row(f"{default} oracle@1-3", 10.1, [1, 2, 3], by_layer=(0.1, 0.2, 0.2, 0.05)),
            row(f"{default} dense@0", 10.5, [0], by_layer=(1.0, 0.07, 0.07, 0.06), scorer="dense")]
    lines = study.attribution_table(rows, default).splitlines()
    assert [line.split(" | ")[3:5] + line.split(" | ")[6:7] + line.split(" | ")[-1:] for line in lines[2:]] == [
        [default, "-", "-", "0% |"], [f"{default} oracle@0", "oracle@0", "0.100 (0.100)", "25% |"],
        [f"{default} oracle@1-3", "oracle@1-3", "0.150 (0.100)", "75% |"],
        [f"{default} dense@0", "dense@0", "1.000 (0.100)", "-25% |"], ["oracle", "all", "-", "100% |"],
        ["the oracle groups summed", "-", "-", "100% |"]]  # the dense lever not in the oracle's sum
    without_oracle = study.attribution_table(rows[:1] + rows[2:], default)
    assert "+0.100 PPL" in without_oracle and "+0.300 PPL" in without_oracle and "summed" not in without_oracle


def test_the_essays_text_is_rulers_haystack_and_needs_the_extra(study, monkeypatch):
    pytest.importorskip("long_context_eval")
    from seer.evaluation.ruler import EssaysCorpus, _essay_words

    args = ["--model-dir", "/m", "--novels", "n", "--eval-novel", "e", "--plan", "final", "--texts", "novel", "essays"]
    assert study.planned_jobs(study.parse_args(args))  # checked before any model loads
    text = next(EssaysCorpus().documents())
    assert text.split() == [w for w in _essay_words() if w]  # the haystack's words, in order
    assert EssaysCorpus().fingerprint == EssaysCorpus().fingerprint != ""
    monkeypatch.setattr(study.ruler, "missing_extra", lambda: ["wonderwords"])
    with pytest.raises(SystemExit, match="--texts essays: .*wonderwords missing.*pip install"):
        study.planned_jobs(study.parse_args(args))


FIT = [*ATTRIBUTION, "--attribution-groups", "0", "2-3", "--group-scorers", "oracle", "flexprefill", "dense",
       "--densities", "0.2", "0.1", "--fit-hybrid"]  # densities at which the dense groups fit SmolLM2's budget


def test_the_fitted_hybrid_comes_last_at_each_density_with_the_deployable_candidates(study):
    jobs = study.planned_jobs(study.parse_args(FIT))
    default = "gate:base+vertical_slash@0.5"
    per_density = 1 + 3 * 2 + 1
    assert len(jobs) == 2 * per_density
    for fitted, density in ((jobs[per_density - 1], 0.2), (jobs[-1], 0.1)):
        assert fitted.label == f"{default} fitted" and fitted.group_scorer == "fitted" and fitted.group_layers == ()
        assert (fitted.scorer, fitted.blend) == ("gate:base", ("vertical_slash", 0.5))
        assert fitted.sparsity.target_density == density and fitted.sparsity.dense_layers == []
        # the oracle is no candidate: it reads the true attention
        assert fitted.candidates == (((0,), "flexprefill"), ((2, 3), "flexprefill"), ((0,), "dense"),
                                     ((2, 3), "dense"))
    assert [job.label for job in jobs[:per_density - 1]] == [default] + [
        f"{default} {scorer}@{group}" for scorer in ("oracle", "flexprefill", "dense") for group in ("0", "2-3")]
    assert not any(job.candidates for job in jobs if job.group_scorer != "fitted")
    only = study.planned_jobs(study.parse_args([*FIT, "--only", f"{default} fitted"]))
    assert [i for i, job in enumerate(only) if job] == [per_density - 1, 2 * per_density - 1]
    assert not any(job.group_scorer == "fitted" for job in study.planned_jobs(study.parse_args(FIT[:-1])))


@pytest.mark.parametrize("argv, message", [
    (["--model-dir", "/m", "--novels", "n", "--eval-novel", "e", "--plan", "lever", "--fit-hybrid"],
     "--fit-hybrid: only for --plan attribution, not lever"),
    ([*ATTRIBUTION, "--fit-hybrid"], "--fit-hybrid: give --group-scorers a deployable scorer .* not only oracle"),
    ([*ATTRIBUTION, "--fit-hybrid", "--group-scorers", "oracle", "oracle"], "not only oracle oracle"),
    ([*FIT[:-1], "--fit-margin", "0.01"], "--fit-margin: only with --fit-hybrid"),
    ([*FIT, "--fit-margin", "-0.01"], "--fit-margin -0.01: give a share"),
    ([*FIT, "--attribution-groups", "0-3", "2-5"],
     r"--attribution-groups: groups of layers 0-3 and 2-5 overlap \(layer 2\)")])
def test_a_fitted_hybrid_with_bad_arguments_stops_before_any_model_loads(study, monkeypatch, argv, message):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was trained or loaded")

    monkeypatch.setattr(study, "train_gates", no_model)
    monkeypatch.setattr(study, "load_causal_lm", no_model)
    monkeypatch.setattr(study, "load_tokenizer", no_model)
    monkeypatch.setattr("sys.argv", ["quality_qwen.py", *argv, "--out", "/nonexistent/out"])
    with pytest.raises(SystemExit, match=message):
        study.main()


def test_fit_hybrid_measures_the_default_and_each_candidate_on_the_calibration_windows_then_picks(study):
    from seer.evaluation.hybrid_fit import describe_layers
    from seer.sparsity import SparsityConfig

    class FakeEvaluator:
        ppl = {"": 10.0, "flexprefill@0": 9.5, "flexprefill@2-3": 10.1, "dense@0": 9.9, "dense@2-3": 9.7,
               "flexprefill@0 dense@2-3": 9.3}

        def __init__(self):
            self.calls, self.forgotten = [], 0

        def forget(self, selector):
            assert selector is None
            self.forgotten += 1

        def calibration_ppl(self, selector, sparsity, seq_len, calibration=None, layer_selectors=None):
            assert selector is None and seq_len == 4096 and calibration is None
            assert sparsity.target_density == 0.1
            layers = {**{layer: s.name for layer, s in (layer_selectors or {}).items()},
                      **dict.fromkeys(sparsity.dense_layers, "dense")}
            key = describe_layers(layers)
            self.calls.append(key)
            return {"ppl": self.ppl[key], "ppl_half": 0.0}

    ev, reports = FakeEvaluator(), []
    candidates = (((0,), "flexprefill"), ((2, 3), "flexprefill"), ((0,), "dense"), ((2, 3), "dense"))
    fit, combined = study.fit_hybrid(ev, SparsityConfig(method="threshold", target_density=0.1), 4096, candidates,
                                     0.002, lambda *got: reports.append(got))
    assert ev.calls == ["", "flexprefill@0", "flexprefill@2-3", "dense@0", "dense@2-3", "flexprefill@0 dense@2-3"]
    assert ev.forgotten == 2 * len(ev.calls)  # no observation kept from one hybrid to the next
    assert fit.layers == {0: "flexprefill", 2: "dense", 3: "dense"} and fit.baseline_ppl == 10.0
    assert combined == 9.3 and reports[0] == ("default", 10.0, 0.0)
    assert reports[-1][0] == "combined flexprefill@0 dense@2-3" and reports[-1][2] == pytest.approx(-0.07)
    # one pick: its own measure is the combined one, nothing measured again
    ev.ppl = {**ev.ppl, "dense@2-3": 10.0}
    ev.calls = []
    fit, combined = study.fit_hybrid(ev, SparsityConfig(method="threshold", target_density=0.1), 4096, candidates)
    assert fit.describe() == "flexprefill@0" and combined == 9.5 and len(ev.calls) == 5
    layer_selectors, budget = study.hybrid_selection({0: "flexprefill", 2: "dense", 3: "dense"},
                                                     SparsityConfig(method="threshold", target_density=0.1))
    assert {layer: s.name for layer, s in layer_selectors.items()} == {0: "flexprefill"}
    assert budget.dense_layers == [2, 3]


def test_the_fitted_hybrid_is_reported_beside_the_groups(study):
    default = "gate:base+vertical_slash@0.5"

    def row(selector, ppl, layers=(), scorer=None, fit=None):
        return {"text": "novel", "seq_len": 2048, "target_density": 0.1, "selector": selector, "density": 0.1,
                "density_by_layer": [0.1, 0.2, 0.3, 0.4], "ppl": ppl, "ppl_increase": ppl / 10.0 - 1,
                "group_layers": list(layers), "group_scorer": scorer, "hybrid_fit": fit}

    fit = {"job": f"{default} fitted", "label": f"{default} fitted[vertical_slash@2-3]", "sparsity": "threshold@0.1",
           "text": "novel", "seq_len": 2048, "baseline_ppl": 11.0, "margin": 0.002, "picked": "vertical_slash@2-3",
           "layers": {"2": "vertical_slash", "3": "vertical_slash"}, "combined_ppl": 10.5,
           "candidates": [{"group": [0], "scorer": "vertical_slash", "ppl": 11.2, "change": 11.2 / 11 - 1,
                           "picked": False},
                          {"group": [2, 3], "scorer": "vertical_slash", "ppl": 10.5, "change": 10.5 / 11 - 1,
                           "picked": True},
                          {"group": [2, 3], "scorer": "dense", "ppl": None, "change": None, "picked": False}]}
    none = {**fit, "label": f"{default} fitted[none]", "picked": "none", "layers": {}, "combined_ppl": 11.0}
    rows = [row(default, 10.4), row(f"{default} vertical_slash@2-3", 10.2, [2, 3], "vertical_slash"),
            row(fit["label"], 10.3, [2, 3], "fitted", fit), row(none["label"], 10.4, [], "fitted", none)]
    lines = study.attribution_table(rows, default).splitlines()[2:]
    assert [line.split(" | ")[3:7] for line in lines] == [
        [default, "-", "0.100", "-"], [f"{default} vertical_slash@2-3", "vertical_slash@2-3", "0.100", "0.350 (0.350)"],
        [fit["label"], "fitted: vertical_slash@2-3", "0.100", "0.350 (0.350)"],
        [none["label"], "fitted: none", "0.100", "-"]]
    table = study.hybrid_fit_table([fit]).splitlines()
    assert table[2:] == [f"| {default} fitted | threshold@0.1 | - | default | 11.0000 | - | - |",
                         f"| {default} fitted | threshold@0.1 | 0 | vertical_slash | 11.2000 | +1.82% |  |",
                         f"| {default} fitted | threshold@0.1 | 2-3 | vertical_slash | 10.5000 | -4.55% | yes |",
                         f"| {default} fitted | threshold@0.1 | 2-3 | dense | not measured | - |  |",
                         f"| {default} fitted | threshold@0.1 | combined | vertical_slash@2-3 | 10.5000 | -4.55% | - |"]


def test_a_fitted_job_on_a_tiny_model_picks_on_the_calibration_windows_and_evaluates_the_picks(study):
    from seer.evaluation.config import EvalConfig
    from seer.evaluation.data import HeldOutText
    from seer.evaluation.harness import Evaluator
    from seer.gates.config import GateConfig
    from seer.model.attention import attach_gates
    from seer.sparsity import SparsityConfig
    from tests.evaluation.conftest import WORDS, ListCorpus
    from tests.tiny import tiny_model, tiny_tokenizer

    import torch

    gen = torch.Generator().manual_seed(0)
    docs = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (400,), generator=gen).tolist())
            for _ in range(12)]
    model = tiny_model("llama", seed=0, max_position_embeddings=4096)
    attach_gates(model, GateConfig(block_size=16, hidden_size=16, blend="vertical_slash", blend_weight=0.5))
    tokenizer = tiny_tokenizer()
    text = HeldOutText(ListCorpus(docs), tokenizer, split="all", progress=False)
    ev = Evaluator(model, tokenizer, text, EvalConfig(seq_lens=[256], windows=1, calibration_windows=1, passkey=0,
                                                      copy=0, timing=False, dense_cache=False), progress=False)
    sparsity = SparsityConfig(method="threshold", target_density=0.3)
    candidates = (((0,), "vertical_slash"), ((1,), "vertical_slash"), ((0,), "dense"), ((1,), "dense"))
    record, layer_selectors, budget = study.fitted_job(ev, "g fitted", sparsity, "novel", 256, candidates,
                                                       margin=0.0)
    own = {(tuple(c["group"]), c["scorer"]): c["ppl"] for c in record["candidates"]}
    assert record["baseline_ppl"] == pytest.approx(ev.calibration_ppl(None, sparsity, 256)["ppl"], rel=1e-6)
    # a dense layer costs half of the tiny model's budget, more than 0.3: not measured, never picked
    assert own[(0,), "dense"] is None and own[(1,), "dense"] is None
    assert own[(1,), "vertical_slash"] == pytest.approx(ev.calibration_ppl(
        None, sparsity, 256, layer_selectors={1: study.build_selector("vertical_slash")})["ppl"], rel=1e-6)
    assert record["job"] == "g fitted" and record["label"] == f"g fitted[{record['picked']}]"
    picked = {int(layer): scorer for layer, scorer in record["layers"].items()}
    for (group, scorer), ppl in own.items():  # a group is picked exactly when a candidate beats the default
        if ppl is None:
            assert picked.get(group[0]) != scorer
            continue
        best = min(p for (g, _), p in own.items() if g == group and p is not None)
        assert (picked.get(group[0]) == scorer) == (ppl == best and ppl < record["baseline_ppl"])
    assert {layer: s.name for layer, s in layer_selectors.items()} == {
        layer: scorer for layer, scorer in picked.items() if scorer != "dense"}
    assert budget.dense_layers == sorted(layer for layer, scorer in picked.items() if scorer == "dense")
    (row,) = ev.evaluate(None, budget, {256: {}}, layer_selectors=layer_selectors)
    assert row["ppl"] > 0 and row["calibrated_density"] == pytest.approx(0.3, abs=0.05)
    assert json.loads(json.dumps(record)) == record
    wide = SparsityConfig(method="threshold", target_density=0.6)
    record, layer_selectors, budget = study.fitted_job(ev, "g fitted", wide, "novel", 256, (((0,), "dense"),))
    dense0 = ev.calibration_ppl(None, SparsityConfig(method="threshold", target_density=0.6, dense_layers=[0]), 256)
    assert record["candidates"][0]["ppl"] == pytest.approx(dense0["ppl"], rel=1e-6)
    assert (budget.dense_layers == [0]) == record["candidates"][0]["picked"] and not layer_selectors


def _tiny_study(study, monkeypatch, tmp_path):
    """``study.main`` on a 2-layer random Llama (gates attached as if loaded) and a little novel, on the CPU."""
    from types import SimpleNamespace

    import torch

    from seer.gates.config import GateConfig
    from seer.model.attention import attach_gates
    from tests.evaluation.conftest import WORDS
    from tests.tiny import tiny_model, tiny_tokenizer

    gen = torch.Generator().manual_seed(0)
    novels = tmp_path / "novels"
    novels.mkdir()
    for i in range(8):
        (novels / f"{i}.txt").write_text(" ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (500,),
                                                                                    generator=gen).tolist()))
    monkeypatch.setattr(study, "validate", lambda cfg: SimpleNamespace(model=None))
    monkeypatch.setattr(study, "model_id", lambda model: "tiny")
    monkeypatch.setattr(study, "load_tokenizer", lambda model: tiny_tokenizer())
    monkeypatch.setattr(study, "load_causal_lm", lambda model, device: tiny_model(
        "llama", seed=0, max_position_embeddings=4096))
    monkeypatch.setattr(study, "load_gates", lambda model, path: attach_gates(model, GateConfig(block_size=16,
                                                                                                 hidden_size=16)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return ["--model", "smollm2", "--model-dir", "/m", "--novels", "n", "--eval-novel", str(novels / "*.txt"),
            "--gates", "base=/gates", "--recipes", "base=", "--blends", "vertical_slash:0.5", "--plan",
            "attribution", "--attribution-groups", "0", "1", "--group-scorers", "oracle", "vertical_slash", "dense",
            "--fit-hybrid", "--fit-margin", "0", "--densities", "0.6", "--texts", "novel", "--seq-lens", "256",
            "--windows", "1", "--passkey", "0", "--copy", "1", "--work", str(tmp_path / "work")]


def test_the_fitted_job_runs_in_the_study_loop_and_writes_its_fit(study, monkeypatch, tmp_path, capsys):
    argv = _tiny_study(study, monkeypatch, tmp_path)
    out = tmp_path / "out"
    monkeypatch.setattr("sys.argv", ["quality_qwen.py", *argv, "--out", str(out)])
    study.main()
    rows = json.loads((out / "rows.json").read_text())
    (fit,) = json.loads((out / "hybrid_fits.json").read_text())
    default = "gate:base+vertical_slash@0.5"
    assert [row["selector"] for row in rows[:-1]] == [default] + [
        f"{default} {scorer}@{layer}" for scorer in ("oracle", "vertical_slash", "dense") for layer in "01"]
    fitted = rows[-1]
    assert fitted["selector"] == fit["label"] == f"{default} fitted[{fit['picked']}]"
    if len(fit["layers"]) == 1:  # one group picked: evaluated as that group's own job was
        (same,) = [row for row in rows if row["selector"] == f"{default} {fit['picked']}"]
        assert fitted["ppl"] == pytest.approx(same["ppl"], rel=1e-6)
    assert fitted["hybrid_fit"] == fit and fit["job"] == f"{default} fitted"
    assert [(c["group"], c["scorer"]) for c in fit["candidates"]] == [([0], "vertical_slash"), ([1], "vertical_slash"),
                                                                    ([0], "dense"), ([1], "dense")]
    assert fitted["group_layers"] == sorted(int(layer) for layer in fit["layers"])
    printed = capsys.readouterr().out
    budget = "threshold target_density=0.6 (global) [dense_last_rows=1]"
    assert f"{default} fitted {budget} fit on novel calibration windows: default ppl" in printed
    assert f"{default} fitted {budget} fit on novel calibration windows: dense@1 ppl" in printed
    results = (out / "results.md").read_text()
    assert "## Fitted hybrids" in results and f"| {default} fitted | " in results and "--fit-hybrid " in results


def test_the_fitted_job_is_cut_by_the_deadline_and_counted_by_skip_and_only(study, monkeypatch, tmp_path, capsys):
    argv = _tiny_study(study, monkeypatch, tmp_path)
    default = "gate:base+vertical_slash@0.5"
    for extra, fitted in ((["--skip", "7"], True), (["--only", f"{default} fitted"], True),
                          (["--deadline-s", "0"], False)):
        out = tmp_path / "_".join(extra)
        monkeypatch.setattr("sys.argv", ["quality_qwen.py", *argv, *extra, "--out", str(out)])
        study.main()
        rows = json.loads((out / "rows.json").read_text()) if (out / "rows.json").exists() else []
        assert [row["selector"].startswith(f"{default} fitted[") for row in rows] == ([True] if fitted else [])
        assert (out / "hybrid_fits.json").exists() == fitted
        results = (out / "results.md").read_text()
        assert (f"{default} fitted threshold target_density=0.6" in results.split("## Not run")[-1]) != fitted


def test_a_dense_group_costlier_than_the_budget_stops_the_plan_before_loading(study):
    # SmolLM2 has 30 layers: at density 0.1 three dense layers already spend the whole budget
    args = [*ATTRIBUTION, "--attribution-groups", "0", "1-3", "--group-scorers", "dense", "--densities", "0.1"]
    with pytest.raises(SystemExit, match="dense@1-3: 3 dense layers of 30 cost more than the target density 0.1"):
        study.planned_jobs(study.parse_args(args))
    assert study.planned_jobs(study.parse_args([*args, "--only", "gate:base+vertical_slash@0.5 dense@0"]))


def _decode_gate_folder(tmp_path):
    """Decode gates (random, non-trivial) of the tiny study's model, saved as stage=distill_decode saves them."""
    import torch

    from seer.gates.decode_config import DecodeGateConfig
    from seer.model.decode import attach_decode_gates, decode_gates
    from seer.model.decode_gate_io import save_decode_gates
    from tests.tiny import tiny_model

    folder = tmp_path / "decode_gates"
    model = tiny_model("llama", seed=0, max_position_embeddings=4096)
    attach_decode_gates(model, DecodeGateConfig(block_size=16, hidden_size=16))
    torch.manual_seed(3)
    for gate in decode_gates(model).values():
        torch.nn.init.normal_(gate.k_weight, std=2.0)
    save_decode_gates(folder, model, "tiny")
    return folder


def test_shared_gates_are_studied_beside_the_recipes_gates(study, monkeypatch, tmp_path):
    """--shared-gates NAME=PATH: the decode gates score the prefill as the gate set gate:NAME, in every job of the
    plan that a recipe's gates have, blended and alone."""
    argv = _tiny_study(study, monkeypatch, tmp_path)
    argv = argv[:argv.index("--plan")] + ["--plan", "lever", "--densities", "0.6", "--texts", "novel", "--seq-lens",
                                          "256", "--windows", "1", "--passkey", "0", "--copy", "1", "--work",
                                          str(tmp_path / "work")]
    out = tmp_path / "out"
    folder = _decode_gate_folder(tmp_path)
    monkeypatch.setattr("sys.argv", ["quality_qwen.py", *argv, "--shared-gates", f"shared={folder}", "--out",
                                     str(out)])
    study.main()
    rows = {row["selector"]: row for row in json.loads((out / "rows.json").read_text())}
    assert list(rows) == ["gate:base+vertical_slash@0.5", "gate:shared+vertical_slash@0.5", "gate:base",
                          "gate:shared"]
    for row in rows.values():
        assert 0.45 < row["density"] < 0.75 and row["ppl"] > 0
    assert rows["gate:shared"]["ppl"] != rows["gate:base"]["ppl"]


@pytest.mark.parametrize("pair, message", [("shared", "give NAME=PATH"), ("base=/x", "give NAME=PATH"),
                                           ("s=/no/decode", "no decode gates there")])
def test_bad_shared_gates_stop_before_any_training(study, pair, message):
    args = study.parse_args(["--model-dir", "/m", "--novels", "n", "--eval-novel", "e", "--recipes", "base=",
                             "--shared-gates", pair])
    with pytest.raises(SystemExit, match=message):
        study.planned_jobs(args)


def test_shared_gates_alone_need_no_trained_gate_set(study, tmp_path):
    folder = _decode_gate_folder(tmp_path)
    base = ["--model-dir", "/m", "--novels", "n", "--eval-novel", "e", "--plan", "lever", "--blends",
            "vertical_slash:0.5", "--densities", "0.1", "--targets"]
    args = study.parse_args([*base, "--shared-gates", f"shared={folder}"])
    assert study.recipes(args) == {} and study.gate_sets(args) == ["gate:shared"]
    assert [label for label, *_ in study.planned_jobs(args)] == ["gate:shared+vertical_slash@0.5", "gate:shared"]
    with pytest.raises(SystemExit, match="no gate sets: give --targets, --recipes or --shared-gates"):
        study.planned_jobs(study.parse_args(base))


def test_baselines_alone_need_no_gate_set_and_measure_as_beside_gates(study, monkeypatch, tmp_path):
    """--targets with none and --plan lever: the --baselines run on the model without gates (prepared at the
    recipe's block size), and measure exactly what the same baselines measure in a study with gates."""
    argv = _tiny_study(study, monkeypatch, tmp_path)
    monkeypatch.setattr(study, "recipe_block_size", lambda model: 16)  # the tiny gates' block size
    common = ["--plan", "lever", "--baselines", "oracle", "vertical_slash", "--only", "oracle", "vertical_slash",
              "--densities", "0.6", "--texts", "novel", "--seq-lens", "256", "--windows", "1", "--passkey", "0",
              "--copy", "1", "--work", str(tmp_path / "work")]
    before_plan = argv[:argv.index("--plan")]
    gated = before_plan + common
    ungated = [a for a in before_plan if a not in ("--gates", "base=/gates", "--recipes", "base=")] + common
    rows = {}
    for name, args in (("gated", gated), ("ungated", [*ungated, "--targets"])):
        monkeypatch.setattr("sys.argv", ["quality_qwen.py", *args, "--out", str(tmp_path / name)])
        study.main()
        rows[name] = json.loads((tmp_path / name / "rows.json").read_text())
    assert [r["selector"] for r in rows["ungated"]] == ["oracle", "vertical_slash"]
    for got, want in zip(rows["ungated"], rows["gated"], strict=True):
        assert got["selector"] == want["selector"] and 0.45 < got["density"] < 0.75
        assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-9) and got["density"] == want["density"]
    assert rows["ungated"][0]["ppl"] != rows["ungated"][1]["ppl"]
    base = ["--model-dir", "/m", "--novels", "n", "--eval-novel", "e", "--densities", "0.1", "--targets"]
    with pytest.raises(SystemExit, match="or, with --plan lever, only --baselines"):
        study.planned_jobs(study.parse_args([*base, "--plan", "final", "--baselines", "oracle"]))


def test_the_recipe_block_size_is_the_gate_presets(study):
    assert study.recipe_block_size("qwen05") == 64 and study.recipe_block_size("smollm2") == 32


def test_the_lever_plan_measures_the_blend_under_each_allocation(study):
    args = study.parse_args(["--model-dir", "/m", "--novels", "n", "--eval-novel", "e", "--recipes", "base=",
                             "--plan", "lever", "--blends", "vertical_slash:0.5", "--densities", "0.1",
                             "--allocations", "global", "oracle"])
    jobs = study.planned_jobs(args)
    assert [(job.label, job.sparsity.allocation) for job in jobs] == [
        ("gate:base+vertical_slash@0.5", "global"), ("gate:base+vertical_slash@0.5 oracle", "oracle"),
        ("gate:base", "global")]
    with pytest.raises(SystemExit, match="--allocations: only for --plan lever"):
        study.planned_jobs(study.parse_args([*ATTRIBUTION, "--allocations", "uniform"]))
    with pytest.raises(SystemExit):
        study.parse_args(["--model-dir", "/m", "--novels", "n", "--eval-novel", "e", "--allocations", "per_row"])


def test_a_decode_budget_is_at_least_a_block_and_not_beside_shared_gates(study):
    base = ["--model-dir", "/m", "--novels", "n", "--eval-novel", "e", "--recipes", "base=", "--plan", "lever"]
    assert study.parse_args([*base, "--decode-budget", "2048"]).decode_budget == 2048
    assert study.planned_jobs(study.parse_args([*base, "--decode-budget", "2048"]))
    assert study.planned_jobs(study.parse_args([*base, "--decode-budget", "2048", "--decode-prompt-blocks", "4"]))
    assert study.planned_jobs(study.parse_args([*base, "--decode-budget", "2048", "--decode-recent-blocks", "2"]))
    assert study.parse_args([*base, "--decode-budget", "2048", "--decode-estimate", "quest_mass"]).decode_estimate \
        == "quest_mass"
    with pytest.raises(SystemExit, match="--decode-estimate quest_mass: scores sparse decode steps"):
        study.planned_jobs(study.parse_args([*base, "--decode-estimate", "quest_mass"]))
    with pytest.raises(SystemExit):
        study.parse_args([*base, "--decode-budget", "2048", "--decode-estimate", "snapkv"])
    assert study.parse_args([*base, "--decode-budget", "2048", "--decode-estimate", "oracle"]).decode_estimate \
        == "oracle"
    assert study.planned_jobs(study.parse_args([*base, "--decode-budget", "2048", "--decode-rerank-blocks", "64"]))
    for bad in (["--decode-budget", "32"], ["--decode-budget", "-1"],
                ["--decode-budget", "2048", "--shared-gates", "s=/g"], ["--decode-prompt-blocks", "4"],
                ["--decode-budget", "2048", "--decode-prompt-blocks", "-1"], ["--decode-recent-blocks", "2"],
                ["--decode-budget", "2048", "--decode-recent-blocks", "-1"], ["--decode-rerank-blocks", "64"]):
        with pytest.raises(SystemExit, match="--decode-budget|--decode-prompt-blocks|--decode-recent-blocks|"
                                             "--decode-rerank-blocks"):
            study.planned_jobs(study.parse_args([*base, *bad]))


def test_the_lever_plan_reranks_the_default_and_the_bad_specs_stop_it(study):
    base = ["--model-dir", "/m", "--novels", "n", "--eval-novel", "e", "--recipes", "base=", "--blends",
            "vertical_slash:0.5", "--densities", "0.1"]
    jobs = study.planned_jobs(study.parse_args([*base, "--plan", "lever", "--reranks", "8:0.9", "16", "16::0.3",
                                                "--baselines", "reranked"]))
    assert [(job.label, job.blend, job.rerank) for job in jobs] == [
        ("gate:base+vertical_slash@0.5", ("vertical_slash", 0.5), None),
        ("gate:base+vertical_slash@0.5+rerank8@0.9", ("vertical_slash", 0.5), (8, 0.9, 1.0)),
        ("gate:base+vertical_slash@0.5+rerank16@0.99", ("vertical_slash", 0.5), (16, 0.99, 1.0)),
        ("gate:base+vertical_slash@0.5+rerank16@0.99cap0.3", ("vertical_slash", 0.5), (16, 0.99, 0.3)),
        ("gate:base", None, None), ("reranked", None, None)]
    assert study.rerank_fields(None) == {"rerank_rows": 0, "rerank_top_p": 0.99, "rerank_max_share": 1.0}
    for bad in ("0:0.9", "8:1.5", "x", "8:0", "8:0.9:0", "8:0.9:0.5:1"):
        with pytest.raises(SystemExit, match=f"--reranks '{bad}'"):
            study.planned_jobs(study.parse_args([*base, "--plan", "lever", "--reranks", bad]))
    with pytest.raises(SystemExit, match="--reranks: only for --plan lever"):
        study.planned_jobs(study.parse_args([*base, "--plan", "final", "--reranks", "8:0.9"]))


def test_a_reranked_job_runs_in_the_study_loop_under_its_own_label(study, monkeypatch, tmp_path):
    argv = _tiny_study(study, monkeypatch, tmp_path)
    argv = argv[:argv.index("--plan")] + ["--plan", "lever", "--reranks", "4:0.8"] + argv[argv.index("--densities"):]
    out = tmp_path / "out"
    monkeypatch.setattr("sys.argv", ["quality_qwen.py", *argv, "--out", str(out)])
    study.main()
    rows = {row["selector"]: row for row in json.loads((out / "rows.json").read_text())}
    default = "gate:base+vertical_slash@0.5"
    assert list(rows) == [default, f"{default}+rerank4@0.8", "gate:base"]
    assert rows[f"{default}+rerank4@0.8"]["ppl"] != rows[default]["ppl"]
