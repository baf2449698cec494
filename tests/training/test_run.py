"""A training run end to end on the tiny model: what it writes, what it refuses before loading, what it reports."""

import json
import os
import re
import subprocess

import pytest
import torch

import seer
from seer.checks import ConfigError
from tests.training.conftest import cli_env, seer_train, train


@pytest.mark.parametrize("overrides, message", [
    (["data.seq_len=16"], "data.seq_len=16: rows must hold at least 2 blocks of gate.block_size=16"),
    (["data=stdlib"], "data=stdlib is text, but model=tiny_llama"),
    (["model.name_or_path=/no/such/model", "model.random_init=false"], "model.name_or_path='/no/such/model': no such"),
    (["ckpt_path=/no/such.ckpt"], "ckpt_path='/no/such.ckpt': no such file"),
    (["sparsity.dense_layers=[99]"], "sparsity.dense_layers=[99]: [99] not among the model's layers 0..1"),
    (["sparsity.dense_layers=[0,-1]"], "sparsity.dense_layers=[0, -1]: [-1] not among the model's layers 0..1"),
    (["data.seq_len=8192"], "data.seq_len=8192: longer than the model's context of 4096 tokens"),
    (["trainer.max_steps=0"], "trainer.max_steps=0: must be an integer >= 1"),
    (["trainer.max_steps=-1"], "trainer.max_steps=-1: must be an integer >= 1"),
    (["data=text_files"], "data.corpus.paths: must be given (e.g. data.corpus.paths=...)"),
    (["gate=schema"], "gate=schema: is the schema the gate options extend, not an option; choose from ['avgmax'"),
])
def test_bad_input_is_refused_before_the_model_loads(overrides, message, tmp_path, monkeypatch):
    import seer.model.loading

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was found")

    monkeypatch.setattr(seer.model.loading, "load_causal_lm", no_model)
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(tmp_path, *overrides)


def test_validation_runs_at_the_last_step_and_files_keep_the_umask(tmp_path):
    """max_steps below val_check_interval still validates the final gates, and the summary says at which step; every
    file the run writes gets the umask's mode (not mkstemp's 0600)."""
    old = os.umask(0o027)
    try:
        summary = train(tmp_path, "trainer.max_steps=5", "trainer.val_check_interval=4")
    finally:
        os.umask(old)
    assert summary["steps"] == 5 and summary["val_step"] == 5 and summary["status"] == "completed"
    assert 0 < summary["val_recall"] <= 1 and 0 < summary["val_density"] <= 1
    assert [row["layer"] for row in summary["val_layers"]] == [0, 1]
    assert json.loads((tmp_path / "summary.json").read_text())["val_step"] == 5
    written = [tmp_path / "summary.json", tmp_path / "gates" / "gates.safetensors", tmp_path / "gates" / "gates.json",
               tmp_path / "checkpoints" / "last.ckpt", tmp_path / "checkpoints" / "step000003.ckpt"]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: oct(0o640) for p in written}


@pytest.mark.parametrize("extra", [{}, {"max_row_share": 0.5, "calibration_rounds": 1}])
def test_threshold_run_calibrates_its_density_for_seer_load(tmp_path, extra):
    sparsity = {"method": "threshold", "target_density": 0.3, **extra}
    summary = train(tmp_path, "sparsity=threshold", "sparsity.target_density=0.3", "data.seq_len=256",
                    "trainer.max_steps=2", *(f"sparsity.{k}={v}" for k, v in extra.items()))
    assert summary["sparsity_policy"] == "threshold target_density=0.3 (global) [dense_last_rows=1" + \
        "".join(f", {k}={v}" for k, v in extra.items()) + "]"
    assert abs(summary["calibration"]["density"] - 0.3) < 0.02 and summary["calibration"]["knob"] > 0
    assert (tmp_path / "gates" / "calibration.json").is_file()
    from seer.config import compose
    from seer.data.synthetic import RandomTokensDataModule
    from omegaconf import OmegaConf

    cfg = compose(["model=tiny_llama", "data=random_tokens", "data.seq_len=256"])
    model = seer.load(OmegaConf.to_container(cfg.model), gates=tmp_path / "gates", sparsity=sparsity, device="cpu")
    data = RandomTokensDataModule(vocab_size=cfg.data.vocab_size, seq_len=256, train_sequences=4, val_sequences=1)
    data.setup()
    with torch.no_grad():
        model(data.val_rows[:1], use_cache=False)
    assert abs(model.seer_context.mean_density() - 0.3) < 0.03


def test_runs_started_together_get_their_own_folders(tmp_path):
    env = cli_env(tmp_path)
    common = [*("model=tiny_llama", "data=random_tokens", "data.seq_len=256", "data.train_sequences=2",
                "data.val_sequences=1", "logger=none", "trainer.max_steps=1", "trainer.enable_progress_bar=false",
                "callbacks.progress_bar=null")]
    procs = [subprocess.Popen(seer_train(*common, f"sparsity.target_density={d}"), cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for d in (0.5, 0.2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    folders = sorted((tmp_path / "outputs" / "distill").iterdir())
    assert len(folders) == 2, folders
    densities = sorted(json.loads((f / "summary.json").read_text())["sparsity"]["target_density"] for f in folders)
    assert densities == [0.2, 0.5]


def test_random_weights_on_token_ids_look_up_no_tokenizer(tmp_path, monkeypatch):
    # a hub id with random weights (the 8B speed recipes): the tokenizer is not needed, so the hub is never asked
    import seer.model.loading

    def no_lookup(cfg):
        raise AssertionError(f"looked up a tokenizer for {cfg.name_or_path}")

    monkeypatch.setattr(seer.model.loading, "load_tokenizer", no_lookup)
    summary = train(tmp_path, "model.name_or_path=meta-llama/Llama-3.1-8B-Instruct")
    assert summary["status"] == "completed"


def test_each_stage_schema_names_its_module():
    """``STAGES`` is the one registry: each schema names the Stage module that ``run_training`` builds."""
    from hydra.utils import get_class

    from seer.training.config import STAGES
    from seer.training.stage import Stage

    for name, schema in STAGES.items():
        assert schema().name == name and issubclass(get_class(schema.module), Stage)


def test_piped_output_gets_progress_lines_and_the_last_step_is_drawn(tmp_path, capsys):
    train(tmp_path, "trainer.max_steps=4", "trainer.val_check_interval=2", "callbacks.progress_lines.every_n_steps=2",
          "stage.image_every_n_steps=2")
    out = capsys.readouterr().out  # captured: not a terminal
    assert "[seer] step 2/4: loss " in out and "[seer] step 4/4: loss " in out and "[seer] step 3/4" not in out
    assert "[seer] validation at step 2: recall " in out and "[seer] validation at step 4: recall " in out
    assert sorted(p.name for p in (tmp_path / "images").glob("layer00_*")) == [
        "layer00_step00000.png", "layer00_step00002.png", "layer00_step00003.png"]  # step 3: the last one's
