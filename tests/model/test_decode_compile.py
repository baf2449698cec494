"""``DecodeSparsityConfig(compile=True)``: a one-token sparse decode step's per-layer tensor work
(:func:`seer.model.decode.sparse_decode_step`) through ``torch.compile`` gives the logits and densities of the eager
path. On the CPU through the ``aot_eager`` backend (dynamo's graph capture and AOT autograd, no code generation);
inductor, the default on a GPU, once as well when a C++ compiler is at hand, and its generated code writes the
compressed-K cache in place."""

from __future__ import annotations

import math
import re
import shutil

import pytest
import torch

import seer.model.decode as decode
from seer.checks import ConfigError
from seer.sparsity.decode import DecodeSparsityConfig
from tests.tiny import padded_generation, tiny_decode_model

BS = 16
BUDGETS = [{"token_budget": 32}, {"method": "threshold", "threshold": 0.3}]
QUEST = [{"token_budget": 32, "estimate": "quest", "estimate_weight": 0.5},
         {"method": "threshold", "threshold": 0.3, "estimate": "quest", "estimate_weight": 1.0}]


@pytest.fixture
def compiles(monkeypatch):
    """The compile backend replaced by ``aot_eager`` behind a counter (``frame_count``: graphs compiled), with a fresh
    dynamo cache."""
    import torch._dynamo
    import torch._dynamo.testing

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(decode, "COMPILE_BACKEND", counter)
    monkeypatch.setattr(decode, "_COMPILED", {})
    yield counter
    torch._dynamo.reset()


def _model(budget: dict, compiled: bool):
    return tiny_decode_model({**budget, "compile": compiled}, BS)


def _padded_logits(model, new: int = 8) -> torch.Tensor:
    """``[new, 2, vocab]``: greedy generation's logits for a left-padded batch of two prompts (45 and 26 tokens)."""
    return padded_generation(model, new)[0]


def _static_logits(model, new: int = 8) -> torch.Tensor:
    """``[new, 2, vocab]``: a prefill of two unpadded 40-token prompts then one-token steps over a StaticCache."""
    from transformers import StaticCache

    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(7))
    cache = StaticCache(config=model.config, max_cache_len=64)
    logits = []
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        for _ in range(new):
            logits.append(out.logits[:, -1])
            out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
    return torch.stack(logits)


@pytest.mark.parametrize("budget", BUDGETS + QUEST)
def test_compiled_steps_give_the_eager_logits_of_a_padded_batch(budget, compiles):
    eager = _model(budget, compiled=False)
    want = _padded_logits(eager)
    assert compiles.frame_count == 0
    model = _model(budget, compiled=True)
    got = _padded_logits(model)
    # one graph for both layers and every step of a capacity; the DynamicCache's compressed-K store grows once here
    # (3 blocks after the 45-token prefill, 6 from the step into the 4th block)
    assert compiles.frame_count == 2
    assert torch.equal(got, want)
    assert model.seer_decode.densities() == eager.seer_decode.densities()
    assert 0 < model.seer_decode.mean_density() < 1


@pytest.mark.parametrize("budget", [BUDGETS[0], QUEST[0], {**QUEST[0], "rerank_blocks": 3}])
def test_compiled_steps_over_a_static_cache_compile_once(budget, compiles):
    want = _static_logits(_model(budget, compiled=False))
    model = _model(budget, compiled=True)
    got = _static_logits(model)
    assert compiles.frame_count == 1  # shared by both layers and every step
    assert torch.equal(got, want)
    assert 0 < model.seer_decode.mean_density() < 1


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor on the CPU needs "
                    "a C++ compiler")
def test_inductor_gives_the_eager_logits(monkeypatch):
    """The default backend (inductor: generated C++ on the CPU) once, a token budget over a StaticCache."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    monkeypatch.setattr(decode, "_COMPILED", {})
    try:
        want = _static_logits(_model(BUDGETS[0], compiled=False), new=4)
        before = counters["stats"]["unique_graphs"]  # dynamo's count, not reset by torch._dynamo.reset()
        got = _static_logits(_model(BUDGETS[0], compiled=True), new=4)
        assert counters["stats"]["unique_graphs"] == before + 1
    finally:
        torch._dynamo.reset()
    assert (got - want).abs().max() <= 1e-6


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_compile_must_be_a_bool(value):
    with pytest.raises(ConfigError, match=r"decode_sparsity\.compile=.*: is true or false"):
        DecodeSparsityConfig(compile=value)
    assert DecodeSparsityConfig(compile=True).compile and not DecodeSparsityConfig().compile


def test_files_do_not_keep_the_compile_switch():
    """Gates and calibrations store the budget without ``compile`` (how a run executes it), and read back."""
    from seer.sparsity.decode import DecodeCalibration

    budget = DecodeSparsityConfig(method="threshold", target_density=0.1, compile=True)
    assert "compile" not in budget.stored() and budget.stored()["target_density"] == 0.1
    stored = DecodeCalibration(budget, threshold=0.01, density=0.1).to_dict()
    assert "compile" not in stored["sparsity"]
    assert DecodeCalibration.from_dict(stored).sparsity == DecodeSparsityConfig(method="threshold", target_density=0.1)


def _allocated_sizes(code: str) -> list[int]:
    """Element counts of the buffers inductor's generated wrapper allocates
    (``empty_strided_<device>((sizes), ...)``)."""
    return [math.prod(int(n) for n in sizes.split(",") if n.strip())
            for sizes in re.findall(r"empty_strided_\w+\(\(([\d, ]*)\)", code)]


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor on the CPU needs "
                    "a C++ compiler")
@pytest.mark.parametrize("estimate", [None, "quest"])
def test_the_compiled_step_writes_the_cache_in_place(estimate):
    """A one-token step writes a few hundred bytes of the compressed-K cache (``store``, ``tails``); compiled by
    inductor it must not copy them whole. ``scatter_`` on these graph inputs did: functionalization made it an
    out-of-place scatter into a clone, which inductor does not turn back into an in-place write, then a copy back
    into the input. A whole copy needs an intermediate buffer of the copied size, which the generated wrapper
    allocates, so no allocation of a ``store`` or ``tails`` sized buffer may appear in the generated code (sizes
    chosen apart from every other buffer's); the inputs still end as the eager step leaves them. With Quest's estimate
    the same holds of its key bounds (``key_min``, ``key_max``)."""
    import torch._dynamo
    from torch._inductor.utils import run_and_get_code

    from seer.gates.decode_config import DecodeGateConfig
    from seer.gates.decode_gate import DecodeGate

    batch, heads, kv_heads, head_dim, bs, capacity = 2, 4, 2, 24, 16, 40
    torch.manual_seed(0)
    gate = DecodeGate(DecodeGateConfig(block_size=bs, hidden_size=12), head_dim, heads, kv_heads)
    store, tails = torch.randn(batch, kv_heads, capacity, 12), torch.randn(batch, kv_heads, bs, head_dim)
    inputs = [store, tails, torch.tensor([37, 600], dtype=torch.int32), torch.zeros(()),
              torch.zeros((), dtype=torch.int64), torch.randn(batch, kv_heads, 1, head_dim),
              torch.randn(batch, heads, 1, head_dim)]
    bounds = {}
    if estimate:  # Quest's key bounds (min, max), sized apart from the rest too
        bounds = {"key_min": torch.randn(batch, kv_heads, capacity, head_dim) - 1,
                  "key_max": torch.randn(batch, kv_heads, capacity, head_dim) + 1,
                  "k_post": torch.randn(batch, kv_heads, 1, head_dim), "q_post": torch.randn(batch, heads, 1, head_dim)}
    eager = [t.clone() for t in inputs]
    eager_bounds = {name: t.clone() for name, t in bounds.items()}
    step = torch.compile(decode.sparse_decode_step, backend="inductor", dynamic=False, fullgraph=True)
    budget = DecodeSparsityConfig(token_budget=64, estimate=estimate)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            decode.sparse_decode_step(gate, *eager, budget, None, **eager_bounds)
            _, code = run_and_get_code(step, gate, *inputs, budget, None, **bounds)
    finally:
        torch._dynamo.reset()
    sizes = _allocated_sizes("\n".join(code))
    whole = [store.numel(), tails.numel()] + ([bounds["key_min"].numel()] if estimate else [])
    assert sizes and not set(whole) & set(sizes), sizes
    for got, want in zip([*inputs, *bounds.values()], [*eager, *eager_bounds.values()]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("budget", [{"token_budget": 48, "estimate": "quest", "estimate_weight": 1.0},
                                    {"token_budget": 48, "estimate": "quest", "estimate_weight": 1.0,
                                     "prompt_blocks": 1},
                                    {"token_budget": 48, "estimate": "quest", "estimate_weight": 1.0,
                                     "rerank_blocks": 4},
                                    {"token_budget": 48, "estimate": "moments", "estimate_weight": 1.0}])
def test_compiled_quest_alone_without_decode_gates_gives_the_eager_logits(compiles, budget):
    """Training-free decode (no decode gates; pinned prompt blocks, the rerank, the moments too) through the compiled
    step."""
    from tests.model.test_decode_quest_alone import quest_model

    eager = padded_generation(quest_model(budget), 10)[0]
    compiled_model = quest_model({**budget, "compile": True})
    got = padded_generation(compiled_model, 10)[0]
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    assert compiles.frame_count >= 1 and 0 < compiled_model.seer_decode.mean_density() < 1
