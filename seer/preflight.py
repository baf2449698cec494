"""Pre-flight checks of ``seer.train``, ``seer.eval`` and ``seer.generate``: every check that reads more than one
config group, a file or the model's config, run before any model loads.

The schemas (``seer/*/config.py``) check single values and do no I/O; what needs two groups (``data.seq_len`` against
the model's context and the gate's block size, ``sparsity.dense_layers`` against the model's layers, gates against
the model's shape, the stage against the trainer) is checked here, each refusal a :class:`~seer.config.ConfigError`
naming the value. The model's shape comes from its config file alone (``seer.model.loading.load_config``), read
once per check; a model whose attention seer cannot stand in for is refused there.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any
from collections.abc import Mapping

from seer.checks import ConfigError, build, fail, is_int
from seer.config import CONF_DIR

if TYPE_CHECKING:
    from seer.config import RunConfig
    from seer.sparsity.decode import DecodeSparsityConfig

MIN_BLOCKS = 2  # rows of one block leave the gate nothing to choose: loss 0, recall 1


def check_complete(cfg) -> None:
    """Every mandatory value (``???`` in ``conf/``) of the composed config ``cfg`` (a DictConfig) is given."""
    from omegaconf import OmegaConf

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]}: must be given (e.g. {missing[0]}=...); see its option in conf/"
                          + (f" (also missing: {', '.join(missing[1:])})" if missing[1:] else ""))


def check_options(choices: Mapping[str, str]) -> None:
    """Refuses a schema picked as a group's option (``gate=schema``: the base the options extend, not one)."""
    for group, option in choices.items():
        if option == "schema" or option.endswith("_schema"):
            options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
            raise ConfigError(f"{group}={option}: is the schema the {group} options extend, not an option; "
                              f"choose from {options}")


def model_shape(model_cfg) -> dict[str, Any]:
    """The base model's layer count, context, RoPE settings and gate signature, from its config (no weights); a model
    whose attention seer cannot stand in for is refused here."""
    from seer.model.attention import unsupported_attention
    from seer.model.gate_io import config_signature
    from seer.model.loading import load_config
    from seer.model.rope_scaling import rope_settings

    config = load_config(model_cfg)
    problem = unsupported_attention(config)
    if problem is not None:
        raise ConfigError(f"model: {_model_name(model_cfg)}: {problem}")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {"num_layers": text.num_hidden_layers, "context": getattr(text, "max_position_embeddings", None),
            "signature": config_signature(config), "rope": rope_settings(config)}


def check_dense_layers(sparsity, shape: dict) -> None:
    """Every ``sparsity.dense_layers`` index is a layer of the model."""
    n = shape["num_layers"]
    outside = [i for i in sparsity.dense_layers if not 0 <= i < n]
    if outside:
        fail("sparsity", "dense_layers", sparsity.dense_layers, f"{outside} not among the model's layers 0..{n - 1}")


def check_length(setting: str, tokens: int, shape: dict, rope_scaling: Mapping | None) -> None:
    """``tokens`` (what ``setting``, ``key=value``, asks for) fits the model's context; dynamic NTK scaling extends it
    without limit."""
    context = shape["context"]
    if context is None or tokens <= context or (rope_scaling or {}).get("rope_type") == "dynamic":
        return
    raise ConfigError(f"{setting}: longer than the model's context of {context} tokens; use at most {context} "
                      f"(or extend the context with model/rope_scaling=yarn)")


def check_gate_file(key: str, path: str | os.PathLike | None, shape: dict, *, gate=None,
                    allow_rope_change: bool = False) -> dict:
    """The gate checkpoint at ``path`` (the value of ``key``) is whole and fits the model's shape (and ``gate``'s
    architecture, when given); returns its metadata."""
    from seer.gates.config import GateConfig
    from seer.model.gate_io import check_gates_fit, read_gate_meta

    if not path or not Path(path).exists():
        raise ConfigError(f"{key}={str(path) if path else path!r}: no gate checkpoint there (a gates folder written "
                          f"by seer.train, outputs/<run>/gates)")
    meta = read_gate_meta(path)
    check_gates_fit(meta, Path(path), shape["signature"], shape["rope"], allow_rope_change)
    if gate is not None:
        stored = build(GateConfig, "gate", meta["gate"])
        for name in stored.architecture_differences(gate):
            fail("gate", name, getattr(gate, name), f"differs from the gates of {key} ({path}: "
                 f"{getattr(stored, name)!r}); choose the gate option they were made with")
    return meta


def check_training(cfg: Mapping[str, Any], run: RunConfig, choices: Mapping[str, str], shards_model: bool) -> None:
    """What a training run (``cfg``: the composed config as plain containers) needs beyond single values."""
    check_options(choices)
    trainer, data = cfg.get("trainer") or {}, cfg.get("data") or {}
    max_steps = trainer.get("max_steps")
    if not is_int(max_steps) or max_steps < 1:
        fail("trainer", "max_steps", max_steps, "must be an integer >= 1 (the optimizer steps of the run)")
    if shards_model and getattr(run.stage, "lora_rank", 0):
        raise ConfigError(f"trainer=fsdp with stage.lora_rank={run.stage.lora_rank}: LoRA adapters are not sharded "
                          f"(their merge into a sharded base is not supported); use trainer=ddp, or stage.lora_rank=0 "
                          f"with stage.trainable")
    _check_packing(data.get("packing", "concat"), run.stage)
    decode_gate = getattr(run.stage, "decode_gate", None)  # stage=distill_decode trains decode gates only
    seq_len, block = data.get("seq_len"), (decode_gate or run.gate).block_size
    if is_int(seq_len) and seq_len < MIN_BLOCKS * block:
        raise ConfigError(f"data.seq_len={seq_len}: rows must hold at least {MIN_BLOCKS} blocks of "
                          f"{'stage.decode_gate' if decode_gate else 'gate'}.block_size={block} tokens (a one-block "
                          f"row leaves the gate nothing to choose); use data.seq_len >= {MIN_BLOCKS * block}")
    if run.stage.name == "finetune":
        _check_finetune(cfg, run)
    if run.stage.name == "distill":
        run.stage.check_gate(run.gate)
    shape = model_shape(run.model)
    check_dense_layers(run.sparsity, shape)
    if is_int(seq_len):
        check_length(f"data.seq_len={seq_len}", seq_len, shape, run.model.rope_scaling)
    init_gates = getattr(run.stage, "init_gates", None)
    if init_gates is not None:
        check_gate_file("stage.init_gates", init_gates, shape, gate=run.gate, allow_rope_change=True)


def _check_packing(packing, stage) -> None:
    """``data.packing`` is known, and ``documents`` only with a stage that keeps documents apart."""
    from seer.data.packing import PACKINGS

    if packing not in PACKINGS:
        fail("data", "packing", packing, f"choose from {PACKINGS}")
    if packing == "documents" and not stage.keeps_documents_apart:
        fail("data", "packing", packing, f"stage={stage.name} cannot keep documents apart; use data.packing=concat "
             f"(documents: the distill and finetune stages)")


def check_text_data(takes_tokenizer: bool, tokenizer, data_target: str, model_name: str,
                    choices: Mapping[str, str]) -> None:
    """Text data (a data module that takes a tokenizer) needs a model with a tokenizer."""
    if takes_tokenizer and tokenizer is None:
        raise ConfigError(f"data={choices.get('data', data_target)} is text, but model="
                          f"{choices.get('model', model_name)} ({model_name}) has random weights and no tokenizer; "
                          f"use data=random_tokens with it")


def check_launch(trainer, hydra_job) -> None:
    """Refuses a sweep (``-m``; ``hydra_job``: the running job's Hydra config) whose jobs need several processes
    that Lightning would start itself: its launcher runs the command again for each, and the command is the whole
    sweep. SLURM tasks (``hydra/launcher=slurm``) are processes made outside Lightning, and are fine."""
    from hydra.types import RunMode

    env = getattr(trainer.strategy, "cluster_environment", None)
    if hydra_job is None or hydra_job.mode != RunMode.MULTIRUN or trainer.world_size < 2 or env is None \
            or env.creates_processes_externally:
        return
    raise ConfigError(f"trainer.devices={trainer.num_devices}: a sweep (-m) cannot start {trainer.world_size} "
                      f"processes a job on this machine (Lightning's launcher would run the whole sweep in each); "
                      f"sweep with hydra/launcher=slurm and hydra.launcher.tasks_per_node={trainer.num_devices}, or "
                      f"start the jobs one at a time")


def _check_finetune(cfg: Mapping[str, Any], run: RunConfig) -> None:
    """The fine-tune stage against the data's length, the model's rope scaling, the budget and the trainer."""
    stage, sparsity = run.stage, run.sparsity
    seq_len = (cfg.get("data") or {}).get("seq_len")
    rope = run.model.rope_scaling
    if rope is not None and rope["rope_type"] != "dynamic" and is_int(seq_len):
        from seer.model.rope_scaling import extended_context

        original = rope["original_max_position_embeddings"]
        if seq_len <= original:
            fail("data", "seq_len", seq_len, f"is not longer than the original context (model.rope_scaling."
                 f"original_max_position_embeddings={original}): nothing for {rope['rope_type']} to extend")
        if seq_len > extended_context(rope):
            fail("data", "seq_len", seq_len, f"is beyond model.rope_scaling.factor={rope['factor']} x "
                 f"{original} = {extended_context(rope)} tokens")
    if stage.gate_loss_weight == 0 and stage.init_gates is None and sparsity.method != "dense":
        fail("stage", "gate_loss_weight", 0, f"with no stage.init_gates the gates would select blocks "
             f"({sparsity.describe()}) untrained: give trained gates, a weight > 0, or sparsity=dense")
    if sparsity.calibrated and sparsity.allocation == "oracle":
        fail("sparsity", "allocation", "oracle", "needs the true attention mass of calibration rows, which "
             "fine-tuning does not compute; use global or uniform")
    if stage.lora_rank and importlib.util.find_spec("peft") is None:
        fail("stage", "lora_rank", stage.lora_rank, "LoRA needs peft: pip install 'seer[finetune]'")
    trainer = cfg.get("trainer") or {}
    precision = str(trainer.get("precision", "32-true"))
    if precision.endswith("-true") and precision != "32-true":
        fail("trainer", "precision", precision, "would cast the rotary frequencies to half precision too; use "
             "bf16-mixed with model.dtype=bfloat16 (and stage.float32_master_weights=false to keep the trained "
             "weights in bfloat16)")
    if _half_model(run.model.dtype, str(trainer.get("accelerator", "auto"))) and not precision.endswith("-mixed"):
        fail("trainer", "precision", precision, f"the model runs in half precision (model.dtype="
             f"{run.model.dtype}): use bf16-mixed (autocast)")


def _half_model(dtype: str, accelerator: str) -> bool:
    """Whether the model of this run loads in bfloat16/float16 (``auto``: when it trains on a CUDA GPU)."""
    if dtype != "auto":
        return dtype in ("bfloat16", "float16")
    import torch

    return accelerator != "cpu" and torch.cuda.is_available()


def check_evaluation(cfg: Mapping[str, Any], model_cfg, sparsity, evaluation, choices: Mapping[str, str],
                     uses_gates: bool) -> dict:
    """What ``seer.eval`` needs beyond single values; returns the model's shape."""
    check_options(choices)
    shape = model_shape(model_cfg)
    check_dense_layers(sparsity, shape)
    check_length(f"eval.seq_lens={evaluation.seq_lens}", max(evaluation.seq_lens), shape, model_cfg.rope_scaling)
    if uses_gates:
        from seer.sparsity.calibration import load_calibrations

        check_gate_file("gates", cfg.get("gates"), shape)
        folder = Path(cfg["gates"])
        folder = folder.parent if folder.is_file() else folder
        load_calibrations(folder)  # a damaged calibration.json is named
        if sparsity.calibrated and cfg.get("save_calibration") and not os.access(folder, os.W_OK):
            raise ConfigError(f"gates={str(folder)!r}: the folder is not writable, and the calibration made here is "
                              f"stored there for seer.load; make it writable or set save_calibration=false")
    return shape


def check_calibration(gates: str | os.PathLike, sparsity, scorer: str | None = None) -> None:
    """A calibrated ``sparsity`` has its calibration stored beside ``gates``, made with ``scorer`` (default: the
    gates' own, their blend included)."""
    from seer.gates.config import GateConfig
    from seer.model.gate_io import read_gate_meta
    from seer.sparsity.calibration import find_calibration, load_calibrations

    folder = Path(gates).parent if Path(gates).is_file() else Path(gates)
    load_calibrations(folder)  # a damaged calibration.json is named
    if not sparsity.calibrated:
        return
    scorer = scorer or build(GateConfig, "gate", read_gate_meta(gates)["gate"]).scorer_name
    try:
        find_calibration(folder, sparsity, scorer)
    except ValueError as exc:
        raise ConfigError(f"sparsity: {exc}") from exc


def check_decode_calibration(decode_gates: str | os.PathLike, budget) -> None:
    """A calibrated decode ``budget`` has its calibration stored beside ``decode_gates``."""
    from seer.model.decode_gate_io import decode_weights_path
    from seer.sparsity.decode import find_decode_calibration, load_decode_calibrations

    folder = decode_weights_path(decode_gates).parent
    load_decode_calibrations(folder)  # a damaged decode_calibration.json is named
    if budget.calibrated:
        find_decode_calibration(folder, budget)


def check_decode_gate_file(path: str | os.PathLike, shape: dict) -> dict:
    """The decode-gate files at ``path`` (the value of ``decode_gates``) are whole and fit the model's shape; returns
    their metadata."""
    from seer.model.decode_gate_io import decode_weights_path, read_decode_gate_meta
    from seer.model.gate_io import check_gates_fit

    meta = read_decode_gate_meta(path)
    check_gates_fit(meta, decode_weights_path(path), shape["signature"], shape["rope"])
    return meta


def check_decode(cfg: Mapping[str, Any], shape: dict, block_size: int | None = None) -> DecodeSparsityConfig | None:
    """The decode budget of a run (``cfg``: its plain config, with ``decode_gates`` and ``decode_sparsity``): the one
    stored with the decode gates with every non-null ``decode_sparsity.*`` value put over it, the gates fitting the
    model's ``shape``, at least one block, its calibration stored. Without decode gates: None (dense decode), or with
    ``decode_sparsity.*`` values a training-free budget (Quest alone) of at least one block of ``block_size`` tokens
    (the prefill's; default: the prefill gates' block size, or :data:`~seer.model.decode.QUEST_BLOCK_SIZE`)."""
    from seer.model.inference import decode_budget

    from seer.model.decode import QUEST_BLOCK_SIZE
    from seer.model.gate_io import read_gate_meta
    from seer.sparsity.decode import DecodeSparsityConfig

    given = {k: v for k, v in (cfg.get("decode_sparsity") or {}).items() if v is not None}
    if cfg.get("decode_gates") is None:  # training-free sparse decode (Quest alone) or dense decode
        if not given:
            return None
        budget = build(DecodeSparsityConfig, "decode_sparsity", given)
        budget.check_training_free()
        if block_size is None:
            gates = cfg.get("gates")
            block_size = read_gate_meta(gates)["gate"]["block_size"] if gates is not None else QUEST_BLOCK_SIZE
        budget.check_block_size(block_size)
        return budget
    meta = check_decode_gate_file(cfg["decode_gates"], shape)
    budget = decode_budget({**(meta.get("decode_sparsity") or {}), **given}, meta)
    check_decode_calibration(cfg["decode_gates"], budget)
    return budget


def check_generation(cfg: Mapping[str, Any], model_cfg, prompt_tokens: int) -> dict:
    """What ``seer.generate`` needs beyond single values (its budgets, known from the gates, are checked by
    :func:`check_dense_layers`, :func:`check_calibration` and :func:`check_decode`); returns the model's shape."""
    if prompt_tokens == 0:
        given = f"prompt_file={cfg['prompt_file']!r}" if cfg.get("prompt_file") else f"prompt={cfg.get('prompt')!r}"
        raise ConfigError(f"{given}: the prompt is empty; give the text to continue")
    shape = model_shape(model_cfg)
    total = prompt_tokens + cfg["max_new_tokens"]
    if shape["context"] is not None and total > shape["context"]:
        raise ConfigError(f"the prompt is {prompt_tokens} tokens and max_new_tokens={cfg['max_new_tokens']}, but "
                          f"{_model_name(model_cfg)} has a context of {shape['context']} tokens; shorten the prompt")
    if cfg.get("gates") is not None:
        check_gate_file("gates", cfg["gates"], shape)
    return shape


def _model_name(model_cfg) -> str:
    from seer.model.loading import model_id

    return model_id(model_cfg)
