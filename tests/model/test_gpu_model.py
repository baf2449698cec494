"""On a CUDA GPU: the Triton paths inside a model agree with the PyTorch reference paths."""

import pytest
import torch

from seer.gates.config import GateConfig
from seer.sparsity.config import SparsityConfig
from seer.model import attach_gates, freeze_base_model
from seer.model.inference import enable_sparse_prefill
from tests.tiny import tiny_model

pytestmark = pytest.mark.gpu


def _model(dtype):
    model = tiny_model("llama", num_attention_heads=8, num_key_value_heads=2, hidden_size=512,
                       max_position_embeddings=8192).to("cuda", dtype)
    attach_gates(model, GateConfig(block_size=64, hidden_size=64))
    freeze_base_model(model)
    return model


def test_distill_triton_gt_matches_reference():
    model = _model(torch.bfloat16)
    ids = torch.randint(0, 300, (2, 1000), device="cuda")
    ctx = model.seer_context
    got = {}
    for source in ("reference", "triton"):
        recs = []
        with ctx.running("distill", consumer=recs.append, gt_source=source), torch.no_grad():
            model.model(ids)
        got[source] = recs
    # later layers see bf16 hidden states that differ by the two attention kernels' rounding
    for ref, tri in zip(got["reference"], got["triton"]):
        torch.testing.assert_close(tri.gt, ref.gt, rtol=2e-2, atol=1e-4)
        torch.testing.assert_close(tri.logits, ref.logits, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got["triton"][0].logits, got["reference"][0].logits)  # same input to layer 0


@pytest.mark.parametrize("density", [1.0, 0.2])
def test_sparse_prefill_triton_matches_reference(density):
    # float32, so both kernels hand the next layer the same hidden states and its top-k picks the same blocks
    model = _model(torch.float32)
    ids = torch.randint(0, 300, (1, 2000), device="cuda")
    ctx = model.seer_context
    with torch.no_grad():
        ctx.update(mode="dense")
        dense = model(ids).logits.float()
        enable_sparse_prefill(model, SparsityConfig(method="topk", target_density=density), kernel="reference")
        ref = model(ids).logits.float()
        enable_sparse_prefill(model, SparsityConfig(method="topk", target_density=density), kernel="triton")
        tri = model(ids).logits.float()
    torch.testing.assert_close(tri, ref, rtol=1e-3, atol=1e-3)
    if density == 1.0:
        torch.testing.assert_close(tri, dense, rtol=1e-3, atol=1e-3)
    else:
        assert (tri - dense).abs().max() > 1e-2  # the sparse path really dropped blocks


def test_graphed_prefill_matches_eager_sparse_and_dense():
    from seer.model.inference import GraphedPrefill

    model = _model(torch.float32)
    ids = torch.randint(0, 300, (1, 2048), device="cuda")
    eager = {}
    for name, sparsity in (("dense", SparsityConfig(method="dense")),
                           ("sparse", SparsityConfig(method="topk", target_density=0.2))):
        enable_sparse_prefill(model, sparsity, kernel="triton")
        with torch.no_grad():
            eager[name] = model(ids, use_cache=False).logits[:, -4:]
        graphed = GraphedPrefill(model, 1, 2048, logits_to_keep=4)
        graphed(torch.zeros_like(ids))  # a replay on other tokens first: the input buffer is really refilled
        torch.testing.assert_close(graphed(ids), eager[name], rtol=1e-3, atol=1e-3)
        densities = model.seer_context.densities()  # tensors written by the graph's last replay
        want = 1.0 if sparsity.method == "dense" else sparsity.target_density
        assert all(abs(d - want) < 0.05 for d in densities.values())
    assert (eager["sparse"] - eager["dense"]).abs().max() > 1e-2  # so the sparse graph did run the gated path


def test_padded_batch_through_the_packed_kernel_matches_each_prompt_alone():
    """Left-padded prompts of mixed lengths: one packed Triton launch a layer gives each prompt its logits alone
    (float32, so every prompt's selection is the same either way)."""
    model = _model(torch.float32)
    enable_sparse_prefill(model, SparsityConfig(method="topk", target_density=0.2), kernel="triton")
    gen = torch.Generator(device="cuda").manual_seed(0)
    prompts = [torch.randint(3, 300, (n,), device="cuda", generator=gen) for n in (3000, 1000, 64, 1)]
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), 2, device="cuda")
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, n - len(p):], mask[row, n - len(p):] = p, 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
        for row, p in enumerate(prompts):
            torch.testing.assert_close(batched[row, n - len(p):], model(p[None]).logits[0], rtol=1e-3, atol=1e-3)
