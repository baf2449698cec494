"""Where a gate-distillation step's time goes: an 8B-shaped model with random weights at 32k tokens.

Times, for one 32k-token row (batch 1) on one GPU, after warm-up:
* ``dense forward`` - the frozen decoder alone with SDPA attention (no ground truth, no gates);
* ``forward + GT`` - the decoder with the fused Triton ground-truth kernel in every layer (gates idle);
* ``distill forward`` - the same plus every layer's gate, loss and metrics (the training step's forward);
* ``distill step`` - forward + backward + AdamW step on the gate weights (what the trainer does per batch);
and prints the top CUDA kernels of one step from torch.profiler.

    python3 experiments/profile_distill.py --model llama3_8b --gate avgmaxminavg --seq 32768 \
        --out docs/profile_distill.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
from pathlib import Path

import torch
from triton.testing import do_bench

from seer.config import compose, validate
from seer.model.attention import attach_gates, freeze_base_model, gate_parameters
from seer.model.loading import load_causal_lm
from seer.training.distill import GateDistillation


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3_8b")
    ap.add_argument("--gate", default="avgmaxminavg")
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--gt-mode", default="auto")
    ap.add_argument("--out", default="docs/profile_distill.md")
    args = ap.parse_args()

    run = validate(compose([f"model={args.model}", f"gate={args.gate}", "model.random_init=true",
                            "model.dtype=bfloat16", "stage.gt=triton", f"stage.gt_mode={args.gt_mode}",
                            "sparsity.target_density=0.1"]))
    torch.manual_seed(0)
    model = load_causal_lm(run.model, "cuda")
    attach_gates(model, run.gate)
    freeze_base_model(model)
    module = GateDistillation(model, run.stage, run.sparsity, "triton").cuda()
    opt = torch.optim.AdamW(gate_parameters(model), lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq), device="cuda")
    ctx = model.seer_context

    def dense():
        with ctx.running("dense"), torch.no_grad():
            model.base_model(input_ids=ids, use_cache=False)

    def forward_gt():
        with ctx.running("distill", gt_source="triton", gt_mode=args.gt_mode), torch.no_grad():
            model.base_model(input_ids=ids, use_cache=False)

    def distill_forward():
        module._forward(ids, with_mass=False, want_images=False)

    def step():
        out = module._forward(ids, with_mass=False, want_images=False)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated() / 2**30
    parts = (("dense forward (SDPA)", dense), ("forward + Triton GT", forward_gt),
             ("distill forward (GT + gates + loss)", distill_forward), ("distill step (+ backward + AdamW)", step))
    rows = [(name, do_bench(fn, warmup=1, rep=1, return_mode="median")) for name, fn in parts]
    peak = torch.cuda.max_memory_allocated() / 2**30
    step_ms = rows[-1][1]

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60)

    props = torch.cuda.get_device_properties(0)
    n_params = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    lines = [
        f"# Gate distillation step: {args.model} shape (random weights), {args.seq} tokens, gate `{args.gate}`",
        "",
        f"Device: {props.name}; torch {torch.__version__}, CUDA {torch.version.cuda}, triton "
        f"{__import__('triton').__version__}, transformers {__import__('transformers').__version__}, Python "
        f"{platform.python_version()}; {datetime.date.today().isoformat()}. Base model {n_params / 1e9:.2f}B "
        f"parameters in bf16 (frozen), gates {sum(p.numel() for p in gate_parameters(model)) / 1e6:.1f}M in fp32.",
        f"Command: `python3 experiments/profile_distill.py --model {args.model} --gate {args.gate} "
        f"--seq {args.seq} --gt-mode {args.gt_mode} --out {args.out}`",
        "",
        "| part | ms per 32k-token row | tokens/s |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {ms:.1f} | {args.seq / ms * 1e3:,.0f} |" for name, ms in rows]
    lines += ["", f"Memory: {base_mem:.1f} GiB allocated before the step (weights, gates, optimizer state), "
              f"{peak:.1f} GiB peak.", "", f"Top CUDA kernels of one distill step (of {step_ms:.0f} ms):", "",
              "```", table, "```"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
