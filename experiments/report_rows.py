"""``python -m seer.report`` over the rows files of quality studies (``rows.json`` of ``quality_qwen.py`` /
``quality_smollm2.py``, several runs at once), one report and one set of plots per evaluated text.

The studies write every text's rows into one file (a ``text`` field: ``novel``, ``code``); ``seer.report`` reads the
``metrics.json`` of ``seer.eval`` run folders. This hands each text's rows (those ``--drop`` does not name by
selector label) to :func:`seer.report.build_report`, which writes ``OUT/<text>/report.md`` and its plots, so the
plots of perplexity, recall, passkey and RULER against achieved density join runs made at different densities.

    python -m experiments.report_rows docs/results/qwen/rows_final005_block.json \\
        docs/results/qwen/rows_final01_block.json docs/results/qwen/rows_r16_block.json \\
        docs/results/qwen/rows_final02_block.json --drop gate:base+vertical_slash@0.5+rerank8@0.99 \\
        --out docs/results/qwen/densities_32k
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from seer.report import build_report


def split_by_text(files: list[str], drop: tuple[str, ...] = ()) -> dict[str, list[dict]]:
    """The rows of ``files`` grouped by their ``text`` (``all`` where a row has none), without the selectors
    ``drop`` names; a row that two files hold (the same selector, budget, text and length) is kept once."""
    by_text: dict[str, list[dict]] = defaultdict(list)
    seen = set()
    for file in files:
        for row in json.loads(Path(file).read_text()):
            key = (row.get("text"), row["selector"], row.get("sparsity"), row["seq_len"])
            if row["selector"] in drop or key in seen:
                continue
            seen.add(key)
            by_text[row.get("text") or "all"].append(row)
    return dict(by_text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rows", nargs="+", help="rows.json files of quality studies")
    ap.add_argument("--drop", nargs="*", default=[], help="selector labels to leave out")
    ap.add_argument("--out", required=True, help="folder: OUT/<text>/report.md and its plots")
    args = ap.parse_args(argv)
    for text, rows in split_by_text(args.rows, tuple(args.drop)).items():
        folder = Path(args.out) / text
        report, images = build_report(folder, folder / "report.md", rows=rows)
        print(f"{text}: {len(rows)} rows -> {report} and {len(images)} plots")


if __name__ == "__main__":
    main()
