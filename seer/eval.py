"""Evaluation entry point: ``python -m seer.eval selector=... sparsity=... [gates=PATH] [key=value ...]`` (``-m`` for
sweeps).

Loads the model (with its gates for ``selector=gate``), measures it dense once (cached) and with the chosen block
selection (scorer x budget) on held-out text, and writes ``metrics.json`` (one row per window length, the keys of
:data:`seer.evaluation.harness.ROW_KEYS`) in the run folder; ``python -m seer.report DIR`` tabulates a sweep.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from seer.cli import user_errors
from seer.config import register_configs

register_configs()
log = logging.getLogger(__name__)


def _checked(cfg: DictConfig):
    """Every argument validated before anything loads: (model, sparsity, eval, selector or None, corpus)."""
    import torch
    from hydra.utils import instantiate

    from seer.checks import ConfigError, build
    from seer.evaluation.config import EvalConfig
    from seer.model.config import ModelConfig
    from seer.sparsity.config import SparsityConfig
    from seer.sparsity.selectors import LayerInputs, build_selector

    plain = OmegaConf.to_container(cfg, resolve=True)
    model = build(ModelConfig, "model", plain["model"])
    sparsity = build(SparsityConfig, "sparsity", plain["sparsity"])
    evaluation = build(EvalConfig, "eval", plain["eval"])
    params = dict(plain["selector"])
    name = params.pop("name")
    if name == "gate":
        if params:
            raise ConfigError(f"selector=gate takes no parameters; got {sorted(params)}")
        if not cfg.gates or not Path(cfg.gates).exists():
            raise ConfigError(f"gates={cfg.gates!r}: selector=gate needs a gate checkpoint folder "
                              f"(outputs/<run>/gates)")
        selector = None
    else:
        try:
            selector = build_selector(name, **params)
            probe = torch.zeros(1, 1, 2 * cfg.block_size, 8)  # parameters that depend on the block size fail here
            selector.scores(LayerInputs(probe, probe, cfg.block_size, 1.0))
        except ValueError as exc:
            raise ConfigError(f"selector: {exc}") from exc
    corpus = instantiate(cfg.data.corpus)
    _check_context(model, evaluation)
    return model, sparsity, evaluation, selector, corpus


def _check_context(model, evaluation) -> None:
    """Refuses lengths longer than the model's context (read from its config, before the weights load)."""
    from seer.checks import ConfigError
    from seer.model.loading import load_config, model_id

    context = getattr(load_config(model).get_text_config(), "max_position_embeddings", None)
    if context is not None and max(evaluation.seq_lens) > context:
        raise ConfigError(f"eval.seq_lens={evaluation.seq_lens}: longer than the model's context of {context} tokens "
                          f"({model_id(model)})")


def run_eval(cfg: DictConfig) -> list[dict]:
    """Evaluates the configured selection; returns the rows written to ``metrics.json``."""
    import torch

    from seer.evaluation.data import HeldOutText
    from seer.evaluation.harness import Evaluator
    from seer.model.attention import prepare_model, scorer_name
    from seer.model.gate_io import load_gates, read_gate_meta
    from seer.model.inference import resolve_kernel
    from seer.model.loading import load_causal_lm, load_tokenizer, model_id
    from seer.sparsity.calibration import find_calibration, save_calibration

    model_cfg, sparsity, evaluation, selector, corpus = _checked(cfg)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kernel = resolve_kernel(cfg.kernel, device)
    if selector is None:
        read_gate_meta(cfg.gates)  # a gate file that cannot be read fails here, before the model loads
    tokenizer = load_tokenizer(model_cfg)
    if tokenizer is None:
        raise ValueError("seer.eval needs a model with a tokenizer (held-out text is tokenised)")
    text = HeldOutText(corpus, tokenizer, evaluation.split, float(cfg.data.get("val_fraction", 0.05)))
    ruler = None
    if evaluation.ruler:  # generated before the model loads: a length too short for a task fails here
        from seer.evaluation.ruler import ruler_samples

        ruler = ruler_samples(tokenizer, evaluation.ruler, evaluation.seq_lens, evaluation.ruler_samples,
                              evaluation.seed, text.start_id)
    torch.manual_seed(cfg.seed)  # random-weight models (model.random_init) are the same in every run
    model = load_causal_lm(model_cfg, device)
    model.config.use_cache = True
    if selector is None:
        load_gates(model, cfg.gates)
    else:
        prepare_model(model, cfg.block_size)
    evaluator = Evaluator(model, tokenizer, text, evaluation, kernel=kernel,
                          cache_dir=Path(cfg.paths.cache_dir) / "eval", model_name=model_id(model_cfg),
                          ruler_samples=ruler)
    dense = evaluator.dense()
    calibrations = {}
    if selector is None and sparsity.calibrated:
        for n in evaluation.seq_lens:
            try:
                calibrations[n] = find_calibration(cfg.gates, sparsity, model.seer_context.scorer_name, n)
                log.info("using the calibration stored with the gates for %s at %d tokens", sparsity.describe(), n)
            except ValueError:
                calibrations[n] = evaluator.calibrate(None, sparsity, n)
                if cfg.save_calibration:
                    save_calibration(cfg.gates, calibrations[n])
    rows = evaluator.evaluate(selector, sparsity, dense, calibrations)
    for row in rows:
        row.update(model=model_id(model_cfg), data=text.fingerprint, gates=cfg.gates if selector is None else None)
    out_dir = Path(cfg.paths.output_dir)
    from seer.files import atomic_write_text

    atomic_write_text(out_dir / "metrics.json", json.dumps(rows, indent=1))
    print(format_rows(rows), flush=True)
    _log_wandb(cfg, rows, scorer_name(selector, model.seer_context.gate_config), sparsity)
    return rows


def format_rows(rows: list[dict]) -> str:
    """A few lines a person reads at the end of a run."""
    def f(x, spec):
        return "n/a" if x is None else format(x, spec)

    lines = ["", f"=== seer.eval: {rows[0]['selector']} x {rows[0]['sparsity']} ==="]
    for r in rows:
        lines.append(
            f"{r['seq_len']:>6} tokens: density {f(r['density'], '.3f')} | ppl {f(r['ppl'], '.3f')} (dense "
            f"{f(r['ppl_dense'], '.3f')}, {f(r['ppl_increase'], '+.1%')}) | recall {f(r['recall'], '.3f')} "
            f"(oracle {f(r['oracle_recall'], '.3f')}) | passkey {f(r['passkey'], '.2f')} (dense "
            f"{f(r['passkey_dense'], '.2f')}) | copy {f(r['copy'], '.2f')} (dense {f(r['copy_dense'], '.2f')})"
            + (f" | RULER {r['ruler']:.1f} (dense {f(r['ruler_dense'], '.1f')})" if r.get("ruler") is not None else ""))
    return "\n".join(lines + [""])


def _log_wandb(cfg: DictConfig, rows: list[dict], selector: str, sparsity) -> None:
    """One W&B run per job (offline unless a key is set), flat config keys, one summary value per metric and
    length, the rows as a table."""
    node = (cfg.get("logger") or {}).get("wandb")
    if node is None:
        return
    import wandb

    from seer.training.loggers import wandb_mode

    flat = {"selector": selector, "sparsity.describe": sparsity.describe(), "seq_lens": [r["seq_len"] for r in rows],
            **{f"sparsity.{k}": v for k, v in vars(sparsity).items()},
            **{f"eval.{k}": v for k, v in OmegaConf.to_container(cfg.eval, resolve=True).items()},
            "model": rows[0]["model"], "data": rows[0]["data"]}
    run = wandb.init(project=node.get("project", "seer"), dir=str(cfg.paths.output_dir),
                     mode=wandb_mode(node.get("mode")),
                     group=node.get("group"), name=f"eval-{selector}-{sparsity.method}-{sparsity.target_density}",
                     config=flat, job_type="eval", reinit=True)
    try:
        keys = [k for k in rows[0] if k != "recall_by_layer"]
        run.log({"eval/rows": wandb.Table(columns=keys, data=[[r[k] for k in keys] for r in rows])})
        for r in rows:
            run.summary.update({f"{k}/{r['seq_len']}": v for k, v in r.items() if isinstance(v, (int, float))})
    finally:
        run.finish()


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    with user_errors():
        run_eval(cfg)


if __name__ == "__main__":
    main()
