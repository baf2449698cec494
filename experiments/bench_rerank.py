"""Cost of the rerank step (:func:`seer.kernels.sampled_rows.sampled_rows_mass`) on one attention layer, beside what
it selects for: dense causal attention (SDPA) and block-sparse attention at density 0.1 on the same shape.

    python -m experiments.bench_rerank [--n 32768 --hq 14 --hkv 2 --d 64] [--rows 8 16] [--share 0.1 0.3 0.7]
                                        [--kernels 1:2 0:2 0:1] [--launch default w8 s2]
                                        [--out docs/bench_rerank.md]

Defaults: one layer of Qwen2.5-Coder-0.5B at 32k (B 1, Hq 14, Hkv 2, D 64, 64-token blocks, bf16, random Q/K).
Candidates are random: each row of each query block keeps each causal key block with probability ``--share`` (and
its diagonal), either the same set for the query heads of a key head (``shared``: the union a program walks is one
head's set, the best case) or drawn per head (``independent``: the union is largest, the worst case); real heads lie
between. ``--kernels HEADS:PASSES``: ``HEADS`` 1 runs one query head per program, 0 the kernel's choice
(:func:`seer.kernels.sampled_rows.program_layout`: 7 Qwen heads x 16 rows in one 128-row program); ``PASSES`` 2 reads
the keys twice, 1 once with a scratch of partial sums (the default); ``1:2`` is the kernel before either.
``--launch``: launch settings (:data:`seer.kernels.sampled_rows.LAUNCH`), each ``default`` or ``w<N>`` warps, ``s<N>``
pipeline stages, ``n<16|32|64>`` keys a tile, ``a`` (the query blocks in ascending order: the order before
heaviest-first became the default) joined (e.g. ``w8s3``, ``a``, ``n32a``); the ``regs`` and ``spills`` columns are
the compiled kernel's. Before timing, each configuration is checked against the float32 PyTorch contract
(:func:`seer.kernels.reference.sampled_rows_mass`) at ``--check-n`` tokens. Times: CUDA-event medians of ``--reps`` runs
after ``--warmup`` (on CPU, only under ``TRITON_INTERPRET=1`` with ``--dtype fp16``, to exercise the code path: such
times mean nothing, and the interpreter does not compute bf16 dots exactly)."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from experiments.bench_selectors import env_line, time_ms
from seer.kernels import block_sparse_attn, reference, sampled_rows
from seer.kernels.sampled_rows import program_layout, sampled_rows_mass

DEFAULT_LAUNCH = dict(sampled_rows.LAUNCH)


def launch_settings(spec: str) -> dict:
    """``default`` (the kernel's own settings) or e.g. ``w8s3a`` as :data:`seer.kernels.sampled_rows.LAUNCH`
    entries (``n32``: 32 keys a tile; ``a``: the query blocks in ascending order instead of the heaviest first)."""
    out = dict(DEFAULT_LAUNCH)
    if spec == "default":
        return out
    parts = re.fullmatch(r"(?:w(\d+))?(?:s(\d+))?(?:n(16|32|64))?(a)?", spec)
    if not spec or not parts:
        raise ValueError(f"--launch {spec!r}: expected 'default' or w<N>, s<N>, n<16|32|64> and a joined, e.g. "
                         "w4s2, a, n32a")
    if parts[1]:
        out["num_warps"] = int(parts[1])
    if parts[2]:
        out["num_stages"] = int(parts[2])
    if parts[3]:
        out["block_n"] = int(parts[3])
    if parts[4]:
        out["heaviest_first"] = False
    return out


def candidates(b: int, hq: int, hkv: int, nb: int, share: float, layout: str, gen: torch.Generator) -> torch.Tensor:
    """Random candidate blocks ``[B, Hq, nb, nb]`` (bool, block-causal, the diagonal always in): drawn per key head
    (``shared``), per query head (``independent``), or per key head as columns, the same key blocks for every query
    block (``columns``: vertical lines, the union of consecutive query blocks' sets no larger than one set)."""
    heads = hkv if layout in ("shared", "columns") else hq
    if layout == "columns":
        cand = (torch.rand(b, heads, 1, nb, generator=gen) < share).expand(b, heads, nb, nb).clone()
    else:
        cand = torch.rand(b, heads, nb, nb, generator=gen) < share
    if layout in ("shared", "columns"):
        cand = cand.repeat_interleave(hq // hkv, dim=1)
    cand |= torch.eye(nb, dtype=torch.bool)
    return cand & torch.ones(nb, nb, dtype=torch.bool).tril()


def check(args, dev: torch.device, dt: torch.dtype, rows: int, share: float, layout: str,
          heads: int | None, passes: int, blocks: int = 1) -> float:
    """Largest |difference| of the kernel's masses from the float32 contract at ``--check-n`` tokens."""
    gen = torch.Generator().manual_seed(1)
    n = args.check_n
    q = torch.randn(1, args.hq, n, args.d, generator=gen).to(dev, dt)
    k = torch.randn(1, args.hkv, n, args.d, generator=gen).to(dev, dt)
    cand = candidates(1, args.hq, args.hkv, math.ceil(n / args.block), share, layout, gen).to(dev)
    want = reference.sampled_rows_mass(q.float(), k.float(), cand, rows, args.block)
    got = sampled_rows_mass(q, k, cand, rows, args.block, heads_per_program=heads, passes=passes,
                            blocks_per_program=blocks)
    return (got - want).abs().max().item()


def add_shape_arguments(ap: argparse.ArgumentParser) -> None:
    """``--n --hq --hkv --d --block``: one attention layer's shape, Qwen2.5-Coder-0.5B's at 32k by default."""
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--hq", type=int, default=14)
    ap.add_argument("--hkv", type=int, default=2)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--block", type=int, default=64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(ap)
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--share", type=float, nargs="+", default=[0.1, 0.3, 0.7])
    ap.add_argument("--layouts", nargs="+", choices=["shared", "independent", "columns"],
                    default=["shared", "independent"])
    ap.add_argument("--kernels", nargs="+", default=["1:2", "0:2", "0:1"],
                    help="HEADS:PASSES, heads per program (0: the kernel's choice) and passes over the keys (1 or 2)")
    ap.add_argument("--launch", nargs="+", default=["default"], help="launch settings: default, or e.g. w8s3")
    ap.add_argument("--blocks-per-program", type=int, nargs="+", default=[1],
                    help="query blocks a program (sampled_rows_mass's blocks_per_program; those that do not fit "
                         "the shape get a row that says so)")
    ap.add_argument("--check-n", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = ap.parse_args()
    if args.hq % args.hkv:
        ap.error(f"--hq {args.hq} is not a multiple of --hkv {args.hkv}")
    try:
        kernels = [tuple(int(x) for x in kv.split(":")) for kv in args.kernels]
    except ValueError:
        ap.error(f"--kernels takes HEADS:PASSES pairs, got {args.kernels}")
    for heads, passes in kernels:
        if heads < 0 or passes not in (1, 2):
            ap.error(f"--kernels {heads}:{passes}: HEADS must be >= 0 and PASSES 1 or 2")
    try:
        launches = [(spec, launch_settings(spec)) for spec in args.launch]
    except ValueError as err:
        ap.error(str(err))
    for s in args.share:
        if not 0 < s <= 1:
            ap.error(f"--share {s} must be in (0, 1]")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = dev.type == "cuda"
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    gen = torch.Generator().manual_seed(0)
    b, nb = 1, math.ceil(args.n / args.block)
    q = torch.randn(b, args.hq, args.n, args.d, generator=gen).to(dev, dt)
    k = torch.randn(b, args.hkv, args.n, args.d, generator=gen).to(dev, dt)
    v = torch.randn(b, args.hkv, args.n, args.d, generator=gen).to(dev, dt)

    dense = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                    args.reps, args.warmup, cuda)[0]
    sparse_mask = candidates(b, args.hq, args.hkv, nb, 0.1, "independent", gen).to(dev)
    sparse = time_ms(lambda: block_sparse_attn(q, k, v, sparse_mask, args.block), args.reps, args.warmup, cuda)[0]
    lines = [
        f"Device: {env_line(dev)}.", "",
        f"Shape: B {b}, Hq {args.hq}, Hkv {args.hkv}, N {args.n}, D {args.d}, {args.block}-token blocks, "
        f"{args.dtype}. Dense causal attention (SDPA): {dense:.3f} ms; block-sparse attention (ours) at density "
        f"0.1: {sparse:.3f} ms.",
        "", "| rows | candidate share | layout | heads per program | query blocks per program | rows per program | "
        "passes | launch | ms | vs sparse attention 0.1 | vs dense | max abs err (check) | regs | spills |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rows in args.rows:
        for share in args.share:
            for layout in args.layouts:
                cand = candidates(b, args.hq, args.hkv, nb, share, layout, gen).to(dev)
                for (heads, passes), (spec, launch), blocks in [((h or None, ps), ln, qb) for h, ps in kernels
                                                                for ln in launches for qb in args.blocks_per_program]:
                    sampled_rows.LAUNCH.update(launch)
                    p, pp, rp = program_layout(args.hq // args.hkv, rows, args.block, heads)
                    row = f"| {rows} | {share} | {layout} | {p} | {blocks} | {blocks * pp * rp} | {passes} | {spec} | "
                    try:
                        err = check(args, dev, dt, rows, share, layout, heads, passes, blocks)
                        ms = time_ms(lambda: sampled_rows_mass(q, k, cand, rows, args.block, heads_per_program=heads,
                                                               passes=passes, blocks_per_program=blocks),
                                     args.reps, args.warmup, cuda)[0]
                    except Exception as exc:  # a launch setting the compiler rejects: its row says why
                        lines.append(row + f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]} | | | | | |")
                    else:
                        res = sampled_rows.last_kernel_resources()
                        lines.append(row + f"{ms:.3f} | {ms / sparse:.2f}x | {ms / dense:.2f}x | {err:.1e} | "
                                     f"{res['n_regs']} | {res['n_spills']} |")
                    print(lines[-1], flush=True)
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
