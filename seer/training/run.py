"""One training job from a composed config: checks -> data -> W&B run -> model + gates -> Lightning fit -> summary.

What a user can get wrong is checked before the model loads (minutes for an 8B model): config values, what needs
several groups (:mod:`seer.preflight`: ``data.seq_len`` against the gate's block size and the model's context, ...),
text data for a model without a tokenizer, ``ckpt_path`` (a
readable checkpoint made with the same settings for everything that shapes the gates or the data order,
:mod:`seer.training.resume`) and the data itself (rows are packed, or read from the cache, first).

Each run has an identity: a W&B run id (kept by checkpoints, so ``ckpt_path=`` resumes the same W&B run), a short
unique name (task, swept values, id), the sweep's group, the command-line overrides as tags, and the resolved config
as flat keys (:func:`seer.tracking.flat_config`) plus derived facts (parameter counts, versions, device).
A run that raises is closed on W&B as failed.
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from seer import tracking
from seer.backends import resolve_backend
from seer.checks import ConfigError
from seer.config import RunConfig, validate
from seer.preflight import check_complete, check_launch, check_text_data, check_training

log = logging.getLogger(__name__)



def training_device(cfg: DictConfig) -> torch.device:
    """The device this process trains on: its node-local rank's GPU (``LOCAL_RANK`` from Lightning's launcher,
    ``SLURM_LOCALID`` under SLURM) when CUDA is used, else the CPU."""
    accel = str(cfg.trainer.get("accelerator", "auto"))
    if accel in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if accel in ("gpu", "cuda"):
        raise ConfigError(f"trainer.accelerator={accel!r} but no CUDA GPU is visible")
    return torch.device("cpu")


def data_takes_tokenizer(node: DictConfig) -> bool:
    """Whether the data module of ``node`` reads text (its class takes a tokenizer) rather than token ids."""
    from hydra.utils import get_class

    return "tokenizer" in inspect.signature(get_class(node._target_)).parameters


def instantiate_data(node: DictConfig, tokenizer, model_name: str = "the model"):
    """The data module of ``node``, given the tokenizer when its class takes one (text corpora do, random tokens
    do not); text data for a model without a tokenizer is refused, naming both."""
    from hydra.utils import instantiate

    takes_tokenizer = data_takes_tokenizer(node)
    check_text_data(takes_tokenizer, tokenizer, node._target_, model_name, tracking.chosen_options())
    return instantiate(node, **({"tokenizer": tokenizer} if takes_tokenizer else {}))


def _instantiate_group(nodes: DictConfig | None, **extra) -> list:
    """Every non-null node of ``nodes``; ``extra`` goes to the nodes whose target takes those arguments and that do
    not set them."""
    from hydra.utils import get_method, instantiate

    out = []
    for node in (nodes or {}).values():
        if node is None:
            continue
        params = inspect.signature(get_method(node._target_)).parameters
        out.append(instantiate(node, **{k: v for k, v in extra.items() if k in params and k not in node}))
    return out


def shards_model(cfg: DictConfig) -> bool:
    """Whether the trainer's strategy shards the model (``trainer=fsdp``)."""
    from hydra.utils import get_class

    strategy = cfg.trainer.get("strategy")
    target = strategy.get("_target_") if isinstance(strategy, DictConfig) else None
    return target is not None and getattr(get_class(target), "shards_base", False)


def placement(cfg: DictConfig, run: RunConfig, device: torch.device) -> dict:
    """How to load the base model (:func:`seer.model.loading.load_causal_lm`'s arguments): on ``device``, or when the
    strategy shards it (``trainer=fsdp``) on the meta device in the dtype it trains in (each group gets its weights
    on the GPU just before it is sharded)."""
    if not shards_model(cfg):
        return {"cfg": run.model, "device": device}
    return {"cfg": run.model, "device": torch.device("meta"), "dtype_device": device}


def derived_facts(module, trainer, device: torch.device, gt_source: str) -> dict:
    """Parameter counts (of the stage's module), versions, device and processes: what the config alone does not
    say."""
    import lightning
    import transformers
    import triton

    import seer
    from seer.model.attention import gate_parameters
    from seer.model.decode import decode_gates

    trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
    gates = gate_parameters(module) + [p for g in decode_gates(module).values() for p in g.parameters()]
    return {"params.trained": trained, "params.gates": sum(p.numel() for p in gates),
            "params.frozen": sum(p.numel() for p in module.parameters()) - trained,
            "run.device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "run.world_size": trainer.world_size, "run.gt_source": gt_source,
            "versions.seer": seer.__version__, "versions.torch": torch.__version__,
            "versions.lightning": lightning.__version__, "versions.transformers": transformers.__version__,
            "versions.triton": triton.__version__}


def _not_an_advert(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip")


def quiet_third_party_output() -> None:
    """Lightning gives the ``lightning`` logger a console handler of its own and lets it propagate too, so under
    Hydra's logging each line came twice: keep Hydra's. Drop Lightning's advert and warnings that do not apply to
    seer."""
    if logging.getLogger().handlers:
        logging.getLogger("lightning").handlers.clear()
    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _not_an_advert not in rank_zero_log.filters:
        rank_zero_log.addFilter(_not_an_advert)
    for message in (r".*module\(s\) in eval mode.*",  # the frozen base model is in eval mode on purpose
                    r".*isinstance\(treespec, LeafSpec\).*",
                    r".*dataloader is not resumable.*",  # the data modules resume their position themselves
                    r".*`flops_per_batch` attribute.*",  # ThroughputMonitor: tokens/s without FLOPs
                    r".*does not have many workers.*"):
        warnings.filterwarnings("ignore", message=message)


def run_training(cfg: DictConfig) -> dict:
    """Runs the training stage ``cfg`` names; returns the run summary (also written to ``summary.json``). Raises
    ``KeyboardInterrupt`` after a Ctrl-C that saved a checkpoint and a summary."""
    from hydra.utils import get_class, instantiate
    import lightning as L
    from lightning.pytorch.loggers.logger import DummyLogger
    from lightning.pytorch.utilities import rank_zero_info
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from seer.model.loading import load_causal_lm, load_tokenizer, model_id
    from seer.training.callbacks import (AtomicCheckpointIO, DecodeGateCalibration, GateCalibration, RunRecord,
                                         RunSummary, StopOnInterrupt, ValidateAtEnd)
    from seer.training.parallel import exclude_frozen_from_ddp
    from seer.training.resume import continues_wandb_run, read_resume

    quiet_third_party_output()
    check_complete(cfg)
    run: RunConfig = validate(cfg)  # bad values fail here, before anything is loaded
    check_training(OmegaConf.to_container(cfg, resolve=True), run, tracking.chosen_options(), shards_model(cfg))
    config = tracking.flat_config(cfg)
    resume = read_resume(cfg.ckpt_path, config) if cfg.get("ckpt_path") else None
    device = training_device(cfg)
    gt_source = resolve_backend("stage.gt", run.stage.gt, device)
    out_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    # a random-weight model on token ids needs no tokenizer: none is looked up (offline, every process would spend
    # a minute on hub retries for it)
    needs_tokenizer = data_takes_tokenizer(cfg.data) or not run.model.random_init
    tokenizer = load_tokenizer(run.model) if needs_tokenizer else None
    datamodule = instantiate_data(cfg.data, tokenizer, model_id(run.model))
    datamodule.prepare_data()
    datamodule.setup("fit")  # packing and cache errors surface now, not after the model has loaded

    continues = resume is not None and rank_zero_only.rank == 0 and continues_wandb_run(resume)
    identity = tracking.run_identity(cfg.task_name, {**config, "model.name": model_id(run.model),
                                                     "run.resumed_from": str(resume.path) if resume else None},
                                     *((resume.run_id, resume.run_name) if continues else ()))
    summary = RunSummary(str(out_dir), str(out_dir / "gates"))
    interrupt = StopOnInterrupt()
    record = RunRecord({"config": config, "run_id": identity["run_id"], "run_name": identity["name"]})
    calibration = [GateCalibration(str(out_dir / "gates"), run.sparsity)] if run.sparsity.calibrated \
        and run.stage.uses_prefill_budget else []
    decode_budget = getattr(run.stage, "decode_sparsity", None)  # stage=distill_decode
    if decode_budget is not None and decode_budget.calibrated:
        calibration.append(DecodeGateCalibration(str(out_dir / "gates"), decode_budget,
                                                 run.stage.decode_gate.block_size))
    callbacks = [*_instantiate_group(cfg.get("callbacks")), ValidateAtEnd(), interrupt, record, *calibration, summary]
    trainer = instantiate(cfg.trainer, _partial_=True)(logger=False, callbacks=callbacks,
                                                       plugins=[AtomicCheckpointIO()])
    check_launch(trainer, tracking.hydra_runtime())

    loggers = _instantiate_group(cfg.get("logger"), name=identity["name"], run_config=identity["config"],
                                 group=identity["group"], tags=identity["tags"], run_id=identity["run_id"])
    # with no logger configured, a no-op one still lets Lightning keep logged values (throughput) for the summary
    trainer.loggers = loggers or [DummyLogger()]
    try:
        model = load_causal_lm(**placement(cfg, run, device))
        module = get_class(run.stage.module).from_run(run, model, gt_source=gt_source, device=device,
                                                      tokenizer=tokenizer, out_dir=out_dir,
                                                      model_name=model_id(run.model))
        exclude_frozen_from_ddp(module)
        facts = derived_facts(module, trainer, device, gt_source)
        for logger in trainer.loggers:
            logger.log_hyperparams(facts)  # W&B: into the run's config; rank 0 only
        rank_zero_info(f"run folder {out_dir}; device {facts['run.device']} x{trainer.world_size}, ground truth "
                       f"{gt_source} (stage.gt={run.stage.gt}); {facts['params.trained']:,} trained parameters "
                       f"(gates {facts['params.gates']:,}), {facts['params.frozen']:,} frozen")
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except BaseException as exc:
        tracking.finish_wandb(exit_code=130 if isinstance(exc, KeyboardInterrupt) else 1)
        raise
    tracking.finish_wandb(exit_code=130 if interrupt.stopped_at is not None else 0)
    if interrupt.stopped_at is not None:
        raise KeyboardInterrupt
    return summary.summary
