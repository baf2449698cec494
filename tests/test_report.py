"""seer.report turns a sweep folder into a table, a best-at-density summary and plots."""

import json

import pytest

from seer.checks import ConfigError
from seer.evaluation.harness import ROW_KEYS
from seer.report import best_at, build_report, layer_recall_table, main, read_rows


def _row(selector, method, density, ppl, passkey, n=2048, allocation=None):
    row = {k: None for k in ROW_KEYS}
    row.update(selector=selector, method=method, allocation=allocation, sparsity=method, target_density=density,
               density=density + 0.003, seq_len=n, ppl=ppl, ppl_dense=10.0, ppl_increase=ppl / 10.0 - 1,
               recall=0.9 - (ppl - 10) / 10, oracle_recall=0.95, passkey=passkey, passkey_dense=0.8)
    return row


def test_report_from_a_sweep_folder(tmp_path):
    grid = {("gate", "threshold"): (10.4, 10.2), ("oracle", "threshold"): (10.3, 10.1),
            ("streaming", "topk"): (13.0, 11.5)}
    for i, ((selector, method), (p10, p20)) in enumerate(grid.items()):
        for j, (d, p) in enumerate(((0.1, p10), (0.2, p20))):
            job = tmp_path / f"{i}{j}"
            job.mkdir()
            pk = 0.8 if selector != "streaming" else 0.0
            (job / "metrics.json").write_text(json.dumps([_row(selector, method, d, p, pk, allocation="global"
                                                              if method == "threshold" else None)]))
    rows = read_rows(tmp_path)
    assert len(rows) == 6
    best = best_at(rows, 0.1)
    assert len(best) == 1 and "lowest perplexity **oracle + threshold (global)** (+3.0%" in best[0]
    assert "the best other scorer, gate + threshold (global), is at +4.0%" in best[0]
    main([str(tmp_path)])
    report = (tmp_path / "report.md").read_text()
    assert report.count("| 2048 |") == 6 and "streaming + topk" in report
    for key in ("ppl_increase", "recall", "passkey"):
        png = tmp_path / f"{key}_vs_density_2048.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({png.name})" in report


def test_report_needs_metrics(tmp_path):
    with pytest.raises(ConfigError, match="no metrics.json"):
        build_report(tmp_path)


def test_report_shows_ruler(tmp_path):
    for i, (selector, density, score) in enumerate((("gate", 0.1, 40.0), ("oracle", 0.1, 70.0), ("gate", 0.2, 60.0))):
        row = _row(selector, "threshold", density, 10.5, 0.5)
        row.update({"ruler": score, "ruler_dense": 80.0, "ruler_density": density + 0.01, "ruler/vt": score - 10,
                    "ruler/vt_dense": 75.0, "ruler/niah_single_1": score + 10, "ruler/niah_single_1_dense": 85.0})
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "metrics.json").write_text(json.dumps([row]))
    out, images = build_report(tmp_path)
    report = out.read_text()
    assert "| copy acc (dense) | RULER (dense) |" in report
    assert "| 2048 | oracle + threshold | 0.110 | 70.0 (80.0) | 80.0 (85.0) | 60.0 (75.0) |" in report
    assert ("| N | scorer + budget | achieved density (RULER prompts) | RULER mean (dense) | niah_single_1 | vt |"
            in report)
    assert " 40.0 (80.0) |" in report  # the RULER column of the main table
    assert "RULER: best oracle + threshold at 70.0 (dense 80.0)." in best_at(read_rows(tmp_path), 0.1)[0]
    png = tmp_path / "ruler_vs_density_2048.png"
    assert png in images and png.read_bytes()[:4] == b"\x89PNG"


def test_report_names_the_decode_budget(tmp_path):
    """Rows answered through decode gates are lines of their own, their decode density in the RULER table."""
    for i, decode in enumerate((None, "token_budget=2048")):
        row = _row("gate", "threshold", 0.1, 10.5, 0.5)
        row.update(ruler=50.0 - 10 * i, ruler_dense=80.0, ruler_density=0.11, decode=decode,
                   decode_density=0.25 if decode else None)
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "metrics.json").write_text(json.dumps([row]))
    report = build_report(tmp_path)[0].read_text()
    assert "| N | scorer + budget | achieved density (RULER prompts) | decode density | RULER mean (dense) |" in report
    assert "| 2048 | gate + threshold | 0.110 | - | 50.0 (80.0) |" in report
    assert "| 2048 | gate + threshold + decode token_budget=2048 | 0.110 | 0.250 | 40.0 (80.0) |" in report


def test_bad_folders_and_damaged_metrics_are_one_line_naming_the_file(tmp_path, capsys):
    with pytest.raises(SystemExit, match=f"ConfigError: no metrics.json under {tmp_path}"):
        main([str(tmp_path)])
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "metrics.json").write_text('{"ppl": ')
    with pytest.raises(SystemExit, match=f"ConfigError: {tmp_path / '0' / 'metrics.json'}: not a metrics.json of "
                                         f"seer.eval"):
        main([str(tmp_path)])


def test_best_at_lines_follow_the_swept_targets(tmp_path):
    for i, (selector, ppl) in enumerate((("gate", 10.5), ("streaming", 12.0))):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "metrics.json").write_text(json.dumps([_row(selector, "topk", 0.3, ppl, 0.5)]))
    report = build_report(tmp_path)[0].read_text()
    assert "- N=2048, density 0.3 (+-0.02): lowest perplexity **gate + topk** (+5.0%" in report
    assert "no run reached" not in report and "density 0.1" not in report


def test_plot_axes_show_several_ticks_and_no_zoomed_in_spread():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from seer.report import _set_y_axis, y_limits

    low, high = y_limits([0.951, 0.953, 0.955], percent=False)
    assert high - low >= 0.1 and low <= 0.951 and 0.955 <= high <= 1.02
    low, high = y_limits([42.9, 56.5], percent=False, full=100.0)  # RULER scores: their own 0-100 scale
    assert low <= 42.9 and 56.5 <= high <= 102 and high - low >= 10
    fig, ax = plt.subplots()
    ax.plot([0.1, 0.2, 0.3], [15.0, 8.0, 3.0])
    _set_y_axis(ax, [15.0, 8.0, 3.0], percent=True)
    fig.canvas.draw()
    labelled = [t for t in ax.get_yticklabels() if t.get_text() and ax.get_ylim()[0] <= t.get_position()[1]
                <= ax.get_ylim()[1]]
    assert len(labelled) >= 3
    plt.close(fig)


def test_report_shows_recall_by_layer(tmp_path):
    for i, (selector, layers) in enumerate((("gate", [0.77, 0.9, 0.95]), ("oracle", [0.97, 0.92, 0.96]))):
        row = _row(selector, "threshold", 0.1, 10.5, 0.5)
        row.update(recall_by_layer=layers, recall=sum(layers) / 3, text="novel")
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "metrics.json").write_text(json.dumps([row]))
    report = build_report(tmp_path)[0].read_text()
    assert "| N | text | scorer + budget | achieved density | mean | 0 | 1 | 2 |" in report
    assert "| 2048 | novel | gate + threshold | 0.103 | 0.873 | 0.77 | 0.90 | 0.95 |" in report
    assert "| 2048 | novel | oracle + threshold | 0.103 | 0.950 | 0.97 | 0.92 | 0.96 |" in report
    assert layer_recall_table([_row("gate", "threshold", 0.1, 10.5, 0.5)]) == ""  # nothing measured by layer
