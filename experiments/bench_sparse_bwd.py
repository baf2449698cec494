"""Benchmark of the block-sparse attention backward (``seer.kernels.block_sparse_attn`` under autograd), one GPU.

In one run, bounded by ``--budget-s`` (default 5.5 minutes; a FlexAttention compile already started runs on):

1. **check**: gradients (dq, dk, dv, with a loss on out and lse) against autograd of the PyTorch reference in
   float32, bf16, N = 2048 + 77, 8 query heads on 2 key/value heads, D 128, blocks 64 and 128, per-query-head
   masks with an empty and a diagonal-only row; and the dense mask against SDPA's backward at 4k. Exits with
   status 2 and a loud message on a mismatch. Repeated after the sweep with the winning launch configs.
2. **sweep**: a few launch configs (tile sizes, warps, pipeline stages, copy engine) per backward kernel (dk/dv,
   then dq) at N = 32k, density 1.0 and 0.1, each validated against the default's gradients; the best (sum of
   times relative to the fastest at each density) is kept for the measurements (forced with
   ``seer.kernels.tuning.force_config``) and printed as entries for the launch tables of
   ``seer/kernels/block_sparse_bwd.py``. Candidates left when the sweep's share of the budget is spent are skipped
   (and reported).
3. **measure**: B 1, H 32, D 128, bf16, causal, N = 32k (then 16k and 8k while time is left), random per-head
   block masks with the diagonal kept at densities 1.0, 0.5, 0.2, 0.1, blocks 64 and 128:

   * ``bwd``: our backward alone (``torch.autograd.grad`` on a retained graph: forward outputs precomputed;
     the row- and column-list builds from the bool mask included), and apart: ``col index``
     (:func:`build_block_col_index`), ``row index`` (:func:`build_block_index`) and ``kernels`` (the
     backward on prebuilt lists, :func:`block_sparse_attn_backward`);
   * ``flash bwd``: SDPA's flash backend (``sdpa_kernel(SDPBackend.FLASH_ATTENTION)``), backward of causal
     dense attention, timed the same way;
   * ``fwd+bwd``: ours (index builds included) against FlexAttention (``torch.compile``d) with a ``BlockMask``
     built from the same bool mask (``BlockMask.from_kv_blocks``: selected off-diagonal blocks full, the
     diagonal partial with a causal ``mask_mod``; its build not timed, shown apart) at the same block size,
     and dense SDPA flash.

Timing: :func:`seer.kernels.bench.ms` (``triton.testing.do_bench``, median, L2 flushed between runs). Progress goes
to stdout as it happens; the markdown report (``--out``) and a JSON file beside it are rewritten after every stage.

    python experiments/bench_sparse_bwd.py --out docs/bench_sparse_bwd.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from seer.kernels import block_sparse_attn, reference
from seer.kernels import block_sparse_bwd as bwd
from seer.kernels.bench import Flex, env_info, fmt, ms
from seer.kernels.block_sparse import build_block_index
from seer.kernels.block_sparse_bwd import block_sparse_attn_backward, build_block_col_index
from seer.kernels.tuning import force_config

DEV = "cuda"
H, D, DT = 32, 128, torch.bfloat16
CHECK_N, CHECK_HEADS, DENSE_N = 2048 + 77, (8, 2), 4096  # sizes of the correctness checks

# launch-config candidates per mask block (the first is the module's default), as tuples of the fields of the
# kernel's launch table in order (bwd.DKDV_TABLE.fields, bwd.DQ_TABLE.fields; config_dict() makes the dict); all
# compile for sm_90 without register spills but the 64-key dk/dv tiles at block 128 (32 to 40 bytes;
# experiments/compile_stats.py)
DKDV_CANDIDATES = {  # (BLOCK_N keys per program, BLOCK_M query rows per step, num_warps, num_stages, USE_TMA)
    64: [(64, 64, 8, 2, False), (64, 64, 4, 2, False), (64, 64, 8, 3, False), (64, 32, 4, 3, False),
         (64, 64, 8, 2, True), (64, 64, 4, 2, True)],
    128: [(64, 128, 8, 2, False), (128, 64, 8, 2, False), (128, 32, 8, 2, False), (64, 64, 8, 2, False),
          (64, 128, 8, 2, True)],
}
DQ_CANDIDATES = {  # (BLOCK_M query rows per program, BLOCK_N keys per step, num_warps, num_stages, USE_TMA)
    64: [(64, 64, 4, 2, False), (64, 64, 4, 3, False), (64, 64, 8, 2, False), (64, 32, 4, 2, False),
         (64, 64, 4, 2, True), (64, 64, 4, 1, True), (64, 64, 4, 3, True)],
    128: [(128, 64, 8, 2, False), (64, 64, 4, 2, False), (128, 32, 8, 2, False), (64, 128, 4, 2, False),
          (128, 64, 8, 2, True)],
}


TABLES = {"dkdv": bwd.DKDV_TABLE, "dq": bwd.DQ_TABLE}


def config_dict(kernel: str, cfg: tuple) -> dict:
    """A candidate tuple of ``kernel`` ("dkdv" or "dq") as a launch config (its table's fields in order)."""
    return dict(zip(TABLES[kernel].fields, cfg))


def forced(block: int, configs: dict[tuple[str, int], tuple]) -> contextlib.ExitStack:
    """The configs ``{(kernel, mask block): candidate tuple}`` of ``block`` forced (``force_config``) while the
    returned context is open; kernels without one keep their defaults."""
    stack = contextlib.ExitStack()
    for (kernel, b), cfg in configs.items():
        if b == block:
            stack.enter_context(force_config(TABLES[kernel].name, **config_dict(kernel, cfg)))
    return stack


class Deadline:
    def __init__(self, seconds: float):
        self.t0 = time.time()
        self.end = self.t0 + seconds

    def left(self) -> float:
        return self.end - time.time()

    def elapsed(self) -> float:
        return time.time() - self.t0


def log(*a) -> None:
    print(*a, flush=True)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.float(), ref.float()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def random_mask(hm: int, nb: int, density: float, seed: int) -> torch.Tensor:
    """Bool ``[1, hm, nb, nb]``: each causal block kept with probability ``density``, the diagonal always."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    m = torch.rand(1, hm, nb, nb, device=DEV, generator=g) < density
    i = torch.arange(nb, device=DEV)
    m &= i[None, :] <= i[:, None]
    m[..., i, i] = True
    return m


def real_density(mask: torch.Tensor) -> float:
    nb = mask.shape[-1]
    return (mask.tril().sum(dim=(-1, -2)).double() / (nb * (nb + 1) / 2)).mean().item()


def qkv(n: int, hq: int | None = None, hkv: int | None = None, seed: int = 0, grad: bool = True):
    hq = hq or H
    hkv = hkv or hq
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(1, hq, n, D, device=DEV, generator=g).to(DT)
    k = torch.randn(1, hkv, n, D, device=DEV, generator=g).to(DT)
    v = torch.randn(1, hkv, n, D, device=DEV, generator=g).to(DT)
    do = torch.randn(1, hq, n, D, device=DEV, generator=g).to(DT)
    if grad:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
    return q, k, v, do


def sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


# ---------------------------------------------------------------------------------------------- check

def check(tag: str, blocks: list[int], configs: dict[tuple[str, int], tuple] | None = None) -> list[dict]:
    """Our gradients against the float32 reference (and SDPA for a dense mask), with ``configs`` forced (see
    :func:`forced`); exits on a mismatch."""
    configs = configs or {}
    rows, bad = [], []
    n, (hq, hkv) = CHECK_N, CHECK_HEADS

    def compare(case: str, label: str, got, want, tol: float) -> None:
        row = {"check": tag, "case": case}
        for name, a, b in zip(("dq", "dk", "dv"), got, want):
            row[name] = rel_err(a, b)
            if not (row[name] < tol) or torch.isnan(a).any():
                bad.append(f"{label} {name}: rel err {row[name]:.3e}")
        rows.append(row)
        log(json.dumps(row))

    for block in blocks:
        q, k, v, do = qkv(n, hq, hkv, seed=block)
        nb = math.ceil(n / block)
        mask = random_mask(hq, nb, 0.3, seed=block + 1)
        mask[:, 0, 5, :] = False  # an empty row
        mask[:, -1, 7, :] = False  # a diagonal-only row
        mask[:, -1, 7, 7] = True
        out, lse = block_sparse_attn(q, k, v, mask, block)
        dlse = torch.randn_like(lse)
        with forced(block, configs):
            got = torch.autograd.grad((out, lse), (q, k, v), (do, dlse))
        qr, kr, vr = (x.detach().float().requires_grad_() for x in (q, k, v))
        ro, rl = reference.block_sparse_attn(qr, kr, vr, mask, block)
        want = torch.autograd.grad((ro, rl), (qr, kr, vr), (do.float(), dlse.masked_fill(torch.isneginf(rl), 0)))
        compare(f"N={n} Hq={hq} Hkv={hkv} block={block} density 0.3 vs float32 reference", f"block {block}", got,
                want, 2.5e-2)
    n = DENSE_N
    q, k, v, do = qkv(n, hq, hq, seed=3)
    for block in blocks:
        mask = torch.ones(1, hq, n // block, n // block, dtype=torch.bool, device=DEV)
        with forced(block, configs):
            got = torch.autograd.grad(block_sparse_attn(q, k, v, mask, block)[0], (q, k, v), do)
        want = torch.autograd.grad(sdpa_flash(q, k, v), (q, k, v), do)
        compare(f"N={n} H={hq} block={block} dense mask vs SDPA flash backward", f"dense block {block} vs SDPA",
                got, want, 2e-2)
    if bad:
        log("\n" + "!" * 100 + f"\nCORRECTNESS CHECK FAILED ({tag}): " + "; ".join(bad) + "\n" + "!" * 100)
        sys.exit(2)
    return rows


# ---------------------------------------------------------------------------------------------- sweep

def sweep(block: int, n: int, budget_end: float, winners: dict[tuple[str, int], tuple]) -> list[dict]:
    """Sweep dk/dv then dq launch configs at ``n`` (density 1.0 and 0.1), each forced with ``force_config``; the best
    of each kernel goes to ``winners[(kernel, block)]`` (the dq sweep runs with the dk/dv winner)."""
    q, k, v, do = qkv(n, grad=False, seed=11)
    nb = math.ceil(n / block)
    masks = {dens: random_mask(H, nb, dens, seed=int(100 * dens) + block) for dens in (1.0, 0.1)}
    idx = {dens: (build_block_index(m), build_block_col_index(m)) for dens, m in masks.items()}
    fwd = {dens: block_sparse_attn(q, k, v, m, block) for dens, m in masks.items()}

    def run(dens):
        out, lse = fwd[dens]
        return block_sparse_attn_backward(do, q, k, v, out, lse, None, block, kv_index=idx[dens][0],
                                          q_index=idx[dens][1])

    base = [g.clone() for g in run(0.1)]  # the default configs' gradients: every candidate must agree
    rows = []
    for i, (kernel, cands) in enumerate((("dkdv", DKDV_CANDIDATES[block]), ("dq", DQ_CANDIDATES[block]))):
        key = (kernel, block)
        kernel_end = time.time() + (budget_end - time.time()) / (2 - i)  # half of what is left for each kernel
        res = []
        for cfg in cands:
            row = {"sweep": kernel, "block": block, "N": n, "cfg": list(cfg)}
            if time.time() > kernel_end:
                row["skipped"] = "sweep budget spent"
                rows.append(row)
                log(json.dumps(row))
                continue
            t0 = time.time()
            try:
                with forced(block, winners), force_config(TABLES[kernel].name, **config_dict(kernel, cfg)):
                    got = run(0.1)
                    errs = [rel_err(a, b) for a, b in zip(got, base)]
                    if not all(e < 1e-2 for e in errs):
                        raise RuntimeError(f"gradients differ from the default config's: {errs}")
                    row["t1.0"] = ms(lambda: run(1.0), rep_ms=50, min_runs=3)
                    row["t0.1"] = ms(lambda: run(0.1), rep_ms=50, min_runs=3)
                res.append(row)
            except Exception as exc:  # a config may not fit (shared memory) or not compile
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            row["s"] = round(time.time() - t0, 1)
            rows.append(row)
            log(json.dumps(row))
        if res:
            b1 = min(r["t1.0"] for r in res)
            b01 = min(r["t0.1"] for r in res)
            for r in res:
                r["score"] = r["t1.0"] / b1 + r["t0.1"] / b01
            best = min(res, key=lambda r: r["score"])
            best["best"] = True
            winners[key] = tuple(best["cfg"])
            log(f"best {kernel} block {block}: {tuple(best['cfg'])} ({best['t1.0']:.3f} ms at 1.0, "
                f"{best['t0.1']:.3f} ms at 0.1)")
        else:
            winners.pop(key, None)
    return rows


# ---------------------------------------------------------------------------------------------- flex

@contextlib.contextmanager
def _flex_bwd_64_config():
    """Offer FlexAttention's backward one extra config of 64 x 64 tiles (its H100 default for D 128 uses
    128-wide tiles, which its own check refuses for 64-token mask blocks)."""
    from torch._inductor import choices
    orig = choices.InductorChoices.get_flex_attention_bwd_configs

    def patched(self, head_dim, dtype, *args, **kwargs):
        confs = list(orig(self, head_dim, dtype, *args, **kwargs))
        if confs:
            cls = type(confs[0])
        else:
            from torch._inductor.template_heuristics.triton import FlexBwDConfig as cls
        extra = cls(64, 64, 64, 64, 3, 4)  # (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, num_stages, num_warps)
        return confs if extra in confs else confs + [extra]

    choices.InductorChoices.get_flex_attention_bwd_configs = patched
    try:
        yield
    finally:
        choices.InductorChoices.get_flex_attention_bwd_configs = orig


class FlexWithBackward(Flex):
    """:class:`seer.kernels.bench.Flex` with its backward, compiled with the first kernel options that work."""

    def __init__(self):
        super().__init__()
        self.opts: dict[int, dict | None] = {}
        self.ready: dict[tuple[int, int], str] = {}
        self.failed: set[tuple[int, int]] = set()

    def build(self, mask: torch.Tensor, block: int, n: int):
        """The BlockMask with the lists of the backward; gradients are compared with ours in ``measure``."""
        return super().build(mask, block, n, backward=True)

    def __call__(self, q, k, v, bm, block):
        return super().__call__(q, k, v, bm, self.opts.get(block))

    def prepare(self, q, k, v, do, bm, block: int, n: int) -> str:
        """Compile forward + backward for (block, N), trying kernel options until one compiles."""
        if (block, n) in self.ready:
            return self.ready[(block, n)]
        if (block, n) in self.failed:
            raise RuntimeError(f"FlexAttention did not compile at block {block} (earlier attempt)")
        if block == 128:
            attempts = [("defaults", None, False), ("defaults + a 64x64 backward config", None, True)]
        else:
            fwd64 = {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64}
            attempts = [("forward tiles 64", fwd64, False), ("forward tiles 64 + a 64x64 backward config", fwd64, True),
                        ("BLOCK_M/N 64 + a 64x64 backward config", {"BLOCK_M": 64, "BLOCK_N": 64}, True)]
        for label, opts, patch in attempts:
            self.opts[block] = opts
            t0 = time.time()
            try:
                with (_flex_bwd_64_config() if patch else contextlib.nullcontext()):
                    torch.autograd.grad(self(q, k, v, bm, block), (q, k, v), do)
                    torch.cuda.synchronize()
                log(f"flex{block} N={n}: compiled with {label} in {time.time() - t0:.0f} s")
                self.ready[(block, n)] = label
                return label
            except Exception as exc:
                log(f"flex{block} N={n}: {label} failed after {time.time() - t0:.0f} s: "
                    f"{type(exc).__name__}: {str(exc)[:300]}")
                torch._dynamo.reset()
        self.failed.add((block, n))
        raise RuntimeError(f"FlexAttention did not compile at block {block}")


# ---------------------------------------------------------------------------------------------- measure

def flash_backward_ms(q, k, v, do) -> float:
    out = sdpa_flash(q, k, v)
    return ms(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True), rep_ms=50)


def measure(n: int, blocks: list[int], densities: list[float], flex: FlexWithBackward | None, deadline: Deadline,
            rows: list[dict], save, configs: dict[tuple[str, int], tuple]) -> None:
    """Rows at ``n`` for each block and density, with the backward ``configs`` forced (see :func:`forced`)."""
    q, k, v, do = qkv(n, seed=n)
    qd, kd, vd = (x.detach() for x in (q, k, v))
    flash_bwd = flash_backward_ms(q, k, v, do)
    flash_fb = ms(lambda: torch.autograd.grad(sdpa_flash(q, k, v), (q, k, v), do), rep_ms=50)
    log(f"N={n}: SDPA flash backward {flash_bwd:.3f} ms, forward+backward {flash_fb:.3f} ms")
    for block in blocks:
        nb = math.ceil(n / block)
        with forced(block, configs):
            for dens in densities:
                if deadline.left() < 15:
                    log(f"out of time: N={n} block {block} density {dens} skipped")
                    return
                mask = random_mask(H, nb, dens, seed=n + block + int(1000 * dens))
                row = {"N": n, "block": block, "density": dens, "real_density": real_density(mask),
                       "flash_bwd": flash_bwd, "flash_fwd_bwd": flash_fb}
                out, lse = block_sparse_attn(q, k, v, mask, block)
                row["bwd"] = ms(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True), rep_ms=50)
                ri, ci = build_block_index(mask), build_block_col_index(mask)
                row["col_index"] = ms(lambda: build_block_col_index(mask), rep_ms=50, min_runs=20)
                row["row_index"] = ms(lambda: build_block_index(mask), rep_ms=50, min_runs=20)
                od, ld = out.detach(), lse.detach()
                row["kernels"] = ms(lambda: block_sparse_attn_backward(do, qd, kd, vd, od, ld, None, block, kv_index=ri,
                                                                       q_index=ci), rep_ms=50)
                row["fwd"] = ms(lambda: block_sparse_attn(qd, kd, vd, mask, block), rep_ms=50)
                row["fwd_bwd"] = ms(lambda: torch.autograd.grad(block_sparse_attn(q, k, v, mask, block)[0], (q, k, v),
                                                                do), rep_ms=50)
                if flex is not None and (deadline.left() > 75 or (block, n) in flex.ready):  # a compile: ~1 min
                    try:
                        t0 = time.time()
                        bm = flex.build(mask, block, n)
                        row["flex_build"] = ms(lambda: flex.build(mask, block, n), rep_ms=50, min_runs=5)
                        row["flex_setup"] = flex.prepare(q, k, v, do, bm, block, n)
                        if dens == densities[-1]:  # the same gradients (one density per N and block)
                            got = torch.autograd.grad(flex(q, k, v, bm, block), (q, k, v), do)
                            ours = torch.autograd.grad(block_sparse_attn(q, k, v, mask, block)[0], (q, k, v), do)
                            row["flex_vs_ours_rel_diff"] = max(rel_err(a, b) for a, b in zip(ours, got))
                            if not row["flex_vs_ours_rel_diff"] < 3e-2:
                                log(f"WARNING: FlexAttention and ours disagree: {row['flex_vs_ours_rel_diff']:.3e}")
                        row["flex_fwd_bwd"] = ms(lambda: torch.autograd.grad(flex(q, k, v, bm, block), (q, k, v), do),
                                                 rep_ms=50)
                        row["flex_s"] = round(time.time() - t0, 1)
                    except Exception as exc:
                        row["flex_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                rows.append(row)
                log(json.dumps({kk: round(vv, 4) if isinstance(vv, float) else vv for kk, vv in row.items()}))
                save()


# ---------------------------------------------------------------------------------------------- report

def bwd_tflops(r: dict) -> float:
    """Backward TF/s, counting the selected work the FlashAttention way: 2.5 x forward = 5 matmuls of
    2 * B * H * N^2 * D / 2 (causal) flops, times the real density."""
    return 2.5 * 2.0 * H * r["N"] ** 2 * D * r["real_density"] / (r["kernels"] * 1e-3) / 1e12


def report(info: dict, cmd: str, checks: list[dict], sweeps: list[dict], rows: list[dict], total_s: float) -> str:
    L = [f"# Block-sparse attention backward: {info['device']}", "",
         f"Device: {info['device']}; torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, "
         f"Python {info['python']}; {info['date']}; {total_s:.0f} s in all.", "", f"Command: `{cmd}`", "",
         f"B 1, H {H}, D {D}, {str(DT).replace('torch.', '')}, causal; random per-head block masks with the "
         "diagonal kept. Times in ms "
         "(`triton.testing.do_bench`, median). `bwd`: our backward alone through autograd (forward outputs "
         "precomputed; includes building the row and column lists from the bool mask); `col idx` / `row idx`: "
         "the list builds alone; `kernels`: the backward on prebuilt lists; `flash bwd`: SDPA flash "
         "backend, backward of dense causal attention; `fwd+bwd`: ours from the bool mask (index builds "
         "included), FlexAttention (compiled; BlockMask from the same mask, its build apart) and SDPA flash.", ""]
    L += ["## Goals (largest N measured)", "", "| goal | block | measured | met |", "|---|---|---|---|"]
    if rows:
        n_main = max(r["N"] for r in rows)
        for block in sorted({r["block"] for r in rows}):
            rs = {r["density"]: r for r in rows if r["N"] == n_main and r["block"] == block}
            if 0.1 in rs:
                r = rs[0.1]
                sp = r["flash_bwd"] / r["bwd"]
                L.append(f"| bwd at density 0.1 >= 5x faster than SDPA flash bwd | {block} | {sp:.2f}x "
                         f"({r['bwd']:.3f} vs {r['flash_bwd']:.3f} ms) | {'yes' if sp >= 5 else 'no'} |")
            if 1.0 in rs:
                r = rs[1.0]
                ratio = r["bwd"] / r["flash_bwd"]
                L.append(f"| bwd at density 1.0 within 1.25x of SDPA flash bwd | {block} | {ratio:.2f}x its time "
                         f"({r['bwd']:.3f} vs {r['flash_bwd']:.3f} ms) | {'yes' if ratio <= 1.25 else 'no'} |")
            if 0.1 in rs and rs[0.1].get("flex_fwd_bwd"):
                r = rs[0.1]
                sp = r["flex_fwd_bwd"] / r["fwd_bwd"]
                L.append(f"| fwd+bwd at density 0.1 faster than FlexAttention, same block | {block} | {sp:.2f}x "
                         f"({r['fwd_bwd']:.3f} vs {r['flex_fwd_bwd']:.3f} ms) | {'yes' if sp > 1 else 'no'} |")
    L += ["", "## Results", "",
          "| N | block | density (real) | bwd | col idx | row idx | kernels | TF/s* | flash bwd | flash / bwd | "
          "fwd | fwd+bwd | flex fwd+bwd | flex / ours | flex build | flash fwd+bwd |",
          "|" + "---|" * 16]
    for r in rows:
        flex = r.get("flex_fwd_bwd")
        L.append("| " + " | ".join([
            f"{r['N'] // 1024}k", str(r["block"]), f"{r['density']:.1f} ({r['real_density']:.3f})", fmt(r["bwd"]),
            fmt(r["col_index"]), fmt(r["row_index"]), fmt(r["kernels"]), f"{bwd_tflops(r):.0f}",
            fmt(r["flash_bwd"]), f"{r['flash_bwd'] / r['bwd']:.2f}x", fmt(r["fwd"]), fmt(r["fwd_bwd"]),
            fmt(flex) if flex else ("error" if "flex_error" in r else "-"),
            f"{flex / r['fwd_bwd']:.2f}x" if flex else "-", fmt(r.get("flex_build")),
            fmt(r["flash_fwd_bwd"])]) + " |")
    L += ["", "*TF/s of `kernels`, counting 2.5 x the causal forward's 2 * B * H * N^2 * D flops times the real "
          "density (FlashAttention's convention; our dq pass recomputes Q K^T and dO V^T, which is not counted).", ""]
    flex_notes = sorted({(r["block"], r.get("flex_setup"), r.get("flex_error")) for r in rows
                         if r.get("flex_setup") or r.get("flex_error")}, key=str)
    for block, setup, err in flex_notes:
        L.append(f"- FlexAttention, block {block}: " + (f"compiled with {setup}" if setup else f"failed: {err}"))
    diffs = [(r["N"], r["block"], r["flex_vs_ours_rel_diff"]) for r in rows if "flex_vs_ours_rel_diff" in r]
    for n, block, dd in diffs:
        L.append(f"- gradients of FlexAttention vs ours (N {n}, block {block}): max rel diff {dd:.2e}")
    L += ["", "## Launch-config sweep", "",
          "dk/dv config: (BLOCK_N keys per program, BLOCK_M query rows per step, warps, stages, TMA); dq config: "
          "(BLOCK_M rows per program, BLOCK_N keys per step, warps, stages, TMA). Times: the whole backward on "
          f"prebuilt lists at N = {sweeps[0]['N'] if sweeps else '-'}, density 1.0 / 0.1, ms; each candidate's "
          "gradients checked against the default's first.", "",
          "| kernel | block | config | density 1.0 | density 0.1 | best | note |", "|---|---|---|---|---|---|---|"]
    for s in sweeps:
        note = s.get("error") or s.get("skipped") or ""
        L.append(f"| {s['sweep']} | {s['block']} | {tuple(s['cfg'])} | {fmt(s.get('t1.0'))} | {fmt(s.get('t0.1'))} "
                 f"| {'**best**' if s.get('best') else ''} | {note} |")
    best = [s for s in sweeps if s.get("best")]
    if best:
        L += ["", "Winners as launch-table entries (``seer/kernels/block_sparse_bwd.py``):", "", "```python"]
        for s in best:
            cfg = ", ".join(f"{kk}={vv}" for kk, vv in config_dict(s["sweep"], s["cfg"]).items())
            L.append(f"_H100_{s['sweep'].upper()}[({D}, {s['block']})] = dict({cfg})")
        L.append("```")
    L += ["", "## Checks", "", "| when | case | dq | dk | dv |", "|---|---|---|---|---|"]
    for c in checks:
        L.append(f"| {c['check']} | {c['case']} | {c['dq']:.2e} | {c['dk']:.2e} | {c['dv']:.2e} |")
    return "\n".join(L) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/bench_sparse_bwd.md", help="markdown report (JSON written beside it)")
    ap.add_argument("--ns", type=int, nargs="+", default=[32768, 16384, 8192], help="first one always, others if time")
    ap.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.2, 0.1])
    ap.add_argument("--blocks", type=int, nargs="+", default=[64, 128], choices=[64, 128])
    ap.add_argument("--budget-s", type=float, default=330.0, help="wall-clock budget of the whole run")
    ap.add_argument("--sweep-s", type=float, default=100.0, help="at most this long for the config sweep")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-flex", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    deadline = Deadline(args.budget_s)
    cmd = "python experiments/bench_sparse_bwd.py " + " ".join(sys.argv[1:])
    info = env_info()
    log(json.dumps(info))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    checks, sweeps, rows = [], [], []
    winners: dict[tuple[str, int], tuple] = {}  # (kernel, block) -> the sweep's best candidate, forced from then on

    def save():
        text = report(info, cmd, checks, sweeps, rows, deadline.elapsed())
        with open(args.out, "w") as f:
            f.write(text)
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump({"info": info, "checks": checks, "sweeps": sweeps, "rows": rows,
                       "configs": {f"{kk[0]}/{D}/{kk[1]}": config_dict(kk[0], vv) for kk, vv in winners.items()}},
                      f, indent=1)
        return text

    checks += check("default configs", args.blocks)
    log(f"check done at {deadline.elapsed():.0f} s")
    save()
    if not args.no_sweep:
        sweep_end = time.time() + min(args.sweep_s, 0.4 * deadline.left())
        for i, block in enumerate(args.blocks):
            block_end = time.time() + (sweep_end - time.time()) / (len(args.blocks) - i)
            sweeps += sweep(block, args.ns[0], block_end, winners)
            torch.cuda.empty_cache()
            save()
        log(f"sweep done at {deadline.elapsed():.0f} s; configs {winners}")
        if winners:
            checks += check("winning configs", args.blocks, winners)
            save()
    flex = None
    if not args.no_flex:
        try:
            flex = FlexWithBackward()
        except Exception as exc:
            log(f"FlexAttention unavailable: {exc!r}")
    for i, n in enumerate(args.ns):
        if i > 0 and deadline.left() < 60:
            log(f"out of time: N={n} skipped")
            continue
        measure(n, args.blocks, args.densities, flex, deadline, rows, save, winners)
        torch.cuda.empty_cache()
        log(f"N={n} done at {deadline.elapsed():.0f} s")
    text = save()
    log("\n" + text)
    log(f"total {deadline.elapsed():.0f} s")


if __name__ == "__main__":
    main()
