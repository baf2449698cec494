"""The CUDA-graph decode loop (:func:`seer.model.graph_decode.greedy_generate`): on the CPU its eager steps over a
StaticCache give ``generate()``'s greedy tokens and decode densities (dense decode, decode gates, Quest alone, with and
without sparse prefill) and its end-of-sequence padding; on a GPU the graph replays give the eager loop's tokens."""

from __future__ import annotations

import pytest
import torch

from seer.model.graph_decode import greedy_generate
from tests.model.test_sparse_decode import QUEST_ALONE, _generate, _load, write_gate_folder
from tests.tiny import tiny_model

SETUPS = {  # name: seer.load arguments beside the tiny model (the gate folder filled in by the test)
    "sparse prefill, dense decode": dict(gates=True),
    "sparse prefill, decode gates": dict(gates=True, decode_gates=True, decode_sparsity={"token_budget": 32}),
    "dense prefill, Quest alone": dict(decode_sparsity={**QUEST_ALONE, "token_budget": 64, "first_block": False}),
    "sparse prefill, Quest alone, pinned": dict(gates=True, decode_sparsity={**QUEST_ALONE, "prompt_blocks": 1}),
}


@pytest.fixture(scope="module")
def gate_folder(tmp_path_factory):
    """Prefill gates and decode gates of the tiny model, as test_sparse_decode's."""
    return write_gate_folder(tmp_path_factory.mktemp("gates"))


def _model(setup: str, folder, **extra):
    kwargs = {k: (folder if v is True else v) for k, v in SETUPS[setup].items()}
    return _load(**kwargs, **extra)


@pytest.mark.parametrize("setup", list(SETUPS))
def test_the_loop_gives_generates_tokens_and_densities(gate_folder, setup):
    """Two prompts of 77 tokens, 20 new: the same tokens as transformers' generate() (a DynamicCache, eager steps),
    and with sparse decode the same per-layer decode densities, below 1."""
    ids = torch.randint(3, 300, (2, 77), generator=torch.Generator().manual_seed(11))
    model = _model(setup, gate_folder)
    want = _generate(model, ids, new=20)
    decode = getattr(model, "seer_decode", None)
    want_density = decode.densities() if decode is not None and decode.sparsity else None
    got = greedy_generate(model, ids, 20)
    assert got.shape == (2, 97) and torch.equal(got, want)
    if want_density is not None:
        assert model.seer_decode.densities() == pytest.approx(want_density, rel=1e-6)
        assert 0 < model.seer_decode.mean_density() < 1


def test_rows_are_padded_after_their_stop_token(gate_folder):
    """A stop token met at the sixth new token of 40: generate() ends there; the loop runs on to its next check of
    "every row stopped?" (16 new tokens) and pads after the stop token."""
    from seer.model.graph_decode import STOP_CHECK

    ids = torch.randint(3, 300, (1, 50), generator=torch.Generator().manual_seed(4))
    model = _model("sparse prefill, decode gates", gate_folder)
    free = greedy_generate(model, ids, 40)
    assert free.shape == (1, 90)
    stop = int(free[0, 55])
    first = int((free[0, 50:] == stop).nonzero()[0])  # the stop token's first place among the new tokens
    want = _generate(model, ids, new=40, eos_token_id=stop)
    got = greedy_generate(model, ids, 40, eos_token_id=stop, pad_token_id=2)
    assert want.shape[1] == 51 + first and torch.equal(got[:, :want.shape[1]], want)
    assert got.shape[1] == 50 + STOP_CHECK and (got[0, want.shape[1]:] == 2).all()


def test_a_plain_transformers_model_decodes_as_generate():
    """No seer at all (transformers' own attention, blocks of 64 for the cache): generate()'s tokens."""
    model = tiny_model("llama")
    ids = torch.randint(3, 300, (2, 30), generator=torch.Generator().manual_seed(6))
    assert torch.equal(greedy_generate(model, ids, 12), _generate(model, ids, new=12))


def test_bad_arguments_are_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        greedy_generate(model, torch.ones(1, 4, dtype=torch.long), 0)
    with pytest.raises(ValueError, match=r"ids of shape \(4,\)"):
        greedy_generate(model, torch.ones(4, dtype=torch.long), 3)


@pytest.mark.gpu
@pytest.mark.parametrize("setup", ["sparse prefill, decode gates", "dense prefill, Quest alone"])
def test_graph_replays_give_the_eager_steps_tokens(gate_folder, setup):
    """On a GPU with the Triton kernels (float32): the captured step's replays give the tokens of generate()'s eager
    steps (two prompts of 300 tokens, 40 new), and the decode densities of the replayed steps only."""
    from seer.model.inference import load
    from tests.model.test_inference import TINY

    ids = torch.randint(3, 300, (2, 300), generator=torch.Generator().manual_seed(2)).cuda()
    torch.manual_seed(0)
    model = load(TINY, device="cuda", kernel="triton",
                 **{k: (gate_folder if v is True else v) for k, v in SETUPS[setup].items()})
    want = _generate(model, ids, new=40)
    want_density = model.seer_decode.densities()
    got = greedy_generate(model, ids, 40, warmup=2)
    assert torch.equal(got, want)
    assert model.seer_decode.densities() == pytest.approx(want_density, rel=1e-5)
