"""How many device operations a one-token sparse decode step adds per layer: every aten op that computes (views and
bare allocations left out) is a kernel launch on a GPU, and at batch 1 a decode step is bound by their number. Counted
on the CPU with a dispatch mode over one step of a tiny model (two layers) after its prefill and an eager step; the
decode kernel (the Triton kernel on a GPU, its PyTorch reference here) counts as one."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from seer.model.decode import DecodeContext
from tests.tiny import tiny_decode_model

BS = 16
NO_KERNEL = {"empty", "empty_like", "empty_strided", "detach", "lift_fresh", "_unsafe_view"}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside it by name (``ops``), views and bare allocations left out; none while
    ``paused``."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.paused and not func.is_view and name not in NO_KERNEL:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def step_ops(model, monkeypatch, prompt: int = 70, batch: int = 2) -> collections.Counter[str]:
    """The ops of one one-token decode step of ``model`` (after a prefill of ``prompt`` tokens and an eager step),
    the decode kernel's counted as one op ``"decode_kernel"``."""
    counter = OpCounter()
    attend = DecodeContext._attend

    def counted_attend(self, *args, **kwargs):
        counter.paused = True
        try:
            return attend(self, *args, **kwargs)
        finally:
            counter.paused = False
            counter.ops["decode_kernel"] += 1

    monkeypatch.setattr(DecodeContext, "_attend", counted_attend)
    ids = torch.randint(3, 300, (batch, prompt), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        for _ in range(2):  # the first step allocates the density sums
            counter.ops.clear()
            with counter:
                out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values,
                            use_cache=True)
    return counter.ops


def added_ops_per_layer(budget: dict, monkeypatch) -> collections.Counter[str]:
    """Ops a one-token step with decode ``budget`` adds per layer over the dense step (by name; negative: fewer)."""
    sparse = step_ops(tiny_decode_model(budget, BS), monkeypatch)
    dense = step_ops(tiny_decode_model(None, BS), monkeypatch)
    layers = 2
    return collections.Counter({name: (sparse[name] - dense[name]) / layers for name in sparse | dense
                                if sparse[name] != dense[name]})


@pytest.mark.parametrize(("budget", "most"), [({"token_budget": 32}, 72),
                                             ({"method": "threshold", "threshold": 0.3}, 74)])
def test_a_sparse_decode_step_adds_few_ops_per_layer(budget, most, monkeypatch):
    """Ops a one-token sparse step adds per layer over the dense step (the gate, the compressed-K cache, the block
    selection, the density sums), batch 2, max/min/avg pooling: 99 for a token budget and 97 for a threshold before
    the block list came straight from topk and the cache reused its step's positions and wrote each step's gate key
    unconditionally, 71 and 73 after, 70 and 72 since the block selection takes the step's newest blocks (the cache's
    indexed writes cost one arange) (bounds: two more)."""
    added = added_ops_per_layer(budget, monkeypatch)
    assert sum(added.values()) <= most, sorted(added.items(), key=lambda kv: -kv[1])
