"""The fused vertical-slash gate blend (seer/kernels/vs_blend.py) against the PyTorch path it replaces at inference,
``blend_mass(gate, VerticalSlash().mass(x), weight)``, and against its plain reference
(``seer.kernels.reference.vertical_slash_blend``), on fresh random layer inputs: N not a multiple of the block,
N < 64, batch > 1, grouped-query heads, several weights, rows of several tiles, the ``-inf`` pattern above the
diagonal, argument checks. Without CUDA the kernel runs on CPU tensors under the Triton interpreter
(tests/conftest.py); the ``gpu`` test compares the CUDA kernel with the PyTorch path, and the model's
``blend_gate_scores`` dispatch, at a moderate size."""

from __future__ import annotations

import pytest
import torch

from seer.kernels import reference, vs_blend
from seer.kernels.vs_blend import vertical_slash_blend
from seer.sparsity.masks import causal_blocks
from seer.sparsity.selectors import (LayerInputs, VerticalSlash, _vertical_slash_block_mass, _vertical_slash_vectors,
                                     blend_mass)

CASES = [  # b, hq, hkv, n, d, block, last_queries, weight
    (1, 2, 1, 64, 16, 16, 8, 0.5),  # n a multiple of the block
    (2, 4, 2, 75, 16, 16, 8, 0.3),  # partial last block, batch 2, GQA
    (1, 3, 3, 40, 8, 64, 16, 0.5),  # n < 64: one block
    (2, 2, 1, 45, 8, 16, 64, 0.9),  # n < 64 and < last_queries, three blocks
    (1, 2, 2, 1, 8, 16, 4, 0.5),  # one token
    (1, 4, 1, 150, 16, 16, 32, 0.0),  # weight 0: the gate alone
]


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def make(b, hq, hkv, n, d, bs, seed, spread=1.0, dev=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, d, generator=g) * spread
    k = torch.randn(b, hkv, n, d, generator=g) * spread
    x = LayerInputs(q.to(dev or _device()), k.to(dev or _device()), bs, d ** -0.5)
    gate = (torch.randn(b, hq, x.nb, x.nb, generator=g) * 3).to(x.q.device)
    return x, gate


def assert_blend_close(got, want, atol=1e-5):
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), "-inf patterns differ"
    fin = torch.isfinite(want)
    assert torch.isfinite(got[fin]).all()
    torch.testing.assert_close(got[fin], want[fin], atol=atol, rtol=1e-5)


@pytest.mark.parametrize("b,hq,hkv,n,d,bs,last,weight", CASES)
def test_matches_blend_mass(b, hq, hkv, n, d, bs, last, weight):
    x, gate = make(b, hq, hkv, n, d, bs, seed=n + hq)
    sel = VerticalSlash(last_queries=last)
    want = blend_mass(gate, sel.mass(x), weight)
    vectors = sel.vectors(x)
    got = vertical_slash_blend(gate, *vectors, weight)
    assert_blend_close(got, want)
    assert torch.equal(torch.isneginf(got), ~causal_blocks(x.nb, device=got.device).expand_as(got))
    assert_blend_close(reference.vertical_slash_blend(gate, *vectors, weight), want)


def test_zero_masses_floors_and_several_tiles(monkeypatch):
    """Marginals with many zeros (block masses exactly 0: the 1e-30 floor), rows of several tiles (tile of 4 key
    blocks), bf16 gate logits read through a non-contiguous view."""
    monkeypatch.setattr(vs_blend, "_MAX_TILE", 4)
    b, h, n, bs = 2, 3, 11 * 16 - 5, 16
    g = torch.Generator().manual_seed(3)
    v, s = torch.rand(2, b, h, n, generator=g) * (torch.rand(2, b, h, n, generator=g) < 0.05)
    v[..., 0] += 1.0  # a sink
    s[..., 0] += 1.0  # the diagonal
    v, s = (v / v.sum(-1, keepdim=True)).to(_device()), (s / s.sum(-1, keepdim=True)).to(_device())
    mass = _vertical_slash_block_mass(v, s, bs)
    nb = mass.shape[-1]
    assert (mass[..., causal_blocks(nb, device=mass.device)] == 0).any(), "no zero mass: the floor is not tested"
    gate = (torch.randn(b, h, nb, nb, generator=g) * 3).to(_device(), torch.bfloat16)
    gate = gate.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not gate.is_contiguous()
    # -inf gate logits on some zero masses: mixture entries at the floor (the diagonal's mass keeps rows finite)
    gate = gate.masked_fill((mass == 0) & (torch.rand(mass.shape, generator=g) < 0.5).to(mass.device), float("-inf"))
    vectors = _vertical_slash_vectors(v, s, bs)
    for weight in (0.3, 0.7):
        want = blend_mass(gate, mass, weight)
        assert (want < -60).any(), "no entry at the floor"
        assert_blend_close(vertical_slash_blend(gate, *vectors, weight), want)
        assert_blend_close(reference.vertical_slash_blend(gate, *vectors, weight), want)


def test_gate_logits_minus_inf_above_the_diagonal_and_in_a_first_tile(monkeypatch):
    """Gate rows whose first tile is all -inf (online max from -inf) and -inf logits above the diagonal."""
    monkeypatch.setattr(vs_blend, "_MAX_TILE", 2)
    x, gate = make(1, 2, 1, 6 * 16, 8, 16, seed=5)
    gate = gate.masked_fill(~causal_blocks(x.nb, device=gate.device), float("-inf"))
    gate[..., 3:, :2] = float("-inf")
    sel = VerticalSlash(last_queries=8)
    assert_blend_close(vertical_slash_blend(gate, *sel.vectors(x), 0.5), blend_mass(gate, sel.mass(x), 0.5))


@pytest.mark.parametrize("weight", [1.0, -0.1, 1.5, True, float("nan")])
def test_bad_weight_is_refused(weight):
    x, gate = make(1, 1, 1, 32, 8, 16, seed=0)
    vectors = VerticalSlash(last_queries=8).vectors(x)
    with pytest.raises(ValueError, match="weight"):
        vertical_slash_blend(gate, *vectors, weight)
    with pytest.raises(ValueError, match="weight"):
        reference.vertical_slash_blend(gate, *vectors, weight)


def test_bad_shapes_are_refused():
    x, gate = make(1, 2, 1, 48, 8, 16, seed=0)
    vertical, diagonal, slash, slash_last = VerticalSlash(last_queries=8).vectors(x)
    with pytest.raises(ValueError, match="gate_logits"):
        vertical_slash_blend(gate[..., :-1], vertical, diagonal, slash, slash_last, 0.5)
    with pytest.raises(ValueError, match="slash_last"):
        vertical_slash_blend(gate, vertical, diagonal, slash, slash_last[..., :-1], 0.5)


@pytest.mark.gpu
def test_cuda_kernel_matches_pytorch_path_and_model_dispatch(monkeypatch):
    from seer.sparsity import selectors

    monkeypatch.setattr(selectors, "FUSED_SELECTION_ON_CUDA", True)  # what the model does once switched on
    from seer.gates.config import GateConfig
    from seer.model.attention import blend_gate_scores

    x, gate = make(2, 8, 2, 8192 + 37, 64, 64, seed=7, dev=torch.device("cuda"))
    x = LayerInputs(x.q.bfloat16(), x.k.bfloat16(), x.block_size, x.scale)
    sel = VerticalSlash(last_queries=64)
    for weight in (0.2, 0.5, 0.8):
        want = blend_mass(gate, sel.mass(x), weight)
        assert_blend_close(vertical_slash_blend(gate, *sel.vectors(x), weight), want)
    # the model's blend: the fused kernel at inference, the PyTorch path when the logits need a gradient
    cfg = GateConfig(blend="vertical_slash", blend_weight=0.5)
    with torch.no_grad():
        fused = blend_gate_scores(cfg, gate, x.q, x.k, x.block_size, x.scale, 0)
    trained = blend_gate_scores(cfg, gate.clone().requires_grad_(True), x.q, x.k, x.block_size, x.scale, 0)
    assert trained.requires_grad
    assert_blend_close(fused, trained.detach())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            blend_gate_scores(cfg, gate, x.q, x.k, x.block_size, x.scale, 0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
