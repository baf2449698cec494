"""Gate distillation on one GPU and on two: an 8B-shaped model (random weights) at 32k tokens a row.

Runs ``python -m seer.train experiment=throughput_8b`` three ways, ``--steps`` steps each:

* one GPU, 2 rows a batch: the global batch of the two-GPU runs;
* DDP on 2 GPUs (``trainer=ddp``), 1 row a batch on each;
* FSDP2 on 2 GPUs (``trainer=fsdp``), 1 row a batch on each (the base sharded; its random weights drawn on each GPU
  one group at a time, the same as the one-GPU run's);

and writes a table of tokens/s (Lightning's ThroughputMonitor over the last ``--window`` steps, all GPUs together),
peak GPU memory (rank 0; the ranks hold equal shares) and startup time, and how far each two-GPU run's gates are from
the one-GPU gates after the last step (same rows in the same order, so only rounding separates them).

    python experiments/bench_ddp.py --out docs/scale.md            # on a machine with 2 GPUs, about 7 minutes
    python experiments/bench_ddp.py --smoke --out /tmp/scale.md    # the same three runs on the CPU, tiny model
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def _run(name: str, overrides: list[str], folder: Path, timeout: int) -> dict:
    cmd = [sys.executable, "-m", "seer.train", *overrides, f"hydra.run.dir={folder / name}"]
    print(f"[bench] {name}: {' '.join(cmd[2:])}", flush=True)
    start = time.perf_counter()
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": path}, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"not done in {timeout} s (--timeout)", "wall_s": time.perf_counter() - start}
    wall = time.perf_counter() - start
    if proc.returncode != 0:  # reported in the table; the other runs still go
        print(proc.stdout[-3000:], proc.stderr[-5000:], sep="\n", flush=True)
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit code {proc.returncode}: {last[:200]}", "wall_s": wall}
    summary = json.loads((folder / name / "summary.json").read_text())
    summary["wall_s"] = wall
    summary["gates_state"] = load_file(str(folder / name / "gates" / "gates.safetensors"))
    print(f"[bench] {name}: {summary['tokens_per_s']:.0f} tokens/s, peak {summary['peak_mem_gib'] or 0:.1f} GiB, "
          f"{wall:.0f} s in all", flush=True)
    return summary


def _distance(a: dict, b: dict) -> tuple[float, float]:
    """Largest absolute difference, and the norm of the difference over the norm of ``a``, over all gate weights."""
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    num = sum(((a[k].float() - b[k].float()) ** 2).sum().item() for k in a) ** 0.5
    den = sum((a[k].float() ** 2).sum().item() for k in a) ** 0.5
    return diff, num / den


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--window", type=int, default=6, help="steps the throughput is measured over (the last ones)")
    ap.add_argument("--timeout", type=int, default=240, help="seconds each run may take")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script, not the speed")
    ap.add_argument("--out", default="docs/scale.md")
    args = ap.parse_args()

    if args.smoke:
        base = ["model=tiny_llama", "data=random_tokens", "gate.block_size=16", "gate.hidden_size=16",
                "data.seq_len=256", "data.train_sequences=8", "trainer.accelerator=cpu", "logger=none",
                "trainer.limit_val_batches=0", "stage.image_every_n_steps=0"]
        two = ["trainer.accelerator=cpu", "trainer.devices=2"]
    else:
        base = ["experiment=throughput_8b", "logger=none"]
        two = ["trainer.devices=2"]
    base += [f"trainer.max_steps={args.steps}", f"callbacks.throughput.window_size={args.window}",
             "callbacks.progress_bar=null", "trainer.enable_progress_bar=false"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, short, extra in (("1 GPU, 2 rows a batch", "one", ["data.batch_size=2"]),
                                   ("DDP, 2 GPUs x 1 row", "ddp", ["trainer=ddp", *two]),
                                   ("FSDP2, 2 GPUs x 1 row", "fsdp", ["trainer=fsdp", *two])):
            runs[name] = _run(short, [*base, *extra], folder, args.timeout)
            partial = {k: {f: v for f, v in r.items() if f != "gates_state"} for k, r in runs.items()}
            Path(args.out).with_suffix(".json").write_text(json.dumps(partial, indent=1, default=str))

    reference = runs["1 GPU, 2 rows a batch"].get("gates_state")
    one_tps = runs["1 GPU, 2 rows a batch"].get("tokens_per_s")
    rows = []
    for name, s in runs.items():
        if "error" in s:
            rows.append(f"| {name} | failed: {s['error']} | - | - | {s['wall_s']:.0f} | - | - |")
            continue
        abs_diff, rel = _distance(reference, s["gates_state"]) if reference is not None else (float("nan"),) * 2
        rows.append(f"| {name} | {s['tokens_per_s']:,.0f} | {s['tokens_per_s'] / one_tps:.2f}x | "
                    f"{s['peak_mem_gib'] or 0:.1f} | {s['wall_s']:.0f} | {abs_diff:.2e} | {rel:.2e} |"
                    if one_tps else f"| {name} | {s['tokens_per_s']:,.0f} | - | {s['peak_mem_gib'] or 0:.1f} | "
                    f"{s['wall_s']:.0f} | - | - |")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.smoke else platform.processor()
    import lightning
    import transformers
    import triton

    shape = "tiny_llama (CPU smoke run)" if args.smoke else "llama3_8b shape (random weights), 32768 tokens a row"
    command = "python experiments/bench_ddp.py " + " ".join(sys.argv[1:])
    text = "\n".join([
        f"# Gate distillation on one GPU and on two: {shape}",
        "",
        f"Device: {torch.cuda.device_count()} x {gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"lightning {lightning.__version__}, triton {triton.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}; {datetime.date.today().isoformat()}.",
        f"Command: `{command}` ({args.steps} steps a run; tokens/s over the last {args.window}, all GPUs together).",
        "",
        "| run | tokens/s | vs 1 GPU | peak GPU memory (GiB, rank 0) | wall s (with loading) | max abs gate diff vs "
        "1 GPU | relative diff (norm) |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "The 1-GPU run reads the rows the two GPUs read together, in the same order (rank r of w takes positions r,"
        " r+w, ... of each epoch's permutation), so the gates differ only by rounding: the bf16 base model runs a"
        " batch of 2 rows there and of 1 row on each GPU.",
        "",
    ])
    Path(args.out).write_text(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
