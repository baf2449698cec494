"""Whole-model prefill: a gated model with sparse prefill against the same model dense (forward, batch 1).

For each N it times one forward pass (all layers, no LM-head sampling) of:
* ``dense``  - the model with SDPA attention (the gates idle);
* ``sparse`` - gate -> top-k selection at ``--density`` -> Triton block-sparse attention in every layer;
* ``no-attn`` - the same forward with attention replaced by a zero output, so ``dense - no-attn`` is the time
  spent in attention and ``sparse - no-attn`` the time in gate + selection + sparse attention.

The model is built from its architecture with random weights (``--model smollm2`` is SmolLM2-135M's shape:
30 layers, 9/3 heads, head dim 64), so no download is needed; speed does not depend on the weights, and top-k
selection keeps the requested density whatever the gate's weights are.

    PYTHONPATH=. python3 experiments/bench_prefill.py --model smollm2 --seq 8192 --density 0.1 --out docs/bench_prefill.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from experiments.timing import cuda_median_ms  # noqa: E402
from seer.config import GateConfig, SparsityConfig  # noqa: E402
from seer.model.inference import enable_sparse_prefill, load  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def graphed(fn):
    """``fn`` captured once in a CUDA graph (after warm-up); returns its replay, or None if capture fails."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay
    except Exception as exc:  # noqa: BLE001 - reported, the eager figure stands
        print(f"CUDA graph capture failed: {type(exc).__name__}: {exc}", flush=True)
        torch.cuda.synchronize()
        return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", help="a conf/model name with an architecture block")
    ap.add_argument("--seq", type=int, nargs="+", default=[8192])
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--gate", default="avgmax", help="a conf/gate name")
    ap.add_argument("--out", default="docs/bench_prefill.md")
    args = ap.parse_args()

    mcfg = yaml.safe_load((ROOT / "conf" / "model" / f"{args.model}.yaml").read_text())
    gcfg = GateConfig(**yaml.safe_load((ROOT / "conf" / "gate" / f"{args.gate}.yaml").read_text()))
    torch.manual_seed(0)
    model = load(random_init=True, architecture=mcfg["architecture"], gate_config=gcfg, dtype="bfloat16",
                 device="cuda", kernel="triton")
    model.config.use_cache = False
    ctx = model.seer_context
    sparsity = SparsityConfig(method="topk", ratio=1.0 - args.density)

    from transformers import AttentionInterface

    def no_attention(module, query, key, value, attention_mask, **kwargs):
        return torch.zeros_like(query).transpose(1, 2), None

    AttentionInterface.register("seer_bench_none", no_attention)

    rows = []
    for n in args.seq:
        ids = torch.randint(0, mcfg["architecture"]["vocab_size"], (1, n), device="cuda")

        def fwd():
            with torch.no_grad():
                model.base_model(input_ids=ids, use_cache=False)

        def measure(setup) -> tuple[float, float | None]:
            """Eager time and CUDA-graph replay time (None when capture fails) of the forward after ``setup()``."""
            setup()
            eager = cuda_median_ms(fwd)
            replay = graphed(fwd)
            return eager, (cuda_median_ms(replay) if replay is not None else None)

        def dense_mode():
            model.set_attn_implementation("seer")
            ctx.set_mode("dense")

        def sparse_mode():
            model.set_attn_implementation("seer")
            enable_sparse_prefill(model, sparsity, "triton")

        dense = measure(dense_mode)
        sparse = measure(sparse_mode)
        achieved = sum(ctx.densities().values()) / len(ctx.densities())
        rest = measure(lambda: model.set_attn_implementation("seer_bench_none"))
        model.set_attn_implementation("seer")
        for label, k in (("eager", 0), ("CUDA graph", 1)):
            if None not in (dense[k], sparse[k], rest[k]):
                rows.append((n, label, dense[k], sparse[k], rest[k], achieved))
                print(f"N={n} {label}: dense {dense[k]:.2f} ms, sparse {sparse[k]:.2f} ms, no-attention "
                      f"{rest[k]:.2f} ms, density {achieved:.3f}", flush=True)

    props = torch.cuda.get_device_properties(0)
    lines = [
        f"# Whole-model prefill: {args.model} shape, sparse (gate `{args.gate}`, top-k) vs dense",
        "",
        f"Device: {props.name}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"triton {__import__('triton').__version__}, transformers {__import__('transformers').__version__}, "
        f"Python {platform.python_version()}; {datetime.date.today().isoformat()}.",
        f"Command: `PYTHONPATH=. python3 experiments/bench_prefill.py --model {args.model} --seq "
        f"{' '.join(map(str, args.seq))} --density {args.density} --gate {args.gate} --out {args.out}`",
        "",
        "Batch 1, bf16, random weights of the model's architecture (speed does not depend on them), median of 10 "
        "forward passes of the decoder (no LM head) after 3 warm-ups, CUDA events. `eager` is the plain PyTorch "
        "forward (Python and kernel launches included); `CUDA graph` replays the same forward captured once, which "
        "removes the host's launch overhead and leaves GPU time.",
        "",
        "| N | mode | dense forward (ms) | sparse forward (ms) | speedup | forward without attention (ms) | "
        "attention share of dense | attention: dense -> sparse (ms) | achieved density |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n, label, dense, sparse, rest, achieved in rows:
        lines.append(f"| {n} | {label} | {dense:.2f} | {sparse:.2f} | {dense / sparse:.2f}x | {rest:.2f} | "
                     f"{(dense - rest) / dense:.0%} | {dense - rest:.2f} -> {sparse - rest:.2f} "
                     f"({(dense - rest) / max(1e-9, sparse - rest):.2f}x) | {achieved:.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
