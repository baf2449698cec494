"""The sm_90 compile screens that need no GPU (``experiments/compile_stats.py`` for the block-sparse backward,
``experiments/bench_gt.py --compile-only`` for the ground-truth kernels) still compile today's kernels: each
compiles one Hopper config with Triton's own ``ptxas`` and reports registers, no spills and Hopper tensor-core
instructions. They run in a subprocess without the Triton interpreter (which the other tests turn on)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

from tests.kernels.scripts import ROOT


def _run(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_backward_screen_compiles_a_one_stage_copy_engine_dq():
    res = _run("-c", "import compile_stats as c; print(c.ptxas_stats(c.dq(128, 64, (64, 64, 4, 1, True), 'bf16', "
                     "True)))", cwd=ROOT / "experiments")
    assert res.returncode == 0, res.stderr[-2000:]
    stats = ast.literal_eval(res.stdout.strip().splitlines()[-1])
    assert 0 < stats["regs"] <= 255 and stats["spill"] == 0 and stats["hgmma"] > 0
    assert 0 < stats["smem"] < 98304  # one stage: less shared memory than two


def test_the_ground_truth_screen_compiles_a_variant():
    res = _run("experiments/bench_gt.py", "--compile-only", "fast-BM64-BN64-w4-s1-epi0-tma")
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line.split(" | ") for line in res.stdout.splitlines() if line.startswith("| fast-")]
    assert len(rows) == 1 and rows[0][0] == "| fast-BM64-BN64-w4-s1-epi0-tma"
    regs, spill, smem, hgmma = (int(x.strip(" |")) for x in rows[0][1:])
    assert 0 < regs <= 255 and spill == 0 and smem > 0 and hgmma > 0
