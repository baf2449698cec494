"""Report entry point: ``python -m seer.report DIR [--out FILE] [--seq-len N] [--wandb]``.

Reads every ``metrics.json`` under ``DIR`` (the run folders of a ``python -m seer.eval -m ...`` sweep, or of the
quality study), and writes one markdown table of all rows, a "best at density" summary for each target density the
rows were run at, a table of RULER scores per task when the rows have them, and PNG plots of perplexity increase,
attention recall, passkey accuracy and RULER mean against the *achieved* density, one line per scorer + budget
(``DIR/report.md`` and ``DIR/*.png`` unless told otherwise). ``--wandb`` also logs the plots and the table to a W&B
run (offline unless a key is set). A folder without results or a damaged ``metrics.json`` is reported as one line
naming it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

from seer.checks import ConfigError
from seer.evaluation.ruler import RULER_TASKS

# (key, title, y scale): "percent" (a relative change, shown in %), or the measure's full scale (shares 1, RULER 100)
PLOTS = (("ppl_increase", "perplexity increase over dense", "percent"),
         ("recall", "attention recall (true mass kept)", 1.0),
         ("passkey", "passkey accuracy", 1.0),
         ("ruler", "RULER mean score (0-100)", 100.0))


def read_rows(folder: str | Path) -> list[dict]:
    """All rows of all ``metrics.json`` files under ``folder`` (sorted by path)."""
    rows = []
    for path in sorted(Path(folder).rglob("metrics.json")):
        try:
            found = json.loads(path.read_text())
            if not isinstance(found, list) or not all(isinstance(r, dict) and "seq_len" in r for r in found):
                raise ValueError("not a list of rows with a seq_len")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not a metrics.json of seer.eval ({exc})") from exc
        rows += found
    if not rows:
        raise ConfigError(f"no metrics.json under {folder}: run python -m seer.eval there first")
    return rows


def target_densities(rows: list[dict]) -> list[float]:
    """The target densities the rows were run at, in order (those with a target; dense rows have none)."""
    return sorted({r["target_density"] for r in rows if r.get("target_density") is not None})


def line_label(row: dict) -> str:
    """What one plotted line is: the scorer and the budget (with its allocation when calibrated, and its forced blocks
    or dense layers when it has any), and the decode budget of rows answered through decode gates."""
    budget = row["method"] + (f" ({row['allocation']})" if row.get("allocation") else "")
    forced = re.search(r"\[(.*)\]$", row.get("sparsity") or "")
    return (f"{row['selector']} + {budget}" + (f" [{forced.group(1)}]" if forced else "")
            + (f" + decode {row['decode']}" if row.get("decode") else ""))


def _f(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    """One markdown table of every row, grouped by length then ordered by scorer, budget and density."""
    head = ("| N | scorer + budget | target | achieved density | knob | PPL | dense PPL | PPL change | recall | "
            "oracle recall | passkey (dense) | copy acc (dense) | RULER (dense) | select ms | attention ms |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: (r["seq_len"], line_label(r), r.get("target_density") or 1.0)):
        lines.append(
            f"| {r['seq_len']} | {line_label(r)} | {_f(r.get('target_density'), '.2f')} | {_f(r['density'], '.3f')} | "
            f"{_f(r.get('knob'), '.3g')} | {_f(r['ppl'], '.3f')} | {_f(r['ppl_dense'], '.3f')} | "
            f"{_f(r.get('ppl_increase'), '+.1%')} | {_f(r.get('recall'), '.3f')} | "
            f"{_f(r.get('oracle_recall'), '.3f')} | "
            f"{_f(r.get('passkey'), '.2f')} ({_f(r.get('passkey_dense'), '.2f')}) | {_f(r.get('copy'), '.2f')} "
            f"({_f(r.get('copy_dense'), '.2f')}) | {_f(r.get('ruler'), '.1f')} ({_f(r.get('ruler_dense'), '.1f')}) | "
            f"{_f(r.get('select_ms'), '.2f')} | {_f(r.get('attention_ms'), '.2f')} |")
    return "\n".join(lines)


def ruler_table(rows: list[dict]) -> str:
    """RULER scores (0-100) per task of the rows that have them, dense in brackets, beside the density achieved on
    the RULER prompts (and the decode density, when some rows decoded through decode gates); empty without RULER."""
    tasks = [t for t in RULER_TASKS if any(r.get(f"ruler/{t}") is not None for r in rows)]
    scored = [r for r in rows if r.get("ruler") is not None]
    if not scored:
        return ""
    decode = any(r.get("decode") for r in scored)
    lines = ["| N | scorer + budget | achieved density (RULER prompts) | "
             + ("decode density | " if decode else "") + "RULER mean (dense) | " + " | ".join(tasks) + " |",
             "|" + "---|" * (4 + decode + len(tasks))]
    for r in sorted(scored, key=lambda r: (r["seq_len"], line_label(r), r.get("target_density") or 1.0)):
        cells = [f"{_f(r.get(f'ruler/{t}'), '.1f')} ({_f(r.get(f'ruler/{t}_dense'), '.1f')})" for t in tasks]
        lines.append(f"| {r['seq_len']} | {line_label(r)} | {_f(r.get('ruler_density'), '.3f')} | "
                     + (f"{_f(r.get('decode_density'), '.3f')} | " if decode else "")
                     + f"{r['ruler']:.1f} ({_f(r.get('ruler_dense'), '.1f')}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def layer_recall_table(rows: list[dict]) -> str:
    """Recall of the true attention mass per layer (columns) of each row that measured it: where a selection loses,
    layer by layer (an oracle row beside shows what the same budget can keep); empty when no row has it."""
    measured = [r for r in rows if r.get("recall_by_layer")]
    if not measured:
        return ""
    layers = max(len(r["recall_by_layer"]) for r in measured)
    lines = ["| N | text | scorer + budget | achieved density | mean | " + " | ".join(map(str, range(layers))) + " |",
             "|" + "---|" * (5 + layers)]
    for r in sorted(measured, key=lambda r: (r["seq_len"], r.get("text") or "", line_label(r))):
        cells = [f"{x:.2f}" for x in r["recall_by_layer"]] + ["-"] * (layers - len(r["recall_by_layer"]))
        lines.append(f"| {r['seq_len']} | {r.get('text') or '-'} | {line_label(r)} | {_f(r['density'], '.3f')} | "
                     f"{_f(r.get('recall'), '.3f')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_at(rows: list[dict], density: float, tolerance: float = 0.02) -> list[str]:
    """Sentences naming, per length, the selection with the lowest perplexity, the best passkey accuracy and the best
    RULER mean among rows whose achieved density is within ``tolerance`` of ``density``, and by how much it beats the
    next scorer."""
    out = []
    for n in sorted({r["seq_len"] for r in rows}):
        near = [r for r in rows if r["seq_len"] == n and r["density"] is not None
                and abs(r["density"] - density) <= tolerance and r.get("ppl") is not None]
        if not near:
            out.append(f"- N={n}, density {density}: no run reached it within {tolerance}.")
            continue
        by_ppl = sorted(near, key=lambda r: r["ppl"])
        best = by_ppl[0]
        other = next((r for r in by_ppl[1:] if r["selector"] != best["selector"]), None)
        text = (f"- N={n}, density {density} (+-{tolerance}): lowest perplexity **{line_label(best)}** "
                f"({_f(best.get('ppl_increase'), '+.1%')} over dense at density {best['density']:.3f})")
        if other is not None:
            text += (f"; the best other scorer, {line_label(other)}, is at {_f(other.get('ppl_increase'), '+.1%')} "
                     f"(density {other['density']:.3f})")
        keyed = [r for r in near if r.get("passkey") is not None]
        if keyed:
            top = max(keyed, key=lambda r: (r["passkey"], -r["ppl"]))
            text += (f". Passkey: best {line_label(top)} at {top['passkey']:.2f} (dense "
                     f"{_f(top.get('passkey_dense'), '.2f')})")
        scored = [r for r in near if r.get("ruler") is not None]
        if scored:
            top = max(scored, key=lambda r: (r["ruler"], -r["ppl"]))
            text += f". RULER: best {line_label(top)} at {top['ruler']:.1f} (dense {_f(top.get('ruler_dense'), '.1f')})"
        out.append(text + ".")
    return out


def plots(rows: list[dict], out_dir: Path, seq_len: int | None = None) -> list[Path]:
    """PNG plots of the measures against achieved density at ``seq_len`` (default: the longest), one line per scorer
    + budget, dense as a dashed line where it has a value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = seq_len or max(r["seq_len"] for r in rows)
    mine = [r for r in rows if r["seq_len"] == n]
    lines: dict[str, list[dict]] = defaultdict(list)
    for r in mine:
        lines[line_label(r)].append(r)
    written = []
    for key, title, scale in PLOTS:
        percent = scale == "percent"
        if not any(r.get(key) is not None for r in mine):
            continue
        fig, ax = plt.subplots(figsize=(11, 4.5))
        for label, group in sorted(lines.items()):
            pts = sorted((r["density"], r[key]) for r in group if r.get(key) is not None and r["density"] is not None)
            if pts:
                ax.plot([p[0] for p in pts], [100 * p[1] if percent else p[1] for p in pts], marker="o", label=label)
        dense_key = {"passkey": "passkey_dense", "ruler": "ruler_dense"}.get(key)
        if dense_key and mine[0].get(dense_key) is not None:
            ax.axhline(mine[0][dense_key], color="black", linestyle="--", label="dense")
        ax.set_xlabel("achieved density (kept share of causal blocks)")
        ax.set_ylabel(title + (" (%)" if percent else ""))
        values = [100 * r[key] if percent else r[key] for r in mine if r.get(key) is not None]
        _set_y_axis(ax, values, percent, 1.0 if percent else scale)
        ax.set_title(f"{title}, {n} tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: long labels
        fig.tight_layout()
        path = out_dir / f"{key}_vs_density_{n}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def y_limits(values: list[float], percent: bool, full: float = 1.0) -> tuple[float, float] | None:
    """The y range of a plot of ``values`` on a ``0 .. full`` scale (shares: 1, RULER scores: 100): at least a tenth
    of the scale wide and never above ``full`` (so a 0.004 spread is not drawn as a cliff); percentages as they
    come."""
    if not values or percent:
        return None
    low, high = min(values), max(values)
    pad = max(0.1 * full - (high - low), 0.0) / 2 + 0.02 * full
    top = min(1.02 * full, high + pad)
    return max(0.0, min(low - pad, top - 0.1 * full)), top


def _set_y_axis(ax, values: list[float], percent: bool, full: float = 1.0) -> None:
    """Linear axes with several labelled ticks (on a ``0 .. full`` scale); a log-like axis only for percentages
    spanning orders of magnitude."""
    from matplotlib.ticker import MaxNLocator

    limits = y_limits(values, percent, full)
    if limits is not None:
        ax.set_ylim(*limits)
    positive = [abs(v) for v in values if v]
    if percent and positive and max(positive) / min(positive) > 100:
        ax.set_yscale("symlog", linthresh=min(positive))
    else:
        ax.yaxis.set_major_locator(MaxNLocator(nbins=6))


def build_report(folder: str | Path, out: str | Path | None = None, seq_len: int | None = None,
                 densities: tuple[float, ...] | None = None, rows: list[dict] | None = None) -> tuple[Path, list[Path]]:
    """Writes the markdown report and the plots (a "best at" summary for each of ``densities``, default the targets
    the rows were run at) of the rows under ``folder`` (or of ``rows``, read elsewhere); returns their paths."""
    rows = read_rows(folder) if rows is None else rows
    densities = target_densities(rows) if densities is None else densities
    out = Path(out) if out else Path(folder) / "report.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    images = plots(rows, out.parent, seq_len)
    text = ["# Block selection quality", "", f"{len(rows)} rows from {folder}.", ""]
    for d in densities:
        text += best_at(rows, d)
    text += ["", table(rows), ""]
    if ruler_table(rows):
        text += ["RULER scores (0-100) by task, dense in brackets:", "", ruler_table(rows), ""]
    if layer_recall_table(rows):
        text += ["Recall of the attention mass by layer:", "", layer_recall_table(rows), ""]
    text += [f"![{p.stem}]({p.name})" for p in images]
    out.write_text("\n".join(text) + "\n")
    return out, images


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--out", default=None, help="markdown file (default FOLDER/report.md); plots go beside it")
    ap.add_argument("--seq-len", type=int, default=None, help="the length the plots show (default: the longest)")
    ap.add_argument("--wandb", action="store_true", help="also log the table and plots to a W&B run")
    args = ap.parse_args(argv)
    try:
        out, images = build_report(args.folder, args.out, args.seq_len)
    except ConfigError as exc:
        sys.exit(f"{type(exc).__name__}: {exc}")
    print(f"wrote {out} and {len(images)} plots")
    if args.wandb:
        import wandb

        from seer.tracking import new_run_id, start_wandb_run

        rows = read_rows(args.folder)
        run_id = new_run_id()
        run = start_wandb_run(project="seer", save_dir=str(out.parent), job_type="report", run_id=run_id,
                              name=f"report-{Path(args.folder).name}-{run_id}", config={"report.folder": args.folder})
        keys = [k for k in rows[0] if k != "recall_by_layer"]
        run.log({"report/rows": wandb.Table(columns=keys, data=[[r.get(k) for k in keys] for r in rows]),
                 **{f"report/{p.stem}": wandb.Image(str(p)) for p in images}})
        run.finish()


if __name__ == "__main__":
    main()
