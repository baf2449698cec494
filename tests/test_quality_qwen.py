"""experiments/quality_qwen.py: a dense pass written by one run is reused by the next only when it was measured with
exactly the same settings."""

import json
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture
def study(monkeypatch):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))  # as when run as a file: its sibling scripts importable
    import quality_qwen

    return quality_qwen


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
