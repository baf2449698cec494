"""Padded batches: every sequence is gated on its own tokens and gives the logits (and greedy tokens) it gives alone."""

import dataclasses

import pytest
import torch

from seer.gates.config import GateConfig
from seer.model import attach_gates, freeze_base_model, gates
from seer.model.attention import padding_spans
from seer.sparsity.calibration import Calibration
from seer.sparsity.config import SparsityConfig
from seer.sparsity.selectors import build_selector
from tests.tiny import padded_batch, tiny_model

GATE = GateConfig(block_size=16, hidden_size=24, k_pool=["max", "min"])
LENGTHS = (70, 33, 50, 16)
TOPK = SparsityConfig(method="topk", target_density=0.4)


def _gated(family="llama"):
    model = tiny_model(family)
    ctx = attach_gates(model, GATE)
    freeze_base_model(model)
    torch.manual_seed(1)
    for g in gates(model).values():
        torch.nn.init.normal_(g.k_weight)
    return model, ctx


def _alone_and_batched(model, ctx, seqs, side, **settings):
    """Logits and densities ``(kept, total)`` per layer of each sequence alone, and of the padded batch."""
    alone, kept = [], {}
    with torch.no_grad(), ctx.running("sparse", **settings):
        for s in seqs:
            alone.append(model(s[None]).logits[0])
            for layer, (k, t) in ctx.density.items():
                kk, tt = kept.get(layer, (0, 0))
                kept[layer] = (kk + int(k), tt + t)
        ids, mask, pos, spans = padded_batch(seqs, side)
        batched = model(ids, attention_mask=mask, position_ids=pos).logits
        batched_kept = {layer: (int(k), t) for layer, (k, t) in ctx.density.items()}
    return alone, kept, [batched[b, span] for b, span in enumerate(spans)], batched_kept


def _seqs(lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (n,), generator=g) for n in lengths]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_is_gated_per_sequence_like_each_prompt_alone(family, side):
    model, ctx = _gated(family)
    seqs = _seqs()
    alone, kept, batched, batched_kept = _alone_and_batched(model, ctx, seqs, side, sparsity=TOPK)
    for a, b in zip(alone, batched):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    # the density counts each sequence's own causal blocks, padding none: 4 heads x (15 + 6 + 10 + 1) blocks
    assert batched_kept == kept and all(t == 4 * (15 + 6 + 10 + 1) for _, t in kept.values())
    assert all(0.3 < k / t < 0.75 for k, t in kept.values())
    with torch.no_grad():
        dense = model(seqs[0][None]).logits[0]
    assert not torch.allclose(alone[0], dense, atol=1e-3)  # the selection did drop blocks


@pytest.mark.parametrize("settings", [
    dict(sparsity=SparsityConfig(method="threshold", target_density=0.3, dense_last_rows=1, sink_blocks=1),
         calibration=Calibration(sparsity=SparsityConfig(method="threshold", target_density=0.3, dense_last_rows=1,
                                                         sink_blocks=1),
                                 knobs={0: [0.05, 0.1, 0.2, 0.3], 1: [0.3, 0.2, 0.1, 0.05]}, density=0.3)),
    dict(sparsity=SparsityConfig(method="topp", target_density=None, p=0.7, local_blocks=1)),
    dict(sparsity=TOPK, selector=build_selector("vertical_slash")),
    dict(sparsity=TOPK, selector=build_selector("flexprefill")),
    dict(sparsity=TOPK, gate_config=dataclasses.replace(GATE, blend="antidiagonal", blend_weight=0.5)),
    dict(sparsity=dataclasses.replace(TOPK, dense_layers=[1])),
], ids=["calibrated_threshold", "topp", "vertical_slash", "flexprefill", "blend", "dense_layer"])
def test_budgets_selectors_and_blends_see_each_sequence_alone(settings):
    model, ctx = _gated("qwen2")
    seqs = _seqs(seed=2)
    alone, kept, batched, batched_kept = _alone_and_batched(model, ctx, seqs, "left", **settings)
    for a, b in zip(alone, batched):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert batched_kept == kept


def test_observations_of_a_padded_batch_come_per_sequence():
    model, ctx = _gated()
    seqs = _seqs()
    ids, mask, pos, _ = padded_batch(seqs, "right")
    seen, alone = [], []
    with torch.no_grad(), ctx.running("sparse", sparsity=TOPK, consumer=seen.append):
        model(ids, attention_mask=mask, position_ids=pos)
    with torch.no_grad(), ctx.running("sparse", sparsity=TOPK, consumer=alone.append):
        for s in seqs:
            model(s[None])
    alone.sort(key=lambda o: o.layer_idx)  # stable: sequences in order within each layer
    assert [(o.layer_idx, o.scores.shape[-1]) for o in seen] == [(i, nb) for i in (0, 1) for nb in (5, 3, 4, 1)]
    for o, a in zip(seen, alone, strict=True):
        torch.testing.assert_close(o.scores, a.scores)
        assert torch.equal(o.mask, a.mask)


@pytest.mark.parametrize("side", ["left", "right"])
def test_triton_kernel_on_a_padded_batch_matches_the_reference_path(side, monkeypatch):
    """The Triton path (the interpreter on CPU) attends the sequences packed, one varlen launch a layer."""
    import seer.kernels

    launches = []
    varlen = seer.kernels.block_sparse_attn_varlen
    monkeypatch.setattr(seer.kernels, "block_sparse_attn_varlen",
                        lambda *args, **kwargs: launches.append(args[3].tolist()) or varlen(*args, **kwargs))
    model, ctx = _gated()
    seqs = _seqs(lengths=(40, 17, 1))
    ids, mask, pos, spans = padded_batch(seqs, side)
    with torch.no_grad():
        with ctx.running("sparse", sparsity=TOPK, kernel="reference"):
            ref = model(ids, attention_mask=mask, position_ids=pos).logits
        with ctx.running("sparse", sparsity=TOPK, kernel="triton"):
            tri = model(ids, attention_mask=mask, position_ids=pos).logits
    assert launches == [[0, 40, 57, 58]] * 2
    for b, span in enumerate(spans):
        torch.testing.assert_close(tri[b, span], ref[b, span], rtol=2e-4, atol=2e-4)


def test_generate_on_left_padded_prompts_gives_each_prompt_alone_tokens():
    model, ctx = _gated()
    model.generation_config.pad_token_id = 2
    seqs = _seqs(lengths=(50, 21, 37), seed=3)
    ctx.update(mode="sparse", sparsity=TOPK)
    with torch.no_grad():
        alone = [model.generate(s[None], max_new_tokens=5, do_sample=False)[0, len(s):] for s in seqs]
        ids, mask, _, _ = padded_batch(seqs, "left")
        out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        dens = ctx.densities()
    assert [row.tolist() for row in out[:, ids.shape[1]:]] == [a.tolist() for a in alone]
    assert all(d < 0.8 for d in dens.values())  # the batched prefill was sparse
    ids, mask, _, _ = padded_batch(seqs, "right")
    with torch.no_grad(), pytest.raises(ValueError, match="needs left padding"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)


def test_padding_spans_of_one_run_per_row_and_none_with_holes():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    assert padding_spans(mask) == ((2, 4), (0, 3), (0, 4), (0, 0))
    assert padding_spans(torch.tensor([[1, 0, 1, 1]])) is None
