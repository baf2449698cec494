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
