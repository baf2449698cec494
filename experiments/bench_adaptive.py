"""Speed of adaptive (calibrated, per-head) budgets: skewed masks, calibrated selection, end to end.

On B 1, 32 heads, head dim 128, bf16, causal, 64-token blocks (the Llama-3.1-8B attention shape), at each N:

* **skew**: a mask of mean density 0.1 whose per-head densities spread from 0.02 to 0.5 (what a per-head calibrated
  threshold gives: geometric spacing over the heads, rescaled to the mean), against a uniform density-0.1 mask
  built the same way (top-k of structured scores, diagonal and sink forced). The kernel with prebuilt lists, and
  ``block_sparse_attn`` from the bool mask (list build and, for ``heaviest_first``, the sort included), per
  launch schedule (``rows``: per head, longest rows first; ``heaviest_first``: every row program by list length).
  Goal: skewed within 1.15x of uniform.
* **select**: the calibrated threshold budget (``seer.sparsity.threshold_mask`` with the knob that
  ``seer.sparsity.calibration`` finds for density 0.1) on block scores shaped like a trained gate's (the structured
  scores; a random gate's are flat) and the list build, against the attention they feed.
  Goal: selection (scores -> budget -> index) at most 10% of the attention time.
* **end to end**: q, k -> gate (``avgmax``) and calibrated threshold -> lists -> kernel, against SDPA flash (FA2) and
  cuDNN. Goal: at least 8x SDPA flash at 32k.
* **end to end, the recipes' policy**: the same with the gate's scores blended with vertical-slash at 0.5 and, with
  ``--rerank-rows`` (default 0 and 16, the Qwen and SmolLM2 recipes' 16), reranked over the blend's top-p 0.99
  candidates (:func:`seer.model.attention.blend_gate_scores`, what ``seer.load`` runs), the threshold calibrated on
  those scores. Random q and k make every estimate flat, so the candidates are nearly every causal block: the
  rerank's costliest case (trained gates on real text propose 30-70% of a row, docs/bench_rerank.md).

    python3 -m experiments.bench_adaptive --out $OUT/bench_adaptive.md
"""

from __future__ import annotations

import argparse
import sys

import torch

from experiments.bench_sparse import DEV, make_gate, make_qkv, sdpa, structured_scores
from seer.gates.config import GateConfig
from seer.kernels import block_sparse_attn
from seer.kernels.bench import env_info, ms
from seer.kernels.block_sparse import block_sparse_attn_indexed, build_block_index
from seer.model.attention import blend_gate_scores
from seer.sparsity import SparsityConfig, head_density, threshold_mask, topk_mask
from seer.sparsity.calibration import calibrate


def skew(heads: int, mean: float, low: float, high: float) -> torch.Tensor:
    """Per-head densities from ``low`` to ``high`` with mean ``mean``: ``low + (high - low) x^p`` over evenly spaced x
    in [0, 1], p solved so the mean fits (many light heads, a few heavy ones, as calibrated thresholds give), in a
    seeded random head order."""
    x = torch.linspace(0, 1, heads, dtype=torch.float64)
    lo_p, hi_p = 0.01, 100.0
    for _ in range(60):
        p = (lo_p * hi_p) ** 0.5
        lo_p, hi_p = (p, hi_p) if (low + (high - low) * x ** p).mean() > mean else (lo_p, p)
    dens = (low + (high - low) * x ** p).float()
    return dens[torch.randperm(heads, generator=torch.Generator().manual_seed(1))]


def measure(n: int, rerank_rows: list[int]) -> list[dict]:
    from torch.nn.attention import SDPBackend

    h, block = 32, 64
    nb = -(-n // block)
    q, k, v = make_qkv(n, h)
    scores = structured_scores(1, h, nb)
    uniform = topk_mask(scores, 0.1, sink_blocks=1)
    skewed = topk_mask(scores, skew(h, 0.1, 0.02, 0.5).to(DEV), sink_blocks=1)
    rows = []
    for name, mask in (("uniform 0.1", uniform), ("skewed 0.02-0.5", skewed)):
        dens = head_density(mask)
        idx, cnt = build_block_index(mask)
        row = {"N": n, "mask": name, "density": float(dens.mean()), "head_min": float(dens.min()),
               "head_max": float(dens.max())}
        for schedule in ("rows", "heaviest_first"):
            row[f"kernel {schedule}"] = ms(lambda: block_sparse_attn_indexed(q, k, v, idx, cnt, block,
                                                                                schedule=schedule))
            row[f"from mask {schedule}"] = ms(lambda: block_sparse_attn(q, k, v, mask, block, schedule=schedule))
        rows.append(row)
        print(row, flush=True)

    gate = make_gate("avgmax", block)
    with torch.no_grad():
        # a random gate's logits are flat: the budget runs on the structured scores (what a trained gate's look
        # like), while the end-to-end time also runs the gate itself
        config = SparsityConfig(method="threshold", target_density=0.1, sink_blocks=1)
        knob = calibrate({0: scores}, config).knob(0, DEV)
        mask = threshold_mask(scores, knob, sink_blocks=1)

        flash = ms(lambda: sdpa(q, k, v, SDPBackend.FLASH_ATTENTION))
        cudnn = ms(lambda: sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION))
        parts = {
            "gate": ms(lambda: gate(q, k)),
            "threshold budget": ms(lambda: threshold_mask(scores, knob, sink_blocks=1)),
            "list build": ms(lambda: build_block_index(mask)),
            "attention (from mask)": ms(lambda: block_sparse_attn(q, k, v, mask, block)),
        }
        e2e = ms(lambda: (gate(q, k), block_sparse_attn(q, k, v, threshold_mask(scores, knob, sink_blocks=1),
                                                           block)))
    idx_ms = parts["list build"]
    select_ms = parts["threshold budget"] + idx_ms
    rows.append({"N": n, "mask": "gate + calibrated threshold", "density": float(head_density(mask).mean()),
                 "head_min": float(head_density(mask).min()), "head_max": float(head_density(mask).max()), **parts,
                 "selection share": select_ms / (parts["attention (from mask)"] - idx_ms), "end to end": e2e,
                 "flash": flash, "cudnn": cudnn, "x flash": flash / e2e, "x cudnn": cudnn / e2e})
    print(rows[-1], flush=True)
    for r_rows in rerank_rows:
        policy = GateConfig(block_size=block, blend="vertical_slash", blend_weight=0.5, rerank_rows=r_rows)
        with torch.no_grad():
            select = lambda: blend_gate_scores(policy, gate(q, k), q, k, block, q.shape[-1] ** -0.5, 0)  # noqa: E731
            blended = select()
            knob = calibrate({0: blended}, config).knob(0, DEV)
            mask = threshold_mask(blended, knob, sink_blocks=1)
            selection = ms(lambda: threshold_mask(select(), knob, sink_blocks=1))
            e2e = ms(lambda: block_sparse_attn(q, k, v, threshold_mask(select(), knob, sink_blocks=1), block))
        dens = head_density(mask)
        rows.append({"N": n, "policy rows": r_rows, "density": float(dens.mean()), "head_min": float(dens.min()),
                     "head_max": float(dens.max()), "selection": selection, "end to end": e2e, "flash": flash,
                     "cudnn": cudnn, "x flash": flash / e2e, "x cudnn": cudnn / e2e})
        print(rows[-1], flush=True)
    return rows


def report(rows: list[dict], cmd: str) -> str:
    info = env_info()
    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    lines = ["# Adaptive budgets: speed of skewed masks and calibrated selection", "",
             f"Device: {info['device']}; torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, Python "
             f"{info['python']}; {info['date']}.", f"Command: `{cmd}`", "",
             "B 1, 32 heads, head dim 128, bf16, causal, 64-token blocks; milliseconds (median, "
             "`triton.testing.do_bench` through `seer.kernels.tuning.median_ms`).", "",
             "## Skewed per-head budgets", "",
             "| N | mask | density (head min-max) | kernel, rows | kernel, heaviest first | from mask, rows | "
             "from mask, heaviest first | skewed / uniform (heaviest first, from mask) |",
             "|---|---|---|---|---|---|---|---|"]
    for n in sorted({r["N"] for r in rows}):
        uni = next(r for r in rows if r["N"] == n and r["mask"].startswith("uniform"))
        for r in (r for r in rows if r["N"] == n and "kernel rows" in r):
            ratio = r["from mask heaviest_first"] / uni["from mask heaviest_first"]
            lines.append(f"| {n} | {r['mask']} | {f(r['density'])} ({f(r['head_min'])}-{f(r['head_max'])}) | "
                         f"{f(r['kernel rows'])} | {f(r['kernel heaviest_first'])} | {f(r['from mask rows'])} | "
                         f"{f(r['from mask heaviest_first'])} | {ratio:.3f}x |")
    lines += ["", "## Calibrated selection and end to end (gate `avgmax`, threshold calibrated to density 0.1)", "",
              "| N | density (head min-max) | gate | threshold budget | list build | attention from mask | "
              "selection / attention | end to end | SDPA flash | cuDNN | vs flash | vs cuDNN |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if "end to end" in r and "policy rows" not in r):
        lines.append(f"| {r['N']} | {f(r['density'])} ({f(r['head_min'])}-{f(r['head_max'])}) | {f(r['gate'])} | "
                     f"{f(r['threshold budget'])} | {f(r['list build'])} | {f(r['attention (from mask)'])} | "
                     f"{r['selection share']:.1%} | {f(r['end to end'])} | {f(r['flash'])} | {f(r['cudnn'])} | "
                     f"{r['x flash']:.2f}x | {r['x cudnn']:.2f}x |")
    lines += ["", "`selection / attention`: (threshold budget + list build) over the kernel time (attention from mask "
              "minus its list build)."]
    policy = [r for r in rows if "policy rows" in r]
    if policy:
        lines += ["", "## End to end with the recipes' policy (gate + vertical-slash blend at 0.5, rerank rows, "
                  "threshold calibrated to density 0.1)", "",
                  "| N | rerank rows | density (head min-max) | gate, blend, rerank and budget | end to end | "
                  "SDPA flash | cuDNN | vs flash | vs cuDNN |", "|---|---|---|---|---|---|---|---|---|"]
        for r in policy:
            lines.append(f"| {r['N']} | {r['policy rows']} | {f(r['density'])} ({f(r['head_min'])}-"
                         f"{f(r['head_max'])}) | {f(r['selection'])} | {f(r['end to end'])} | {f(r['flash'])} | "
                         f"{f(r['cudnn'])} | {r['x flash']:.2f}x | {r['x cudnn']:.2f}x |")
        lines += ["", "Random q and k: the blend's top-p candidates are nearly every causal block, the rerank's "
                  "costliest case."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ns", type=int, nargs="+", default=[32768, 65536])
    ap.add_argument("--rerank-rows", type=int, nargs="*", default=[0, 16],
                    help="the recipes' policy end to end with these rerank rows (none: skip it)")
    ap.add_argument("--out", default="docs/bench_adaptive.md")
    args = ap.parse_args()
    if any(r < 0 for r in args.rerank_rows):
        ap.error(f"--rerank-rows must be >= 0, got {args.rerank_rows}")
    rows = [r for n in args.ns for r in measure(n, args.rerank_rows)]
    text = report(rows, "python3 -m experiments.bench_adaptive " + " ".join(sys.argv[1:]))
    with open(args.out, "w") as fh:
        fh.write(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
