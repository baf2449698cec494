"""Generation entry point: ``python -m seer.generate gates=PATH decode_gates=PATH 'prompt="..."'
[sparsity.target_density=0.2] [decode_sparsity.token_budget=2048]``.

Loads the model with prefill gates (``gates``), decode gates (``decode_gates``) or both, and generates for the
prompt: the prefill through gate -> block selection -> block-sparse attention, each decode step through decode gate
-> decode budget -> block-sparse decode attention (dense where no gates are given). Prints the text, the achieved
prefill density per layer and the prefill time (beside dense), and the achieved decode density. Each budget is the
one stored with its gates changed by any ``sparsity.*`` / ``decode_sparsity.*`` value given (``sparsity=<option>``
replaces the prefill one); ``rerank_rows`` replaces the gates' rerank rows (0: off, the faster prefill, whose
calibrated budget needs a calibration of that selection beside the gates). Everything is checked before the model
loads (:mod:`seer.preflight`): an empty prompt, a prompt (plus ``max_new_tokens``) longer than the model's context,
gates or decode gates made for another model shape, a decode budget below one block, a decode budget without decode
gates that is not Quest alone, a calibrated budget with no calibration stored beside its gates, a ``rerank_rows``
without prefill gates. Without decode gates, ``decode_sparsity.estimate=quest decode_sparsity.estimate_weight=1`` makes
decode sparse and training-free (Quest's key bounds score the blocks). ``shared_gate=true`` (with ``decode_gates``,
without ``gates``): one gate for both phases, the decode gates scoring the prefill's blocks too (top-k by default,
``sparsity.*`` changes it; ``blend`` may name an estimate).
``graph``: ``auto`` (the default) decodes on a GPU by replaying one captured step (the prompt into a StaticCache, one
decode step captured in a CUDA graph and replayed for every new token: :func:`seer.model.graph_decode.greedy_generate`)
and on a CPU through ``generate()``; ``true`` / ``false`` force either loop (``true`` on a CPU runs the same loop's
steps eagerly). ``generate()``'s eager steps are host-bound: on an H100, Qwen2.5-Coder-0.5B at 32k decodes 2.7x slower
through it with Quest at a 2k budget than densely, and 2.97x faster than dense ``generate()`` through the replayed step
(docs/bench_decode_model.md).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from seer.cli import user_errors
from seer.checks import ConfigError
from seer.config import register_configs

register_configs()


def _timed_prefill(model, ids) -> float:
    if ids.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        model(ids, use_cache=False)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _prompt(cfg: DictConfig) -> str:
    if not cfg.prompt_file:
        return cfg.prompt
    path = Path(cfg.prompt_file)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"prompt_file={cfg.prompt_file!r}: cannot be read as UTF-8 text ({exc})") from exc


def budget(cfg: DictConfig, gates_meta: dict):
    """The sparsity of this run: the gates' own (``gates_meta["sparsity"]``, top-k for untrained gates) with every
    non-null ``sparsity.*`` value of ``cfg`` put over it."""
    from seer.checks import build
    from seer.sparsity.config import SparsityConfig

    given = {k: v for k, v in OmegaConf.to_container(cfg.sparsity, resolve=True).items() if v is not None}
    stored = gates_meta.get("sparsity") or {"method": "topk"}
    return build(SparsityConfig, "sparsity", {**stored, **given})


def run_generation(cfg: DictConfig) -> dict:
    from seer import tracking
    from seer.checks import build
    from seer.gates.config import GateConfig
    from seer.model.config import ModelConfig
    from seer.model.gate_io import read_gate_meta
    from seer.model.gate_sources import resolve_gates
    from seer.model.graph_decode import greedy_generate
    from seer.model.inference import load
    from seer.model.loading import load_tokenizer, model_id
    from seer.preflight import (check_calibration, check_complete, check_decode, check_dense_layers, check_generation,
                                check_options)

    check_complete(cfg)
    check_options(tracking.chosen_options())
    if cfg.graph not in (True, False, "auto"):
        raise ConfigError(f"graph={cfg.graph!r}: give auto (a captured decode step on a GPU, generate() on a CPU), "
                          f"true or false")
    decode_given = any(v is not None for v in OmegaConf.to_container(cfg.decode_sparsity, resolve=True).values())
    if cfg.gates is None and cfg.decode_gates is None and not decode_given:
        raise ConfigError("gates=null and decode_gates=null: give gates=PATH (sparse prefill), decode_gates=PATH "
                          "(sparse decode), both, or a training-free decode budget (decode_sparsity.estimate=quest "
                          "decode_sparsity.estimate_weight=1)")
    if cfg.shared_gate and (cfg.gates is not None or cfg.decode_gates is None):
        raise ConfigError(f"shared_gate=true: the decode gates score the prefill too; give decode_gates=PATH and "
                          f"gates=null (gates={cfg.gates!r}, decode_gates={cfg.decode_gates!r})")
    if cfg.rerank_rows is not None and cfg.gates is None:
        raise ConfigError(f"rerank_rows={cfg.rerank_rows!r}: the rerank ranks prefill gates' blocks; give gates=PATH")
    if cfg.gates is not None:
        cfg.gates = str(resolve_gates(cfg.gates))  # a release folder or hub id becomes a seer gate folder
    elif not cfg.shared_gate:
        given = [(k, v) for k, v in OmegaConf.to_container(cfg.sparsity, resolve=True).items() if v is not None]
        if given:
            raise ConfigError(f"sparsity.{given[0][0]}={given[0][1]!r}: a prefill budget needs prefill gates "
                              f"(gates=PATH)")
    mcfg = build(ModelConfig, "model", OmegaConf.to_container(cfg.model, resolve=True))
    prompt = _prompt(cfg)
    tokenizer = load_tokenizer(mcfg)
    if tokenizer is None:
        raise ConfigError(f"model: {model_id(mcfg)} has no tokenizer; seer.generate needs one")
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    shape = check_generation(OmegaConf.to_container(cfg, resolve=True), mcfg, ids.shape[1])
    spars = gate = None
    if cfg.gates is not None:
        meta = read_gate_meta(cfg.gates)
        spars = budget(cfg, meta)
        gate = build(GateConfig, "gate", meta["gate"]).with_blend(cfg.blend, cfg.blend_weight)
        if cfg.rerank_rows is not None:  # 0: the rerank off (the faster prefill), else that many exact rows a block
            gate = build(GateConfig, "gate", {**asdict(gate), "rerank_rows": cfg.rerank_rows})
        check_dense_layers(spars, shape)
        check_calibration(cfg.gates, spars, gate.scorer_name)
    elif cfg.shared_gate:  # the decode gates' block size; no prefill calibration, so top-k unless told otherwise
        spars = budget(cfg, {})
        if spars.calibrated:
            raise ConfigError(f"sparsity.method={spars.method!r}: shared_gate=true has no prefill calibration; give "
                              f"sparsity.method=topk")
        check_dense_layers(spars, shape)
        gate = GateConfig().with_blend(cfg.blend, cfg.blend_weight)  # only its blend is used (seer.load)
    decode_spars = check_decode(OmegaConf.to_container(cfg, resolve=True), shape)
    model = load(mcfg, gates=cfg.gates, sparsity=spars, device=cfg.device, kernel=cfg.kernel, gate_config=gate,
                 decode_gates=cfg.decode_gates, decode_sparsity=decode_spars, shared_gate=cfg.shared_gate)
    ids = ids.to(model.device)
    result = {"prompt_tokens": ids.shape[1]}
    report = f"prompt: {ids.shape[1]} tokens"
    if spars is not None:
        result["sparse_prefill_s"] = _timed_prefill(model, ids)
        result["densities"] = densities = model.seer_context.densities()
        if cfg.compare_dense:  # the same model dense, then back to its sparse prefill (budget and calibration kept)
            with model.seer_context.running("dense"):
                result["dense_prefill_s"] = _timed_prefill(model, ids)
        mean_density = sum(densities.values()) / max(1, len(densities))
        report += (f"; sparse prefill {result['sparse_prefill_s'] * 1e3:.1f} ms"
                   + (f" (dense {result['dense_prefill_s'] * 1e3:.1f} ms)" if "dense_prefill_s" in result else "")
                   + f"; mean block density {mean_density:.3f} ({spars.describe()})")
    pad = tokenizer.pad_token_id or tokenizer.eos_token_id
    if ids.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    graph = cfg.graph is True or (cfg.graph == "auto" and ids.is_cuda)
    if graph:  # a StaticCache and one captured decode step, replayed (seer.model.graph_decode)
        stops = getattr(model.generation_config, "eos_token_id", None)  # generate()'s stop tokens
        out = greedy_generate(model, ids, cfg.max_new_tokens, eos_token_id=stops if stops is not None
                              else tokenizer.eos_token_id, pad_token_id=pad)
    else:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=cfg.max_new_tokens, do_sample=False, pad_token_id=pad)
    if ids.is_cuda:
        torch.cuda.synchronize()
    result["generate_s"] = time.perf_counter() - start
    result["text"] = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    report += (f"; generation {result['generate_s']:.2f} s for {cfg.max_new_tokens} new tokens at most, prefill "
               f"included ({'one captured decode step replayed' if graph else 'generate()'})")
    if decode_spars is not None:
        result["decode_densities"] = model.seer_decode.densities()
        report += f"; mean decode density {model.seer_decode.mean_density():.3f} ({decode_spars.describe()})"
    print(report)
    print("--- generated ---")
    print(result["text"])
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    with user_errors():
        run_generation(cfg)


if __name__ == "__main__":
    main()
