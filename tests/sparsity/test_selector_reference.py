"""The fast vertical-slash estimate and gate blend of :mod:`seer.sparsity.selectors` against the plain reference
kept in :mod:`seer.sparsity.reference` (the implementation they replaced), on fresh random inputs: dtypes, N not a
multiple of the block, N below ``last_queries``, batch > 1, grouped-query heads; values, the ``-inf`` pattern,
gradients through the blend; and the block mass's precision on masses far below float32's epsilon."""

import math

import pytest
import torch

from seer.sparsity import reference as ref
from seer.sparsity.masks import causal_blocks
from seer.sparsity.selectors import (LayerInputs, VerticalSlash, _last_rows_marginals, _vertical_slash_block_mass,
                                     blend_mass, blend_scores)

SHAPES = [  # b, hq, hkv, n, d, block, last_queries
    (1, 2, 1, 64, 16, 16, 8),  # n a multiple of the block
    (2, 6, 2, 75, 16, 16, 8),  # a partial last block, batch 2, GQA
    (2, 4, 4, 13, 8, 4, 40),  # n < last_queries (every row is a last row)
    (1, 4, 2, 200, 32, 32, 64),
    (3, 3, 1, 1, 8, 16, 4),  # one token
    (1, 2, 1, 17, 8, 16, 16),  # two blocks, the last of one row
]


def make(b, hq, hkv, n, d, bs, dtype, seed, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, d, generator=g, dtype=torch.float64) * spread
    k = torch.randn(b, hkv, n, d, generator=g, dtype=torch.float64) * spread
    return LayerInputs(q.to(dtype), k.to(dtype), bs, d ** -0.5)


def assert_log_scores_close(got, want, atol=1e-5, log_atol=2e-5):
    """Same ``-inf`` pattern; the probabilities agree to ``atol`` and, where they exceed 1e-12, the log-scores to
    float32 rounding (relative 1e-5 of the probability)."""
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    fin = torch.isfinite(want)
    assert torch.isfinite(got[fin]).all()
    torch.testing.assert_close(got[fin].exp(), want[fin].exp(), atol=atol, rtol=1e-5)
    big = want[fin] > math.log(1e-12)
    torch.testing.assert_close(got[fin][big], want[fin][big], atol=log_atol, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spread", [1.0, 4.0])
def test_vertical_slash_matches_reference(shape, dtype, spread):
    b, hq, hkv, n, d, bs, last = shape
    x = make(b, hq, hkv, n, d, bs, dtype, seed=n * 7 + hq, spread=spread)
    v, s, start = _last_rows_marginals(x, last)
    v_ref, s_ref, start_ref = ref.vertical_slash_marginals(x, last)
    assert start == start_ref == max(0, n - last)
    torch.testing.assert_close(v, v_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s, s_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s.sum(-1), torch.ones(b, hq), atol=1e-5, rtol=0)
    mass = _vertical_slash_block_mass(v, s, bs)
    assert (mass[..., ~causal_blocks(x.nb)] == 0).all()
    torch.testing.assert_close(mass, ref.vertical_slash_block_mass(v, s, bs), atol=1e-6, rtol=1e-5)
    assert_log_scores_close(VerticalSlash(last_queries=last).scores(x), ref.vertical_slash_scores(x, last))


def direct_block_mass(v, s, bs):
    """``mass[i, j] = 1/|I| sum_{r in I} sum_{c in J, c <= r} (v[c] + s[r - c])`` in float64, token by token."""
    n = v.shape[-1]
    nb = math.ceil(n / bs)
    r = torch.arange(n)[:, None]
    c = torch.arange(n)[None, :]
    tok = torch.where(c <= r, v.double()[..., None, :] + s.double()[..., (r - c).clamp_min(0)], 0.0)  # [.., N, N]
    blk = torch.arange(n) // bs
    onehot = torch.nn.functional.one_hot(blk, nb).double()  # [N, nb]
    sums = onehot.T @ tok @ onehot  # [.., nb, nb]: sum over I x J
    return sums / onehot.sum(0)[:, None]


@pytest.mark.parametrize("n,bs", [(96, 16), (70, 16), (9, 4)])
def test_block_mass_keeps_masses_below_float32_epsilon(n, bs):
    g = torch.Generator().manual_seed(n)
    v = torch.rand(2, 3, n, generator=g, dtype=torch.float64)
    # slash masses spanning 40 orders of magnitude: the far offsets are ~1e-40 of the near ones
    s = torch.rand(2, 3, n, generator=g, dtype=torch.float64) * torch.logspace(0, -40, n, dtype=torch.float64)
    v, s = (v / v.sum(-1, keepdim=True)).float(), (s / s.sum(-1, keepdim=True)).float()
    v[..., : n // 2] *= 1e-30  # vertical masses that small too in the first half
    want = direct_block_mass(v, s, bs)
    got = _vertical_slash_block_mass(v, s, bs)
    causal = causal_blocks(math.ceil(n / bs))
    big = want[..., causal] > 1e-36  # float32's normal range (the blocks not all denormal)
    torch.testing.assert_close(got[..., causal][big].double(), want[..., causal][big], atol=0, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES[:4])
@pytest.mark.parametrize("weight", [0.0, 0.3, 0.9])
def test_blend_matches_reference_values_and_gradients(shape, weight):
    b, hq, hkv, n, d, bs, last = shape
    x = make(b, hq, hkv, n, d, bs, torch.float32, seed=3 + n)
    g = torch.Generator().manual_seed(n)
    logits = torch.randn(b, hq, x.nb, x.nb, generator=g) * 4
    partner_ref = ref.vertical_slash_scores(x, last)
    sel = VerticalSlash(last_queries=last)
    causal = causal_blocks(x.nb)
    upstream = torch.randn(b, hq, x.nb, x.nb, generator=g)
    grads = []
    for fn in (lambda s: ref.blend_scores(s, partner_ref, weight), lambda s: blend_scores(s, sel.scores(x), weight),
               lambda s: blend_mass(s, sel.mass(x), weight)):
        s = logits.clone().requires_grad_(True)
        out = fn(s)
        (out.masked_fill(~causal, 0.0) * upstream).sum().backward()
        grads.append(s.grad)
        if len(grads) == 1:
            want = out.detach()
        else:
            assert_log_scores_close(out.detach(), want)
    for grad in grads[1:]:
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad, grads[0], atol=1e-5, rtol=1e-4)


def test_blend_scores_with_minus_inf_gate_logits_above_the_diagonal():
    x = make(1, 2, 1, 48, 8, 16, torch.float32, seed=1)
    nb = x.nb
    logits = torch.randn(1, 2, nb, nb).masked_fill(~causal_blocks(nb), float("-inf")).requires_grad_(True)
    out = blend_mass(logits, VerticalSlash(last_queries=8).mass(x), 0.5)
    assert_log_scores_close(out.detach(), ref.blend_scores(logits.detach(), ref.vertical_slash_scores(x, 8), 0.5))
    out[..., causal_blocks(nb)].sum().backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("weight", [1.0, -0.1, 1.5, True])
def test_blend_weight_is_checked(weight):
    s = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="weight"):
        blend_mass(s, s.exp(), weight)


@pytest.mark.gpu
def test_vertical_slash_and_blend_do_not_sync_with_the_host():
    x = make(1, 4, 2, 300, 16, 16, torch.bfloat16, seed=2)
    x = LayerInputs(x.q.cuda(), x.k.cuda(), x.block_size, x.scale)
    logits = torch.randn(1, 4, x.nb, x.nb, device="cuda")
    sel = VerticalSlash(last_queries=64)
    sel.mass(x), blend_mass(logits, sel.mass(x), 0.5)  # warm up (allocator, lazy init)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = blend_mass(logits, sel.mass(x), 0.5)
        sel.scores(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = ref.blend_scores(logits.cpu(), ref.vertical_slash_scores(LayerInputs(x.q.cpu(), x.k.cpu(), 16, x.scale),
                                                                     64), 0.5)
    assert_log_scores_close(out.cpu(), want, atol=1e-4, log_atol=1e-3)  # CUDA vs CPU matmul rounding


def test_blend_constants_made_in_inference_mode_serve_autograd():
    x = make(1, 2, 1, 5 * 16, 8, 16, torch.float32, seed=4)
    sel = VerticalSlash(last_queries=8)
    logits = torch.randn(1, 2, x.nb, x.nb)
    with torch.inference_mode():  # first use of this nb: its cached constants are made here
        blend_mass(logits, sel.mass(x), 0.4)
    s = logits.clone().requires_grad_(True)
    blend_mass(s, sel.mass(x), 0.4)[..., causal_blocks(x.nb)].sum().backward()
    assert torch.isfinite(s.grad).all()
