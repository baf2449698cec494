"""Learned selection on a real 32k model: Qwen2.5-Coder-0.5B-Instruct, gates trained at 16k, measured at 32k.

1. Distils one gate set per ``--targets`` (``experiment=qwen05_gates``: four novels + Python stdlib, 16k rows), or
   one per ``--recipes NAME=OVERRIDE;...`` (levers side by side: ``--plan lever`` evaluates each).
2. On held-out texts (``--texts``: a novel never trained on, evaluated whole; held-out stdlib modules; and, with the
   RULER extra, ``essays``: RULER's haystack essays, another author and kind, never trained on) measures dense once,
   then each job of the plan: the gates with and without a blended query-aware estimate (``gate.blend``) and the
   last query blocks kept dense, beside the oracle and the training-free selectors, every budget calibrated to each
   density; RULER tasks (``--ruler``) when the RULER extra is installed.
3. Writes ``rows.json`` (every row) and ``results.md`` into ``--out``, after each job (a cut-off run loses nothing).

On the GPU machine (GGUF staged in /root/models/qwen05, novels carried in .assets/austen):

    python3 experiments/quality_qwen.py --model-dir /root/models/qwen05 --gguf qwen05.gguf \\
        --novels '.assets/austen/[!e]*.txt' --eval-novel .assets/austen/emma.txt --out $OUT

``--model smollm2`` runs the same study on SmolLM2-135M-Instruct at 8k (``experiment=smollm2_quality``, 8k rows;
``--model-dir`` the folder of its GGUF, staged by ``prepare.sh smollm2``; give ``--train-len 8192 --seq-lens 8192``).

A loss lever, not measured yet: ``--recipes base= logmse=stage.loss=logmse --plan lever --blends vertical_slash:0.5``
trains the recipe's gates once with the release's KL and once on squared log errors weighted by the root of the block
mass (:func:`seer.training.losses.gate_loss`), and evaluates both with the default blend.

Blend-aware distillation (gates trained through the vertical-slash blend they are evaluated with, not alone): the
same command with ``--train-overrides stage.loss_through_blend=true`` and its own ``--work`` and ``--out`` folders
(the default run's gates and results stay); compare the ``gate:mass+vertical_slash@0.5`` rows of the two.

Every run writes ``dense.json`` (the dense measures and the settings they were measured with) into ``--out``;
``--dense-from`` that file skips the dense pass of a later run with the same settings (the dense pass with RULER takes
about 3 minutes of device time at 32k). ``docs/results/qwen/dense_32k_batch4.json``: the dense pass of 2026-12-04
(H200; 32k, 3 windows, 10 passkey, 5 copy, RULER all x 4 samples, batches of 4, model in /root/models/qwen05).

A blend weight per layer (``--blends vertical_slash:fit``): before the first job that uses it, each gate set is
observed alone and beside the vertical-slash estimate, with the true block masses, on the calibration windows of the
first text and length; every layer gets the weight of ``--fit-grid`` whose blended mask keeps the most mass at the
job's budget (``seer.sparsity.blend_fit``), and the job evaluates the gates with that list as ``gate.blend_weight``.
The weights are printed, kept in each row (``blend_weights``), in ``blend_fits.json`` and in ``results.md``. The
lever against the fixed weight (the table's default), with the gates of an earlier run:

    python3 experiments/quality_qwen.py --model-dir /root/models/qwen05 --gguf qwen05.gguf \\
        --novels '.assets/austen/[!e]*.txt' --eval-novel .assets/austen/emma.txt --gates mass=PATH \\
        --targets mass --plan lever --blends vertical_slash:fit vertical_slash:0.5 --out $OUT

Where the learned selection's perplexity is lost (``--plan attribution``): at each density the default (the first
gate set with the first blend), the ``--baselines`` (give ``oracle``), then the default again with each of
``--group-scorers`` (default ``oracle``) scoring each group of ``--attribution-groups`` layers instead of the gates
(``0 1-3 4-7 ...``: layer 0 alone, then groups of four, by default), every budget calibrated for that hybrid. The PPL
the oracle's job recovers is what that group's gates cost; a training-free scorer's job (``vertical_slash``,
``flexprefill``, ...) or ``dense`` (the group's layers kept dense, their cost taken from the other layers' budget) is a
deployable lever for that group. ``results.md`` gives each job's share of the default's gap to the oracle:

    python3 experiments/quality_qwen.py --model-dir /root/models/qwen05 --gguf qwen05.gguf \\
        --novels '.assets/austen/[!e]*.txt' --eval-novel .assets/austen/emma.txt --gates base=PATH --recipes base= \\
        --plan attribution --baselines oracle --blends vertical_slash:0.5 --densities 0.1 --texts novel --out $OUT

A hybrid chosen without looking at the evaluated windows (``--fit-hybrid``, with ``--plan attribution``): last at
each density, a job labelled ``<default> fitted`` (``--only`` selects it by that label) measures, on the calibration
windows of the first text and length only (:meth:`seer.evaluation.harness.Evaluator.calibration_ppl`), the PPL of the
default and of every candidate: each group of ``--attribution-groups`` with each of ``--group-scorers`` (``dense``
included, the oracle never: it is not deployable), each hybrid calibrated on its own. Each group takes its best scorer
when that lowers the default's calibration PPL by more than ``--fit-margin`` (0.2% of it), else keeps the gates
(:func:`seer.evaluation.hybrid_fit.pick_hybrid`; groups must not overlap); the picks together are then calibrated and
evaluated like any other job. The row is labelled with its picks (``gate:base+vertical_slash@0.5
fitted[vertical_slash@8-11]``, ``fitted[none]`` when no group beat the margin) and holds the fit (``hybrid_fit``: the
picks and every candidate's calibration PPL), also in ``hybrid_fits.json`` beside ``rows.json`` and in ``results.md``.
Cost, before the evaluation: the default and each candidate (groups x deployable scorers, 14 below) take one
calibration (an observation of the calibration windows, the model dense) and one sparse forward over the calibration
windows (2 windows of 32k), plus one more of each for the picks combined when more than one group is picked:

    python3 experiments/quality_qwen.py --model-dir /root/models/qwen05 --gguf qwen05.gguf \\
        --novels '.assets/austen/[!e]*.txt' --eval-novel .assets/austen/emma.txt --gates base=PATH --recipes base= \\
        --blends vertical_slash:0.5 --plan attribution --attribution-groups 0 1-3 4-7 8-11 12-15 16-19 20-23 \\
        --group-scorers vertical_slash flexprefill --fit-hybrid --densities 0.1 --texts novel --deadline-s 3000 \\
        --out $OUT

It evaluates the per-group jobs too (on the evaluated windows; the fit never reads them); ``--only
gate:base+vertical_slash@0.5 'gate:base+vertical_slash@0.5 fitted'`` runs the default and the fitted hybrid alone.

One gate for both phases against separate gates (issue 18's moonshot): ``--shared-gates NAME=PATH`` adds the decode
gates of a ``stage=distill_decode`` run (e.g. the ones ``experiments/quality_decode.py`` trains into
``--work``/train_decode/gates) as the gate set ``gate:NAME``, scoring the prefill's blocks
(:class:`seer.gates.decode_gate.SharedPrefillGate`: each query block's mean of its tokens' decode-gate distributions),
in every job a recipe's gates have (blended, alone), beside the prefill gates of ``--gates``/``--recipes``:

    python3 experiments/quality_qwen.py ... --gates base=PATH --recipes base= --shared-gates shared=DECODE_PATH \
        --plan lever --blends vertical_slash:0.5 --densities 0.1 --texts novel code --out $OUT

Retrieval rows (for RULER's retrieval and multi-hop tasks, which the novels and stdlib rarely show the gates): the
same command with ``--train-overrides data/augment=retrieval`` (and its own ``--work`` and ``--out``) writes key-value
facts recalled thousands of tokens later, multi-hop chains and verbatim repeated spans, in the documents' own prose or
code, into half of the training documents (``data.augment.share``; ``seer/data/retrieval.py``); the validation rows
stay those of the default run. Compare the RULER rows of the two runs.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import re
import time
from pathlib import Path
from typing import NamedTuple

import torch

from seer.config import compose, validate
from seer.data import StdlibCorpus, TextFilesCorpus
from seer.evaluation.config import EvalConfig
from seer.evaluation import ruler
from seer.evaluation.data import HeldOutText
from seer.evaluation.harness import Evaluator
from seer.evaluation.hybrid_fit import MARGIN, HybridPick, check_groups, pick_hybrid
from seer.gates.config import GateConfig
from seer.model.attention import layer_ranges, prepare_model
from seer.model.decode import attach_quest_decode, share_decode_gates
from seer.model.decode_gate_io import load_decode_gates, read_decode_gate_meta
from seer.model.gate_io import load_gates
from seer.model.loading import load_causal_lm, load_tokenizer, model_id
from seer.report import table
from seer.sparsity import SparsityConfig
from seer.sparsity.config import ALLOCATIONS
from seer.sparsity.decode import DECODE_ESTIMATES, DecodeSparsityConfig
from seer.sparsity.blend_fit import GRID, blend_recalls, pick_weights
from seer.sparsity.selectors import SELECTORS, build_selector

from quality_smollm2 import environment  # the sibling script (experiments/ is on the path when run as a file)

BASELINES = ["oracle", "vertical_slash", "flexprefill", "streaming"]
FIT = "fit"  # --blends selector:fit: a weight per layer, fitted on the calibration windows
DENSE = "dense"  # --group-scorers dense: the group's layers kept dense
FITTED = "fitted"  # --fit-hybrid: the job whose groups' scorers are picked on the calibration windows
NOT_DEPLOYABLE = ("oracle",)  # group scorers a fitted hybrid never picks (the oracle reads the true attention)


class Job(NamedTuple):
    """One evaluation of a plan: its row label, the gate set or selector that scores, the gates' blend (estimate,
    weight) or None, the budget, and (attribution) the layers ``group_scorer`` scores instead of the gates (a
    selector's name, or ``dense``: those layers in the budget's ``dense_layers``). A fitted hybrid (``group_scorer``
    ``fitted``, no layers of its own) picks from ``candidates``, ``(group, scorer)`` pairs, at run time
    (:func:`fit_hybrid`)."""

    label: str
    scorer: str
    blend: tuple[str, float | str] | None
    sparsity: SparsityConfig
    group_layers: tuple[int, ...] = ()
    group_scorer: str = "oracle"
    candidates: tuple[tuple[tuple[int, ...], str], ...] = ()
    rerank: tuple[int, float, float] | None = None  # the gates' rerank: gate.rerank_rows / _top_p / _max_share


UNGATED = "none"  # the one model of a study without gate sets (training-free --baselines only)
MODELS = {  # --model: (model config, gate recipe, title)
    "qwen05": ("qwen2_5_coder_0_5b", "qwen05_gates", "Qwen2.5-Coder-0.5B-Instruct"),
    "smollm2": ("smollm2", "smollm2_quality", "SmolLM2-135M-Instruct"),
}


def model_overrides(args) -> list[str]:
    """The base model's overrides, for training and evaluation alike: with ``--gguf``, its conversion is cached in
    ``--work`` (the first load converts it, later ones read the converted folder)."""
    over = [f"model={MODELS[args.model][0]}", "model.package=null", f"model.name_or_path={args.model_dir}"]
    return over + ([f"model.gguf_file={args.gguf}", f"model.gguf_cache_dir={args.work}/gguf"] if args.gguf else [])


def recipes(args) -> dict[str, list[str]]:
    """The gate sets to study, name -> their own seer.train overrides: one per ``--targets`` (``stage.target=T``)
    or, with ``--recipes NAME=OV1;OV2 ...``, one per recipe (learning the block mass unless it says otherwise)."""
    if not args.recipes:
        return {t: [f"stage.target={t}"] for t in args.targets}
    out = {}
    for recipe in args.recipes:
        name, sep, overrides = recipe.partition("=")
        if not sep or not name or name in out:
            raise SystemExit(f"--recipes {recipe!r}: give NAME=OVERRIDE;OVERRIDE... with a new name (or NAME= for "
                             "the recipe unchanged)")
        out[name] = ["stage.target=mass", *filter(None, overrides.split(";"))]
    return out


def shared_gates(args) -> dict[str, Path]:
    """``--shared-gates NAME=PATH``: decode-gate folders whose decode gates also score the prefill (one gate for both
    phases, :func:`seer.model.decode.share_decode_gates`), studied as the gate sets ``gate:NAME`` after the
    recipes'."""
    out = {}
    for pair in args.shared_gates:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path or name in out or name in recipes(args):
            raise SystemExit(f"--shared-gates {pair!r}: give NAME=PATH with a name no recipe or other shared gate has")
        try:
            read_decode_gate_meta(path)  # a missing or altered decode-gate file stops the run before any training
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--shared-gates {pair!r}: {exc}") from None
        out[name] = Path(path)
    return out


def gate_sets(args) -> list[str]:
    """The labels of the gate sets studied: the recipes' (or targets'), then the shared gates'."""
    return [f"gate:{name}" for name in [*recipes(args), *shared_gates(args)]]


def train_gates(args, name: str, overrides: list[str]) -> Path:
    """Distils the gate set ``name`` (the recipe, ``--train-overrides``, then ``overrides``); returns its folder."""
    from seer.training.run import run_training

    over = [f"experiment={MODELS[args.model][1]}", *model_overrides(args),
            f"data.corpus.corpora.0.paths=['{args.novels}']", f"trainer.max_steps={args.steps}",
            f"data.seq_len={args.train_len}", "logger=none", f"paths.output_dir={args.work}/train_{name}",
            f"paths.cache_dir={args.work}/cache", *args.train_overrides, *overrides]
    summary = run_training(compose(over))
    return Path(summary["gates"])


def parse_blends(specs: list[str]) -> list[tuple[str, float | str]]:
    """``--blends`` as ``(estimate, weight)``: ``selector:weight`` (one weight in (0, 1) for every layer) or
    ``selector:fit`` (a weight per layer, fitted at each job's budget: :func:`fit_blend`)."""
    out: list[tuple[str, float | str]] = []
    for spec in specs:
        name, _, weight = spec.partition(":")
        try:
            value = weight if weight == FIT else float(weight)
            GateConfig(blend=name, blend_weight=0.5 if value == FIT else value)  # checks the name and the weight
        except ValueError as exc:
            raise SystemExit(f"--blends {spec!r}: give selector:weight, a weight in (0, 1), or selector:fit "
                             f"({exc})") from None
        if (name, value) in out:
            raise SystemExit(f"--blends {spec!r}: given twice")
        out.append((name, value))
    return out


def fit_blend(evaluator: Evaluator, blend: str, sparsity: SparsityConfig, seq_len: int, grid: list[float],
              observed: dict) -> tuple[list[float], dict[int, dict[float, float]]]:
    """The blend weight of each layer of ``evaluator``'s gates for the estimate ``blend`` at budget ``sparsity``
    (the grid weight whose mask keeps the most true mass on the calibration windows of ``seq_len``), and every
    layer's recall at every weight. The gates alone and the estimate are observed once per ``blend`` (kept in
    ``observed``); the gates are left alone (``blend=None``)."""
    if blend not in observed:
        ctx = evaluator.ctx
        ctx.update(gate_config=dataclasses.replace(ctx.gate_config, blend=None))
        evaluator.forget(None)
        gate, masses = evaluator.observe(None, seq_len, want_mass=True)
        partner, _ = evaluator.observe(build_selector(blend), seq_len, want_mass=False)
        evaluator.forget(None)
        observed[blend] = (gate, partner, masses)
    recalls = blend_recalls(*observed[blend], sparsity.target_density, grid, sparsity)
    return pick_weights(recalls), recalls


def hybrid_selection(layers: dict[int, str], sparsity: SparsityConfig) -> tuple[dict, SparsityConfig]:
    """``{layer: scorer}`` as the evaluator takes it: ``layer_selectors`` (a selector per layer) and the budget, with
    the layers of ``dense`` added to its ``dense_layers``."""
    dense = [layer for layer, scorer in layers.items() if scorer == DENSE]
    selectors = {layer: build_selector(scorer) for layer, scorer in layers.items() if scorer != DENSE}
    if dense:
        sparsity = dataclasses.replace(sparsity, dense_layers=sorted({*sparsity.dense_layers, *dense}))
    return selectors, sparsity


def fit_hybrid(evaluator: Evaluator, sparsity: SparsityConfig, seq_len: int,
               candidates: tuple[tuple[tuple[int, ...], str], ...], margin: float = MARGIN,
               report=lambda what, ppl, change: None) -> tuple[HybridPick, float]:
    """The groups' scorers for ``evaluator``'s gates (their blend as the context has it) at budget ``sparsity``,
    picked on the calibration windows of ``seq_len`` only (:meth:`Evaluator.calibration_ppl`; the evaluated windows
    are never looked at): the PPL of the gates alone and of each candidate (``(group, scorer)``: that scorer on that
    group, ``dense``: its layers dense), each calibrated on its own, then :func:`pick_hybrid` with ``margin``.
    Returns the picks and the calibration-window PPL of the picks combined (measured when more than one group was
    picked). ``report(what, ppl, change)`` is told each measure (``ppl`` None, ``change`` the reason, for a candidate
    whose budget cannot be calibrated: dense layers costing more than it; never picked). Cost: each measure is one
    observation (the model dense) and one sparse forward over the calibration windows; observations are dropped after
    each (the gates' cached observations too). Picks that cannot be calibrated together (dense layers) raise
    ValueError."""
    def measure(layers: dict[int, str]) -> float:
        evaluator.forget(None)  # one hybrid's scores kept at a time (a 32k observation holds every layer's)
        layer_selectors, budget = hybrid_selection(layers, sparsity)
        try:
            return evaluator.calibration_ppl(None, budget, seq_len, layer_selectors=layer_selectors)["ppl"]
        finally:
            evaluator.forget(None)

    baseline = measure({})
    report("default", baseline, 0.0)
    table: dict[tuple[tuple[int, ...], str], float | None] = {}
    for group, scorer in candidates:
        what = f"{scorer}@{layer_ranges(group)}"
        try:
            table[group, scorer] = measure(dict.fromkeys(group, scorer))
        except ValueError as exc:  # e.g. dense layers that cost more than the budget
            table[group, scorer] = None
            report(what, None, f"not measured: {exc}")
            continue
        report(what, table[group, scorer], table[group, scorer] / baseline - 1.0)
    fit = pick_hybrid(baseline, table, margin)
    if len(fit.picks) > 1:
        try:
            combined = measure(fit.layers)
        except ValueError as exc:  # dense picks that cost more than the budget together
            raise ValueError(f"the picks {fit.describe()} together: {exc}") from None
        report(f"combined {fit.describe()}", combined, combined / baseline - 1.0)
    else:
        combined = next((table[pick] for pick in fit.picks.items()), baseline)
    return fit, combined


def fitted_job(evaluator: Evaluator, label: str, sparsity: SparsityConfig, text: str, seq_len: int,
               candidates: tuple[tuple[tuple[int, ...], str], ...], margin: float = MARGIN,
               report=lambda what, ppl, change: None) -> tuple[dict, dict, SparsityConfig]:
    """A fitted job's selection (:func:`fit_hybrid` on ``evaluator``'s calibration windows of ``seq_len``, of
    ``text``): its record (the plan's ``job`` label, the row ``label`` naming the picks, the budget, where it was
    fitted, :meth:`HybridPick.record` and the picks' combined calibration PPL), and the layer selectors and budget
    that evaluate it."""
    fit, combined = fit_hybrid(evaluator, sparsity, seq_len, candidates, margin, report)
    record = {"job": label, "label": f"{label}[{fit.describe()}]", "sparsity": sparsity.describe(), "text": text,
              "seq_len": seq_len, **fit.record(), "combined_ppl": combined}
    return (record, *hybrid_selection(fit.layers, sparsity))


def plan(gates: list[str], densities: list[float], blends: list[tuple[str, float]], last_rows: int) -> list[Job]:
    """Jobs in priority order, so a run cut short still answers what matters: at the first density the first gate
    set plain, with the last ``last_rows`` query blocks dense, and blended with the first blend; the oracle and the
    training-free baselines; the other blends and gate sets; the baselines with dense last blocks; then at the other
    densities the main ones again."""
    gate = gates[0]
    jobs = []
    for i, d in enumerate(densities):
        plain = SparsityConfig(method="threshold", target_density=d)
        tail = SparsityConfig(method="threshold", target_density=d, dense_last_rows=last_rows)
        blended = [(f"{gate}+{name}@{w}", gate, (name, w)) for name, w in blends]
        jobs += [Job(gate, gate, None, plain), Job(gate, gate, None, tail)]
        jobs += [Job(*blended[0], tail)] if blends else []
        jobs += [Job(name, name, None, plain) for name in BASELINES]
        if i:
            continue
        jobs += [Job(*b, s) for b in blended for s in (plain, tail) if Job(*b, s) not in jobs]
        jobs += [Job(other, other, None, s) for other in gates[1:] for s in (plain, tail)]
        jobs += [Job(name, name, None, tail) for name in BASELINES]
    return jobs


def final_plan(gates: list[str], densities: list[float], blends: list[tuple[str, float]],
               rerank: tuple[int, float, float] | None = None) -> list[Job]:
    """The comparison behind the results table: at each density the default (the first gate set with the first
    blend, reranked as ``rerank`` says: the gate preset's rerank, :func:`preset_rerank`), the oracle and the
    training-free selectors that read the queries (vertical-slash, FlexPrefill, XAttention's antidiagonal,
    vertical-slash reranked by sampled rows); at the first density also the plain gate and streaming."""
    gate = gates[0]
    jobs = []
    for i, d in enumerate(densities):
        plain = SparsityConfig(method="threshold", target_density=d)
        if blends:
            name, w = blends[0]
            jobs.append(Job(f"{gate}+{name}@{w}{rerank_suffix(rerank)}", gate, (name, w), plain, rerank=rerank))
        jobs += [Job(name, name, None, plain)
                 for name in ("oracle", "vertical_slash", "flexprefill", "antidiagonal", "reranked")]
        if not i:
            jobs += [Job(gate, gate, None, plain), Job("streaming", "streaming", None, plain)]
    return jobs


def lever_plan(gates: list[str], densities: list[float], blends: list[tuple[str, float]],
               baselines: tuple[str, ...] = (), allocations: tuple[str, ...] = ("global",),
               reranks: tuple[tuple[int, float, float], ...] = ()) -> list[Job]:
    """New gate recipes (or blends) against the table: at each density every gate set with each blend in the order
    given (the first is the default), under each of ``allocations`` (how the calibrated threshold shares the
    density among layers and heads; a row's label names any but ``global``), then every gate set with the first
    blend and each of ``reranks`` (rows, top_p, max_share), then every gate set alone, then the training-free
    ``baselines``."""
    jobs = []
    for d in densities:
        plain = SparsityConfig(method="threshold", target_density=d)
        jobs += [Job(f"{gate}+{name}@{w}" + ("" if alloc == "global" else f" {alloc}"), gate, (name, w),
                     dataclasses.replace(plain, allocation=alloc))
                 for alloc in allocations for name, w in blends for gate in gates]
        first = [(f"{gate}+{blends[0][0]}@{blends[0][1]}", blends[0]) if blends else (gate, None) for gate in gates]
        jobs += [Job(f"{label}{rerank_suffix(rerank)}", gate, blend, plain, rerank=rerank)
                 for rerank in reranks for gate, (label, blend) in zip(gates, first)]
        jobs += [Job(gate, gate, None, plain) for gate in gates]
        jobs += [Job(name, name, None, plain) for name in baselines]
    return jobs


def rerank_suffix(rerank: tuple[int, float, float] | None) -> str:
    """A row label's rerank part: ``+rerank8@0.99``, ``cap0.3`` after it when the candidates are capped, empty for
    none."""
    if not rerank:
        return ""
    rows, top_p, cap = rerank
    return f"+rerank{rows}@{top_p:g}" + (f"cap{cap:g}" if cap < 1 else "")


def preset_rerank(model: str) -> tuple[int, float, float] | None:
    """The rerank the model's gate recipe stores in its gates (``gate.rerank_rows`` / ``_top_p`` / ``_max_share`` of
    its gate preset), None when it sets none: what ``seer.load(model, gates=...)`` does with them."""
    gate = validate(compose([f"experiment={MODELS[model][1]}"])).gate
    return (gate.rerank_rows, gate.rerank_top_p, gate.rerank_max_share) if gate.rerank_rows else None


def recipe_block_size(model: str) -> int:
    """The block size of the model's gate recipe (its gate preset's ``block_size``)."""
    return validate(compose([f"experiment={MODELS[model][1]}"])).gate.block_size


def rerank_fields(rerank: tuple[int, float, float] | None) -> dict:
    """A job's rerank as gate fields (off: 0 rows, the other fields at their defaults)."""
    rows, top_p, cap = rerank or (0, GateConfig.rerank_top_p, GateConfig.rerank_max_share)
    return {"rerank_rows": rows, "rerank_top_p": top_p, "rerank_max_share": cap}


def parse_reranks(specs: list[str]) -> tuple[tuple[int, float, float], ...]:
    """``--reranks`` as ``(rows, top_p, max_share)``: ``ROWS[:TOP_P[:MAX_SHARE]]`` (the gate fields' defaults for
    what is left out), checked as gate fields."""
    out = []
    for spec in specs:
        parts = spec.split(":")
        try:
            if len(parts) > 3:
                raise ValueError("too many fields")
            rows = int(parts[0])
            top_p = float(parts[1]) if len(parts) > 1 and parts[1] else GateConfig.rerank_top_p
            cap = float(parts[2]) if len(parts) > 2 and parts[2] else GateConfig.rerank_max_share
            GateConfig(rerank_rows=rows, rerank_top_p=top_p, rerank_max_share=cap)
            if rows < 1:
                raise ValueError("rows must be >= 1")
        except ValueError as exc:  # ConfigError included
            raise SystemExit(f"--reranks {spec!r}: give ROWS[:TOP_P[:MAX_SHARE]], rows >= 1, top_p and max_share in "
                             f"(0, 1] ({exc})") from None
        out.append((rows, top_p, cap))
    return tuple(out)


def default_label(gates: list[str], blends: list[tuple[str, float | str]]) -> str:
    """The default selection's label: the first gate set with the first blend (alone without blends)."""
    return f"{gates[0]}+{blends[0][0]}@{blends[0][1]}" if blends else gates[0]


def attribution_plan(gates: list[str], densities: list[float], blends: list[tuple[str, float | str]],
                     groups: list[tuple[int, ...]], baselines: tuple[str, ...] = (),
                     group_scorers: tuple[str, ...] = ("oracle",), fit: bool = False) -> list[Job]:
    """Which layers' selections cost the perplexity: at each density the default (:func:`default_label`), the
    training-free ``baselines`` (``oracle`` gives each group's recovered share), then, for each of ``group_scorers``,
    the default with that scorer on each group of ``groups`` instead of the gates (labelled
    ``<default> <scorer>@<layers>``; ``dense`` keeps the group's layers dense). With ``fit``, last at each density,
    the default with the groups' scorers picked on the calibration windows (labelled ``<default> fitted``; its
    candidates: every group with every deployable group scorer, the oracle left out: :func:`fit_hybrid`); the
    groups must not overlap then."""
    label, blend = default_label(gates, blends), blends[0] if blends else None
    candidates = tuple((group, scorer) for scorer in group_scorers if scorer not in NOT_DEPLOYABLE
                       for group in groups)
    if fit:
        if not candidates:
            raise ValueError(f"a fitted hybrid needs a deployable group scorer (not only {', '.join(NOT_DEPLOYABLE)})")
        check_groups(groups)
    jobs = []
    for d in densities:
        plain = SparsityConfig(method="threshold", target_density=d)
        jobs.append(Job(label, gates[0], blend, plain))
        jobs += [Job(name, name, None, plain) for name in baselines]
        jobs += [Job(f"{label} {scorer}@{layer_ranges(group)}", gates[0], blend,
                     dataclasses.replace(plain, dense_layers=list(group)) if scorer == DENSE else plain, group, scorer)
                 for scorer in group_scorers for group in groups]
        jobs += [Job(f"{label} {FITTED}", gates[0], blend, plain, (), FITTED, candidates)] if fit else []
    return jobs


def default_groups(num_layers: int) -> list[tuple[int, ...]]:
    """Layer 0 alone (the layer the gates predict worst), then groups of four: ``0 1-3 4-7 8-11 ...``."""
    edges = [0, 1, *range(4, num_layers, 4), num_layers]
    return [tuple(range(start, stop)) for start, stop in zip(edges, edges[1:]) if start < stop]


def parse_groups(specs: list[str] | None, num_layers: int) -> list[tuple[int, ...]]:
    """``--attribution-groups`` (``L`` or ``FIRST-LAST`` each, layers of a model of ``num_layers``) as tuples of
    layers; None: :func:`default_groups`. A malformed group, a layer the model lacks or a group given twice stops
    the run, naming it."""
    if specs is None:
        return default_groups(num_layers)
    groups: list[tuple[int, ...]] = []
    for spec in specs:
        found = re.fullmatch(r"(\d+)(?:-(\d+))?", spec)
        if found is None:
            raise SystemExit(f"--attribution-groups {spec!r}: give a layer (3) or a range of layers (2-5)")
        start, stop = int(found[1]), int(found[2] or found[1])
        if start > stop or stop >= num_layers:
            raise SystemExit(f"--attribution-groups {spec!r}: not layers of the model's 0-{num_layers - 1}")
        group = tuple(range(start, stop + 1))
        if group in groups:
            raise SystemExit(f"--attribution-groups {spec!r}: given twice")
        groups.append(group)
    return groups


def model_layers(model: str) -> int:
    """The number of attention layers of ``--model`` (its model config's architecture), known before loading it."""
    return int(compose([f"model={MODELS[model][0]}"]).model.architecture.num_hidden_layers)


def only_jobs(jobs: list, labels: list[str]) -> list:
    """``jobs`` with those not labelled in ``labels`` replaced by None (their places kept, so ``--skip`` counts
    the same); a label no job has stops the run."""
    unknown = sorted(set(labels) - {label for label, *_ in jobs})
    if unknown:
        raise SystemExit(f"--only {' '.join(unknown)}: not a job of this plan; its jobs are "
                         f"{', '.join(dict.fromkeys(label for label, *_ in jobs))}")
    return [job if job[0] in labels else None for job in jobs]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen05", choices=sorted(MODELS))
    ap.add_argument("--model-dir", required=True, help="folder holding the model's GGUF")
    ap.add_argument("--gguf", help="the GGUF file in --model-dir (default: the model config's)")
    ap.add_argument("--novels", required=True, help="glob of the training novels")
    ap.add_argument("--eval-novel", required=True, help="a novel never trained on (evaluated whole)")
    ap.add_argument("--gates", nargs="*", default=[],
                    help="trained gate folders as NAME=PATH (a target's or a recipe's name; skips its training)")
    ap.add_argument("--targets", nargs="*", default=["mass", "maxpool"], choices=["mass", "maxpool"],
                    help="a gate set per target, trained (none: only the --shared-gates, or with --plan lever and no "
                    "--recipes only the --baselines, on the model without gates)")
    ap.add_argument("--recipes", nargs="*", default=[],
                    help="gate sets as NAME=OVERRIDE;OVERRIDE (seer.train overrides of each; instead of --targets), "
                    "e.g. base= qpool='gate.q_pool=[avg,max,min]' long=trainer.max_steps=1600")
    ap.add_argument("--shared-gates", nargs="*", default=[], metavar="NAME=PATH",
                    help="decode gates (a stage=distill_decode gates folder) scoring the prefill too, studied as the "
                    "gate set gate:NAME beside the recipes' (one gate for both phases against separate gates)")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--train-len", type=int, default=16384)
    ap.add_argument("--train-overrides", nargs="*", default=[], help="more seer.train overrides (e.g. trainer=cpu)")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[32768])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.05])
    ap.add_argument("--blends", nargs="*", default=["vertical_slash:0.5", "vertical_slash:0.25"],
                    help="gate blends to try, as selector:weight or selector:fit (a weight per layer, fitted)")
    ap.add_argument("--fit-grid", type=float, nargs="+", default=list(GRID),
                    help="the weights a fitted blend (selector:fit) chooses from, per layer")
    ap.add_argument("--last-rows", type=int, default=2, help="dense last query blocks in the tail variants")
    ap.add_argument("--dense-last-rows", type=int, default=None,
                    help="every job's whole last query blocks (SparsityConfig.dense_last_rows, counted in the "
                         "budget; default its default, 1); not with --plan explore, whose tail variants set them")
    ap.add_argument("--budget-method", default="threshold", choices=["threshold", "topk"],
                    help="every job's budget: a threshold calibrated to each target density (the default policy's) or "
                         "top-k, the same share of every row's causal blocks; not with --plan explore")
    ap.add_argument("--max-row-share", type=float, default=None,
                    help="with the threshold budget: the most of each row's causal blocks it keeps "
                         "(SparsityConfig.max_row_share, in (0, 1)); not with --plan explore")
    ap.add_argument("--cap-min-blocks", type=int, default=None,
                    help="with --max-row-share: a row may keep this many blocks where its share allows fewer "
                         "(SparsityConfig.cap_min_blocks, >= 1)")
    ap.add_argument("--calibration-rounds", type=int, default=None,
                    help="with the threshold budget: re-fits of each calibrated knob on the scores of the model "
                         "running sparse (SparsityConfig.calibration_rounds, >= 1); not with --plan explore")
    ap.add_argument("--plan", default="explore", choices=["explore", "final", "lever", "attribution"],
                    help="explore: the levers (blends, dense last blocks); final: the default beside the baselines; "
                    "lever: a new gate recipe's default and its gate alone; attribution: the default with the "
                    "oracle in each group of --attribution-groups layers")
    ap.add_argument("--attribution-groups", nargs="+",
                    help="--plan attribution: groups of layers the oracle scores in turn, as L or FIRST-LAST "
                    "(default: 0 1-3 4-7 ..., layer 0 alone then groups of four)")
    ap.add_argument("--group-scorers", nargs="+", default=["oracle"], choices=sorted([*SELECTORS, DENSE]),
                    help="--plan attribution: what scores each group instead of the gates, one job per scorer and "
                    "group (oracle: what the group's gates cost; a training-free selector or dense: a lever)")
    ap.add_argument("--fit-hybrid", action="store_true",
                    help="--plan attribution: last at each density, the default with each group's scorer picked (among "
                    "the deployable --group-scorers, or the gates) on the calibration windows of the first text and "
                    "length, then evaluated like the other jobs (groups must not overlap)")
    ap.add_argument("--fit-margin", type=float, default=MARGIN,
                    help="--fit-hybrid: a group takes a scorer only when it lowers the default's calibration-window "
                    "PPL by more than this share of it")
    ap.add_argument("--skip", type=int, default=0, help="skip the plan's first jobs (measured by an earlier run)")
    ap.add_argument("--only", nargs="+", help="run only the plan's jobs of these labels (as the rows name them, "
                    "e.g. gate:base+vertical_slash@0.5 antidiagonal)")
    ap.add_argument("--reranks", nargs="+", default=[], metavar="ROWS[:TOP_P[:MAX_SHARE]]",
                    help="--plan lever: the gates with the first blend, their candidates (each row's top-p blocks) "
                         "ranked again by ROWS exact query rows per block (gate.rerank_rows / rerank_top_p)")
    ap.add_argument("--baselines", nargs="+", default=[], choices=sorted(SELECTORS),
                    help="--plan lever and attribution: training-free selectors measured after the gate sets at each "
                    "density (attribution: give oracle for each group's recovered share)")
    ap.add_argument("--allocations", nargs="+", default=["global"], choices=list(ALLOCATIONS),
                    help="--plan lever: how each blend's calibrated threshold shares the density (global: one "
                    "threshold; uniform: every head at the target; oracle: each head at the density a global "
                    "threshold on the true block mass gives it on the calibration windows)")
    ap.add_argument("--decode-budget", type=int, default=0,
                    help="tokens per KV head of training-free sparse decode (Quest alone, no decode gates) for the "
                    "generated answers (passkey, RULER) of every job; 0: dense decode steps")
    ap.add_argument("--decode-prompt-blocks", type=int, default=0,
                    help="--decode-budget: blocks of the prompt its last queries attend most, kept at every decode "
                    "step (DecodeSparsityConfig.prompt_blocks; 0: none)")
    ap.add_argument("--decode-estimate", default="quest", choices=DECODE_ESTIMATES,
                    help="--decode-budget: the training-free estimate that scores each decode step's blocks "
                    "(DecodeSparsityConfig.estimate: quest, the largest bound of a KV head's query heads; quest_mass, "
                    "the mean of each head's softmax over the blocks; moments, the keys' mean and variance; oracle, "
                    "the true block mass, the yardstick)")
    ap.add_argument("--decode-recent-blocks", type=int, default=0,
                    help="--decode-budget: blocks before the newest kept at every decode step, a local window "
                    "(DecodeSparsityConfig.recent_blocks; 0: none)")
    ap.add_argument("--decode-rerank-blocks", type=int, default=0,
                    help="--decode-budget: each step's top blocks by the estimate ranked again by their own keys "
                    "(DecodeSparsityConfig.rerank_blocks; 0: none)")
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--passkey", type=int, default=10)
    ap.add_argument("--copy", type=int, default=5)
    ap.add_argument("--ruler", nargs="*", default=[], help="RULER tasks (needs the ruler extra)")
    ap.add_argument("--ruler-samples", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=1,
                    help="windows, passkey/copy cases and RULER samples per prefill (left-padded batches)")
    ap.add_argument("--dense-cache", help="a folder caching the dense pass (per model, text and settings), so a "
                    "second run on the same machine skips it")
    ap.add_argument("--dense-from", help="a dense.json an earlier run wrote into its --out (same settings: checked), "
                    "used instead of the dense pass")
    ap.add_argument("--texts", nargs="+", default=["novel", "code"], choices=["novel", "code", "essays"],
                    help="held-out texts (essays: RULER's haystack essays; needs the RULER extra)")
    ap.add_argument("--deadline-s", type=float, default=540.0,
                    help="no job starts after this many seconds from the start (training included)")
    ap.add_argument("--work", default="outputs/quality_qwen")
    ap.add_argument("--out", default="docs/results/qwen")
    return ap.parse_args(argv)


def planned_jobs(args) -> list[Job | None]:
    """The jobs of ``--plan`` (those ``--only`` leaves out None), every argument they read checked."""
    if "essays" in args.texts and ruler.missing_extra():
        raise SystemExit(f"--texts essays: RULER's essays come with the RULER extra, not installed "
                         f"({', '.join(ruler.missing_extra())} missing): {ruler.INSTALL_HINT}")
    if args.decode_budget < 0 or args.decode_budget and (args.shared_gates or args.decode_budget < 64):
        raise SystemExit(f"--decode-budget {args.decode_budget}: give 0 (dense decode) or at least one 64-token "
                         f"block, without --shared-gates (their decode gates decode)")
    blends = parse_blends(args.blends)
    names = gate_sets(args)
    if not names and not (args.plan == "lever" and args.baselines):
        raise SystemExit("no gate sets: give --targets, --recipes or --shared-gates (or, with --plan lever, only "
                         "--baselines: training-free selectors on the model without gates)")
    for flag, value, default in (("--attribution-groups", args.attribution_groups, None),
                                 ("--group-scorers", args.group_scorers, ["oracle"]),
                                 ("--fit-hybrid", args.fit_hybrid, False)):
        if value != default and args.plan != "attribution":
            raise SystemExit(f"{flag}: only for --plan attribution, not {args.plan}")
    for flag, value in (("--decode-prompt-blocks", args.decode_prompt_blocks),
                        ("--decode-recent-blocks", args.decode_recent_blocks),
                        ("--decode-rerank-blocks", args.decode_rerank_blocks)):
        if value and not args.decode_budget or value < 0:
            raise SystemExit(f"{flag} {value}: give a number >= 0, with --decode-budget")
    if args.decode_estimate != "quest" and not args.decode_budget:
        raise SystemExit(f"--decode-estimate {args.decode_estimate}: scores sparse decode steps; give --decode-budget")
    if args.allocations != ["global"] and args.plan != "lever":
        raise SystemExit(f"--allocations: only for --plan lever, not {args.plan}")
    if args.reranks and args.plan != "lever":
        raise SystemExit(f"--reranks: only for --plan lever, not {args.plan}")
    if args.fit_margin != MARGIN and not args.fit_hybrid:
        raise SystemExit("--fit-margin: only with --fit-hybrid")
    if not args.fit_margin >= 0:
        raise SystemExit(f"--fit-margin {args.fit_margin}: give a share of the PPL >= 0")
    if args.fit_hybrid and set(args.group_scorers) <= set(NOT_DEPLOYABLE):
        raise SystemExit(f"--fit-hybrid: give --group-scorers a deployable scorer (a training-free selector or "
                         f"dense), not only {' '.join(args.group_scorers)}")
    plans = {"explore": lambda: plan(names, args.densities, blends, args.last_rows),
             "final": lambda: final_plan(names, args.densities, blends, preset_rerank(args.model)),
             "lever": lambda: lever_plan(names, args.densities, blends, tuple(args.baselines),
                                         tuple(args.allocations), parse_reranks(args.reranks)),
             "attribution": lambda: attribution_plan(names, args.densities, blends,
                                                     parse_groups(args.attribution_groups, model_layers(args.model)),
                                                     tuple(args.baselines), tuple(args.group_scorers),
                                                     args.fit_hybrid)}
    if args.fit_hybrid:
        try:
            check_groups(parse_groups(args.attribution_groups, model_layers(args.model)))
        except ValueError as exc:
            raise SystemExit(f"--attribution-groups: {exc}") from None
    jobs = plans[args.plan]()
    if args.dense_last_rows is not None:
        if args.plan == "explore" or args.dense_last_rows < 0:
            raise SystemExit(f"--dense-last-rows {args.dense_last_rows}: give a number >= 0, with a plan other than "
                             "explore (its tail variants use --last-rows)")
        jobs = [job._replace(sparsity=dataclasses.replace(job.sparsity, dense_last_rows=args.dense_last_rows))
                for job in jobs]
    if args.budget_method != "threshold":
        if args.plan == "explore":
            raise SystemExit(f"--budget-method {args.budget_method}: not with --plan explore (its budgets are its own)")
        jobs = [job._replace(sparsity=dataclasses.replace(job.sparsity, method=args.budget_method)) for job in jobs]
    if args.max_row_share is not None:
        if args.plan == "explore" or args.budget_method != "threshold" or not 0 < args.max_row_share < 1:
            raise SystemExit(f"--max-row-share {args.max_row_share}: give a share in (0, 1), with the threshold budget "
                             "and a plan other than explore")
        jobs = [job._replace(sparsity=dataclasses.replace(job.sparsity, max_row_share=args.max_row_share))
                for job in jobs]
    if args.cap_min_blocks is not None:
        if args.max_row_share is None or args.cap_min_blocks < 1:
            raise SystemExit(f"--cap-min-blocks {args.cap_min_blocks}: give a number of blocks >= 1, with "
                             "--max-row-share")
        jobs = [job._replace(sparsity=dataclasses.replace(job.sparsity, cap_min_blocks=args.cap_min_blocks))
                for job in jobs]
    if args.calibration_rounds is not None:
        if args.plan == "explore" or args.budget_method != "threshold" or args.calibration_rounds < 1:
            raise SystemExit(f"--calibration-rounds {args.calibration_rounds}: give a count >= 1, with the threshold "
                             "budget and a plan other than explore")
        jobs = [job._replace(sparsity=dataclasses.replace(job.sparsity, calibration_rounds=args.calibration_rounds))
                for job in jobs]
    jobs = only_jobs(jobs, args.only) if args.only else jobs
    layers = model_layers(args.model) if any(job and job.sparsity.dense_layers for job in jobs) else 0
    for job in filter(None, jobs):
        if job.sparsity.dense_layers and len(job.sparsity.dense_layers) >= job.sparsity.target_density * layers:
            raise SystemExit(f"{job.label}: {len(job.sparsity.dense_layers)} dense layers of {layers} cost more than "
                             f"the target density {job.sparsity.target_density}; give smaller groups or a higher "
                             "density")
    return jobs


def main() -> None:
    args = parse_args()
    start = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    given = dict(g.split("=", 1) for g in args.gates)
    jobs = planned_jobs(args)  # before any training or loading, so that a bad --only or group stops at once
    gates = {f"gate:{name}": Path(given[name]) if name in given else train_gates(args, name, overrides)
             for name, overrides in recipes(args).items()}
    shared = {f"gate:{name}": path for name, path in shared_gates(args).items()}
    gates.update(shared)
    train_s = time.time() - start
    # no gate sets (--targets with none, --plan lever): the --baselines on the model without gates, at the block size
    # of the model's gate recipe
    gates = gates or {UNGATED: None}
    print(f"[quality] gates {gates} ({train_s:.0f} s)", flush=True)

    run = validate(compose(model_overrides(args)))
    tokenizer = load_tokenizer(run.model)
    base = load_causal_lm(run.model, device)
    base.config.use_cache = True
    models = {}
    for key, path in gates.items():
        models[key] = copy.deepcopy(base)
        if key in shared:  # the decode gates score the prefill; decode stays dense (their budget is not enabled)
            load_decode_gates(models[key], path)
            share_decode_gates(models[key])
        elif path is None:
            prepare_model(models[key], recipe_block_size(args.model))
        else:
            load_gates(models[key], path)
        if args.decode_budget:  # Quest alone scores each decode step's blocks (the prefill's block size)
            attach_quest_decode(models[key], models[key].seer_context.block_size)
    del base
    decode = DecodeSparsityConfig(token_budget=args.decode_budget, estimate=args.decode_estimate, estimate_weight=1.0,
                                  prompt_blocks=args.decode_prompt_blocks,
                                  recent_blocks=args.decode_recent_blocks,
                                  rerank_blocks=args.decode_rerank_blocks) if args.decode_budget else None
    kernel = "triton" if device.type == "cuda" else "reference"
    evaluation = evaluation_configs(args)
    texts = {"novel": lambda: HeldOutText(TextFilesCorpus(args.eval_novel), tokenizer, split="all"),
             "code": lambda: HeldOutText(StdlibCorpus(seed=0), tokenizer, split="val", val_fraction=0.1),
             "essays": lambda: HeldOutText(ruler.EssaysCorpus(), tokenizer, split="all")}
    texts = {name: texts[name]() for name in args.texts}
    prompts = {name: ruler.ruler_samples(tokenizer, c.ruler, c.seq_lens, c.ruler_samples, c.seed, texts[name].start_id)
               for name, c in evaluation.items() if c.ruler}  # generated once, shared by every gate set
    evaluators = {(key, name): Evaluator(m, tokenizer, text, evaluation[name], kernel=kernel,
                                         cache_dir=args.dense_cache, model_name=model_id(run.model), progress=False,
                                         ruler_samples=prompts.get(name))
                  for key, m in models.items() for name, text in texts.items()}
    first = next(iter(gates))
    dense_settings = dense_measure_settings(model_id(run.model), args.texts, args.eval_novel, evaluation)
    if args.dense_from:
        dense = reuse_dense(Path(args.dense_from), dense_settings)
    else:
        dense = {name: evaluators[first, name].dense() for name in texts}
    print(f"[quality] dense {json.dumps(brief(dense))} ({time.time() - start:.0f} s)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dense.json").write_text(json.dumps({"settings": dense_settings, "dense": dense}, indent=1))
    rows, skipped, fits, observed, hybrids = [], [], [], {key: {} for key in gates}, []
    for i, job in enumerate(jobs[args.skip:], start=args.skip):
        if job is None:  # left out by --only
            continue
        label, scorer, blend, sparsity, group_layers, group_scorer, candidates, rerank = job
        if time.time() - start > args.deadline_s:
            skipped.append(f"{label} {sparsity.describe()}")
            continue
        key = scorer if scorer in gates else first
        selector = None if scorer in gates else build_selector(scorer)
        layer_selectors, sparsity = hybrid_selection(dict.fromkeys(group_layers, group_scorer), sparsity)
        weights, hybrid = None, None
        if blend and blend[1] == FIT:  # a weight per layer, fitted on the first text's calibration windows
            weights, recalls = fit_blend(evaluators[key, args.texts[0]], blend[0], sparsity, args.seq_lens[0],
                                         args.fit_grid, observed[key])
            fits.append(fit_record(label, sparsity, weights, recalls))
            print(f"[quality] {label} {sparsity.describe()}: fitted weights {weights} "
                  f"({time.time() - start:.0f} s)", flush=True)
            (out / "blend_fits.json").write_text(json.dumps(fits, indent=1))
        if selector is None:  # the gates, with this job's blend
            ctx = models[key].seer_context
            ctx.update(gate_config=dataclasses.replace(ctx.gate_config, blend=blend[0] if blend else None,
                                                       blend_weight=weights or (blend[1] if blend else 0.5),
                                                       **rerank_fields(rerank)))
        if group_scorer == FITTED:  # the groups' scorers, picked on the first text's calibration windows
            def report(what: str, ppl: float | None, change: float | str) -> None:
                got = f"ppl {ppl:.4f} ({change:+.2%})" if ppl is not None else change
                print(f"[quality] {i + 1} {label} {sparsity.describe()} fit on {args.texts[0]} calibration windows: "
                      f"{what} {got} ({time.time() - start:.0f} s)", flush=True)

            try:
                hybrid, layer_selectors, sparsity = fitted_job(evaluators[key, args.texts[0]], label, sparsity,
                                                               args.texts[0], args.seq_lens[0], candidates,
                                                               args.fit_margin, report)
            except ValueError as exc:  # the picks cannot be calibrated together: the other jobs still run
                print(f"[quality] {i + 1} {label} {sparsity.describe()}: not evaluated: {exc}", flush=True)
                skipped.append(f"{label} {sparsity.describe()} (fit: {exc})")
                continue
            hybrids.append(hybrid)
            (out / "hybrid_fits.json").write_text(json.dumps(hybrids, indent=1))
            label, group_layers = hybrid["label"], tuple(int(layer) for layer in hybrid["layers"])
        for name in texts:
            if selector is None:
                evaluators[key, name].forget(None)
            for row in evaluators[key, name].evaluate(selector, sparsity, dense[name], decode=decode,
                                                      layer_selectors=layer_selectors):
                row.update(text=name, selector=label
                           + (f" +{args.decode_estimate}{args.decode_budget}" if decode else "")
                           + (f"+pin{args.decode_prompt_blocks}" if decode and args.decode_prompt_blocks else "")
                           + (f"+recent{args.decode_recent_blocks}" if decode and args.decode_recent_blocks else "")
                           + (f"+rerank{args.decode_rerank_blocks}" if decode and args.decode_rerank_blocks else ""),
                           blend_weights=weights, group_layers=list(group_layers),
                           group_scorer=group_scorer if group_layers or hybrid else None, hybrid_fit=hybrid)
                rows.append(row)
                print(f"[quality] {i + 1} {label} {sparsity.describe()} {name}: d={row['density']:.3f} "
                      f"ppl {row['ppl_increase']:+.2%} passkey {row['passkey']} copy {row['copy']}"
                      + (f" ruler {row['ruler']:.1f} (dense {row['ruler_dense']:.1f})" if row.get("ruler") is not None
                         else "")
                      + (f" decode density {row['decode_density']:.3f}" if row.get("decode_density") else "")
                      + f" ({time.time() - start:.0f} s)", flush=True)
        (out / "rows.json").write_text(json.dumps(rows, indent=1))
        write_results(out, rows, skipped, args, device, train_s, time.time() - start, dense, fits, hybrids)
    write_results(out, rows, skipped, args, device, train_s, time.time() - start, dense, fits, hybrids)


def fit_record(label: str, sparsity: SparsityConfig, weights: list[float], recalls: dict) -> dict:
    """What a fit found: the weights, and the calibration recall (mean over layers) of them beside each single
    weight of the grid."""
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    grid = next(iter(recalls.values()))
    return {"label": label, "sparsity": sparsity.describe(), "weights": weights,
            "recall": mean([recalls[i][w] for i, w in enumerate(weights)]),
            "recall_single": {str(w): mean([r[w] for r in recalls.values()]) for w in grid},
            "recalls": {str(i): {str(w): r for w, r in by_w.items()} for i, by_w in recalls.items()}}


def evaluation_configs(args) -> dict[str, EvalConfig]:
    """The evaluation settings of each text (RULER makes its own haystacks: it runs with the first text only)."""
    settings = dict(seq_lens=args.seq_lens, windows=args.windows, calibration_windows=2, passkey=args.passkey,
                    copy=args.copy, batch_size=args.batch_size, dense_cache=args.dense_cache is not None)
    return {name: EvalConfig(**settings, **({"ruler": args.ruler, "ruler_samples": args.ruler_samples}
                                           if args.ruler and i == 0 else {}))
            for i, name in enumerate(args.texts)}


def dense_measure_settings(model_name: str, texts: list[str], eval_novel: str,
                           evaluation: dict[str, EvalConfig]) -> dict:
    """What a dense pass depends on: the model, the texts (the held-out novel's path among them) and every evaluation
    setting (not where it is cached)."""
    return {"model": model_name, "texts": texts, "eval_novel": eval_novel,
            **{name: {k: v for k, v in dataclasses.asdict(c).items() if k != "dense_cache"}
               for name, c in evaluation.items()}}


def reuse_dense(path: Path, settings: dict) -> dict:
    """The dense measures of an earlier run's ``dense.json``, when it was measured with exactly these settings
    (model, texts, every evaluation setting: lengths, windows, probes, RULER tasks and samples, batch size)."""
    saved = json.loads(path.read_text())
    if saved.get("settings") != json.loads(json.dumps(settings)):  # tuples as the file's lists
        raise SystemExit(f"--dense-from {path}: measured with other settings: {saved.get('settings')} (this run: "
                         f"{settings})")
    return {name: {int(n): v for n, v in by_len.items()} for name, by_len in saved["dense"].items()}


def attribution_table(rows: list[dict], default: str) -> str:
    """Per text, length and target density: the ``default`` selection, each group's jobs (a scorer in the group's
    layers instead of the gates), the oracle, with their PPL change and the PPL each recovers from the default, as a
    share of the default's gap to the oracle (and the oracle groups' shares summed) when the oracle row is there,
    else as a PPL difference. A group's own layers' density beside the default's there shows how much of the budget
    its hybrid calibration moved."""
    lines = ["| text | N | target | selection | group | achieved density | in the group (default) | PPL | "
             "PPL change | recovered |", "|---|---|---|---|---|---|---|---|---|---|"]
    for text, n, target in sorted({(r["text"], r["seq_len"], r["target_density"]) for r in rows}):
        same = [r for r in rows if (r["text"], r["seq_len"], r["target_density"]) == (text, n, target)]
        base = next((r for r in same if r["selector"] == default), None)
        oracle = next((r for r in same if r["selector"] == "oracle"), None)
        groups = [r for r in same if (r.get("group_layers") or r.get("hybrid_fit"))
                  and r["selector"].startswith(f"{default} ")]
        gap = base["ppl"] - oracle["ppl"] if base and oracle and base["ppl"] != oracle["ppl"] else None

        def recovered(row: dict | None) -> str:
            if base is None or row is None:
                return "-"
            return f"{(base['ppl'] - row['ppl']) / gap:.0%}" if gap else f"{base['ppl'] - row['ppl']:+.3f} PPL"

        def in_group(row: dict | None, layers: list[int]) -> str:
            by_layer = (row or {}).get("density_by_layer")
            return f"{sum(by_layer[i] for i in layers) / len(layers):.3f}" if by_layer else "-"

        def layers_of(row: dict) -> str:
            if row.get("hybrid_fit"):
                return f"{FITTED}: {row['hybrid_fit']['picked']}"
            return f"{row['group_scorer']}@{layer_ranges(row['group_layers'])}"

        for row, layers in [(base, "-"), *((r, layers_of(r)) for r in groups), (oracle, "all")]:
            if row is not None:
                own = row.get("group_layers")
                group = f"{in_group(row, own)} ({in_group(base, own)})" if own else "-"
                lines.append(f"| {text} | {n} | {target:.2f} | {row['selector']} | {layers} | {row['density']:.3f} | "
                             f"{group} | {row['ppl']:.3f} | {row['ppl_increase']:+.2%} | {recovered(row)} |")
        oracle_groups = [r for r in groups if r["group_scorer"] == "oracle"]
        if gap and oracle_groups:
            total = sum(base["ppl"] - r["ppl"] for r in oracle_groups) / gap
            lines.append(f"| {text} | {n} | {target:.2f} | the oracle groups summed | - | - | - | - | - | "
                         f"{total:.0%} |")
    return "\n".join(lines)


def hybrid_fit_table(hybrids: list[dict]) -> str:
    """Each fitted hybrid's candidates: the calibration-window PPL of the default and of each (group, scorer), its
    change from the default's, whether it was picked, and the picks combined."""
    lines = ["| job | target | group | scorer | calibration PPL | change | picked |", "|---|---|---|---|---|---|---|"]
    for h in hybrids:
        head = f"| {h['job']} | {h['sparsity']} "
        lines.append(f"{head}| - | default | {h['baseline_ppl']:.4f} | - | - |")
        lines += [f"{head}| {layer_ranges(c['group'])} | {c['scorer']} | "
                  + (f"{c['ppl']:.4f} | {c['change']:+.2%} | " if c["ppl"] is not None else "not measured | - | ")
                  + f"{'yes' if c['picked'] else ''} |" for c in h["candidates"]]
        lines.append(f"{head}| combined | {h['picked']} | {h['combined_ppl']:.4f} | "
                     f"{h['combined_ppl'] / h['baseline_ppl'] - 1:+.2%} | - |")
    return "\n".join(lines)


def brief(dense: dict) -> dict:
    """``{text: {length: measures}}`` without RULER's per-sample answers (for logs and pages; dense.json keeps them)."""
    return {name: {n: {k: v for k, v in measures.items() if k != "ruler_answers"} for n, measures in by_len.items()}
            for name, by_len in dense.items()}


def write_results(out: Path, rows: list[dict], skipped: list[str], args, device, train_s: float, total_s: float,
                  dense: dict, fits: list[dict] = (), hybrids: list[dict] = ()) -> None:
    lines = [f"# Block selection quality on {MODELS[args.model][2]}", "",
             f"{environment(device)} Gates trained in {train_s:.0f} s; whole study {total_s:.0f} s.", "",
             "Command: `python3 experiments/quality_qwen.py " + " ".join(
                 f"--{k.replace('_', '-')}" + ("" if v is True else
                                                f" {' '.join(map(str, v)) if isinstance(v, list) else v}")
                 for k, v in vars(args).items() if v not in (None, False, []) and k not in ("work", "out")) + "`", "",
             f"Dense: {json.dumps(brief(dense))}", ""]
    for text in sorted({r["text"] for r in rows}):
        lines += [f"## {text}", "", table([r for r in rows if r["text"] == text]), ""]
    if args.plan == "attribution":
        default = default_label(gate_sets(args), parse_blends(args.blends))
        lines += ["## Attribution", "", f"PPL recovered when a scorer (the oracle: what the gates cost there; a "
                  f"training-free selector or dense: a lever) takes a group of layers from the gates of {default} "
                  "(same budget, calibrated for each hybrid): the share of the default's PPL gap to the oracle's, or "
                  "without an oracle row (--baselines oracle) the PPL difference.", "",
                  attribution_table(rows, default), ""]
    if fits:
        lines += ["## Fitted blend weights", "", "Per layer, on the calibration windows of the first text and "
                  "length; recall: the share of the true block mass kept there (mean over layers), fitted and with "
                  "each single weight.", ""]
        lines += [f"- {f['label']} {f['sparsity']}: recall {f['recall']:.4f} (single weight: "
                  + ", ".join(f"{w}: {r:.4f}" for w, r in f["recall_single"].items()) + f"); weights {f['weights']}"
                  for f in fits] + [""]
    if hybrids:
        lines += ["## Fitted hybrids", "", "Each group's scorer picked on the calibration windows only (of "
                  f"{hybrids[0]['text']}, {hybrids[0]['seq_len']} tokens; the evaluated windows never looked at): the "
                  "default's calibration-window PPL beside each candidate's (every hybrid calibrated on its own, on "
                  f"those windows); a group takes its best scorer when that lowers the PPL by more than "
                  f"{hybrids[0]['margin']:.2%}. The rows above (`... fitted[...]`) are the picks evaluated; "
                  "`hybrid_fits.json` holds these numbers.", "", hybrid_fit_table(hybrids), ""]
    if skipped:
        lines += ["## Not run (time budget; a fit whose picks cannot be calibrated together)", "",
                  ", ".join(skipped), ""]
    (out / "results.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
