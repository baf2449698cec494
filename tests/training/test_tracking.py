"""The W&B run a training run leaves (read back from its offline files): flat config, short unique name, per-layer
table, gates artifact, exit code; and the naming helpers."""

import json
import re

import pytest

from seer.tracking import flat_config, override_tags, run_name
from tests.training.conftest import train
from tests.training.wandb_offline import offline_run, offline_runs


def test_run_names_are_short_unique_and_safe():
    assert run_name("distill", {}, "ab12cd34") == "distill-ab12cd34"
    assert run_name("distill", {"sparsity.target_density": 0.5, "gate": "avgmaxmin"}, "ab12cd34") == \
        "distill-target_density=0.5-gate=avgmaxmin-ab12cd34"
    long = run_name("distill", {f"stage.key{i}": "/a/b c" * 3 for i in range(15)}, "ab12cd34")
    assert len(long) <= 64 and long.endswith("-ab12cd34") and "/" not in long and " " not in long
    assert override_tags(["x=" + "y" * 100]) == ["x=" + "y" * 62]


def test_flat_config_has_dotted_keys():
    flat = flat_config({"gate": {"k_pool": ["max", "min"], "block_size": 64}, "seed": 0, "hydra": {"a": 1},
                        "logger": {"wandb": {}}})
    assert flat == {"gate.k_pool": ["max", "min"], "gate.block_size": 64, "seed": 0}


def test_offline_run_has_config_name_table_and_artifact(tmp_path, offline_wandb):
    summary = train(tmp_path, "logger=wandb", "trainer.max_steps=2", "stage.image_every_n_steps=1")
    (run_dir,) = offline_runs(tmp_path)
    run = offline_run(run_dir)
    assert re.fullmatch(r"distill-[a-z0-9]{8}", run["name"]) and run["name"] == summary["wandb_name"]
    assert run["id"] == summary["wandb_id"] and run["name"].endswith(run["id"])
    config = run["config"]
    assert config["sparsity.method"] == "threshold" and config["sparsity.target_density"] == 0.1
    assert config["gate.k_pool"] == ["max", "min", "avg"] and config["gate.block_size"] == 16
    assert config["model.name"] == "random-llama" and config["choices.model"] == "tiny_llama"
    assert config["params.gates"] > 0 and config["params.frozen"] > config["params.gates"]
    assert config["versions.torch"] and config["run.world_size"] == 1
    assert config["achieved.density"] == pytest.approx(summary["val_density"])
    assert "logger=wandb" in run["tags"] and "logger=wandb" in config["run.overrides"]
    kind, files = run["artifacts"][f"gates-{run['id']}"]
    assert kind == "gates" and {"gates/gates.safetensors", "gates/gates.json", "summary.json"} <= set(files)
    (table_row,) = [row for row in run["history"] if "val/layers/path" in row]
    assert table_row["trainer/global_step"] == 2
    table = json.loads((run_dir / "files" / table_row["val/layers/path"]).read_text())
    assert table["columns"] == ["layer", "recall", "oracle_recall", "density", "kl"]
    assert [r[0] for r in table["data"]] == [0, 1] and all(0 < r[1] <= 1 for r in table["data"])
    assert any(k.startswith("gates/layer_00") for row in run["history"] for k in row)  # the heatmaps
    assert run["exit_code"] == 0


def test_a_run_failing_in_training_is_marked_failed(tmp_path, offline_wandb, monkeypatch):
    from seer.training.distill import GateDistillation

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(GateDistillation, "training_step", out_of_memory)
    with pytest.raises(RuntimeError, match="CUDA out of memory"):  # the run's own error, through Lightning's hooks
        train(tmp_path, "logger=wandb")
    (run_dir,) = offline_runs(tmp_path)
    assert offline_run(run_dir)["exit_code"] == 1


def test_wandb_runs_end_without_the_history_dump(tmp_path, offline_wandb):
    from seer.tracking import start_wandb_run

    run = start_wandb_run(project="seer", save_dir=str(tmp_path), name="quiet-run")
    try:
        assert run.settings.quiet  # no history and summary panel after seer's own summary
    finally:
        run.finish()
