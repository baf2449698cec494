"""Wall-clock cost of each training-free selector's ``scores()`` on one layer's inputs.

    python -m experiments.bench_selectors --n 2048 --hq 9 --hkv 3 --d 64 --block 64 [--device cuda] [--dtype bf16]
                                           [--spread 2]

Prints one line per selector: median and min milliseconds over ``--reps`` runs (CUDA: synchronised before and after each
run) and, for reference, the mass recall of a top-k mask at density 0.25 against the oracle (how well the order
agrees with the true block mass on these random inputs; meaningful only on real Q/K).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from seer.sparsity.masks import mass_recall, topk_mask
from seer.sparsity.selectors import SELECTORS, LayerInputs, build_selector

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def time_ms(fn, reps: int, warmup: int, cuda: bool) -> tuple[float, float]:
    """(median, min) milliseconds of ``fn()``; the min is the robust figure on a shared CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--b", type=int, default=1)
    ap.add_argument("--hq", type=int, default=9)
    ap.add_argument("--hkv", type=int, default=3)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--spread", type=float, default=1.0, help="multiplies the random Q and K (peakier attention)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args(argv)
    dev, dt = torch.device(args.device), DTYPES[args.dtype]
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(args.b, args.hq, args.n, args.d, generator=g) * args.spread).to(dev, dt)
    k = (torch.randn(args.b, args.hkv, args.n, args.d, generator=g) * args.spread).to(dev, dt)
    x = LayerInputs(q, k, args.block, args.d ** -0.5)
    print(f"B={args.b} Hq={args.hq} Hkv={args.hkv} N={args.n} D={args.d} block={args.block} "
          f"{args.dtype} on {dev} ({torch.get_num_threads()} CPU threads)")
    mass = build_selector("oracle").scores(x).exp()
    for name in SELECTORS:
        sel = build_selector(name)
        med, best = time_ms(lambda: sel.scores(x), args.reps, args.warmup, dev.type == "cuda")
        recall = mass_recall(topk_mask(sel.scores(x), 0.75), mass).item()
        print(f"{name:>15}: median {med:9.2f} ms  min {best:9.2f} ms   recall@0.25 {recall:.3f}")


if __name__ == "__main__":
    main()
