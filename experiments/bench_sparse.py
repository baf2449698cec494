"""Benchmark of seer's block-sparse attention kernel against dense SDPA and FlexAttention (forward, causal).

B 1, 32 heads (MHA), head dim 128, bf16. At every N and density it times, on one mask:

* ours: the Triton kernel walking prebuilt block lists (``kernel``), the list build alone (``index``), and
  both (``ours``, what :func:`seer.kernels.block_sparse_attn` costs from a boolean mask);
* SDPA dense causal with the flash (FA2) and cuDNN backends;
* FlexAttention (``torch.compile``d) with the same block mask at 64- and 128-token blocks: the selected
  off-diagonal blocks as its "full" blocks, the diagonal as a partial block with a causal ``mask_mod``; its
  index build from the boolean mask (stable argsort + ``BlockMask.from_kv_blocks``) is timed separately;
* the gate and selection: ``seer.gates.AttnGate`` forward (block RoPE, bf16) in two configurations, ``gate``
  (Q avg, K max+min+avg, hidden 128 = head dim: the authors' K-only-linear default) and ``avgmax`` (Q avg,
  K max, hidden 128), and ``seer.sparsity.topk_mask`` on its logits (the mask at the density, sink block 1);
* end to end: q, k -> gate forward -> top-k selection -> list build -> kernel, with either gate.

The mask of the ``kernel``/``index``/flex columns ("realistic"): per head, a block score = local window
(``exp(-distance / w_h)``, ``w_h`` random in 2..32 blocks) + a few heavy vertical key columns (about nb/32
random columns per head, random strength) + Gumbel noise; ``seer.sparsity.topk_mask`` keeps each query-block
row's highest-scoring causal blocks with the diagonal and the first (sink) block forced, with per-row budgets
``round(density * (i + 1))`` (cumulative rounding, ``seer.sparsity.row_budgets``), so the kept share of the
causal block triangle equals the density. End to end uses the gate's own mask at the same density.

``--gate-only`` times just the gates (also with 8 key/value heads, GQA 4:1) and the selection at each N, after
checking them on the GPU against the PyTorch/CPU paths (gate logits to bf16 accuracy, masks identical).

Timing: :func:`seer.kernels.tuning.median_ms` (``triton.testing.do_bench``: warm-up, L2 cleared before each
CUDA-event-timed run), the median of the runs that fit in about 250 ms (50 to 100 ms for the small steps), at
least 5 of them.

Uses only the installed package's public API (``pip install -e .`` from the repository root):

    python3 experiments/bench_sparse.py --out-dir docs
    python3 experiments/bench_sparse.py --gate-only --out-dir $OUT   # gate + selection only
    python3 experiments/bench_sparse.py --tune      # sweep launch configs at 32k (tuning.force_config)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from seer.gates import AttnGate
from seer.gates.config import GateConfig
from seer.kernels import block_sparse_attn
from seer.kernels.block_sparse import block_sparse_attn_indexed, build_block_index
from seer.kernels.bench import Flex, env_info, fmt, ms, tflops
from seer.kernels.tuning import force_config
from seer.sparsity import topk_mask

DEV = "cuda"
FLEX_TILES = {64: {"BLOCK_M": 64, "BLOCK_N": 64}}  # FlexAttention's default 128-row tiles need 128-token blocks


# ---------------------------------------------------------------------------------------------- masks

def structured_scores(b: int, h: int, nb: int, seed: int = 0) -> torch.Tensor:
    """Block scores ``[B, H, nb, nb]`` float32: local window + vertical columns + noise, -inf above the diagonal."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    i = torch.arange(nb, device=DEV)
    dist = (i[:, None] - i[None, :]).clamp_min(0).float()
    w = 2.0 + 30.0 * torch.rand(b, h, 1, 1, device=DEV, generator=g)
    local = torch.exp(-dist / w)
    ncol = max(1, nb // 32)
    cols = torch.randint(0, nb, (b, h, ncol), device=DEV, generator=g)
    strength = 0.5 + torch.rand(b, h, ncol, device=DEV, generator=g)
    vert = torch.zeros(b, h, nb, device=DEV).scatter_add_(-1, cols, strength)
    u = torch.rand(b, h, nb, nb, device=DEV, generator=g).clamp_(1e-9, 1 - 1e-9)
    noise = -torch.log(-torch.log(u))
    scores = 2.0 * local + vert[:, :, None, :] + 0.3 * noise
    return scores.masked_fill(i[None, :] > i[:, None], float("-inf"))


def select(scores: torch.Tensor, density: float) -> torch.Tensor:
    """The block mask at ``density``: top-k per row with the diagonal and the first (sink) block forced."""
    return topk_mask(scores, density, sink_blocks=1)


def density_of(mask: torch.Tensor) -> float:
    nb = mask.shape[-1]
    kept = mask.tril().sum(dim=(-1, -2)).double()
    return (kept / (nb * (nb + 1) / 2)).mean().item()


def coarsen(mask64: torch.Tensor) -> torch.Tensor:
    """A 128-token block mask from a 64-token one (a 128-block is kept if any of its four 64-blocks is)."""
    b, h, nb, _ = mask64.shape
    pad = nb % 2
    m = F.pad(mask64.float(), (0, pad, 0, pad))
    return (F.max_pool2d(m.view(b * h, 1, nb + pad, nb + pad), 2).view(b, h, (nb + pad) // 2, -1) > 0)


# ---------------------------------------------------------------------------------------------- runs

def make_qkv(n: int, h: int = 32, d: int = 128, seed: int = 0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return [torch.randn(1, h, n, d, device=DEV, dtype=torch.bfloat16, generator=g) for _ in range(3)]


def sdpa(q, k, v, backend):
    from torch.nn.attention import sdpa_kernel
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def tune(args) -> None:
    """Sweep launch configs at 32k (density 1.0 and 0.1) and print the best per (D, block, layout)."""
    n, h = 32768, 32
    res = []
    for d in (128, 64):
        q, k, v = make_qkv(n, h, d)
        for block, pair in ((64, True), (64, False), (128, False)):
            nb = math.ceil(n / block)
            scores = structured_scores(1, h, nb)
            masks = {dens: select(scores, dens) for dens in (1.0, 0.1)}
            idx = {dens: build_block_index(m, pair=pair) for dens, m in masks.items()}
            warps = 8 if (pair or block == 128) else 4
            if d == 128:
                cands = [(bn, warps, st, tma) for bn in ((64, 128) if block == 128 else (64,))
                         for st in ((2, 3) if block == 128 else (2, 3, 4)) for tma in (False, True)]
            else:
                cands = [(64, warps, st, tma) for st in (2, 3) for tma in (False, True)]
            for cfg in cands:  # (BLOCK_N, num_warps, num_stages, USE_TMA)
                row = {"d": d, "block": block, "pair": pair, "cfg": cfg}
                try:
                    t0 = time.time()
                    with force_config("block_sparse", **dict(zip(("BLOCK_N", "num_warps", "num_stages", "USE_TMA"),
                                                                 cfg))):
                        for dens in (1.0, 0.1):
                            ii, cc = idx[dens]
                            row[dens] = ms(lambda: block_sparse_attn_indexed(q, k, v, ii, cc, block, pair=pair),
                                              rep_ms=100, min_runs=3)
                    row["s"] = time.time() - t0
                except Exception as exc:  # a config can run out of shared memory
                    row["err"] = repr(exc)[:120]
                res.append(row)
                print(json.dumps({kk: (vv if not isinstance(vv, float) else round(vv, 4)) for kk, vv in
                                  row.items()}, default=str), flush=True)
        q = k = v = None
    print("\nbest per (d, block, pair) by density-1.0 time and by density-0.1 time:")
    for d in (128, 64):
        for block, pair in ((64, True), (64, False), (128, False)):
            rows = [r for r in res if r["d"] == d and r["block"] == block and r["pair"] == pair and 1.0 in r]
            if not rows:
                continue
            b1 = min(rows, key=lambda r: r[1.0])
            b2 = min(rows, key=lambda r: r[0.1])
            print(f"d={d} block={block} pair={pair}: dens1 {b1['cfg']} {b1[1.0]:.3f} ms "
                  f"({tflops(n, h, d, b1[1.0]):.0f} TF/s) dens0.1 {b1[0.1]:.3f}; best@0.1 {b2['cfg']} "
                  f"{b2[0.1]:.3f} ms (dens1 {b2[1.0]:.3f})")
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "tune.json"), "w") as f:
            json.dump([{kk if isinstance(kk, str) else str(kk): vv for kk, vv in r.items()} for r in res], f)


def check(q, k, v, mask, block, ref_out) -> float:
    """Relative error of our kernel against a dense reference output."""
    out, _ = block_sparse_attn(q, k, v, mask, block)
    err = ((out.float() - ref_out.float()).norm() / ref_out.float().norm()).item()
    if not math.isfinite(err) or err > 2e-2:
        raise RuntimeError(f"kernel output wrong: relative error {err}")
    return err


GATES = {"gate": (["avg"], ["max", "min", "avg"]), "avgmax": (["avg"], ["max"])}  # (Q pools, K pools)


def make_gate(name: str, block: int, hkv: int = 32) -> AttnGate:
    """A bf16 AttnGate (32 query heads, head dim 128, hidden 128, block RoPE) with seeded random weights."""
    torch.manual_seed(0)
    q_pool, k_pool = GATES[name]
    cfg = GateConfig(block_size=block, q_pool=q_pool, k_pool=k_pool, hidden_size=128)
    return AttnGate(cfg, head_dim=128, num_heads=32, num_kv_heads=hkv).to(DEV, torch.bfloat16)


def check_gate(gate: AttnGate, q: torch.Tensor, k: torch.Tensor, density: float = 0.1) -> str:
    """The CUDA gate and selection against the PyTorch paths on the CPU: pools (max/min/last exact, averages to
    one bf16 rounding), logits (a float32 copy of the gate on the same inputs, to bf16 accuracy) and the top-k
    mask of the same logits (identical). Raises on a mismatch; returns a one-line summary."""
    from seer.gates import pool_blocks
    cfg = gate.config
    for x, kinds in ((q, cfg.q_pool), (k, cfg.k_pool)):
        got, want = pool_blocks(x, cfg.block_size, kinds).cpu(), pool_blocks(x.cpu(), cfg.block_size, kinds)
        d = x.shape[-1]
        for i, kind in enumerate(kinds):
            g, w = got[..., i * d:(i + 1) * d].float(), want[..., i * d:(i + 1) * d].float()
            if kind == "avg":
                ok = ((g - w).abs() <= 2.0 ** -7 * w.abs() + 1e-6).all().item()
            else:
                ok = torch.equal(g, w)
            if not ok:
                raise RuntimeError(f"pool {kind} differs from the PyTorch path")
    logits = gate(q, k)
    cpu = AttnGate(cfg, gate.head_dim, gate.num_heads, gate.num_kv_heads, gate.rope_inv_freq.cpu(),
                   gate.rope_scale)
    cpu.load_state_dict({kk: vv.float().cpu() for kk, vv in gate.state_dict().items()})
    want = cpu(q.float().cpu(), k.float().cpu())
    got = logits.float().cpu()
    fin = torch.isfinite(want)
    if not torch.equal(torch.isfinite(got), fin):
        raise RuntimeError("gate logits: -inf pattern differs")
    err = ((got[fin] - want[fin]).norm() / want[fin].norm()).item()
    if not err < 2e-2:
        raise RuntimeError(f"gate logits: relative error {err} against the float32 CPU gate")
    m_gpu, m_cpu = select(logits, density).cpu(), select(logits.cpu(), density)
    if not torch.equal(m_gpu, m_cpu):
        raise RuntimeError(f"top-k mask differs from the CPU sort path in {(m_gpu != m_cpu).sum().item()} blocks")
    return (f"pools match, logits rel err {err:.1e} vs float32 CPU gate, top-k masks identical "
            f"({m_gpu.sum().item()} blocks)")


def gate_only(args) -> list[dict]:
    """Gate forward (both configs, 32 and 8 key/value heads) and selection times at each N, checked first."""
    rows = []
    for n in args.ns:
        g = torch.Generator(device=DEV).manual_seed(n)
        # [B, N, H, D] storage seen as [B, H, N, D], as attention layers hand Q and K to the gate
        q = torch.randn(1, n, 32, 128, device=DEV, dtype=torch.bfloat16, generator=g).transpose(1, 2)
        row = {"N": n}
        for hkv in (32, 8):
            k = torch.randn(1, n, hkv, 128, device=DEV, dtype=torch.bfloat16, generator=g).transpose(1, 2)
            for name in GATES:
                gate = make_gate(name, args.block, hkv)
                if n <= 32768 and (hkv == 8 or name == "gate"):
                    print(f"check {name} hkv={hkv} N={n}: {check_gate(gate, q, k)}", flush=True)
                row[f"{name}_kv{hkv}"] = ms(lambda: gate(q, k), rep_ms=100)
                if name == "gate" and hkv == 32:
                    logits = gate(q, k)
                    for dens in (0.1, 0.5):
                        row[f"select_{dens}"] = ms(lambda: select(logits, dens), rep_ms=100)
                    logits = None
            k = None
        print(json.dumps({kk: round(vv, 4) for kk, vv in row.items()}), flush=True)
        rows.append(row)
        q = None
        torch.cuda.empty_cache()
    return rows


def run(args) -> list[dict]:
    from torch.nn.attention import SDPBackend
    flex = Flex() if not args.no_flex else None
    gates = {name: make_gate(name, args.block) for name in GATES}
    rows = []
    for n in args.ns:
        h, d, block = 32, 128, args.block
        q, k, v = make_qkv(n, h, d, seed=n)
        nb = math.ceil(n / block)
        scores = structured_scores(1, h, nb, seed=n)
        t_flash = ms(lambda: sdpa(q, k, v, SDPBackend.FLASH_ATTENTION))
        t_cudnn = ms(lambda: sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION))
        t_gate = {name: ms(lambda: gate(q, k)) for name, gate in gates.items()}
        if n <= 8192:  # correctness at density 1.0 against SDPA flash; the gate against its CPU path
            ref = sdpa(q, k, v, SDPBackend.FLASH_ATTENTION)
            err = check(q, k, v, torch.ones(1, h, nb, nb, dtype=torch.bool, device=DEV), block, ref)
            print(f"check N={n}: dense rel err vs SDPA flash {err:.2e}", flush=True)
            print(f"check N={n} gate: {check_gate(gates['gate'], q, k)}", flush=True)
            ref = None
        print(f"N={n}: flash {t_flash:.3f} ms, cudnn {t_cudnn:.3f} ms, gates {t_gate}", flush=True)
        logits = gates["gate"](q, k)
        for dens in args.densities:
            mask = select(scores, dens)
            real = density_of(mask)
            ii, cc = build_block_index(mask)
            t_kernel = ms(lambda: block_sparse_attn_indexed(q, k, v, ii, cc, block))
            t_index = ms(lambda: build_block_index(mask), rep_ms=50)
            t_ours = ms(lambda: block_sparse_attn(q, k, v, mask, block))
            t_sel = ms(lambda: select(logits, dens), rep_ms=50)
            row = {"N": n, "density": dens, "real_density": real, "kernel": t_kernel, "index": t_index,
                   "ours": t_ours, "select": t_sel, "flash": t_flash, "cudnn": t_cudnn}
            for name, gate in gates.items():
                row[f"gate_{name}"] = t_gate[name]
                row[f"e2e_{name}"] = ms(lambda: block_sparse_attn(q, k, v, select(gate(q, k), dens), block))
            if flex is not None:
                for fb, fmask in ((64, mask), (128, coarsen(mask) if block == 64 else mask)):
                    if block == 128 and fb == 64:
                        continue
                    bm = flex.build(fmask, fb, n)
                    if dens == args.densities[0] and n == args.ns[0] and fb == block:
                        fo = flex(q, k, v, bm, FLEX_TILES.get(fb))
                        ko = block_sparse_attn(q, k, v, fmask, fb)[0]
                        fe = ((fo.float() - ko.float()).norm() / fo.float().norm()).item()
                        print(f"check flex{fb} vs ours: rel diff {fe:.2e}", flush=True)
                        if not fe < 2e-2:
                            raise RuntimeError(f"ours and FlexAttention disagree: {fe}")
                    row[f"flex{fb}"] = ms(lambda: flex(q, k, v, bm, FLEX_TILES.get(fb)))
                    row[f"flex{fb}_build"] = ms(lambda: flex.build(fmask, fb, n), rep_ms=50)
                    if fb != block:  # our kernel on the same coarsened 128-block mask
                        i2, c2 = build_block_index(fmask)
                        row["kernel128"] = ms(lambda: block_sparse_attn_indexed(q, k, v, i2, c2, 128))
                        row["real_density128"] = density_of(fmask)
                    bm = None
            rows.append(row)
            print(json.dumps({kk: round(vv, 4) if isinstance(vv, float) else vv for kk, vv in row.items()}),
                  flush=True)
            with open(os.path.join(args.out_dir, args.name + ".json"), "w") as f:  # progress, rewritten at the end
                json.dump({"rows": rows}, f)
            mask = ii = cc = None
        q = k = v = scores = logits = None
        torch.cuda.empty_cache()
    return rows


def write_report(rows: list[dict], info: dict, args, cmd: str) -> str:
    data = [r for r in rows if "N" in r]
    lines = [f"Device: {info['device']}; torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, "
             f"cuDNN {info['cudnn']}, Python {info['python']}; {info['date']}.", "",
             f"Command: `{cmd}`", "",
             f"B 1, 32 heads, D 128, bf16, causal, forward; mask blocks of {args.block} tokens. Times in ms "
             "(median of CUDA-event-timed runs, seer.kernels.tuning.median_ms). `kernel`: ours on prebuilt block "
             "lists; `index`: list build "
             "from the bool mask; `ours` = both; `flexB`: FlexAttention (compiled) with B-token blocks "
             "(`flexB build`: its index build from the bool mask); `gate` / `avgmax`: the AttnGate forward "
             "(K max+min+avg / K max); `select`: top-k selection on the gate's logits; `e2e` / `e2e avgmax`: "
             "gate + select + index + kernel. Speedups are over SDPA flash (FA2) / cuDNN dense.", ""]
    hdr = ["N", "density (real)", "kernel", "TF/s*", "index", "ours", "flex64", "flex64 build", "flex128",
           "kernel on 128-mask", "flex128 build", "gate", "avgmax", "select", "e2e", "e2e avgmax", "FA2", "cuDNN",
           "kernel vs FA2", "e2e vs FA2", "e2e vs cuDNN", "e2e avgmax vs FA2", "e2e avgmax vs cuDNN"]
    lines.append("| " + " | ".join(hdr) + " |")
    lines.append("|" + "---|" * len(hdr))
    nan = float("nan")
    for r in data:
        n = r["N"]
        lines.append("| " + " | ".join([
            f"{n // 1024}k", f"{r['density']:.2f} ({r['real_density']:.3f})", fmt(r["kernel"]),
            f"{tflops(n, 32, 128, r['kernel']) * r['real_density']:.0f}", fmt(r["index"]), fmt(r["ours"]),
            fmt(r.get("flex64", nan)), fmt(r.get("flex64_build", nan)), fmt(r.get("flex128", nan)),
            fmt(r.get("kernel128", nan)), fmt(r.get("flex128_build", nan)), fmt(r["gate_gate"]),
            fmt(r["gate_avgmax"]), fmt(r["select"]), fmt(r["e2e_gate"]), fmt(r["e2e_avgmax"]), fmt(r["flash"]),
            fmt(r["cudnn"]), f"{r['flash'] / r['kernel']:.2f}x", f"{r['flash'] / r['e2e_gate']:.2f}x",
            f"{r['cudnn'] / r['e2e_gate']:.2f}x", f"{r['flash'] / r['e2e_avgmax']:.2f}x",
            f"{r['cudnn'] / r['e2e_avgmax']:.2f}x"]) + " |")
    lines += ["", "*TF/s counts only the selected work: 2 * B * H * N^2 * D * real density.", ""]
    for n in sorted({r["N"] for r in data}):
        d1 = [r for r in data if r["N"] == n and r["density"] == 1.0]
        d01 = [r for r in data if r["N"] == n and abs(r["density"] - 0.1) < 1e-9]
        if d1 and d01:
            lines.append(f"- N={n // 1024}k: kernel time at density 0.1 / density 1.0 = "
                         f"{d01[0]['kernel'] / d1[0]['kernel']:.3f}; density 1.0 at "
                         f"{tflops(n, 32, 128, d1[0]['kernel']):.0f} TF/s.")
    return "\n".join(lines) + "\n"


def write_gate_report(rows: list[dict], info: dict, args, cmd: str) -> str:
    lines = [f"Device: {info['device']}; torch {info['torch']}, triton {info['triton']}; {info['date']}.", "",
             f"Command: `{cmd}`", "",
             "AttnGate forward (32 query heads, D 128, hidden 128, block RoPE, bf16; Q and K as [B, N, H, D] "
             "views) with 32 or 8 key/value heads, and top-k selection on its [1, 32, nb, nb] logits. ms.", "",
             "| N | gate kv32 | avgmax kv32 | gate kv8 | avgmax kv8 | select 0.1 | select 0.5 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join([f"{r['N'] // 1024}k"] + [fmt(r[c]) for c in (
            "gate_kv32", "avgmax_kv32", "gate_kv8", "avgmax_kv8", "select_0.1", "select_0.5")]) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data = [r for r in rows if "N" in r]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for n in sorted({r["N"] for r in data}):
        rs = sorted([r for r in data if r["N"] == n], key=lambda r: r["density"])
        x = [r["density"] for r in rs]
        axes[0].plot(x, [r["flash"] / r["kernel"] for r in rs], "o-", label=f"{n // 1024}k kernel")
        axes[0].plot(x, [r["flash"] / r["e2e_gate"] for r in rs], "s--", label=f"{n // 1024}k end to end (gate)")
        if "flex64" in rs[0]:
            axes[1].plot(x, [r["flex64"] / r["kernel"] for r in rs], "o-", label=f"{n // 1024}k vs flex64")
        if "flex128" in rs[0] and "kernel128" in rs[0]:
            axes[1].plot(x, [r["flex128"] / r["kernel128"] for r in rs], "s--", label=f"{n // 1024}k vs flex128")
    axes[0].set(xscale="log", yscale="log", xlabel="density (kept share of causal blocks)",
                ylabel="speedup over SDPA flash (FA2)", title="block-sparse attention vs dense FA2")
    axes[1].set(xscale="log", xlabel="density", ylabel="FlexAttention time / our kernel time",
                title="ours vs FlexAttention, same block mask")
    axes[1].axhline(1.0, color="gray", lw=0.8)
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    ap.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.3, 0.2, 0.1, 0.05])
    ap.add_argument("--block", type=int, default=64, choices=[64, 128])
    ap.add_argument("--out-dir", default="docs")
    ap.add_argument("--name", default="bench_sparse", help="file stem of the .md/.png/.json outputs")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--tune", action="store_true", help="sweep launch configs at 32k instead")
    ap.add_argument("--gate-only", action="store_true", help="check and time only the gates and the selection")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    cmd = "python3 experiments/bench_sparse.py " + " ".join(sys.argv[1:])
    if args.tune:
        tune(args)
        return
    t0 = time.time()
    info = env_info()
    print(json.dumps(info), flush=True)
    os.makedirs(args.out_dir, exist_ok=True)
    if args.gate_only:
        rows = gate_only(args)
        report = write_gate_report(rows, info, args, cmd)
        with open(os.path.join(args.out_dir, args.name + "_gate.json"), "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)
        print(report)
        print(f"total {time.time() - t0:.0f} s")
        return
    rows = run(args)
    report = write_report(rows, info, args, cmd)
    with open(os.path.join(args.out_dir, args.name + ".json"), "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out_dir, args.name + "_table.md"), "w") as f:
        f.write(report)
    try:
        plot(rows, os.path.join(args.out_dir, args.name + ".png"))
    except Exception as exc:
        print(f"plot failed: {exc!r}")
    print(report)
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
