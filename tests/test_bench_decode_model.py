"""experiments/bench_decode_model.py, a GPU benchmark not run yet: its memory estimate and arguments, and one case on
a tiny random model on the CPU (PyTorch reference kernel): dense and sparse decode run over the same rewound cache;
the gate-free `kernel dense` baseline of --graph gives dense attention's logits."""

import math

import pytest
import torch

from experiments import bench_decode_model as bench
from seer.config import compose, validate

GIB = 2**30


def test_memory_estimate_of_the_8b_shape():
    arch = validate(compose(["model=llama3_8b", "model.random_init=true"])).model.architecture
    assert bench.kv_cache_bytes(32, 8, 8, 32768, 128) == 32 * GIB
    assert bench.kv_cache_bytes(32, 8, 8, 131072, 128) == 128 * GIB
    assert bench.weight_bytes(arch, 32) == 2 * 8_030_261_248  # Llama-3.1-8B's parameter count
    assert bench.estimate_bytes(arch, 32, 8, 131072) > 130 * GIB > bench.estimate_bytes(arch, 32, 8, 32768)
    assert bench.estimate_bytes(arch, 32, 1, 131072) < bench.estimate_bytes(arch, 32, 1, 131072, chunk=0) + 1
    assert bench.estimate_bytes(arch, 32, 1, 131072, chunk=8192) < bench.estimate_bytes(arch, 32, 1, 131072)


def test_arguments():
    args = bench.parse_args([])
    assert (args.prompts, args.batch, args.steps, args.budget, args.layers) == ([32768, 131072], [1, 8], 32, 2048,
                                                                               None)
    assert bench.parse_args(["--layers", "4", "--cache", "dynamic"]).layers == 4
    for bad in (["--steps", "0"], ["--layers", "0"], ["--budget", "0"], ["--prompts", "1"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


@pytest.mark.parametrize("cache, chunk", [("reserved", "0"), ("dynamic", "40")])
def test_one_case_on_the_cpu(cache, chunk):
    mcfg = bench.model_config("tiny_llama", layers=3, dtype="float32")
    model = bench.build_model(mcfg, "cpu", block_size=16)
    args = bench.parse_args(["--steps", "3", "--warmup", "1", "--check-steps", "2", "--budget", "32", "--tol",
                             "1e-4", "--cache", cache, "--prefill-chunk", chunk])
    row = bench.bench_case(model, 2, 100, args, "cpu", kernel="reference")
    assert row["check_ok"] and row["check_err"] < 1e-4 and row["speedup"] > 0 and math.isnan(row["peak_gib"])
    assert 0.2 < row["density"] < 0.6  # 2 of 7 blocks, one of them forced
    assert model.seer_decode.sparsity is None and row["key_cache_mib"] > 0
    text = bench.report([row], ["prompt 9, batch 9: too big"], {"device": "cpu", "torch": torch.__version__,
                        "triton": "-", "cuda": "-", "transformers": "-", "python": "-", "date": "-"}, args, 3, "cmd")
    assert "| 0k | 2 |" in text and "Skipped: prompt 9" in text


@pytest.mark.parametrize("chunk", ["0", "40"])
def test_one_graph_case_on_the_cpu(chunk):
    """--graph on the CPU: no CUDA graphs there, so each replay runs the step eagerly, over the same StaticCache and
    static inputs, rewound in place: the checks (graph = eager, sparse over every block and the gate-free kernel
    dense = dense, positions advanced) and the report's columns."""
    mcfg = bench.model_config("tiny_llama", layers=3, dtype="float32")
    model = bench.build_model(mcfg, "cpu", block_size=16)
    args = bench.parse_args(["--graph", "--steps", "3", "--warmup", "1", "--check-steps", "2", "--budget", "32",
                             "--tol", "1e-4", "--prefill-chunk", chunk])
    row = bench.bench_case(model, 2, 100, args, "cpu", kernel="reference")
    assert row["check_ok"] and row["check_err"] < 1e-4 and row["graph_err"] < 1e-6, row
    assert row["kernel_dense_err"] < 1e-5 and row["kernel_dense_ms"] > 0
    assert 0.2 < row["density"] < 0.6 and row["speedup"] > 0
    assert row["speedup_best"] == pytest.approx(min(row["dense_ms"], row["kernel_dense_ms"]) / row["sparse_ms"])
    assert model.seer_decode.sparsity is None and row["key_cache_mib"] > 0
    assert model.config._attn_implementation == "seer"
    text = bench.report([row], [], {"device": "cpu", "torch": torch.__version__, "triton": "-", "cuda": "-",
                        "transformers": "-", "python": "-", "date": "-"}, args, 3, "cmd")
    assert "| 0k | 2 |" in text and "kernel@1.0" in text and "CUDA graph" in text
    assert f"| {row['kernel_dense_err']:.1e} |" in text and "kernel dense ms/step" in text


def test_the_kernel_dense_steps_are_dense_attention_without_the_gate(monkeypatch):
    """`kernel dense`: our decode kernel (the PyTorch reference here) over every block of a StaticCache, each row's
    length read on the device from the positions: decode steps give transformers' dense steps' logits, advance the
    cache, read nothing back to the host (CUDA-graph capturable) and never enter the decode gates."""
    from transformers import StaticCache

    from seer.model.decode import DecodeContext

    model = bench.build_model(bench.model_config("tiny_llama", layers=3, dtype="float32"), "cpu", block_size=16)
    ids = torch.randint(3, 300, (2, 46), generator=torch.Generator().manual_seed(5))
    steps = ids[:, 40:].T[:, :, None]  # [6, B, 1]: a token per step
    cache = StaticCache(config=model.config, max_cache_len=64)
    with torch.no_grad():
        bench.prefill(model, cache, ids[:, :40])
        _, want = bench.decode_steps(model, cache, steps, 6, keep=True)
        bench.rewind(cache, 40)
        with bench.kernel_dense(model, cache, "reference"), monkeypatch.context() as patch:
            patch.setattr(DecodeContext, "handle", lambda *args, **kwargs: pytest.fail("a decode gate ran"))
            for name in ("item", "tolist", "cpu", "numpy", "__int__", "__index__", "__float__", "__bool__"):
                patch.setattr(torch.Tensor, name, lambda *args, name=name, **kwargs: pytest.fail(
                    f"torch.Tensor.{name} in a decode step"))
            _, got = bench.decode_steps(model, cache, steps, 6, keep=True)
    assert model.config._attn_implementation == "seer" and int(cache.layers[0].cumulative_length) == 46
    assert bench._rel_err(got, want) < 1e-5
    assert bench._rel_err(got[1:], want[:-1]) > 0.01  # each step's logits are its own


def test_a_kernel_dense_baseline_off_dense_fails_the_check(monkeypatch, capsys):
    """A `kernel dense` step that leaves out its newest key (a row length one short) is off dense: the case's check
    fails and says why."""
    attention = bench.kernel_dense_attention
    monkeypatch.setattr(bench, "kernel_dense_attention", lambda *args, position_ids, **kwargs: attention(
        *args, position_ids=position_ids - 1, **kwargs))
    model = bench.build_model(bench.model_config("tiny_llama", layers=3, dtype="float32"), "cpu", block_size=16)
    args = bench.parse_args(["--graph", "--steps", "2", "--warmup", "1", "--check-steps", "2", "--budget", "32",
                             "--tol", "1e-4"])
    row = bench.bench_case(model, 2, 100, args, "cpu", kernel="reference")
    assert not row["check_ok"] and row["kernel_dense_err"] > 1e-3 and row["check_err"] < 1e-4
    assert "the kernel's dense decode (every block, no gate) against dense" in capsys.readouterr().out


def test_a_graph_case_with_the_compiled_gate_on_the_cpu(monkeypatch, tmp_path):
    """--compile-gate: the sparse runs' per-layer gate and selection through torch.compile (aot_eager here, for
    speed), compiled by the eager steps before any replay; the same checks pass and the report says so. --profile
    profiles the timed replays at the budget, so the compiled step."""
    import torch._dynamo
    import torch._dynamo.testing

    import seer.model.decode as decode

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(decode, "COMPILE_BACKEND", counter)
    monkeypatch.setattr(decode, "_COMPILED", {})
    assert not bench.parse_args([]).compile_gate
    mcfg = bench.model_config("tiny_llama", layers=3, dtype="float32")
    model = bench.build_model(mcfg, "cpu", block_size=16)
    profile = tmp_path / "profile.txt"
    args = bench.parse_args(["--graph", "--compile-gate", "--steps", "3", "--warmup", "1", "--check-steps", "2",
                             "--budget", "32", "--tol", "1e-4", "--profile", str(profile), "--profile-steps", "4"])
    try:
        row = bench.bench_case(model, 2, 100, args, "cpu", kernel="reference")
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == 2  # one graph per budget (every block, --budget), shared by the layers and steps
    assert row["check_ok"] and row["check_err"] < 1e-4 and row["graph_err"] < 1e-6, row
    table = profile.read_text()
    assert table.startswith("4 CUDA-graph replays of the sparse decode step at a budget of 32 tokens (gate and "
                            "selection through torch.compile")
    assert "Torch-Compiled Region" in table
    assert 0.2 < row["density"] < 0.6
    text = bench.report([row], [], {"device": "cpu", "torch": torch.__version__, "triton": "-", "cuda": "-",
                        "transformers": "-", "python": "-", "date": "-"}, args, 3, "cmd")
    assert "torch.compile" in text and "--compile-gate" in text


@pytest.mark.parametrize(("graph", "rerank"), [([], []), (["--graph"], []), (["--graph"], ["--rerank-blocks", "4"]),
                                               (["--graph"], ["--estimate", "moments"])])
def test_quest_alone_cases_on_the_cpu(graph, rerank):
    """--selection quest: no decode gates; sparse decode over every block equals dense, the budget keeps 2 of 7
    blocks, the key bounds are the reported cache; the same with the budget's blocks reranked (in a CUDA graph)."""
    mcfg = bench.model_config("tiny_llama", layers=3, dtype="float32")
    model = bench.build_model(mcfg, "cpu", block_size=16, selection="quest")
    assert not model.seer_decode.gated and not any("seer_decode_gate" in n for n, _ in model.named_parameters())
    args = bench.parse_args([*graph, *rerank, "--selection", "quest", "--steps", "3", "--warmup", "1",
                             "--check-steps", "2", "--budget", "32", "--tol", "1e-4"])
    row = bench.bench_case(model, 2, 100, args, "cpu", kernel="reference")
    assert row["check_ok"] and row["check_err"] < 1e-4, row
    assert 0.2 < row["density"] < 0.6 and row["key_cache_mib"] > 0
    text = bench.report([row], [], {"device": "cpu", "torch": torch.__version__, "triton": "-", "cuda": "-",
                        "transformers": "-", "python": "-", "date": "-"}, args, 3, "cmd")
    assert "the training-free estimate `" in text
    assert ("reranked over its top 4 blocks" in text) == ("--rerank-blocks" in rerank)
    assert ("estimate `moments`" in text) == ("moments" in rerank)
