"""experiments/bench_token_gate.py on a machine without a GPU: ``--help`` and its argument parsing work, and the whole
run (check, timed rows, table) goes through on the CPU under the Triton interpreter with the timing faked and the
kernel dispatch forced."""

from __future__ import annotations

import pytest

from seer.gates import AttnGate
from tests.kernels.scripts import run_experiment


@pytest.fixture
def bench(experiment):
    return experiment("bench_token_gate")


def test_help_runs():
    res = run_experiment("bench_token_gate.py", "--help")
    assert res.returncode == 0, res.stderr
    assert "--ns" in res.stdout and "--gate-dtype" in res.stdout


def test_defaults_are_the_qwen_layer(bench):
    args = bench.parse_args([])
    assert args.ns == [8192, 32768] and (args.heads, args.kv_heads, args.dim, args.hidden) == (14, 2, 64, 128)
    assert args.block_size == 64 and args.layers == 24 and args.dtype == "bfloat16" and args.gate_dtype == "float32"
    assert bench.parse_args(["--ns", "100, 200"]).ns == [100, 200]
    with pytest.raises(SystemExit):
        bench.parse_args(["--ns", "0"])


def test_end_to_end_on_the_cpu(bench, monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "DEV", "cpu")
    monkeypatch.setattr(bench, "env_info", lambda: {"device": "cpu"})
    monkeypatch.setattr(bench, "median_ms", lambda fn, rep_ms, min_runs: (fn(), (1.25, 5))[1])
    monkeypatch.setattr(AttnGate, "_use_token_kernel", lambda self, q, kg, grad: self.token_kernel and not grad)
    out = tmp_path / "bench.md"
    bench.main(["--ns", "70,128", "--heads", "4", "--kv-heads", "2", "--dim", "16", "--hidden", "32",
                "--block-size", "16", "--dtype", "float32", "--out", str(out)])
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| 70 ")
            or line.startswith("| 128 ")]
    assert [r[1] for r in rows[:5]] == ["pooled", "token pytorch", "token kernel", "kernel only",
                                        "kernel only (tf32)"] and len(rows) == 10
    assert all(r[2] == "1.250" and r[3] == "30.00" for r in rows)
    assert float(rows[2][5].rstrip(" |")) < 1e-4  # the kernel path matched the PyTorch path
