"""Evaluation entry point: ``python -m seer.eval selector=... sparsity=... [gates=PATH] [decode_gates=PATH]
[key=value ...]`` (``-m`` for sweeps).

Checks every argument (:mod:`seer.preflight`: gates against the model's shape, lengths against its context and the
text) before the model loads, then loads it (with its gates for ``selector=gate``), measures it dense once (cached)
and with the chosen block selection (scorer x budget) on held-out text, and writes ``metrics.json`` (one row per
window length, the keys of :data:`seer.evaluation.harness.ROW_KEYS`) and ``summary.json`` (where the metrics and the
W&B run are) in the run folder. W&B runs start as ``seer.train``'s do (:mod:`seer.tracking`), bad input is printed
as one line, and a sweep (``-m``) ends with its report (:mod:`seer.sweeps`); ``python -m seer.report DIR`` tabulates
a sweep.

With ``decode_gates`` (and any ``decode_sparsity.*`` over their stored budget, checked as ``seer.generate`` checks
them) the generated measures (passkey, RULER) decode through the decode gates on top of the prefill selection under
test (``sparsity=dense`` for decode alone); the dense reference stays dense, prefill and decode, and its cache is
shared with runs without decode gates. Rows name the decode budget (``decode``) and its achieved ``decode_density``.

``selector=gate shared_gate=true decode_gates=PATH`` (no ``gates``): one gate for both phases, the decode gates
scoring the prefill's blocks too (:func:`seer.model.decode.share_decode_gates`; a calibrated budget is calibrated
here on the calibration windows, never stored) and decoding through their budget; rows name the scorer
``shared_gate`` (``shared_gate+<blend>@<weight>`` when blended).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from seer import tracking
from seer.cli import user_errors
from seer.checks import ConfigError
from seer.config import register_configs
from seer.sweeps import sweep_report

register_configs()
log = logging.getLogger(__name__)


def _checked(cfg: DictConfig):
    """Every argument validated before anything loads: (model, sparsity, eval, selector or None, corpus)."""
    import torch
    from hydra.utils import instantiate

    from seer.checks import build
    from seer.evaluation.config import EvalConfig
    from seer.gates.config import INFERENCE_FIELDS
    from seer.kernels.common import check_block_size
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
        unknown = sorted(set(params) - set(INFERENCE_FIELDS))
        if unknown:
            raise ConfigError(f"selector=gate takes only {', '.join(INFERENCE_FIELDS)} (how the gates' scores are "
                              f"used at inference); got {unknown}")
        if cfg.shared_gate and (cfg.gates or not cfg.decode_gates):
            raise ConfigError(f"shared_gate=true: the decode gates score the prefill too; give decode_gates=PATH and "
                              f"gates=null (gates={cfg.gates!r}, decode_gates={cfg.decode_gates!r})")
        if not cfg.gates and not cfg.shared_gate:
            raise ConfigError(f"gates={cfg.gates!r}: selector=gate needs a gate checkpoint folder "
                              f"(outputs/<run>/gates)")
        selector = None
    elif cfg.shared_gate:
        raise ConfigError(f"shared_gate=true scores the prefill with the decode gates: give selector=gate, not "
                          f"selector={name}")
    else:
        try:
            check_block_size(cfg.block_size)
        except ValueError as exc:
            raise ConfigError(f"{exc} (the top-level block_size: the training-free selectors' blocks)") from exc
        try:
            selector = build_selector(name, **params)
            probe = torch.zeros(1, 1, 2 * cfg.block_size, 8)  # parameters that depend on the block size fail here
            selector.scores(LayerInputs(probe, probe, cfg.block_size, 1.0))
        except ValueError as exc:
            raise ConfigError(f"selector: {exc}") from exc
    corpus = instantiate(cfg.data.corpus)
    return model, sparsity, evaluation, selector, corpus


def _held_out_text(corpus, tokenizer, evaluation, val_fraction: float):
    """The held-out text, tokenised far enough for every window and case now, so a text too short for
    ``eval.seq_lens`` is refused before the model loads."""
    from seer.evaluation.data import HeldOutText

    text = HeldOutText(corpus, tokenizer, evaluation.split, val_fraction)
    per_length = evaluation.calibration_windows + evaluation.windows
    try:
        text.tokens(max(evaluation.seq_lens) * per_length)
    except ConfigError:  # the data itself (files matching nothing, empty, in another encoding), named as it is
        raise
    except ValueError as exc:
        raise ConfigError(f"eval.seq_lens={evaluation.seq_lens} with eval.windows={evaluation.windows} and "
                          f"eval.calibration_windows={evaluation.calibration_windows}: {exc}") from exc
    return text


def run_eval(cfg: DictConfig) -> list[dict]:
    """Evaluates the configured selection; returns the rows written to ``metrics.json``."""
    import torch

    from seer.backends import resolve_backend
    from seer.checks import build
    from seer.evaluation.harness import Evaluator
    from seer.gates.config import INFERENCE_FIELDS, GateConfig
    from seer.model.attention import prepare_model, scorer_name
    from seer.model.gate_io import load_gates, read_gate_meta
    from seer.model.loading import load_causal_lm, load_tokenizer, model_id
    from seer.preflight import check_complete, check_decode, check_evaluation
    from seer.sparsity.calibration import find_calibration, save_calibration

    check_complete(cfg)
    if cfg.gates and cfg.selector.name == "gate":  # a release folder or hub id becomes a seer gate folder
        from seer.model.gate_sources import resolve_gates

        cfg.gates = str(resolve_gates(cfg.gates))
    model_cfg, sparsity, evaluation, selector, corpus = _checked(cfg)
    plain = OmegaConf.to_container(cfg, resolve=True)
    shared = bool(cfg.shared_gate)
    shape = check_evaluation(plain, model_cfg, sparsity, evaluation, tracking.chosen_options(),
                             uses_gates=selector is None and not shared)
    decode = check_decode(plain, shape, block_size=cfg.block_size if selector is not None else None)
    decode_gates = decode_threshold = None
    if decode is not None and cfg.decode_gates is not None:
        from seer.model.decode_gate_io import decode_weights_path
        from seer.sparsity.decode import find_decode_calibration

        decode_gates = str(decode_weights_path(cfg.decode_gates).parent.resolve())
        if decode.calibrated:
            decode_threshold = find_decode_calibration(decode_gates, decode).threshold
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kernel = resolve_backend("kernel", cfg.kernel, device)
    tokenizer = load_tokenizer(model_cfg)
    if tokenizer is None:
        raise ConfigError(f"model: {model_id(model_cfg)} has no tokenizer; seer.eval tokenises held-out text")
    text = _held_out_text(corpus, tokenizer, evaluation, float(cfg.data.get("val_fraction", 0.05)))
    ruler = None
    if evaluation.ruler:  # generated before the model loads: a length too short for a task fails here
        from seer.evaluation.ruler import ruler_samples

        ruler = ruler_samples(tokenizer, evaluation.ruler, evaluation.seq_lens, evaluation.ruler_samples,
                              evaluation.seed, text.start_id)
    out_dir = Path(cfg.paths.output_dir)
    gates = str(Path(cfg.gates).resolve()) if selector is None and not shared else None
    gate_config = None
    if selector is None:  # the gates' config with the blend asked for (selector.blend), checked before loading
        own = {"block_size": decode_block_size(decode_gates)} if shared else read_gate_meta(cfg.gates)["gate"]
        gate_config = build(GateConfig, "gate", own).with_blend(cfg.selector.get("blend", "own"),
                                                                cfg.selector.get("blend_weight"))
        rerank = {k: cfg.selector.get(k) for k in INFERENCE_FIELDS
                  if k.startswith("rerank_") and cfg.selector.get(k) is not None}
        if rerank:
            gate_config = build(GateConfig, "gate", {**dataclasses.asdict(gate_config), **rerank})
    identity = tracking.run_identity(f"{cfg.task_name}-{'shared_' if shared else ''}"
                                     f"{scorer_name(selector, gate_config)}",
                                     {**tracking.flat_config(cfg), "gates": gates, "model.name": model_id(model_cfg),
                                      "decode_gates": decode_gates})
    run = _start_wandb(cfg, identity)
    try:
        torch.manual_seed(cfg.seed)  # random-weight models (model.random_init) are the same in every run
        model = load_causal_lm(model_cfg, device)
        model.config.use_cache = True
        if selector is None and not shared:
            load_gates(model, cfg.gates, expected_gate=gate_config)
        else:
            prepare_model(model, gate_config.block_size if shared else cfg.block_size)
        if decode is not None and decode_gates is None:  # training-free sparse decode (Quest alone)
            from seer.model.decode import attach_quest_decode

            attach_quest_decode(model, model.seer_context.block_size)
        elif decode is not None:
            from seer.model.decode import share_decode_gates
            from seer.model.decode_gate_io import load_decode_gates

            load_decode_gates(model, decode_gates)
            if shared:
                share_decode_gates(model, gate_config)
        evaluator = Evaluator(model, tokenizer, text, evaluation, kernel=kernel,
                              cache_dir=Path(cfg.paths.cache_dir) / "eval", model_name=model_id(model_cfg),
                              ruler_samples=ruler)
        dense = evaluator.dense()
        calibrations = {}
        if selector is None and sparsity.calibrated:
            for n in evaluation.seq_lens:
                if shared:  # no calibration is stored for a shared gate
                    calibrations[n] = evaluator.calibrate(None, sparsity, n)
                    continue
                try:
                    calibrations[n] = find_calibration(cfg.gates, sparsity, model.seer_context.scorer_name, n)
                    log.info("using the calibration stored with the gates for %s at %d tokens", sparsity.describe(), n)
                except ValueError:
                    calibrations[n] = evaluator.calibrate(None, sparsity, n)
                    if cfg.save_calibration:
                        save_calibration(cfg.gates, calibrations[n])
        rows = evaluator.evaluate(selector, sparsity, dense, calibrations, decode, decode_threshold)
        for row in rows:
            row.update(model=model_id(model_cfg), data=text.fingerprint, gates=gates,
                       decode_gates=decode_gates)
            if shared:  # the prefill scored by the decode gates, not by prefill gates
                row["selector"] = "shared_" + row["selector"]
        from seer.files import atomic_write_text

        answers = [{"seq_len": row["seq_len"], **answer}
                   for row in rows for answer in row.pop("ruler_answers", None) or []]
        if answers:  # one line a RULER sample: what the selection answered, beside the dense model's answer
            atomic_write_text(out_dir / "ruler_answers.jsonl", "".join(json.dumps(a) + "\n" for a in answers))
        metrics = atomic_write_text(out_dir / "metrics.json", json.dumps(rows, indent=1))
        summary = {"status": "completed", "metrics": str(metrics.resolve()), **_wandb_facts(run)}
        atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
        if run is not None:
            _log_rows(run, rows, answers)
    except BaseException as exc:
        tracking.finish_wandb(exit_code=130 if isinstance(exc, KeyboardInterrupt) else 1)
        raise
    tracking.finish_wandb(exit_code=0)
    print(format_rows(rows) + f"metrics.json: {metrics}\n", flush=True)
    return rows


def decode_block_size(decode_gates: str) -> int:
    """The block size of the decode gates in the folder ``decode_gates``."""
    from seer.model.decode_gate_io import read_decode_gate_meta

    return int(read_decode_gate_meta(decode_gates)["decode_gate"]["block_size"])


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
            + (f" | RULER {r['ruler']:.1f} (dense {f(r['ruler_dense'], '.1f')})" if r.get("ruler") is not None else "")
            + (f" | decode density {f(r['decode_density'], '.3f')} ({r['decode']})" if r.get("decode") else ""))
    return "\n".join(lines + [""])


def _start_wandb(cfg: DictConfig, identity: dict):
    """The job's W&B run, started as ``seer.train`` starts its own (:func:`seer.tracking.start_wandb_run`); None
    with ``logger=none``."""
    node = (cfg.get("logger") or {}).get("wandb")
    if node is None:
        return None
    return tracking.start_wandb_run(project=node.get("project", "seer"), save_dir=str(cfg.paths.output_dir),
                                    name=identity["name"], config=identity["config"], group=identity["group"],
                                    tags=identity["tags"], run_id=identity["run_id"], job_type="eval",
                                    mode=node.get("mode"), flush_interval_s=node.get("flush_interval_s", 5.0))


def _wandb_facts(run) -> dict:
    """Where the W&B run is (what the sweep report groups jobs by)."""
    if run is None:
        return {"wandb_run": None}
    return {"wandb_run": str(Path(run.dir).parent), "wandb_project": run.project, "wandb_id": run.id,
            "wandb_name": run.name, "wandb_group": run.group or None}


def _log_rows(run, rows: list[dict], answers: list[dict]) -> None:
    """The rows as a table, one summary value per metric and length, and RULER's answers as a table."""
    import wandb

    keys = [k for k in rows[0] if k != "recall_by_layer"]
    run.log({"eval/rows": wandb.Table(columns=keys, data=[[r[k] for k in keys] for r in rows])})
    if answers:
        columns = ["seq_len", "task", "sample", "score", "dense_score", "answer", "dense_answer", "references"]
        run.log({"eval/ruler_answers": wandb.Table(columns=columns, data=[
            [a.get(k) if k != "references" else " | ".join(a[k]) for k in columns] for a in answers])})
    for r in rows:
        run.summary.update({f"{k}/{r['seq_len']}": v for k, v in r.items() if isinstance(v, (int, float))})


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    with user_errors():
        run_eval(cfg)


if __name__ == "__main__":
    with sweep_report():
        main()
