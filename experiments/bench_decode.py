"""Benchmark of seer's block-sparse decode kernel (:func:`seer.kernels.block_sparse_decode`) against dense decode.

Its runs on one H200 (2026-12-04, eager and ``--graph``) are ``docs/bench_decode.md``.

Shape: the 8B model's attention (32 query / 8 KV heads, D 128, bf16), one new token (T 1, ``--t`` for more),
64-token blocks, every sequence of the batch filled to the cache length (so dense SDPA needs no mask). For each
batch (1 / 4 / 16 / 64), cache length (8k / 32k / 128k) and token budget (1k / 2k / 4k: ``budget / 64`` blocks per
KV head, the newest block always among them, the others drawn at random, ascending), it times

* ``ours``: the kernel on those lists (``validate=False``: no host synchronisation, as in a decode loop), and the
  split count it chose;
* ``ours@1.0``: the kernel with every block listed (density 1.0);
* ``SDPA``: ``torch.nn.functional.scaled_dot_product_attention`` over the whole cache (flash backend, GQA without
  repeating K/V; ``-`` where no backend ran it);
* ``dense``: the faster of SDPA and ours@1.0, and the speedup of ours over it (issue 18's goals at 90% sparsity:
  >= 9x at batch 16 / 32k, >= 3x at batch 1 / 32k);
* ``release`` (with ``--release-dir``): the authors' Triton decode kernel
  (``seer_attn/kernels/varlen/triton_sparse_gqa_decode_varlen_indice.py``, loaded by
  ``experiments/release_kernels.py``) on the same tensors (its ``[B, N, Hkv, D]`` cache layout is a view of ours, its
  index lists the same), T 1 only, as shipped (its autotune keyed on the head and block sizes only), and ours / it.

Before timing, the kernel is checked on the GPU against :func:`seer.kernels.reference.block_sparse_decode` (float32
reference on bf16 inputs, 8k cache, T 1 and 4). Timing: :func:`seer.kernels.bench.ms` (``triton.testing.do_bench``:
warm-up, L2 cleared before each CUDA-event-timed run; median of at least 5 runs).

    python experiments/bench_decode.py --out docs/bench_decode.md --release-dir .assets/release
    python experiments/bench_decode.py --batch 1 16 --kv 32768 --budget 2048 --splits 1 8 16 32   # split sweep
    python experiments/bench_decode.py --tune       # launch configs (tuning.force_config) at 32k, budget 2k
    python experiments/bench_decode.py --variants --batch 1 4 16 --kv 32768 131072 --budget 2048 3264

``--variants`` times, in CUDA-graph replays, the kernel's defaults (``current``), ``unique_blocks=True``
(``unique``; the lists here are top-k, so without repeats; read in place), the same lists compacted first
(``compacted``: the ``IN_PLACE`` launch switch off) and unique at 3 pipeline stages (``unique s3``, the default
before) at each batch, cache length, budget (any token count: 3264 is 51 blocks, density 0.0996 at 32k) and ``--splits``
value, each checked against the float32 reference on the same inputs before it is timed, beside SDPA and ours@1.0,
and writes one table with the speedups over dense.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from seer.kernels import block_sparse_decode, reference
from seer.kernels.bench import env_info, fmt, graph_ms, ms, publish
from seer.kernels.decode import launch_plan
from seer.kernels.decode_index import block_index_from_scores
from seer.kernels.tuning import force_config, last_launch

DEV = "cuda"
HQ, HKV, D, BLOCK = 32, 8, 128, 64


def inputs(b: int, n: int, t: int, seed: int = 0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(b, HQ, t, D, device=DEV, generator=g, dtype=torch.bfloat16)
    k = torch.randn(b, HKV, n, D, device=DEV, generator=g, dtype=torch.bfloat16)
    v = torch.randn(b, HKV, n, D, device=DEV, generator=g, dtype=torch.bfloat16)
    return q, k, v, torch.full((b,), n, dtype=torch.int32, device=DEV)


def lists(b: int, n: int, budget: int, seed: int = 0) -> torch.Tensor:
    """``budget / BLOCK`` random blocks per KV head, the newest always, ascending."""
    nb = -(-n // BLOCK)
    g = torch.Generator(device=DEV).manual_seed(seed)
    scores = torch.rand(b, HKV, nb, device=DEV, generator=g)
    scores[..., -1] = float("inf")
    return block_index_from_scores(scores, min(nb, max(1, budget // BLOCK)))


def assert_near_reference(out, lse, ref_out, ref_lse, what) -> None:
    """bf16 results against the float32 reference: relative error of ``out`` below 1.5e-2, ``lse`` within 2e-2,
    the same empty rows."""
    err = ((out.float() - ref_out).norm() / ref_out.norm()).item()
    fin = torch.isfinite(ref_lse)
    assert err < 1.5e-2 and (lse[fin] - ref_lse[fin]).abs().max().item() < 2e-2, (what, err)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), what


def check() -> None:
    for t in (1, 4):
        q, k, v, lens = inputs(2, 8192, t, seed=t)
        lens[1] = 5000 + t
        idx = lists(2, 8192, 2048, seed=t)
        out, lse = block_sparse_decode(q, k, v, idx, lens, BLOCK)
        ref_out, ref_lse = reference.block_sparse_decode(q.float(), k.float(), v.float(), idx, lens, BLOCK)
        assert_near_reference(out, lse, ref_out, ref_lse, t)
    print("GPU check against the reference: ok", flush=True)


def release_fn(release_dir: str | None):
    """The release's decode kernel as ``fn(q, k, v, idx, lens)`` on our layouts (T 1), checked against the
    reference; None without ``release_dir``."""
    if release_dir is None:
        return None
    from experiments import release_kernels
    mod = release_kernels.load(release_dir, "seer_attn.kernels.varlen.triton_sparse_gqa_decode_varlen_indice")

    def fn(q, k, v, idx, lens):
        return mod.block_sparse_flash_decode_gqa_indice_triton(
            q[:, :, 0], k.transpose(1, 2), v.transpose(1, 2), lens, k.shape[2], idx.shape[2], idx, BLOCK)

    q, k, v, lens = inputs(2, 8192, 1, seed=7)
    lens[1] = 5001
    # the release reads every listed block: list only blocks below each length (ours ignores the others)
    idx = torch.cat([lists(1, 8192, 2048, seed=7), lists(1, 5001, 2048, seed=8)])
    ref_out, _ = reference.block_sparse_decode(q.float(), k.float(), v.float(), idx, lens, BLOCK)
    err = ((fn(q, k, v, idx, lens).float() - ref_out[:, :, 0]).norm() / ref_out.norm()).item()
    assert err < 1.5e-2, f"the release's decode kernel disagrees with the reference: relative error {err:.3g}"
    print(f"release kernel {release_kernels.commit(release_dir)} against the reference: ok", flush=True)
    return fn


TIMER = {"timer": ms}  # --graph: graph_ms


def timed(fn) -> float:
    return TIMER["timer"](fn)


def sdpa_ms(q, k, v) -> float:
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
            return timed(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    except RuntimeError as exc:  # no backend for the shape, or out of memory
        print(f"  SDPA: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
        return float("nan")


def ours_ms(q, k, v, idx, lens, splits: int | None, **variant) -> tuple[float, int]:
    """The kernel's time (``variant``: its ``unique_blocks`` keyword) and the split count it chose."""
    def run():
        return block_sparse_decode(q, k, v, idx, lens, BLOCK, num_splits=splits, validate=False, **variant)

    run()
    return timed(run), launch_plan(q.shape[0], HKV, HQ // HKV, q.shape[2], idx.shape[2], q.device, splits)[2]


def bench(args) -> list[dict]:
    rows = []
    release = release_fn(args.release_dir) if args.t == 1 else None
    for b, n in itertools.product(args.batch, args.kv):
        q, k, v, lens = inputs(b, n, args.t)
        full = torch.arange(-(-n // BLOCK), dtype=torch.int32, device=DEV).expand(b, HKV, -1).contiguous()
        dense_sdpa = sdpa_ms(q, k, v) if args.t == 1 else float("nan")
        for splits in args.splits or [None]:
            dense_ours, _ = ours_ms(q, k, v, full, lens, splits)
            for budget in args.budget:
                idx = lists(b, n, budget)
                t_ours, chosen = ours_ms(q, k, v, idx, lens, splits)
                dense = min(x for x in (dense_sdpa, dense_ours) if x == x)
                t_rel = float("nan")
                if release and (b - 1) * n * HKV * D < 2**31:  # the release's int32 offsets overflow beyond (64 x 128k)
                    t_rel = timed(lambda q=q, k=k, v=v, i=idx, lens=lens: release(q, k, v, i, lens))
                rows.append(dict(batch=b, kv=n, budget=budget, density=idx.shape[2] * BLOCK / n, splits=chosen,
                                 ours=t_ours, ours_dense=dense_ours, sdpa=dense_sdpa, dense=dense,
                                 speedup=dense / t_ours, release=t_rel, vs_release=t_rel / t_ours))
                print(rows[-1], flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    return rows


# name: (keywords of block_sparse_decode, launch-config fields forced over the default). `unique`: unique lists, which
# the default walks in place (IN_PLACE, since 2026-12-06); `compacted`: the same lists compacted first (the default
# before); `unique s3`: in place at three pipeline stages (the default before 4 stages were timed 2% faster at batch
# 16 / 32k in two H100 runs, level at batch 1). (The copy-engine switch, USE_TMA, was 2-10% slower in three runs:
# docs/bench_decode.md.)
VARIANTS = {"current": ({}, {}), "unique": (dict(unique_blocks=True), {}),
            "compacted": (dict(unique_blocks=True), dict(IN_PLACE=False)),
            "unique s3": (dict(unique_blocks=True), dict(num_stages=3))}


def variants(args) -> list[dict]:
    """``--variants``: each kernel variant of :data:`VARIANTS` on each shape and budget (and ``--splits``), checked
    against the float32 reference on those inputs before it is timed, beside SDPA and ours@1.0."""
    rows = []
    for b, n in itertools.product(args.batch, args.kv):
        q, k, v, lens = inputs(b, n, args.t)
        qf, kf, vf = q.float(), k.float(), v.float()
        full = torch.arange(-(-n // BLOCK), dtype=torch.int32, device=DEV).expand(b, HKV, -1).contiguous()
        dense_sdpa = sdpa_ms(q, k, v) if args.t == 1 else float("nan")
        dense_ours, _ = ours_ms(q, k, v, full, lens, None)
        dense = min(x for x in (dense_sdpa, dense_ours) if x == x)
        for budget in args.budget:
            idx = lists(b, n, budget)
            ref_out, ref_lse = reference.block_sparse_decode(qf, kf, vf, idx, lens, BLOCK)
            for splits in args.splits or [None]:
                row = dict(batch=b, kv=n, budget=budget, density=idx.shape[2] * BLOCK / n, sdpa=dense_sdpa,
                           ours_dense=dense_ours, dense=dense)
                for name, (variant, config) in VARIANTS.items():
                    with force_config("block_sparse_decode", **config):
                        out, lse = block_sparse_decode(q, k, v, idx, lens, BLOCK, num_splits=splits, validate=False,
                                                       **variant)
                        assert_near_reference(out, lse, ref_out, ref_lse, (b, n, budget, splits, name))
                        row[name], row["splits"] = ours_ms(q, k, v, idx, lens, splits, **variant)
                rows.append(row)
                print(rows[-1], flush=True)
        del q, k, v, qf, kf, vf, full
        torch.cuda.empty_cache()
    return rows


def tune(args) -> None:
    print("| batch | budget | BLOCK_N | num_warps | num_stages | USE_TMA | ms | regs | spills |")
    print("|---|---|---|---|---|---|---|---|---|")
    n = 32768
    for b in args.batch:
        q, k, v, lens = inputs(b, n, args.t)
        for budget in args.budget:
            idx = lists(b, n, budget)
            for block_n, warps, stages, tma in itertools.product((32, 64), (2, 4, 8), (2, 3, 4), (False, True)):
                with force_config("block_sparse_decode", BLOCK_N=block_n, num_warps=warps, num_stages=stages,
                                  USE_TMA=tma):
                    t, _ = ours_ms(q, k, v, idx, lens, None)
                    info = last_launch("block_sparse_decode")
                print(f"| {b} | {budget} | {block_n} | {warps} | {stages} | {tma} | {fmt(t, 4)} | {info['n_regs']} | "
                      f"{info['n_spills']} |", flush=True)


def header(info: dict, args, cmd: str) -> list[str]:
    """The device, command and shape lines above a table."""
    return [f"Device: {info['device']}; torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, "
            f"Python {info['python']}; {info['date']}.", "", f"Command: `{cmd}`", "",
            f"{HQ} query / {HKV} KV heads, D {D}, bf16, T {args.t}, {BLOCK}-token blocks, every sequence at the "
            "cache length."]


def variants_report(rows: list[dict], info: dict, args, cmd: str) -> str:
    names = list(VARIANTS)
    lines = header(info, args, cmd)
    lines[-1] += (" Times in ms: median of CUDA-graph replays (GPU time, no host launch overhead, L2 warm), each "
                  "variant checked against the float32 reference on the same inputs first. `current`: the kernel's "
                  "defaults; `unique`: unique_blocks=True (no repeat check; the lists are top-k, so unique; walked in "
                  "place, without the compaction: IN_PLACE); `compacted`: the same lists compacted first (IN_PLACE "
                  "off); `unique s3`: unique at 3 pipeline stages (the default before 4); "
                  "`splits`: the split count (the same for every variant). `ours@1.0`: every block listed; "
                  "`dense`: the faster of SDPA and ours@1.0; in brackets the speedup dense / variant.")
    lines += ["", "| batch | KV | budget | density | splits | SDPA | ours@1.0 | dense | " + " | ".join(names) + " |",
              "|---|---|---|---|---|---|---|---|" + "---|" * len(names)]
    for r in rows:
        cells = [f"{fmt(r[name], 4)} ({r['dense'] / r[name]:.2f}x)" for name in names]
        lines.append(f"| {r['batch']} | {r['kv'] // 1024}k | {r['budget']} | {r['density']:.4f} | {r['splits']} | "
                     f"{fmt(r['sdpa'], 4)} | {fmt(r['ours_dense'], 4)} | {fmt(r['dense'], 4)} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report(rows: list[dict], info: dict, args, cmd: str) -> str:
    lines = header(info, args, cmd)
    lines[-1] += (" Times in ms: " + (
        "median of CUDA-graph replays (GPU time, no host launch overhead, L2 warm)" if args.graph else
        "median of CUDA-event-timed eager calls, L2 cleared before each (host launch overhead included where it "
        "exceeds the GPU time)") + ". `ours`: the kernel on `budget / 64` listed blocks per KV head (validate=False); "
        "`ours@1.0`: every block listed; `SDPA`: dense over the cache; `dense`: the faster of SDPA and ours@1.0; "
        f"speedup = dense / ours; `release`: the authors' Triton decode kernel (commit {args.release_commit}) on the "
        "same tensors and lists, `vs release` = release / ours.")
    lines += ["", "| batch | KV | budget | density | splits | ours | ours@1.0 | SDPA | dense | speedup | release "
              "| vs release |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['kv'] // 1024}k | {r['budget']} | {r['density']:.3f} | {r['splits']} | "
                     f"{fmt(r['ours'], 4)} | {fmt(r['ours_dense'], 4)} | {fmt(r['sdpa'], 4)} | {fmt(r['dense'], 4)} "
                     f"| {r['speedup']:.2f}x | {fmt(r['release'], 4)} | {fmt(r['vs_release'], 2)}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--kv", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--budget", type=int, nargs="+", default=[1024, 2048, 4096], help="tokens per KV head")
    ap.add_argument("--t", type=int, default=1, help="new tokens per sequence (SDPA is timed for T 1 only)")
    ap.add_argument("--splits", type=int, nargs="+", help="split counts to time (default: the kernel's choice)")
    ap.add_argument("--tune", action="store_true", help="sweep launch configs at 32k instead")
    ap.add_argument("--graph", action="store_true",
                    help="time CUDA-graph replays (GPU time without host launch overhead; L2 kept warm)")
    ap.add_argument("--variants", action="store_true",
                    help="time the kernel's variant (unique lists) beside its defaults instead, in CUDA-graph replays")
    ap.add_argument("--release-dir", help="a copy of microsoft/SeerAttention holding seer_attn/ (see release_kernels)")
    ap.add_argument("--out", help="write the markdown table here (else print it)")
    args = ap.parse_args()
    args.release_commit = "-"
    if args.graph or args.variants:
        TIMER["timer"] = graph_ms
    if args.release_dir:
        from experiments import release_kernels
        args.release_commit = release_kernels.commit(args.release_dir)
    if not torch.cuda.is_available():
        sys.exit("bench_decode.py needs a CUDA GPU")
    check()
    if args.tune:
        tune(args)
        return
    cmd = "python experiments/bench_decode.py " + " ".join(sys.argv[1:])
    if args.variants:
        text = variants_report(variants(args), env_info(), args, cmd)
    else:
        text = report(bench(args), env_info(), args, cmd)
    publish(text, args.out)


if __name__ == "__main__":
    main()
