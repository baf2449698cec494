"""One launch of the rerank kernel (after a warm-up), for a profiler to read: Nsight Compute's stall reasons per SASS
instruction say what the loop waits on, which timings alone cannot.

    ncu --clock-control none -k regex:_sampled_rows_kernel -s 1 -c 1 --set full --import-source yes \
        -o $OUT/rerank python3 -m experiments.profile_rerank [--rows 16 --share 0.7 --launch default]
    ncu --import $OUT/rerank.ncu-rep --page source --csv --print-source sass > $OUT/rerank_sass.csv

Shape as ``experiments.bench_rerank`` (Qwen2.5-Coder-0.5B's layer at 32k by default), random bf16 q and k, the
candidate blocks shared by a key head's query heads at ``--share`` of the causal blocks.
"""

from __future__ import annotations

import argparse
import math

import torch

from experiments.bench_rerank import add_shape_arguments, candidates, launch_settings
from seer.kernels import sampled_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(ap)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--share", type=float, default=0.7)
    ap.add_argument("--launch", default="default", help="launch settings as in experiments.bench_rerank")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_rerank: needs a CUDA device")
    if not 0 < args.share <= 1:
        raise SystemExit(f"profile_rerank: --share must be in (0, 1], got {args.share}")
    sampled_rows.LAUNCH.update(launch_settings(args.launch))
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, args.hq, args.n, args.d, generator=gen).to("cuda", torch.bfloat16)
    k = torch.randn(1, args.hkv, args.n, args.d, generator=gen).to("cuda", torch.bfloat16)
    cand = candidates(1, args.hq, args.hkv, math.ceil(args.n / args.block), args.share, "shared", gen).cuda()
    for _ in range(2):  # the first compiles; the profiler skips one launch (-s 1) and reads the second
        sampled_rows.sampled_rows_mass(q, k, cand, args.rows, args.block)
    torch.cuda.synchronize()
    print(sampled_rows.last_kernel_resources())


if __name__ == "__main__":
    main()
