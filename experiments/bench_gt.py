"""Benchmark of seer's fused ground-truth kernel against PyTorch SDPA and the reference (issue 3).

Times, in one run, at N = 8k, 32k, 64k (B 1, 32 heads, D 128, bf16, causal): flash_attn_with_gt in fast and
lowmem modes, the same kernel without gt (dense), SDPA flash (FA2) and cuDNN backends, and
reference.block_gt where it is affordable (8k, 16k); then fast/lowmem at 128k; and the AttnGate forward per
layer at 32k when ``seer.gates`` exists. Prints and writes a markdown table (``--out``).

Timing: :func:`seer.kernels.tuning.median_ms` (``triton.testing.do_bench``: warm-up, L2 cleared before each
CUDA-event-timed run), the median of the runs that fit in ``--rep-ms``, at least ``--min-runs`` of them. TFLOP/s
count causal work as 2 * B * H * N^2 * D (the convention of ANCHOR-NUMBERS.md). Extra memory is the peak of
torch.cuda.max_memory_allocated during the call minus what was allocated before it, with the outputs
preallocated for our kernel (so it is the scratch alone) and included for SDPA (it allocates its own).

Uses only the installed package's public API (``pip install -e .`` from the repository root):

    python3 experiments/bench_gt.py --out docs/bench_gt.md
    python3 experiments/bench_gt.py --sweep      # time launch configs at 32k (seer.kernels.tuning.force_config)
    python3 experiments/bench_gt.py --variants --out $OUT/bench_gt_variants.md   # plain vs copy engine (below)

``--variants`` (issue 21, the Hopper path): every variant of the three ground-truth launch tables (``fast``: the
forward with gt, ``dense``: without, ``pass2``: gt from the lse), each of a few configs of their candidates with
plain loads and with the copy engine (``USE_TMA``), plus each table's own tuned choice, is first checked once at
``--check-n`` (2000: off the tile grid) against the float64 PyTorch reference (relative error printed; a variant
that fails to compile or to match is reported FAILED and not timed), then timed at ``--variant-ns`` (8k and 32k,
B 1, 32 heads, D 128, bf16, causal) beside SDPA flash and cuDNN; a markdown table (variant, check, ms, TF/s,
registers) goes to ``--out``. About two minutes on an H200. ``--list-variants`` prints the names ``--variants``
takes (besides ``all`` and the kinds); ``--compile-only`` (the same names) compiles them for sm_90 on any machine and
prints registers, spills, shared memory and tensor-core instructions:

    python3 experiments/bench_gt.py --compile-only fast,dense
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import sys
import time
from functools import partial

import torch
import triton

from seer.kernels import reference
from seer.kernels.bench import fmt, publish, tflops
from seer.kernels.flash_gt import flash_attn_with_gt, gt_from_lse
from seer.kernels.tuning import chosen_configs, force_config, last_launch, median_ms

GiB = 2**30
# the inputs' device and dtype (tests run --variants on the CPU under the Triton interpreter, in float16: it has no
# bfloat16)
DEV, DTYPE = "cuda", torch.bfloat16


def extra_mem(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / GiB


def make(n, h, hkv, d, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return [torch.randn(1, hh, n, d, device=DEV, dtype=DTYPE, generator=g) for hh in (h, hkv, hkv)]


def sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def run(q, k, v):
        with sdpa_kernel(be):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return run


def sweep(args):
    n, h, d, bs = args.sweep_n, args.heads, args.dim, args.block_size
    q, k, v = make(n, h, h, d)
    nb = reference.num_blocks(n, bs)
    out = torch.empty_like(q)
    lse = torch.empty(1, h, n, device="cuda", dtype=torch.float32)
    gt = torch.empty(1, h, nb, nb, device="cuda", dtype=torch.float32)
    fa2, _ = median_ms(lambda: sdpa("flash")(q, k, v), rep_ms=args.rep_ms, min_runs=args.min_runs)
    print(f"sweep N={n} H={h} D={d} bs={bs}: SDPA flash {fa2:.2f} ms", flush=True)
    fwd_cfgs = [(128, 128, 8, 3, 1), (128, 128, 8, 3, 0), (128, 64, 8, 3, 1), (128, 64, 8, 3, 0),
                (128, 64, 8, 4, 1), (128, 128, 8, 4, 1)]
    for with_gt in (False, True):
        kernel = "flash_gt.fast" if with_gt else "flash_gt.dense"
        for bm, bn, w, st, epi in fwd_cfgs:
            if not with_gt and epi == 0:
                continue
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st, **(dict(EPI=epi) if with_gt else {}))
            fn = (lambda: flash_attn_with_gt(q, k, v, bs, mode="fast", out=out, lse=lse, gt=gt)) if with_gt \
                else (lambda: flash_attn_with_gt(q, k, v, bs, return_gt=False, out=out, lse=lse))
            try:
                with force_config(kernel, **cfg):
                    t0 = time.time()
                    fn()
                    torch.cuda.synchronize()
                    comp = time.time() - t0
                    ms, _ = median_ms(fn, rep_ms=args.rep_ms, min_runs=args.min_runs)
            except Exception as ex:  # noqa: BLE001
                print(f"  {'gt' if with_gt else 'dense'} {cfg}: FAILED {type(ex).__name__}: {str(ex)[:200]}")
                continue
            info = last_launch(kernel)
            print(f"  {'fast ' if with_gt else 'dense'} BM{bm} BN{bn} w{w} s{st} epi{epi}: {ms:7.2f} ms "
                  f"{tflops(n, h, d, ms):5.0f} TF/s  {ms / fa2:.3f}x FA2  (first call {comp:.1f}s) "
                  f"regs {info['n_regs']} spills {info['n_spills']}", flush=True)
    # pass 2 of lowmem alone, on the lse of the default dense forward
    flash_attn_with_gt(q, k, v, bs, return_gt=False, out=out, lse=lse)
    for bm, w, st in [(128, 8, 2), (128, 4, 2), (128, 8, 3)]:
        cfg = dict(BLOCK_M=bm, num_warps=w, num_stages=st)
        try:
            with force_config("flash_gt.pass2", **cfg):
                fn = lambda: gt_from_lse(q, k, lse, bs, gt=gt)  # noqa: E731
                fn()
                ms, _ = median_ms(fn, rep_ms=args.rep_ms, min_runs=args.min_runs)
        except Exception as ex:  # noqa: BLE001
            print(f"  pass2 {cfg}: FAILED {type(ex).__name__}: {str(ex)[:200]}")
            continue
        print(f"  pass2 BM{bm} w{w} s{st}: {ms:7.2f} ms ({ms / fa2:.3f}x FA2)", flush=True)


def gate_time(n, rep_ms, min_runs):
    """Forward time of one AttnGate (Llama-3.1-8B shapes: 32 q heads, 8 kv heads, D 128) at n tokens."""
    try:
        from seer.gates import AttnGate  # noqa: F401
    except Exception as ex:  # noqa: BLE001
        return None, f"seer.gates.AttnGate not importable ({type(ex).__name__}: {ex})"
    try:
        from seer.gates.config import GateConfig
        cfg = GateConfig(block_size=64, q_pool=["avg"], k_pool=["max", "min", "avg"], hidden_size=128)
        gate = AttnGate(cfg, head_dim=128, num_heads=32, num_kv_heads=8).to(device="cuda", dtype=torch.bfloat16)
        gate.eval()
        q = torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            ms, _ = median_ms(lambda: gate(q, k), rep_ms=rep_ms, min_runs=min_runs)
        return ms, (f"AttnGate(q_pool avg, k_pool max+min+avg, hidden 128, block 64), bf16, no_grad, on q "
                    f"[1, 32, {n}, 128], k [1, 8, {n}, 128]")
    except Exception as ex:  # noqa: BLE001
        return None, f"AttnGate present but could not be timed here ({type(ex).__name__}: {str(ex)[:200]})"


# --------------------------------------------------------------------------------------------------------------
# --variants: every launch-table variant of the three ground-truth kernels, checked, then timed (issue 21)
# --------------------------------------------------------------------------------------------------------------

TABLES = {"fast": "flash_gt.fast", "dense": "flash_gt.dense", "pass2": "flash_gt.pass2"}
# configs of the launch tables' candidates at D 128, block 64 (seer/kernels/flash_gt.py), each with plain loads and
# with the copy engine (USE_TMA)
# with 64-row programs of 4 warps at 1 and 2 stages beside them: the shape whose one-stage copy-engine config made the
# block-sparse forward 1.10x faster dense on an H100 (four programs an SM; docs/bench_hopper.md), not yet timed here
GRID = {
    "fast": [dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, EPI=0),
             dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4, EPI=0),
             dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, EPI=0),
             dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1, EPI=0),
             dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, EPI=0)],
    "dense": [dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
              dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4),
              dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1),
              dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)],
    "pass2": [dict(BLOCK_M=128, num_warps=4, num_stages=3), dict(BLOCK_M=128, num_warps=8, num_stages=2)],
}
_SHORT = {"BLOCK_M": "BM", "BLOCK_N": "BN", "num_warps": "w", "num_stages": "s", "EPI": "epi"}


def variants() -> list[tuple[str, dict | None]]:
    """``(kind, config)`` for every kind (``fast``: the forward with gt, ``dense``: without, ``pass2``: gt from the
    lse); config None is the launch table's own choice (the runtime tuner, which on capability >= 9 also times the
    default with USE_TMA), else a config forced over the default."""
    return [(kind, config) for kind, grid in GRID.items()
            for config in [None] + [dict(c, USE_TMA=tma) for c in grid for tma in (False, True)]]


def variant_name(kind: str, config: dict | None) -> str:
    if config is None:
        return f"{kind}-tuned"
    return "-".join([kind] + [f"{_SHORT[f]}{v}" for f, v in config.items() if f in _SHORT]
                    + (["tma"] if config["USE_TMA"] else []))


def select_variants(spec: str) -> list[tuple[str, dict | None]]:
    """The variants named in ``spec``: ``all``, or names of :func:`variant_name` and kinds (all variants of a kind),
    comma-separated."""
    every = variants()
    by_name = {variant_name(*v): v for v in every}
    chosen = []
    for item in (s.strip() for s in spec.split(",")):
        if item == "all":
            chosen += every
        elif item in TABLES:
            chosen += [v for v in every if v[0] == item]
        elif item in by_name:
            chosen.append(by_name[item])
        else:
            raise ValueError(f"unknown variant {item!r}; choose from all, {', '.join(TABLES)}, {', '.join(by_name)}")
    return list({variant_name(*v): v for v in chosen}.values())


def _as_variant(kind: str, config: dict | None):
    return force_config(TABLES[kind], **config) if config is not None else contextlib.nullcontext()


def variant_run(kind: str, q, k, v, out, lse, gt, bs: int):
    """The call a variant of ``kind`` makes on preallocated outputs (``pass2`` reads ``lse``)."""
    if kind == "fast":
        return lambda: flash_attn_with_gt(q, k, v, bs, mode="fast", out=out, lse=lse, gt=gt)
    if kind == "dense":
        return lambda: flash_attn_with_gt(q, k, v, bs, return_gt=False, out=out, lse=lse)
    return lambda: gt_from_lse(q, k, lse, bs, gt=gt)


def check_variant(kind: str, config: dict | None, data: dict, bs: int) -> str:
    """The variant on the check inputs against the float64 PyTorch reference; raises on a mismatch, returns the
    errors (relative for out, absolute for lse, largest relative over the causal tiles for gt)."""
    q, k, v = data["qkv"]
    ref_out, ref_lse, ref_gt = data["ref"]
    b, h, n, _ = q.shape
    nb = reference.num_blocks(n, bs)
    out = torch.full_like(q, float("nan"))
    lse = ref_lse.float().contiguous() if kind == "pass2" else torch.full((b, h, n), float("nan"), device=q.device)
    gt = torch.full((b, h, nb, nb), float("nan"), device=q.device)
    with _as_variant(kind, config):
        variant_run(kind, q, k, v, out, lse, gt, bs)()
    torch.cuda.synchronize()
    errs, bad = [], []
    if kind != "pass2":
        e_out = ((out.double() - ref_out).norm() / ref_out.norm()).item()
        e_lse = (lse.double() - ref_lse).abs().max().item()
        errs += [f"out {e_out:.1e}", f"lse {e_lse:.1e}"]
        bad += [not e_out < 1e-2, not e_lse < 1e-3]
    if kind != "dense":
        lower = torch.ones(nb, nb, dtype=torch.bool, device=q.device).tril()
        upper_zero = bool((gt[..., ~lower] == 0).all())
        e_gt = ((gt.double()[..., lower] - ref_gt[..., lower]).abs() / ref_gt[..., lower]).max().item()
        errs.append(f"gt {e_gt:.1e}")
        bad += [not e_gt < 1e-2, not upper_zero]
    summary = ", ".join(errs)
    if any(bad):  # NaN compares false: an unwritten element fails too
        raise RuntimeError(f"mismatch against the reference: {summary}")
    return summary


def bench_variants(args):
    """Check every selected variant at a small length (off the tile grid), then time the ones
    that passed at each of ``--variant-ns`` (dense causal, Hq = Hkv) beside SDPA flash and cuDNN; markdown to
    ``--out``."""
    t_start = time.time()
    h, d, bs = args.heads, args.dim, args.block_size
    chosen = select_variants(args.variants)
    ns = [int(x) for x in args.variant_ns.split(",") if x]
    rep_ms = args.rep_ms if args.rep_ms is not None else 200.0
    cap = ".".join(map(str, torch.cuda.get_device_capability()))
    head = (f"device: {torch.cuda.get_device_name()} (capability {cap}); "
            f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}); "
            f"triton {triton.__version__}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(head, flush=True)

    g = torch.Generator(device=DEV).manual_seed(21)
    cn = args.check_n
    # Hq = Hkv and a length divisible by 16 (not by the tiles): the kernels compiled here are the ones timed below
    qkv = [torch.randn(1, 8, cn, d, device=DEV, dtype=DTYPE, generator=g) for _ in range(3)]
    ref_out, ref_lse = reference.attention(*(x.double() for x in qkv))
    ref_gt = reference.block_gt(qkv[0].double(), qkv[1].double(), bs)
    data = {"qkv": qkv, "ref": (ref_out, ref_lse, ref_gt)}
    checks = {}
    for kind, config in chosen:
        name = variant_name(kind, config)
        try:
            checks[name] = check_variant(kind, config, data, bs)
            info = last_launch(TABLES[kind])
            print(f"check {name:34s} ok: {checks[name]}  ({info['config']})", flush=True)
        except Exception as ex:  # noqa: BLE001 - a variant that fails to compile or to match is reported, not timed
            checks[name] = f"FAILED: {type(ex).__name__}: {str(ex)[:160]}"
            print(f"check {name:34s} {checks[name]}", flush=True)
    data = ref_out = ref_lse = ref_gt = qkv = None
    torch.cuda.empty_cache()

    times = {}  # (name, n) -> (ms, TF/s, regs, note)
    for n in ns:
        q, k, v = make(n, h, h, d, seed=n)
        nb = reference.num_blocks(n, bs)
        out = torch.empty_like(q)
        lse = torch.empty(1, h, n, device=q.device, dtype=torch.float32)
        gt = torch.empty(1, h, nb, nb, device=q.device, dtype=torch.float32)
        for backend, label in (("flash", "SDPA flash"), ("cudnn", "SDPA cuDNN")):
            fn = partial(sdpa(backend), q, k, v)
            try:
                fn()
                ms, _ = median_ms(fn, rep_ms=rep_ms, min_runs=args.min_runs)
                times[(label, n)] = (ms, tflops(n, h, d, ms), None, "")
                print(f"N={n:6d} {label:34s} {ms:8.3f} ms {tflops(n, h, d, ms):5.0f} TF/s", flush=True)
            except Exception as ex:  # noqa: BLE001
                print(f"N={n:6d} {label}: FAILED {type(ex).__name__}: {str(ex)[:200]}", flush=True)
        flash_attn_with_gt(q, k, v, bs, return_gt=False, out=out, lse=lse)  # the lse pass2 reads
        for kind, config in chosen:
            name = variant_name(kind, config)
            if checks[name].startswith("FAILED"):
                continue
            fn = variant_run(kind, q, k, v, out, lse, gt, bs)
            try:
                with _as_variant(kind, config):
                    fn()  # compile (and, for the tuned variants, tune) outside the timing
                    ms, _ = median_ms(fn, rep_ms=rep_ms, min_runs=args.min_runs)
            except Exception as ex:  # noqa: BLE001
                print(f"N={n:6d} {name}: FAILED {type(ex).__name__}: {str(ex)[:200]}", flush=True)
                continue
            info = last_launch(TABLES[kind])
            tf = tflops(n, h, d, ms) / (2 if kind == "pass2" else 1)
            note = "" if config is not None else \
                f"@{n}: picked {variant_name(kind, dict({'USE_TMA': False}, **info['config']))}"
            times[(name, n)] = (ms, tf, info["n_regs"], note)
            print(f"N={n:6d} {name:34s} {ms:8.3f} ms {tf:5.0f} TF/s  regs {info['n_regs']} {note}", flush=True)
        q = k = v = out = lse = gt = None
        torch.cuda.empty_cache()

    cols = "".join(f" ms @{n} | TF/s @{n} |" for n in ns)
    dt = str(DTYPE).removeprefix("torch.")
    lines = ["# Ground-truth kernels: launch variants (plain loads vs the copy engine)", "",
             f"- command: `python3 {' '.join(sys.argv)}`", f"- {head}",
             f"- check: B 1, 8 heads, N {cn}, D {d}, {dt}, block {bs}, against the float64 "
             "PyTorch reference (out: relative error, lse: max abs error, gt: max relative error over the causal "
             "tiles); a variant failing it is not timed",
             f"- time: B 1, {h} heads (Hq = Hkv), D {d}, {dt}, causal, block {bs}; median of "
             "seer.kernels.tuning.median_ms (L2 cleared before each CUDA-event-timed run); TF/s = 2 B H N^2 D / time "
             "(pass2, q k^T only: half of that)",
             "- `tuned`: the launch table's own choice (the runtime tuner; on capability >= 9 it also times the "
             "default with USE_TMA); `tma`: USE_TMA on", "",
             f"| variant | check |{cols} regs | note |", "|---|---|" + "---|---|" * len(ns) + "---|---|"]
    names = ["SDPA flash", "SDPA cuDNN"] + [variant_name(*vv) for vv in chosen]
    for name in names:
        row = [name, checks.get(name, "-")]
        regs, notes = None, []
        for n in ns:
            ms, tf, r, note = times.get((name, n), (None, None, None, ""))
            row += [fmt(ms), fmt(tf, 0)]
            regs = regs if r is None else r
            notes += [note] if note else []
        lines.append("| " + " | ".join(row + [str(regs if regs is not None else "-"), "; ".join(notes)]) + " |")
    lines.append("")
    for n in ns:
        cudnn = times.get(("SDPA cuDNN", n))
        for kind in TABLES:
            timed = [(times[(variant_name(*vv), n)][0], variant_name(*vv)) for vv in chosen
                     if vv[0] == kind and (variant_name(*vv), n) in times]
            if timed:
                ms, best = min(timed)
                vs = f"; {ms / cudnn[0]:.3f}x cuDNN's time" if cudnn and kind != "pass2" else ""
                lines.append(f"- N={n}: best {kind}: `{best}` {ms:.3f} ms{vs}")
    lines.append(f"- total {time.time() - t_start:.0f} s")
    publish("\n".join(lines) + "\n", args.out or "docs/bench_gt_variants.md")


def compile_only(spec: str, d: int, bs: int) -> None:
    """The selected variants' kernels compiled for sm_90 (no GPU needed; as ``compile_stats.py``): ptxas registers and
    spills, shared memory, Hopper tensor-core instructions. The tuned variants (a run-time choice) are skipped."""
    from compile_stats import compile_sm90, ptxas_stats

    from seer.kernels import flash_gt_kernels as fk

    print(f"sm_90, D {d}, bf16, block {bs}\n| variant | regs | spill B | smem B | HGMMA |\n|---|---|---|---|---|",
          flush=True)
    for kind, config in select_variants(spec):
        if config is None:
            continue
        tiles = dict(config, HEAD_DIM=d, BS=bs, DOT_PRECISION="tf32", INTERP=False)
        launch = {f: tiles.pop(f) for f in ("num_warps", "num_stages")}
        if kind == "pass2":
            fn, ptr = fk._gt_kernel, dict(Q="*bf16", K="*bf16", Lse="*fp32", Gt="*fp32")
            tiles.update(JC=32, MASS=False)
        else:
            fn = fk._fwd_kernel
            ptr = {p: "*bf16" for p in ("Q", "K", "V", "Out")} | {p: "*fp32" for p in ("Lse", "Scratch", "Gt")}
            tiles.update(GT=kind == "fast", **({"JC": 64} if kind == "fast" else {}))
        try:
            s = ptxas_stats(compile_sm90(fn, ptr, tiles, **launch))
            print(f"| {variant_name(kind, config)} | {s['regs']} | {s['spill']} | {s['smem']} | {s['hgmma']} |",
                  flush=True)
        except Exception as ex:  # noqa: BLE001 - a variant that does not compile is reported
            print(f"| {variant_name(kind, config)} | FAILED: {type(ex).__name__}: {str(ex)[:120]} | | | |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None,
                    help="markdown report (default docs/bench_gt.md, with --variants docs/bench_gt_variants.md)")
    ap.add_argument("--ns", default="8192,32768,65536")
    ap.add_argument("--ref-ns", default="8192,16384")
    ap.add_argument("--long", default="131072")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--rep-ms", type=float, default=None,
                    help="time budget of the timed runs of one figure (default 1000, with --variants 200)")
    ap.add_argument("--min-runs", type=int, default=5, help="timed runs of one figure at least")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-n", type=int, default=32768)
    ap.add_argument("--variants", nargs="?", const="all", default=None,
                    help="check and time launch variants instead: 'all' (the default), kinds (fast, dense, pass2) or "
                         "variant names, comma-separated; --list-variants names them")
    ap.add_argument("--variant-ns", default="8192,32768", help="lengths the variants are timed at")
    ap.add_argument("--check-n", type=int, default=2000, help="length the variants are checked at")
    ap.add_argument("--list-variants", action="store_true", help="print the variant names and exit")
    ap.add_argument("--compile-only", nargs="?", const="all", default=None,
                    help="compile the variants named (as --variants) for sm_90 and print registers, spills, shared "
                         "memory and HGMMA count; needs no GPU")
    args = ap.parse_args()
    if args.list_variants:
        print("\n".join(variant_name(*v) for v in variants()))
        return
    if args.compile_only is not None:
        compile_only(args.compile_only, args.dim, args.block_size)
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.variants is not None:
        bench_variants(args)
        return
    if args.rep_ms is None:
        args.rep_ms = 1000.0
    if args.sweep:
        sweep(args)
        return
    if args.out is None:
        args.out = "docs/bench_gt.md"

    h, d, bs = args.heads, args.dim, args.block_size
    dev = torch.cuda.get_device_name()
    cmd = "python3 " + " ".join(sys.argv)
    head = (f"device: {dev}; torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
            f"{torch.backends.cudnn.version()}); triton {triton.__version__}; "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(head, flush=True)
    ns = [int(x) for x in args.ns.split(",") if x]
    ref_ns = [int(x) for x in args.ref_ns.split(",") if x]
    long_ns = [int(x) for x in args.long.split(",") if x]
    table = []  # (N, name, ms, runs, tflops, extra GiB, note)
    summary = {}

    def add(n, name, ms, runs, mem, note=""):
        tf = tflops(n, h, d, ms)
        table.append((n, name, ms, runs, tf, mem, note))
        summary[(n, name)] = ms
        print(f"N={n:6d} {name:28s} {ms:9.2f} ms ({runs:2d} runs) {tf:6.0f} TF/s  extra {mem:6.3f} GiB {note}",
              flush=True)

    for n in sorted(set(ns) | set(ref_ns) | set(long_ns)):
        q, k, v = make(n, h, h, d, seed=n)
        nb = reference.num_blocks(n, bs)
        out = torch.empty_like(q)
        lse = torch.empty(1, h, n, device="cuda", dtype=torch.float32)
        gt = torch.empty(1, h, nb, nb, device="cuda", dtype=torch.float32)
        main_n = n in ns
        long_n = n in long_ns
        runs = {}
        if main_n:
            runs["SDPA flash (FA2)"] = lambda: sdpa("flash")(q, k, v)
            runs["SDPA cuDNN"] = lambda: sdpa("cudnn")(q, k, v)
        if main_n or long_n:
            runs["ours dense (no gt)"] = lambda: flash_attn_with_gt(q, k, v, bs, return_gt=False, out=out, lse=lse)
        runs["ours gt fast"] = lambda: flash_attn_with_gt(q, k, v, bs, mode="fast", out=out, lse=lse, gt=gt)
        if main_n or long_n:
            runs["ours gt lowmem"] = lambda: flash_attn_with_gt(q, k, v, bs, mode="lowmem", out=out, lse=lse, gt=gt)
        for name, fn in runs.items():
            try:
                fn()  # compile / autotune outside the timing
                mem = extra_mem(fn)
                ms, r = median_ms(fn, rep_ms=args.rep_ms, min_runs=args.min_runs)
                add(n, name, ms, r, mem)
            except Exception as ex:  # noqa: BLE001
                print(f"N={n} {name}: FAILED {type(ex).__name__}: {str(ex)[:300]}", flush=True)
        if (n, "ours gt fast") in summary and n in ref_ns:
            # accuracy of this very run against the reference, and the reference's time
            torch.cuda.synchronize()
            flash_attn_with_gt(q, k, v, bs, mode="fast", out=out, lse=lse, gt=gt)
            ref_fn = lambda: reference.block_gt(q, k, bs)  # noqa: E731
            g_ref = ref_fn()
            lower = torch.ones(nb, nb, dtype=torch.bool, device="cuda").tril()
            err = ((gt[..., lower] - g_ref[..., lower]).abs() / g_ref[..., lower]).max().item()
            mem = extra_mem(ref_fn)
            ms, r = median_ms(ref_fn, rep_ms=args.rep_ms, min_runs=args.min_runs)
            add(n, "reference.block_gt", ms, r, mem, f"(max rel. err. of our gt vs it: {err:.1e})")
            g_ref = None
        q = k = v = out = lse = gt = None
        torch.cuda.empty_cache()

    g_ms, g_note = gate_time(32768, args.rep_ms, args.min_runs)
    print(f"gate forward per layer at 32k: {g_ms} ms ({g_note})", flush=True)

    lines = ["# Ground-truth kernel benchmark", "", f"- command: `{cmd}`", f"- {head}",
             f"- shapes: B 1, {h} heads (Hq = Hkv), head dim {d}, bf16, causal, gt block size {bs}",
             "- time: median of the CUDA-event-timed runs (runs column) of seer.kernels.tuning.median_ms "
             "(triton.testing.do_bench: warm-up, L2 cleared before each run); TFLOP/s = 2*B*H*N^2*D / time",
             "- extra: peak of max_memory_allocated minus allocated before the call; our outputs are preallocated "
             "(extra = scratch only), SDPA's output and lse are included in its figure", "",
             "| N | kernel | ms | runs | TFLOP/s | x SDPA flash | extra GiB | note |",
             "|---|---|---|---|---|---|---|---|"]
    for n, name, ms, r, tf, mem, note in table:
        fa2 = summary.get((n, "SDPA flash (FA2)"))
        rel = f"{ms / fa2:.3f}" if fa2 else ""
        lines.append(f"| {n} | {name} | {ms:.2f} | {r} | {tf:.0f} | {rel} | {mem:.3f} | {note} |")
    lines += ["", "## Goals", ""]

    def ratio(a, b):
        return summary[a] / summary[b] if a in summary and b in summary else float("nan")
    for n in ns:
        lines.append(f"- N={n}: fast / FA2 = {ratio((n, 'ours gt fast'), (n, 'SDPA flash (FA2)')):.3f}; "
                     f"fast / own dense = {ratio((n, 'ours gt fast'), (n, 'ours dense (no gt)')):.3f}; "
                     f"lowmem / fast = {ratio((n, 'ours gt lowmem'), (n, 'ours gt fast')):.3f}; "
                     f"dense / cuDNN = {ratio((n, 'ours dense (no gt)'), (n, 'SDPA cuDNN')):.3f}")
    for n in long_ns:
        lines.append(f"- N={n}: lowmem / fast = {ratio((n, 'ours gt lowmem'), (n, 'ours gt fast')):.3f}")
    for n in ref_ns:
        lines.append(f"- N={n}: reference.block_gt / fast = "
                     f"{ratio((n, 'reference.block_gt'), (n, 'ours gt fast')):.1f}x")
    lines.append("- AttnGate forward per layer at 32k: " + (f"{g_ms:.2f} ms ({g_note})" if g_ms is not None
                                                               else f"not measured: {g_note}"))
    lines += ["", "Launch configs chosen by seer.kernels.tuning (key: head dim, block size, dtype, N bucket):", ""]
    for kernel, chosen in chosen_configs().items():
        lines += [f"- {kernel} {key}: {cfg}" for key, cfg in chosen.items() if kernel.startswith("flash_gt.")]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
