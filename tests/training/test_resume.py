"""Resuming from a checkpoint: exactly the uninterrupted run's gates across epoch boundaries; a changed key that
shapes the gates or the data order refused, naming it; anything else allowed."""

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
