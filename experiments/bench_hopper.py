"""Hopper sweep of the block-sparse forward (``seer/kernels/block_sparse.py``): check every variant, then time them.

A variant is a list layout (``row``: ``BLOCK_M`` = 64 query rows per program; ``pair``: 128) and a launch config
forced with :func:`seer.kernels.tuning.force_config`: ``BLOCK_N``, ``num_warps``, ``num_stages``, ``USE_TMA`` (Q, K,
V and the output through tensor descriptors), 26 in all, plus the launch table's default per layout (autotuning off):
28 variants; ``--only`` picks some by name, ``--d`` sets the head dim. (A warp-specialised single-loop variant,
``WARP_SPEC``, was removed after the H200 run of docs/bench_hopper.md: it gave NaN or wrong outputs there; two list
entries a step, ``STEP_ENTRIES``, after an H100 run: slower everywhere.)

Per variant, in one process (every line printed as it comes, so a run cut short still shows what was done):

1. check it once at N 4096 (B 1, 16 heads, D 128, bf16, 64-token blocks) against the PyTorch reference on a random
   mask (density 0.2, diagonal kept, one empty row) and at density 1.0 against SDPA flash; the compile happens
   here (the 32k runs reuse it: same integer specialisations). A variant that fails to compile or to match prints
   one line and is not timed; variants not reached within ``--budget-s`` seconds of the start are skipped;
2. time it at B 1, 32 heads, N 32768, D 128, bf16, 64-token blocks, density 1.0 (all causal blocks) and 0.1 (the
   structured mask of ``bench_sparse.py``) with :func:`seer.kernels.tuning.median_ms` (L2 cleared before each
   CUDA-event-timed run). SDPA flash and cuDNN (dense causal) are timed first, for reference.

At the end: a markdown table (ms and TF/s on kept work, ``2 B H N^2 D * real density / time``, registers and
spilled bytes of the compiled kernel) and the best variant per density; ``--out-dir`` also writes it and a JSON.

``--compile-only`` needs no GPU: it compiles every variant for sm_90 (as ``compile_stats.py``) and prints
registers, spills, shared memory and Hopper tensor-core instructions (HGMMA). Run as a file from the repository
root (the benchmarks beside it are imported):

    PYTHONPATH=. python3 experiments/bench_hopper.py                  # check + time; stops at --budget-s 170
    PYTHONPATH=. python3 experiments/bench_hopper.py --out-dir $OUT
    PYTHONPATH=. python3 experiments/bench_hopper.py --compile-only   # on any machine
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from seer.kernels import reference
from seer.kernels.bench import env_info, fmt, ms, tflops
from seer.kernels.block_sparse import block_sparse_attn, block_sparse_attn_indexed, build_block_index
from seer.kernels.tuning import force_config, last_launch, set_autotune

FIELDS = ("BLOCK_N", "num_warps", "num_stages", "USE_TMA")
BLOCK = 64
D = 128
"""Head dim of the sweep (``--d``: 64 for Qwen2.5-0.5B's shape)."""


def variants(only: list[str] | None = None) -> list[tuple[str, dict | None]]:
    """``(layout, config)`` pairs; config None is the launch table's default (the explicit grid repeats it once
    per layout: two timings of one kernel show the noise). Per layout: plain loads and the copy engine, over tile
    widths, warps and pipeline depths; pruned by ``--compile-only`` on sm_90 (pair tiles with 4 warps and 64-wide
    key tiles spill)."""
    grids = {
        "row": [(64, 4, 2, False), (64, 4, 3, False), (64, 8, 3, False), (32, 4, 3, False),
                (64, 4, 1, True), (64, 4, 2, True), (64, 4, 3, True), (64, 4, 4, True), (64, 8, 2, True),
                (64, 8, 3, True), (32, 4, 3, True), (32, 8, 3, True), (64, 4, 1, False), (64, 8, 1, True),
                (32, 4, 1, True)],
        "pair": [(64, 8, 2, False), (64, 8, 3, False), (32, 8, 3, False),
                 (64, 8, 2, True), (64, 8, 3, True), (64, 8, 4, True), (32, 8, 3, True), (32, 4, 3, True),
                 (64, 8, 1, True), (64, 8, 1, False), (32, 8, 1, True)],
    }
    every = [(layout, config) for layout, grid in grids.items()
             for config in [None] + [dict(zip(FIELDS, g)) for g in grid]]
    unknown = sorted(set(only or ()) - {name(*v) for v in every})
    if unknown:
        raise SystemExit(f"--only: no variant {unknown}; variants: {[name(*v) for v in every]}")
    return [v for v in every if only is None or name(*v) in only]


def name(layout: str, config: dict | None) -> str:
    if config is None:
        return f"{layout} table default"
    return (f"{layout} BN{config['BLOCK_N']} w{config['num_warps']} s{config['num_stages']}"
            f"{' tma' if config['USE_TMA'] else ''}")


def launch(layout: str, config: dict | None, fn):
    """``fn()`` with the variant's config forced (the default: autotuning off, so the table's first candidate)."""
    if config is None:
        set_autotune(False)
        try:
            return fn()
        finally:
            set_autotune(True)
    with force_config("block_sparse", **config):
        return fn()


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def check(layout: str, config: dict | None, data: dict) -> str:
    """The variant on the check inputs; raises on a mismatch, returns a summary."""
    pair = layout == "pair"
    q, k, v, mask = data["qkv"] + (data["mask"],)
    out, lse = launch(layout, config, lambda: block_sparse_attn(q, k, v, mask, BLOCK, pair=pair))
    err = rel_err(out, data["ref_out"])
    fin = torch.isfinite(data["ref_lse"])
    if not (err < 1.5e-2 and torch.equal(fin, torch.isfinite(lse))
            and (lse[fin] - data["ref_lse"][fin].float()).abs().max().item() < 2e-2):
        raise RuntimeError(f"mismatch against the reference: rel err {err:.2e}")
    dense, _ = launch(layout, config, lambda: block_sparse_attn(q, k, v, data["ones"], BLOCK, pair=pair))
    err1 = rel_err(dense, data["sdpa"])
    if not err1 < 1.5e-2:
        raise RuntimeError(f"density 1.0 differs from SDPA flash: rel err {err1:.2e}")
    return f"ref {err:.1e}, sdpa {err1:.1e}"


def check_inputs(d: int, n: int = 4096, h: int = 16) -> dict:
    from bench_sparse import DEV, sdpa
    from torch.nn.attention import SDPBackend
    gen = torch.Generator(device=DEV).manual_seed(1)
    qkv = tuple(torch.randn(1, h, n, d, device=DEV, dtype=torch.bfloat16, generator=gen) for _ in range(3))
    nb = n // BLOCK
    mask = torch.rand(1, h, nb, nb, device=DEV, generator=gen) < 0.2
    mask[:, :, torch.arange(nb), torch.arange(nb)] = True
    mask[:, 0, 5, :] = False  # one empty row
    ref_out, ref_lse = reference.block_sparse_attn(*qkv, mask, BLOCK)
    return {"qkv": qkv, "mask": mask, "ref_out": ref_out, "ref_lse": ref_lse,
            "ones": torch.ones(1, h, nb, nb, dtype=torch.bool, device=DEV),
            "sdpa": sdpa(*qkv, SDPBackend.FLASH_ATTENTION)}


def sweep(args) -> dict:
    """Per variant: check, then time at once, every line printed as it comes, so that
    a run cut short (a hung kernel, the caller's time limit) still shows what was done."""
    from bench_sparse import density_of, make_qkv, sdpa, select, structured_scores
    from torch.nn.attention import SDPBackend
    t0 = time.time()
    d = args.d
    data = check_inputs(d)
    n, h = args.n, 32
    q, k, v = make_qkv(n, h, d)
    scores = structured_scores(1, h, n // BLOCK)
    masks = {dens: select(scores, dens) for dens in args.densities}
    real = {dens: density_of(m) for dens, m in masks.items()}
    lists = {(layout, dens): build_block_index(m, pair=layout == "pair") for dens, m in masks.items()
             for layout in ("row", "pair")}
    base = {"flash": ms(lambda: sdpa(q, k, v, SDPBackend.FLASH_ATTENTION), rep_ms=150, min_runs=3),
            "cudnn": ms(lambda: sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION), rep_ms=150, min_runs=3)}
    print(f"N={n}: SDPA flash {base['flash']:.3f} ms, cuDNN {base['cudnn']:.3f} ms", flush=True)
    rows = []
    for layout, config in variants(args.only):
        row = {"variant": name(layout, config), "layout": layout, "config": config}
        rows.append(row)
        if time.time() - t0 > args.budget_s:
            row["error"] = f"skipped: budget of {args.budget_s:.0f} s spent"
            print(f"{row['variant']}: skipped (budget)", flush=True)
            continue
        try:
            row["check"] = check(layout, config, data)
            info = last_launch("block_sparse")
            row.update(used=info["config"], regs=info["n_regs"], spills=info["n_spills"])
        except Exception as exc:  # noqa: BLE001 - a variant that does not compile or match is reported, not fatal
            row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
            print(f"{row['variant']}: check FAILED {row['error'][:200]}", flush=True)
            continue
        pair = layout == "pair"
        times = []
        for dens in args.densities:
            idx, cnt = lists[(layout, dens)]
            try:
                t = launch(layout, config, lambda: ms(
                    lambda: block_sparse_attn_indexed(q, k, v, idx, cnt, BLOCK, pair=pair),
                    rep_ms=100 if dens > 0.5 else 60, min_runs=3 if dens > 0.5 else 5))
            except Exception as exc:  # noqa: BLE001
                row[f"error_{dens}"] = repr(exc)[:200]
                times.append(f"density {dens} FAILED {row[f'error_{dens}']}")
                continue
            row[str(dens)] = t
            times.append(f"density {dens} {t:.3f} ms ({tflops(n, h, d, t) * real[dens]:.0f} TF/s)")
        print(f"{label(row)}: check {row['check']}; regs {row['regs']}, spills {row['spills']}; "
              + "; ".join(times), flush=True)
    return {"rows": rows, "base": base, "real_density": real, "n": n, "h": h, "d": d, "seconds": time.time() - t0}


def label(row: dict) -> str:
    """The variant's name; for a table default, the config it ran."""
    if row["config"] is None and "used" in row:
        return f"{name(row['layout'], row['used'])} (table default)"
    return row["variant"]


def report(res: dict, info: dict, cmd: str, densities: list[float]) -> str:
    n, h, d, real = res["n"], res["h"], res["d"], res["real_density"]
    lines = [f"Device: {info['device']}; torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, "
             f"cuDNN {info['cudnn']}; {info['date']}.", "", f"Command: `{cmd}`", "",
             f"Block-sparse forward at N {n}, B 1, {h} heads, D {d}, bf16, causal, {BLOCK}-token blocks. ms: median "
             "of CUDA-event-timed runs; TF/s on kept work (2 B H N^2 D x real density / time). `row`: BLOCK_M 64, "
             "`pair`: BLOCK_M 128 (lists of pairs of query blocks). `tma`: Q/K/V/out through tensor descriptors. "
             "regs/spills: of the compiled kernel.", ""]
    hdr = ["variant", "check (rel err)", "regs", "spills"]
    for dens in densities:
        hdr += [f"ms @{dens} ({real[dens]:.3f})", f"TF/s @{dens}"]
    lines += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for r in res["rows"]:
        cells = [label(r), r.get("check") or "FAILED: " + r["error"][:80].replace("|", "/"),
                 str(r.get("regs", "-")), str(r.get("spills", "-"))]
        for dens in densities:
            t = r.get(str(dens))
            cells += [fmt(t), "-" if t is None else f"{tflops(n, h, d, t) * real[dens]:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for dens in densities:
        timed = [r for r in res["rows"] if str(dens) in r]
        if timed:
            best = min(timed, key=lambda r: r[str(dens)])
            t = best[str(dens)]
            lines.append(f"- best at density {dens}: `{label(best)}` {t:.3f} ms "
                         f"({tflops(n, h, d, t) * real[dens]:.0f} TF/s on kept work); "
                         f"{res['base']['flash'] / t:.2f}x SDPA flash, {res['base']['cudnn'] / t:.2f}x cuDNN")
    for k in ("flash", "cudnn"):
        t = res["base"][k]
        lines.append(f"- SDPA {k} (dense causal): {t:.3f} ms ({tflops(n, h, d, t):.0f} TF/s)")
    lines.append(f"- total {res['seconds']:.0f} s")
    return "\n".join(lines) + "\n"


def compile_only(only: list[str] | None, d: int) -> None:
    """Every variant compiled for sm_90 (no GPU needed): ptxas registers/spills, shared memory, HGMMA count."""
    from compile_stats import compile_sm90, ptxas_stats

    from seer.kernels import block_sparse as bs
    ptr = {p: "*bf16" for p in ("Q", "K", "V", "Out")}
    ptr.update(Lse="*fp32", Idx="*i32", Cnt="*i32", Order="*i32", Cu="*i32")
    print("| variant | regs | spill B | smem B | HGMMA |\n|---|---|---|---|---|", flush=True)
    for layout, variant in variants(only):
        pair = layout == "pair"
        config = variant or bs.hopper_default((d, BLOCK, pair))  # the default an sm_90 device runs
        title = name(layout, config) + (" (table default)" if variant is None else "")
        const = dict(HEAD_DIM=d, MASK_BLOCK=BLOCK, BLOCK_M=2 * BLOCK if pair else BLOCK, PAIR=pair,
                     DOT_PRECISION="tf32", INTERP=False, SORTED=False, VARLEN=False, BLOCK_N=config["BLOCK_N"],
                     USE_TMA=config["USE_TMA"])
        try:
            kernel = compile_sm90(bs._bs_attn_fwd_kernel, ptr, const, config["num_warps"], config["num_stages"])
            s = ptxas_stats(kernel)
            print(f"| {title} | {s['regs']} | {s['spill']} | {s['smem']} | {s['hgmma']} |", flush=True)
        except Exception as exc:  # noqa: BLE001
            print(f"| {title} | FAILED: {type(exc).__name__} | | | |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32768, help="sequence length of the timing (a multiple of 128)")
    ap.add_argument("--d", type=int, default=D, choices=[64, 128], help="head dim")
    ap.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.1])
    ap.add_argument("--budget-s", type=float, default=170.0,
                    help="seconds from the start after which the variants left are skipped")
    ap.add_argument("--out-dir", default=None, help="also write bench_hopper.md and bench_hopper.json here")
    ap.add_argument("--compile-only", action="store_true", help="compile every variant for sm_90 (no GPU needed)")
    ap.add_argument("--only", nargs="+", default=None, metavar="NAME",
                    help="only these variants, by name as the table writes them ('row table default', 'row BN64 "
                         "w4 s1 tma', ...)")
    args = ap.parse_args()
    if args.compile_only:
        compile_only(args.only, args.d)
        return
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --compile-only)")
    if args.n % (2 * BLOCK):
        raise SystemExit(f"--n must be a multiple of {2 * BLOCK}")
    info = env_info()
    print(json.dumps(info), flush=True)
    cmd = "python3 experiments/bench_hopper.py " + " ".join(sys.argv[1:])
    res = sweep(args)
    text = report(res, info, cmd, args.densities)
    print(text, flush=True)
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "bench_hopper.md"), "w") as f:
            f.write(text)
        with open(os.path.join(args.out_dir, "bench_hopper.json"), "w") as f:
            json.dump({"info": info, **{k: v for k, v in res.items() if k != "real_density"},
                       "real_density": {str(k): v for k, v in res["real_density"].items()}}, f, indent=1,
                      default=str)


if __name__ == "__main__":
    main()
