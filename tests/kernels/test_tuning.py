"""Launch-config tables (seer/kernels/tuning.py): when candidates are timed, what is remembered, forced configs.

The choice logic runs on a made-up table with CUDA behaviour simulated (the interpreter switch off, timings
from a dict), so it is checked here without a GPU; forced configs run the real kernels in the interpreter.
"""

from __future__ import annotations

import pytest
import torch

from seer.kernels import tuning
from seer.kernels.flash_gt import flash_attn_with_gt
from seer.kernels.tuning import LaunchTable, chosen_configs, force_config, kernel_names, last_launch


@pytest.fixture
def cuda_like(monkeypatch):
    """A fresh table registry, tables that behave as on CUDA, and fake timings: ``times[name]`` ms per config."""
    monkeypatch.setattr(tuning, "_TABLES", dict(tuning._TABLES))
    monkeypatch.setattr(tuning, "INTERPRET", False)
    monkeypatch.setattr(tuning, "_AUTOTUNE", True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    timed = []

    def fake_median_ms(fn, rep_ms=100.0, min_runs=1, warmup_ms=25.0):
        name = fn()
        timed.append(name)
        if TIMES[name] is None:
            raise RuntimeError("out of resources")
        return TIMES[name], 10
    monkeypatch.setattr(tuning, "median_ms", fake_median_ms)
    return timed


TIMES = {"a": 3.0, "b": 1.0, "c": 2.0, "broken": None}


def _table(candidates=("a", "b", "c"), name="test.kernel"):
    """Candidates named ``candidates``; a config is invalid for a key that names it."""
    return LaunchTable(name, ("name", "num_warps"), lambda key: [dict(name=n, num_warps=4) for n in candidates],
                       lambda key: dict(name="interpreter", num_warps=1),
                       lambda config, key: "too big" if config["name"] == key[0] else None)


def _run(config):
    return config["name"]


def test_times_each_key_once_and_keeps_the_fastest(cuda_like):
    table = _table()
    assert table.launch(("x",), _run) == "b"
    assert cuda_like == ["a", "b", "c"] * 2  # two rounds over the candidates
    assert table.launch(("x",), _run) == "b" and len(cuda_like) == 6  # remembered: no timing
    assert table.launch(("y",), _run) == "b" and len(cuda_like) == 12  # a new key is timed
    assert chosen_configs()["test.kernel"] == {("x",): dict(name="b", num_warps=4),
                                               ("y",): dict(name="b", num_warps=4)}


def test_invalid_candidates_are_dropped(cuda_like):
    table = _table()
    assert table.launch(("b",), _run) == "c"  # "b" is invalid for this key
    assert "b" not in cuda_like


def test_one_candidate_or_autotune_off_takes_the_default(cuda_like):
    assert _table(("c",)).launch(("x",), _run) == "c"
    assert cuda_like == []
    tuning.set_autotune(False)  # undone by the fixture
    assert _table(name="test.other").launch(("x",), _run) == "a" and cuda_like == []


def test_no_timing_during_cuda_graph_capture(cuda_like, monkeypatch):
    table = _table()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert table.launch(("x",), _run) == "a" and cuda_like == []
    assert ("x",) not in table.chosen  # not remembered: the first call after the capture tunes the key
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert table.launch(("x",), _run) == "b" and len(cuda_like) == 6


def test_candidates_that_fail_are_skipped(cuda_like):
    assert _table(("broken", "c")).launch(("x",), _run) == "c"
    with pytest.raises(RuntimeError, match="no launch configuration of test.other compiled for key"):
        _table(("broken",) * 2, name="test.other").launch(("x",), _run)


def test_the_interpreter_has_one_config(cuda_like, monkeypatch):
    monkeypatch.setattr(tuning, "INTERPRET", True)
    assert _table().launch(("x",), _run) == "interpreter" and cuda_like == []


def test_force_config_merges_over_the_default_and_restores(cuda_like):
    table = _table()
    with force_config("test.kernel", num_warps=8):
        assert table.config(("x",), _run) == dict(name="a", num_warps=8)
        with force_config("test.kernel", name="c"):
            assert table.config(("x",), _run) == dict(name="c", num_warps=4)
        assert table.config(("x",), _run) == dict(name="a", num_warps=8)
        with force_config("test.kernel", name="x"), pytest.raises(ValueError, match="config .* is invalid: too big"):
            table.config(("x",), _run)
    assert cuda_like == [] and table.chosen == {}
    assert table.launch(("x",), _run) == "b"  # tuned again once nothing is forced


def test_force_config_refuses_unknown_kernels_and_entries():
    assert {"flash_gt.dense", "flash_gt.fast", "flash_gt.pass2", "block_sparse", "block_sparse_bwd.dkdv",
            "block_sparse_bwd.dq"} <= set(kernel_names())
    with pytest.raises(ValueError, match=r"no tuned kernel named 'flash'; kernels: \["):
        with force_config("flash", BLOCK_M=64):
            pass
    with pytest.raises(ValueError, match=r"flash_gt.pass2 configs have no entry \['BLOCK_N'\]"):
        with force_config("flash_gt.pass2", BLOCK_N=64):
            pass


def test_forced_config_is_what_the_kernel_launches_with():
    q = torch.randn(1, 2, 40, 16)
    with force_config("flash_gt.fast", BLOCK_M=64, BLOCK_N=16, EPI=0):
        flash_attn_with_gt(q, q, q, 16, mode="fast")
    assert last_launch("flash_gt.fast") == {
        "config": dict(BLOCK_M=64, BLOCK_N=16, num_warps=4, num_stages=1, EPI=0, JC=16), "n_regs": None,
        "n_spills": None}
    flash_attn_with_gt(q, q, q, 16, mode="fast")
    assert last_launch("flash_gt.fast")["config"] == dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1, EPI=1,
                                                          JC=16)
    with pytest.raises(ValueError, match="no tuned kernel named 'nope'"):
        last_launch("nope")


def test_median_ms_adds_runs_until_min_runs(monkeypatch):
    calls = []

    def fake_do_bench(fn, warmup, rep, return_mode):
        calls.append(rep)
        assert return_mode == "all"
        return [10.0] if len(calls) == 1 else [12.0] * int(rep // 10.0)
    monkeypatch.setattr(tuning.triton.testing, "do_bench", fake_do_bench)
    ms, runs = tuning.median_ms(lambda: None, rep_ms=5, min_runs=4)
    assert calls == [5, 30.0] and runs == 4 and ms == 12.0


@pytest.mark.gpu
def test_gpu_tunes_once_per_key_and_never_during_graph_capture(monkeypatch):
    """An untuned key met inside a CUDA-graph capture runs its default untimed and stays untuned; the graph
    replays correctly; the next eager call times the candidates, the one after does not."""
    timed = []
    real = tuning.median_ms
    monkeypatch.setattr(tuning, "median_ms", lambda fn, **kw: timed.append(1) or real(fn, **kw))
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 4, 3000, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    key = (64, 32, torch.bfloat16, 4096)
    table = tuning._TABLES["flash_gt.fast"]
    monkeypatch.setattr(table, "chosen", {})
    assert len(table.candidates(key)) > 1
    with force_config("flash_gt.fast"):  # compiles the default outside the capture
        want = flash_attn_with_gt(q, k, v, 32, mode="fast")
    out, lse, gt = torch.empty_like(q), torch.empty(1, 4, 3000, device="cuda"), torch.empty(1, 4, 94, 94,
                                                                                           device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        flash_attn_with_gt(q, k, v, 32, mode="fast", out=out, lse=lse, gt=gt)
    assert timed == [] and key not in table.chosen
    graph.replay()
    torch.cuda.synchronize()
    for got, ref in zip((out, lse, gt), want):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    flash_attn_with_gt(q, k, v, 32, mode="fast")
    assert timed and key in table.chosen and table.chosen[key] in table.candidates(key)
    n_timed = len(timed)
    flash_attn_with_gt(q, k, v, 32, mode="fast")
    assert len(timed) == n_timed
