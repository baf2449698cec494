"""A sweep (-m): short job folders whatever the overrides, every failed job listed, W&B runs named by their swept
values in one group, and a summary run comparing the jobs."""

import json
import subprocess

import pytest

from tests.training.conftest import TINY, cli_env, seer_train
from tests.training.wandb_offline import offline_run, offline_runs


def test_sweep_reports_every_failure_and_compares_jobs(tmp_path):
    cmd = seer_train("-m", *TINY, "logger=wandb", "sparsity.target_density=0.5,1.5,2.5,0.3",
                     f"paths.cache_dir={tmp_path}/a/path/value", "stage.lr=0.002", "stage.weight_decay=0.01")
    proc = subprocess.run(cmd, cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0  # the failures are reported ...
    assert "Traceback" not in proc.stderr  # ... as messages
    for job, value in ((1, 1.5), (2, 2.5)):
        assert f"FAILED job {job} (" in proc.stderr and f"ConfigError: sparsity.target_density={value}" in proc.stderr
    (sweep,) = (tmp_path / "multirun" / "distill").iterdir()
    assert sorted(p.name for p in sweep.iterdir() if p.name.isdigit()) == ["0", "1", "2", "3"]
    rows = json.loads((sweep / "sweep.json").read_text())
    assert [r["status"] for r in rows] == ["completed", "failed", "failed", "completed"]

    runs = {}
    for job, density in ((0, 0.5), (3, 0.3)):  # the others' results are there
        summary = json.loads((sweep / str(job) / "summary.json").read_text())
        assert summary["sparsity"]["target_density"] == density and summary["steps"] == 3
        assert (sweep / str(job) / "gates" / "gates.safetensors").exists()
        (run_dir,) = offline_runs(sweep / str(job))
        runs[job] = offline_run(run_dir)
        assert runs[job]["name"] == f"distill-target_density={density}-{runs[job]['id']}"
        assert f"sparsity.target_density={density}" in runs[job]["tags"]
    assert runs[0]["group"] == runs[3]["group"] == f"distill/{sweep.name}"

    (group_run,) = (sweep / "wandb").glob("offline-run-*")
    summary_run = offline_run(group_run)
    assert summary_run["group"] == runs[0]["group"] and summary_run["exit_code"] == 0
    logged = {k for row in summary_run["history"] for k in row}
    assert "sweep/jobs/path" in logged and any(k.startswith("sweep/val_recall_vs_density") for k in logged)


@pytest.mark.parametrize("launcher, target, values", [
    ("slurm", "SlurmLauncher", {"gpus_per_node": 1, "tasks_per_node": 1, "timeout_min": 720, "array_parallelism": 8}),
    ("slurm_local", "LocalLauncher", {"gpus_per_node": 0, "timeout_min": 60}),
])
def test_cluster_launchers_compose(launcher, target, values):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")  # make setup installs it (the cluster extra)
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from seer.config import CONF_DIR, register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={launcher}", "sparsity.target_density=0.1"],
                      return_hydra_config=True)
    node = cfg.hydra.launcher
    assert node._target_ == f"hydra_plugins.hydra_submitit_launcher.submitit_launcher.{target}"
    assert {k: node[k] for k in values} == values
    assert node.submitit_folder == f"{cfg.hydra.sweep.dir}/.submitit/%j"  # the plugin's schema fills the rest
