"""experiments/report_rows.py: quality-study rows files, split by text, through seer.report."""

import json

from experiments import report_rows
from tests.test_report import _row


def _text_row(text, selector, density, ppl):
    return dict(_row(selector, "threshold", density, ppl, 0.8), text=text, sparsity=f"threshold d={density}")


def test_rows_files_become_one_report_per_text(tmp_path):
    low = [_text_row(t, s, 0.05, p) for t in ("novel", "code") for s, p in (("gate", 11.0), ("oracle", 10.5))]
    high = [_text_row(t, s, 0.2, p) for t in ("novel", "code") for s, p in (("gate", 10.2), ("oracle", 10.1))]
    again = [dict(low[0], ppl=99.0)]  # the same run in a second file: kept once, as first read
    dropped = [_text_row("novel", "gate8", 0.1, 10.4)]
    files = []
    for i, rows in enumerate((low, high, again, dropped)):
        files.append(tmp_path / f"rows{i}.json")
        files[-1].write_text(json.dumps(rows))
    by_text = report_rows.split_by_text([str(f) for f in files], drop=("gate8",))
    assert sorted(by_text) == ["code", "novel"] and len(by_text["novel"]) == len(by_text["code"]) == 4
    assert [r["ppl"] for r in by_text["novel"] if r["selector"] == "gate"] == [11.0, 10.2]
    report_rows.main([*map(str, files), "--drop", "gate8", "--out", str(tmp_path / "out")])
    for text in ("novel", "code"):
        report = (tmp_path / "out" / text / "report.md").read_text()
        assert report.count("| 2048 |") == 4 and "gate8" not in report
        assert (tmp_path / "out" / text / "ppl_increase_vs_density_2048.png").read_bytes()[:4] == b"\x89PNG"
