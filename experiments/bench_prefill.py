"""Whole-model prefill: a gated model with sparse prefill against the same model dense (forward, batch 1).

For each N it times one forward pass (all layers, no LM-head sampling) of:
* ``dense``  - the model with SDPA attention (the gates idle);
* ``sparse`` - gate -> top-k selection at ``--density`` -> Triton block-sparse attention in every layer;
* ``no-attn`` - the same forward with attention replaced by a zero output, so ``dense - no-attn`` is the time
  spent in attention and ``sparse - no-attn`` the time in gate + selection + sparse attention.

``--rerank-rows 0 8 16`` times the sparse forward once per value of ``gate.rerank_rows`` (0: no rerank), the other
inference fields as the gate preset sets them. With random weights the rerank's candidates (the top-p of a flat
proposal) are nearly every causal block, its costliest case. ``--rerank-launch`` sets the rerank kernel's launch
(:data:`seer.kernels.sampled_rows.LAUNCH`, in ``experiments.bench_rerank``'s ``--launch`` syntax; e.g. ``n32``).

The model is built from its architecture with random weights (``--model smollm2`` is SmolLM2-135M's shape:
30 layers, 9/3 heads, head dim 64), so no download is needed; speed does not depend on the weights, and top-k
selection keeps the requested density whatever the gate's weights are.

    python3 -m experiments.bench_prefill --model smollm2 --seq 8192 --density 0.1 --out docs/bench_prefill.md
    python3 -m experiments.bench_prefill --model qwen2_5_coder_0_5b --seq 16384 32768 --rerank-rows 0 8 16
    python3 -m experiments.bench_prefill --model smollm2 --seq 8192 --block-size 32 --rerank-rows 0 8
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
from pathlib import Path

import torch
from triton.testing import do_bench

from experiments.bench_rerank import launch_settings
from seer.config import compose, validate
from seer.kernels import sampled_rows
from seer.model.inference import GraphedPrefill, enable_sparse_prefill, load
from seer.sparsity import SparsityConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", help="a conf/model name with an architecture block")
    ap.add_argument("--seq", type=int, nargs="+", default=[8192])
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--gate", default="avgmax", help="a conf/gate name")
    ap.add_argument("--block-size", type=int, default=None,
                    help="the gate's block size (gate.block_size; default: the preset's)")
    ap.add_argument("--rerank-rows", type=int, nargs="+", default=[0], help="gate.rerank_rows values to time")
    ap.add_argument("--rerank-launch", default="default",
                    help="the rerank kernel's launch settings, as bench_rerank's --launch (e.g. n32)")
    ap.add_argument("--out", default="docs/bench_prefill.md")
    args = ap.parse_args()
    if any(r < 0 for r in args.rerank_rows):
        ap.error(f"--rerank-rows {args.rerank_rows}: each must be >= 0")
    try:
        sampled_rows.LAUNCH.update(launch_settings(args.rerank_launch))
    except ValueError as exc:
        ap.error(str(exc))

    block = [f"gate.block_size={args.block_size}"] if args.block_size is not None else []
    run = validate(compose([f"model={args.model}", f"gate={args.gate}", *block, "model.random_init=true",
                            "model.dtype=bfloat16"]))
    torch.manual_seed(0)
    model = load(run.model, gate_config=run.gate, device="cuda", kernel="triton")
    model.config.use_cache = False
    ctx = model.seer_context
    base_gate = ctx.gate_config
    sparsity = SparsityConfig(method="topk", target_density=args.density)

    from transformers import AttentionInterface

    def no_attention(module, query, key, value, attention_mask, **kwargs):
        return torch.zeros_like(query).transpose(1, 2), None

    AttentionInterface.register("seer_bench_none", no_attention)

    rows = []
    for n in args.seq:
        ids = torch.randint(0, model.config.vocab_size, (1, n), device="cuda")

        def fwd():
            with torch.no_grad():
                model(input_ids=ids, use_cache=False, logits_to_keep=1)

        def measure(setup) -> tuple[float, float | None]:
            """Eager time and CUDA-graph replay time (None when capture fails) of the forward after ``setup()``."""
            setup()
            eager = do_bench(fwd, return_mode="median")
            try:
                graph = GraphedPrefill(model, 1, n)
            except Exception as exc:  # noqa: BLE001 - reported, the eager figure stands
                print(f"CUDA graph capture failed: {type(exc).__name__}: {exc}", flush=True)
                return eager, None
            return eager, do_bench(lambda: graph(ids), return_mode="median")

        def dense_mode():
            model.set_attn_implementation("seer")
            ctx.update(mode="dense")

        def sparse_mode():
            model.set_attn_implementation("seer")
            enable_sparse_prefill(model, sparsity, "triton")

        dense = measure(dense_mode)
        sparse = {}  # rerank rows -> (eager ms, CUDA-graph ms or None, achieved density)
        for rerank in args.rerank_rows:
            ctx.update(gate_config=dataclasses.replace(base_gate, rerank_rows=rerank))
            eager, graph = measure(sparse_mode)
            sparse[rerank] = (eager, graph, sum(ctx.densities().values()) / len(ctx.densities()))
        ctx.update(gate_config=base_gate)
        rest = measure(lambda: model.set_attn_implementation("seer_bench_none"))
        model.set_attn_implementation("seer")
        for label, k in (("eager", 0), ("CUDA graph", 1)):
            for rerank, times in sparse.items():
                if None not in (dense[k], times[k], rest[k]):
                    rows.append((n, label, rerank, dense[k], times[k], rest[k], times[2]))
                    print(f"N={n} {label} rerank {rerank}: dense {dense[k]:.2f} ms, sparse {times[k]:.2f} ms, "
                          f"no-attention {rest[k]:.2f} ms, density {times[2]:.3f}", flush=True)

    props = torch.cuda.get_device_properties(0)
    lines = [
        f"# Whole-model prefill: {args.model} shape, sparse (gate `{args.gate}`, {run.gate.block_size}-token blocks, "
        "top-k) vs dense",
        "",
        f"Device: {props.name}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"triton {__import__('triton').__version__}, transformers {__import__('transformers').__version__}, "
        f"Python {platform.python_version()}; {datetime.date.today().isoformat()}.",
        f"Command: `python3 -m experiments.bench_prefill --model {args.model} --seq "
        f"{' '.join(map(str, args.seq))} --density {args.density} --gate {args.gate} "
        f"--block-size {run.gate.block_size} --rerank-rows {' '.join(map(str, args.rerank_rows))} "
        f"--rerank-launch {args.rerank_launch} --out {args.out}` (the rerank kernel's launch: {sampled_rows.LAUNCH})",
        "",
        "Batch 1, bf16, random weights of the model's architecture (speed does not depend on them), median of "
        "`triton.testing.do_bench` over the forward pass (LM head on the last position only). `eager` is the plain "
        "PyTorch "
        "forward (Python and kernel launches included); `CUDA graph` replays the same forward captured once, which "
        "removes the host's launch overhead and leaves GPU time.",
        "",
        "| N | mode | rerank rows | dense forward (ms) | sparse forward (ms) | speedup | forward without attention "
        "(ms) | attention share of dense | attention: dense -> sparse (ms) | achieved density |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, label, rerank, dense, sparse, rest, achieved in rows:
        lines.append(f"| {n} | {label} | {rerank} | {dense:.2f} | {sparse:.2f} | {dense / sparse:.2f}x | {rest:.2f} | "
                     f"{(dense - rest) / dense:.0%} | {dense - rest:.2f} -> {sparse - rest:.2f} "
                     f"({(dense - rest) / max(1e-9, sparse - rest):.2f}x) | {achieved:.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
