"""experiments/bench_rerank.py on the CPU (Triton interpreter, float16: the interpreter's bfloat16 dots are wrong): its
random candidates have the promised layouts, and every configuration is checked against the reference and tabled."""

import sys

import pytest
import torch

from experiments import bench_rerank as bench


def test_candidates_are_block_causal_with_the_diagonal_and_shared_within_a_group():
    gen = torch.Generator().manual_seed(0)
    shared = bench.candidates(1, 6, 2, 9, 0.4, "shared", gen)
    own = bench.candidates(1, 6, 2, 9, 0.4, "independent", gen)
    for cand in (shared, own):
        assert cand.shape == (1, 6, 9, 9) and cand.dtype == torch.bool
        assert cand.diagonal(dim1=-2, dim2=-1).all() and not cand.triu(1).any()
    assert torch.equal(shared[:, 0], shared[:, 2]) and torch.equal(shared[:, 3], shared[:, 5])
    assert not torch.equal(own[:, 0], own[:, 1])
    columns = bench.candidates(1, 6, 2, 9, 0.4, "columns", gen)
    assert not columns.triu(1).any() and columns.diagonal(dim1=-2, dim2=-1).all()
    assert torch.equal(columns[:, 0], columns[:, 2])
    off_diagonal = columns & ~torch.eye(9, dtype=torch.bool)
    # the same key blocks for every query block, up to its own
    assert torch.equal(off_diagonal[0, 0, 8, :7].expand(7, 7).tril(-1), off_diagonal[0, 0, :7, :7])


def test_every_configuration_is_checked_and_tabled(monkeypatch, tmp_path):
    out = tmp_path / "rerank.md"
    monkeypatch.setattr(sys, "argv", [
        "bench_rerank.py", "--n", "96", "--hq", "4", "--hkv", "2", "--d", "16", "--block", "16", "--rows", "4", "8",
        "--share", "0.5", "--check-n", "70", "--reps", "1", "--warmup", "0", "--dtype", "fp16", "--layouts", "shared",
        "columns", "--blocks-per-program", "1", "2", "--out", str(out)])
    bench.main()
    lines = out.read_text().splitlines()
    rows = [line.split(" | ") for line in lines if line.startswith("| 4 ") or line.startswith("| 8 ")]
    # rows x layouts x kernels (1:2 one head per program and two passes; 0:2 the kernel's choice, both heads of a
    # group in 2 x 4 or 2 x 8 rows, two passes; 0:1 the same in one pass) x query blocks a program (16 rows each)
    kernels = [("1", "2"), ("2", "2"), ("2", "1")]
    assert [(r[0], r[2], r[3], r[4], r[5], r[6]) for r in rows] == [
        (f"| {rows_}", layout, heads, str(blocks), str(16 * blocks), passes) for rows_ in (4, 8)
        for layout in ("shared", "columns") for heads, passes in kernels for blocks in (1, 2)]
    assert all(r[7] == "default" for r in rows)
    assert all(float(r[-3]) < 1e-3 for r in rows)  # the check's max abs error
    assert all(r[-2:] == ["None", "None |"] for r in rows)  # no registers to report under the interpreter
    assert lines[0].startswith("Device: CPU")


def test_launch_settings_are_parsed_and_bad_ones_named():
    base = {"num_warps": 4, "num_stages": None, "heaviest_first": True, "block_n": None}
    assert bench.launch_settings("default") == base
    assert bench.launch_settings("w8s3") == {**base, "num_warps": 8, "num_stages": 3}
    assert bench.launch_settings("s2") == {**base, "num_stages": 2}
    assert bench.launch_settings("a") == {**base, "heaviest_first": False}
    assert bench.launch_settings("w8a") == {**base, "num_warps": 8, "heaviest_first": False}
    assert bench.launch_settings("n32a") == {**base, "block_n": 32, "heaviest_first": False}
    for bad in ("w", "x4", "w4e16", "aw4", "la", "n8", "p", "h", ""):
        with pytest.raises(ValueError, match=f"--launch {bad!r}"):
            bench.launch_settings(bad)
