"""Ctrl-C saves a checkpoint and a summary; a resumed run continues the same W&B run; a killed run keeps the
history it logged."""

import json
import os
import signal
import subprocess
import time

import torch

from tests.training.conftest import TINY, cli_env, seer_train
from tests.training.wandb_offline import offline_run, offline_runs


def _loss_steps(run):
    """The global steps of the training losses a W&B run recorded."""
    return [row["trainer/global_step"] for row in run["history"] if "train/loss" in row]


def _wait_for_step(folder, step, proc, timeout=300):
    """Waits until the W&B run under ``folder`` has flushed training losses up to ``step``; returns its folder."""
    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        for run_dir in offline_runs(folder):
            try:
                steps = _loss_steps(offline_run(run_dir, finished=False))
            except (ValueError, AssertionError):  # caught mid-write
                continue
            if steps and max(steps) >= step:
                return run_dir
        time.sleep(0.5)
    raise TimeoutError(f"no W&B history up to step {step} in {folder}")


def test_ctrl_c_checkpoint_resume_and_kill(tmp_path):
    env = cli_env(tmp_path)
    args = [*TINY, "logger=wandb", "logger.wandb.flush_interval_s=0.5", "trainer.max_steps=100000",
            "callbacks.model_checkpoint.every_n_train_steps=100000"]
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first = subprocess.Popen(seer_train(*args, f"hydra.run.dir={first_dir}"), cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_run = _wait_for_step(first_dir, 3, first)
    first.send_signal(signal.SIGINT)
    output = first.communicate(timeout=300)[0]
    assert first.returncode == 130, output[-3000:]
    ckpt = first_dir / "checkpoints" / "last.ckpt"
    stopped_at = torch.load(ckpt, weights_only=False)["global_step"]
    summary = json.loads((first_dir / "summary.json").read_text())
    assert summary["status"] == "stopped early" and summary["steps"] == stopped_at >= 3
    assert summary["val_step"] == stopped_at  # validated the gates it stopped with
    assert f"resume with ckpt_path={ckpt}" in output
    assert offline_run(first_run)["exit_code"] == 130

    second = subprocess.Popen(seer_train(*args, f"hydra.run.dir={second_dir}", f"ckpt_path={ckpt}"), cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    second_run = _wait_for_step(second_dir, stopped_at + 3, second)
    os.kill(second.pid, signal.SIGKILL)
    second.communicate(timeout=60)
    resumed = offline_run(second_run, finished=False)  # killed: no exit record
    assert resumed["id"] == offline_run(first_run)["id"] and resumed["name"] == summary["wandb_name"]
    steps = _loss_steps(resumed)
    assert min(steps) == stopped_at and max(steps) >= stopped_at + 3
