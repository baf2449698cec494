"""experiments/bench_hopper.py on a machine without a GPU: it imports, ``--help`` works, and its variants are configs
the block-sparse launch table accepts."""

from __future__ import annotations

import pytest

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
    assert len(variants) == 28 and len({bench_hopper.name(lay, c) for lay, c in variants if c}) == 26
    for layout, config in variants:
        assert layout in ("row", "pair")
        if config is not None:
            assert set(config) == set(bs.FIELDS) and tiles_invalid(config, (128, 64, layout == "pair")) is None


def test_only_picks_variants_by_name_and_names_an_unknown_one(experiment):
    bench_hopper = experiment("bench_hopper")
    picked = bench_hopper.variants(["row table default", "pair BN64 w8 s1 tma"])
    assert [bench_hopper.name(*v) for v in picked] == ["row table default", "pair BN64 w8 s1 tma"]
    with pytest.raises(SystemExit, match=r"no variant \['row BN64 w4 s9'\]"):
        bench_hopper.variants(["row BN64 w4 s9"])
