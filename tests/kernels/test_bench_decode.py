"""experiments/bench_decode.py --variants on the CPU (Triton interpreter): every variant is checked against the
reference and lands in the table. float32 inputs (the interpreter's bfloat16 dots are wrong), a stand-in timer."""

import torch

from experiments import bench_decode as bench


def _inputs(b, n, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(b, h, m, bench.D, generator=g) for h, m in ((bench.HQ, t), (bench.HKV, n), (bench.HKV, n))]
    return *qkv, torch.full((b,), n, dtype=torch.int32)


def test_variants_are_checked_and_tabled(monkeypatch):
    monkeypatch.setattr(bench, "DEV", "cpu")
    monkeypatch.setattr(bench, "inputs", _inputs)
    monkeypatch.setitem(bench.TIMER, "timer", lambda fn: (fn(), 0.01)[1])
    monkeypatch.setattr(bench, "sdpa_ms", lambda q, k, v: 0.1)
    args = bench.argparse.Namespace(batch=[2], kv=[130], budget=[64], t=1, splits=[2])
    rows = bench.variants(args)
    assert len(rows) == 1 and rows[0]["splits"] == 2 and rows[0]["dense"] == 0.01
    info = dict(device="cpu", torch="-", triton="-", cuda="-", python="-", date="-")
    table = bench.variants_report(rows, info, args, "cmd").splitlines()
    assert table[-3].endswith("| current | unique | compacted | unique s3 |")
    assert table[-1] == "| 2 | 0k | 64 | 0.4923 | 2 | 0.1000 | 0.0100 | 0.0100 | " + " | ".join(
        ["0.0100 (1.00x)"] * 4) + " |"
