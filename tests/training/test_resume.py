"""Resuming from a checkpoint: exactly the uninterrupted run's gates across epoch boundaries; a changed key that
shapes the gates or the data order refused, naming it; anything else allowed."""

import json

import pytest
import torch
from safetensors.torch import load_file

from seer.checks import ConfigError
from tests.training.conftest import train

# 4 rows of batch 1: epochs end after steps 4 and 8
NINE_STEPS = ["trainer.max_steps=9", "callbacks.model_checkpoint.every_n_train_steps=3"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    summary = train(out, *NINE_STEPS)
    assert summary["steps"] == 9
    return out


def _gates(folder):
    return load_file(str(folder / "gates" / "gates.safetensors"))


@pytest.mark.parametrize("step", [3, 6])
def test_resume_across_epoch_boundaries_gives_the_same_gates(uninterrupted, step, tmp_path):
    ckpt = uninterrupted / "checkpoints" / f"step{step:06d}.ckpt"
    state = torch.load(ckpt, weights_only=False)
    assert state["global_step"] == step
    assert state["state_dict"] and all(".seer_gate." in k for k in state["state_dict"])  # gates only
    assert state["seer"]["config"]["gate.block_size"] == 16  # the run's config travels with it
    summary = train(tmp_path, *NINE_STEPS, f"ckpt_path={ckpt}")
    assert summary["steps"] == 9
    want, got = _gates(uninterrupted), _gates(tmp_path)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_resume_refuses_a_changed_key_that_shapes_the_gates(uninterrupted, tmp_path):
    ckpt = uninterrupted / "checkpoints" / "step000003.ckpt"
    with pytest.raises(ConfigError, match=r"gate.block_size=16 in the checkpoint, 32 now"):
        train(tmp_path, *NINE_STEPS, f"ckpt_path={ckpt}", "gate.block_size=32")
    with pytest.raises(ConfigError, match=r"data.seed=0 in the checkpoint, 1 now; seed=0 in the checkpoint, 1 now"):
        train(tmp_path, *NINE_STEPS, f"ckpt_path={ckpt}", "seed=1")
    summary = train(tmp_path, *NINE_STEPS, f"ckpt_path={ckpt}", "trainer.max_steps=4")  # not shaping: allowed
    assert summary["steps"] == 4


class SigintAt:
    """A callback sending this process a Ctrl-C (SIGINT) during the training step after ``step``."""

    def __new__(cls, step: int):
        import os
        import signal

        import lightning as L

        class Sigint(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step == step:
                    os.kill(os.getpid(), signal.SIGINT)

        return Sigint()


def _checkpoints(folder):
    return sorted(p.name for p in (folder / "checkpoints").iterdir() if not p.name.startswith("."))


def test_last_ckpt_is_the_newest_step_and_a_link(uninterrupted):
    last = uninterrupted / "checkpoints" / "last.ckpt"
    assert _checkpoints(uninterrupted) == ["last.ckpt", "step000003.ckpt", "step000006.ckpt", "step000009.ckpt"]
    assert last.is_symlink() and last.resolve().name == "step000009.ckpt"


def test_ctrl_c_leaves_one_last_ckpt_that_resumes_exactly(uninterrupted, tmp_path):
    stopped, resumed = tmp_path / "stopped", tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C during step 5 (epoch 1): it finishes, is saved, validated
        train(stopped, *NINE_STEPS, "+callbacks.ctrl_c._target_=tests.training.test_resume.SigintAt",
              "+callbacks.ctrl_c.step=4")
    assert _checkpoints(stopped) == ["last.ckpt", "step000003.ckpt", "step000005.ckpt"]
    last = stopped / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 5
    assert json.loads((stopped / "summary.json").read_text())["val_step"] == 5
    summary = train(resumed, *NINE_STEPS, f"ckpt_path={last}")  # crosses the epoch boundary after step 8
    want, got = _gates(uninterrupted), _gates(resumed)
    assert summary["steps"] == 9 and all(torch.equal(want[k], got[k]) for k in want)


def test_the_last_step_between_periodic_checkpoints_is_saved(tmp_path):
    train(tmp_path, *NINE_STEPS, "trainer.max_steps=5")
    assert _checkpoints(tmp_path) == ["last.ckpt", "step000003.ckpt", "step000005.ckpt"]
    assert (tmp_path / "checkpoints" / "last.ckpt").resolve().name == "step000005.ckpt"


def test_a_checkpoint_resumed_twice_continues_its_wandb_run_once(tmp_path, offline_wandb):
    from tests.training.wandb_offline import offline_run, offline_runs

    first = train(tmp_path / "first", "logger=wandb", "trainer.max_steps=2")
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    again = [train(tmp_path / name, "logger=wandb", "trainer.max_steps=3", f"ckpt_path={ckpt}")
             for name in ("again", "once_more")]
    assert again[0]["wandb_id"] == first["wandb_id"] and again[0]["wandb_name"] == first["wandb_name"]
    assert again[1]["wandb_id"] != first["wandb_id"]
    (run_dir,) = offline_runs(tmp_path / "once_more")
    assert offline_run(run_dir)["config"]["run.resumed_from"] == str(ckpt)
