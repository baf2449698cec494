"""Wall-clock cost of each training-free selector's ``scores()`` on one layer's inputs; with ``--blend``, the
vertical-slash estimate and the gate blend (what inference selects with by default) against the plain reference
they replaced (:mod:`seer.sparsity.reference`).

    python -m experiments.bench_selectors --n 2048 --hq 9 --hkv 3 --d 64 --block 64 [--device cuda] [--dtype bf16]
                                           [--spread 2]
    python -m experiments.bench_selectors --blend [--device cuda] [--seq-len 32768] [--out docs/...md]

Default mode prints one line per selector: median and min milliseconds over ``--reps`` runs (CUDA: synchronised
before and after each run) and, for reference, the mass recall of a top-k mask at density 0.25 against the oracle
(how well the order agrees with the true block mass on these random inputs; meaningful only on real Q/K).

``--blend`` defaults to one layer of Qwen2.5-Coder-0.5B at 32k (B=1, Hq=14, Hkv=2, D=64, block 64, bf16 Q/K, float32
gate logits; any shape flag overrides) and times, reference vs new, per layer: the vertical-slash scores, the gate
blend as inference runs it (estimate + blend: ``reference.blend_scores(g, reference.vertical_slash_scores(x))``
vs ``blend_mass(g, VerticalSlash().mass(x))``), the blend alone, the two stages of the estimate (last-rows
marginals, block mass), and the block mass + blend from the marginals. On CUDA the table also times the fused Triton
kernel (:func:`seer.kernels.vs_blend.vertical_slash_blend`: block mass and blend in one pass from the estimate's
per-block vectors, what ``blend_gate_scores`` runs at inference) beside the new path, for the gate blend and for
the block mass + blend, and the fused last-rows marginals (:func:`seer.kernels.vs_marginals.last_rows_marginals`,
the estimate's first stage without the ``[B, Hq, L, N]`` probabilities) beside their PyTorch path (on CPU only
under ``TRITON_INTERPRET=1``, to check the code path: the interpreter's times mean nothing). The new path's other
rows run the fused marginals on CUDA as inference does (:data:`seer.sparsity.selectors.FUSED_SELECTION_ON_CUDA`)
unless ``--pytorch-selection`` switches them off for the run; the marginals row's new column always
forces the PyTorch path (``fused=False``). On CUDA the times are CUDA-event medians
(``--reps`` runs after ``--warmup``); on CPU the median and min of wall-clock runs. The table also gives the largest
difference of the log-scores (finite entries; of ``v`` and ``s`` in the marginals row) and the environment (device,
versions, date, commit).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import time

import torch

from seer.sparsity import reference
from seer.sparsity.masks import topk_mask
from seer.sparsity.measures import mass_recall
from seer.sparsity.selectors import (SELECTORS, LayerInputs, VerticalSlash, _last_rows_marginals,
                                     _vertical_slash_block_mass, _vertical_slash_vectors, blend_mass,
                                     build_selector)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QWEN_32K = {"b": 1, "hq": 14, "hkv": 2, "n": 32768, "d": 64, "block": 64, "dtype": "bf16"}
DEFAULTS = {"b": 1, "hq": 9, "hkv": 3, "n": 2048, "d": 64, "block": 64, "dtype": "fp32"}


def time_ms(fn, reps: int, warmup: int, cuda: bool) -> tuple[float, float]:
    """(median, min) milliseconds of ``fn()``; the min is the robust figure on a shared CPU. On CUDA, each run
    between two CUDA events (the GPU's time; the host may run ahead)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def env_line(dev: torch.device) -> str:
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        device = f"{p.name} ({p.multi_processor_count} SMs), CUDA {torch.version.cuda}"
    else:
        device = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "?"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"{device}; torch {torch.__version__}; python {platform.python_version()}; {date}; commit {commit}"


def max_log_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest |difference| of two log-score tensors over the reference's finite entries (inf when the ``-inf``
    patterns differ)."""
    if not torch.equal(torch.isneginf(got), torch.isneginf(want)):
        return float("inf")
    fin = torch.isfinite(want)
    return (got[fin].double() - want[fin].double()).abs().max().item()


def max_diff(got, want) -> float:
    """:func:`max_log_diff` of two log-score tensors, or the largest |difference| over the tensors of two tuples
    (the marginals ``(v, s, start)``; the ints must be equal)."""
    if isinstance(got, torch.Tensor):
        return max_log_diff(got, want)
    diff = 0.0
    for g, w in zip(got, want, strict=True):
        if isinstance(g, torch.Tensor):
            diff = max(diff, (g.double() - w.double()).abs().max().item())
        elif g != w:
            return float("inf")
    return diff


def bench_blend(args, dev: torch.device, dt: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(args.b, args.hq, args.n, args.d, generator=g) * args.spread).to(dev, dt)
    k = (torch.randn(args.b, args.hkv, args.n, args.d, generator=g) * args.spread).to(dev, dt)
    x = LayerInputs(q, k, args.block, args.d ** -0.5)
    gate = (torch.randn(args.b, args.hq, x.nb, x.nb, generator=g) * 3).to(dev)
    sel, w, lq = VerticalSlash(last_queries=args.last_queries), args.weight, args.last_queries
    cuda = dev.type == "cuda"
    partner_ref, mass_new = reference.vertical_slash_scores(x, lq), sel.mass(x)
    v, s, _ = _last_rows_marginals(x, lq)
    # the fused kernel (seer.kernels.vs_blend: block mass + blend in one pass from the per-block vectors): CUDA, or
    # the CPU under TRITON_INTERPRET=1 (a check of the code path)
    fused_blend = fused_from_marginals = fused_marginals = None
    if cuda or os.environ.get("TRITON_INTERPRET") == "1":
        from seer.kernels.vs_blend import vertical_slash_blend

        def fused_blend():
            return vertical_slash_blend(gate, *sel.vectors(x), w)

        def fused_from_marginals():
            return vertical_slash_blend(gate, *_vertical_slash_vectors(v, s, args.block), w)

        def fused_marginals():  # seer.kernels.vs_marginals
            return _last_rows_marginals(x, lq, fused=True)

    rows = [  # name, reference, new, fused (or None), compare the outputs (log-scores)
        ("vertical_slash scores", lambda: reference.vertical_slash_scores(x, lq), lambda: sel.scores(x), None, True),
        ("gate blend (estimate + blend)",
         lambda: reference.blend_scores(gate, reference.vertical_slash_scores(x, lq), w),
         lambda: blend_mass(gate, sel.mass(x), w), fused_blend, True),
        ("blend alone", lambda: reference.blend_scores(gate, partner_ref, w), lambda: blend_mass(gate, mass_new, w),
         None, True),
        ("  last-rows marginals", lambda: reference.vertical_slash_marginals(x, lq),
         lambda: _last_rows_marginals(x, lq, fused=False), fused_marginals, True),
        ("  block mass", lambda: reference.vertical_slash_block_mass(v, s, args.block),
         lambda: _vertical_slash_block_mass(v, s, args.block), None, False),
        ("  block mass + blend (from the marginals)",
         lambda: reference.blend_scores(gate, reference.log_mass(reference.vertical_slash_block_mass(v, s, args.block)),
                                        w),
         lambda: blend_mass(gate, _vertical_slash_block_mass(v, s, args.block), w), fused_from_marginals, True),
    ]
    lines = ["# vertical-slash + gate blend, reference vs new (per layer)", "",
             f"B={args.b} Hq={args.hq} Hkv={args.hkv} N={args.n} D={args.d} block={args.block} (nb={x.nb}) "
             f"last_queries={lq} weight={w} {args.dtype} Q/K, float32 gate logits", "",
             env_line(dev), "",
             f"{'CUDA-event' if cuda else 'wall-clock'} ms over {args.reps} runs after {args.warmup} warm-up; "
             f"x{args.layers} = per-layer median times {args.layers} layers; fused = the Triton kernel "
             "seer.kernels.vs_blend, or seer.kernels.vs_marginals in the marginals row (CUDA, or the CPU "
             "interpreter; its diff is against the new path); the diffs of the marginals row are of v and s; on "
             "CUDA the new path runs the fused marginals except in the marginals row", "",
             "| step | reference median | reference min | new median | new min | speedup (median) "
             f"| x{args.layers} reference | x{args.layers} new | max abs diff of log-scores "
             f"| fused median | fused min | fused vs new (median) | x{args.layers} fused | fused max abs diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    with torch.no_grad():
        for name, fn_ref, fn_new, fn_fused, compare in rows:
            r_med, r_min = time_ms(fn_ref, args.reps, args.warmup, cuda)
            n_med, n_min = time_ms(fn_new, args.reps, args.warmup, cuda)
            diff = f"{max_diff(fn_new(), fn_ref()):.2e}" if compare else "-"
            fused = "| - | - | - | - | - |"
            if fn_fused is not None:
                f_med, f_min = time_ms(fn_fused, args.reps, args.warmup, cuda)
                fused = (f"| {f_med:.3f} | {f_min:.3f} | {n_med / f_med:.2f}x | {f_med * args.layers:.1f} "
                         f"| {max_diff(fn_fused(), fn_new()):.2e} |")
            lines.append(f"| {name} | {r_med:.3f} | {r_min:.3f} | {n_med:.3f} | {n_min:.3f} | {r_med / n_med:.2f}x "
                         f"| {r_med * args.layers:.1f} | {n_med * args.layers:.1f} | {diff} {fused}")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--b", type=int)
    ap.add_argument("--hq", type=int)
    ap.add_argument("--hkv", type=int)
    ap.add_argument("--n", "--seq-len", dest="n", type=int)
    ap.add_argument("--d", type=int)
    ap.add_argument("--block", type=int)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES))
    ap.add_argument("--spread", type=float, default=1.0, help="multiplies the random Q and K (peakier attention)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--blend", action="store_true", help="vertical-slash + gate blend, reference vs new")
    ap.add_argument("--last-queries", type=int, default=64, help="--blend: the estimate's last query rows")
    ap.add_argument("--weight", type=float, default=0.5, help="--blend: the estimate's share in the blend")
    ap.add_argument("--layers", type=int, default=24, help="--blend: layers the per-layer times add up over")
    ap.add_argument("--out", help="--blend: also write the table here")
    ap.add_argument("--pytorch-selection", action="store_true",
                    help="--blend: switch the fused selection kernels off for the whole run (seer.sparsity."
                    "selectors.FUSED_SELECTION_ON_CUDA), so the new path runs the PyTorch marginals")
    args = ap.parse_args(argv)
    if args.pytorch_selection:
        from seer.sparsity import selectors

        selectors.FUSED_SELECTION_ON_CUDA = False
    for key, value in (QWEN_32K if args.blend else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    dev, dt = torch.device(args.device), DTYPES[args.dtype]
    if args.blend:
        return bench_blend(args, dev, dt)
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
        recall = mass_recall(topk_mask(sel.scores(x), 0.25), mass).item()
        print(f"{name:>15}: median {med:9.2f} ms  min {best:9.2f} ms   recall@0.25 {recall:.3f}")


if __name__ == "__main__":
    main()
