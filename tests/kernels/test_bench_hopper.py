"""experiments/bench_hopper.py on a machine without a GPU: it imports, ``--help`` works, and its variants are configs
the block-sparse launch table accepts."""

from __future__ import annotations

from seer.kernels import block_sparse as bs
from seer.kernels.common import tiles_invalid
from tests.kernels.scripts import run_experiment


def test_help_runs():
    res = run_experiment("bench_hopper.py", "--help")
    assert res.returncode == 0, res.stderr
    assert "--compile-only" in res.stdout and "--budget-s" in res.stdout


def test_variants_are_valid_configs(experiment):
    bench_hopper = experiment("bench_hopper")
    variants = bench_hopper.variants()
    assert len(variants) == 21 and len({bench_hopper.name(lay, c) for lay, c in variants if c}) == 19
    for layout, config in variants:
        assert layout in ("row", "pair")
        if config is not None:
            assert set(config) == set(bs.FIELDS) and tiles_invalid(config, (128, 64, layout == "pair")) is None
