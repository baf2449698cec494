"""experiments/bench_gt.py on a machine without a GPU: ``--help`` and ``--list-variants`` work, the variant list
parses into configs the ground-truth launch tables accept, and ``--variants`` runs end to end on the CPU under the
Triton interpreter (timings faked) with a failing variant reported and not timed."""

from __future__ import annotations

import sys

import pytest
import torch

from seer.kernels import flash_gt
from seer.kernels import flash_gt_kernels as fk
from tests.kernels.scripts import run_experiment

TABLES = {"fast": flash_gt.FAST, "dense": flash_gt.DENSE, "pass2": flash_gt.PASS2}


@pytest.fixture
def bench(experiment):
    return experiment("bench_gt")


def test_help_and_list_variants(bench):
    res = run_experiment("bench_gt.py", "--help")
    assert res.returncode == 0, res.stderr
    assert "--variants" in res.stdout and "--sweep" in res.stdout
    res = run_experiment("bench_gt.py", "--list-variants")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [bench.variant_name(*v) for v in bench.variants()]


def test_variants_parse_into_table_configs(bench):
    every = bench.variants()
    names = [bench.variant_name(*v) for v in every]
    assert len(names) == len(set(names)) == 25
    assert bench.select_variants("all") == every
    assert [bench.variant_name(*v) for v in bench.select_variants("pass2, fast-BM128-BN64-w8-s3-epi0-tma, pass2")] \
        == ["pass2-tuned", "pass2-BM128-w4-s3", "pass2-BM128-w4-s3-tma", "pass2-BM128-w8-s2",
            "pass2-BM128-w8-s2-tma", "fast-BM128-BN64-w8-s3-epi0-tma"]
    with pytest.raises(ValueError, match="unknown variant 'fast-tma'"):
        bench.select_variants("fast-tma")
    key = (128, 64, torch.bfloat16, 32768)
    for kind, config in every:
        table = TABLES[kind]
        assert table.name == bench.TABLES[kind]
        if config is not None:
            assert set(config) <= set(table.fields) and table.invalid(config, key) is None
    # each kind times plain loads and the copy engine over the same configs
    for kind in TABLES:
        configs = [c for k, c in every if k == kind and c is not None]
        assert [c for c in configs if c["USE_TMA"]] == [dict(c, USE_TMA=True) for c in configs if not c["USE_TMA"]]


class _FailWithTma:
    """Stands in for ``_gt_kernel``: a launch with the copy engine raises, the others run."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if kwargs["USE_TMA"]:
                raise RuntimeError("broken copy engine")
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_variants_mode_end_to_end_on_the_cpu(bench, monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "DEV", "cpu")
    monkeypatch.setattr(bench, "DTYPE", torch.float16)  # the interpreter has no bfloat16
    for name, value in (("synchronize", lambda *a: None), ("empty_cache", lambda: None),
                        ("get_device_name", lambda *a: "cpu"), ("get_device_capability", lambda *a: (9, 0))):
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(bench, "median_ms", lambda fn, rep_ms, min_runs: (fn(), (1.5, 3))[1])
    monkeypatch.setattr(fk, "tma_ok", lambda *t: True)
    monkeypatch.setattr(fk, "_gt_kernel", _FailWithTma(fk._gt_kernel))
    out = tmp_path / "variants.md"
    monkeypatch.setattr(sys, "argv", ["bench_gt.py", "--variants", "fast-BM128-BN64-w8-s3-epi0-tma,dense-tuned,pass2",
                                      "--check-n", "100", "--variant-ns", "128", "--heads", "2", "--dim", "16",
                                      "--block-size", "16", "--out", str(out)])
    bench.main()
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in out.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| variant")}
    assert rows["fast-BM128-BN64-w8-s3-epi0-tma"][1].startswith("out ")
    assert rows["fast-BM128-BN64-w8-s3-epi0-tma"][2] == "1.500"
    assert "picked dense-BM32-BN16-w4-s1" in rows["dense-tuned"][-1]
    for name in ("pass2-BM128-w4-s3-tma", "pass2-BM128-w8-s2-tma"):
        assert rows[name][1].startswith("FAILED: RuntimeError: broken copy engine") and rows[name][2] == "-"
    assert rows["pass2-BM128-w4-s3"][1].startswith("gt ") and rows["pass2-BM128-w4-s3"][2] == "1.500"
    assert "SDPA flash" in rows
