"""The PyTorch references against brute force in float64 (full N x N probability maps, no chunking)."""

import math

import pytest
import torch

from seer.kernels import reference


def _probs(q, k, scale):
    hq, hkv, n = q.shape[1], k.shape[1], q.shape[2]
    kk = k.double().repeat_interleave(hq // hkv, dim=1)
    s = q.double() @ kk.transpose(-1, -2) * scale
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1)


def _brute_pool(p, bs, how):
    b, h, n, _ = p.shape
    nb = math.ceil(n / bs)
    out = torch.zeros(b, h, nb, nb, dtype=torch.float64)
    for i in range(nb):
        for j in range(nb):
            tile = p[:, :, i * bs:(i + 1) * bs, j * bs:(j + 1) * bs]
            out[:, :, i, j] = tile.amax((-1, -2)) if how == "max" else tile.sum(-1).mean(-1)
    return out


@pytest.mark.parametrize("n, bs, hq, hkv, chunk", [(1, 16, 2, 1, None), (63, 16, 4, 1, 16), (65, 32, 4, 4, 32),
                                                    (200, 64, 6, 2, 64), (130, 16, 2, 2, None)])
def test_block_gt_and_mass_match_brute_force(n, bs, hq, hkv, chunk):
    torch.manual_seed(n)
    q, k = torch.randn(2, hq, n, 16, dtype=torch.float64), torch.randn(2, hkv, n, 16, dtype=torch.float64)
    scale = 0.3
    p = _probs(q, k, scale)
    gt = reference.block_gt(q, k, bs, sm_scale=scale, chunk_rows=chunk)
    torch.testing.assert_close(gt, _brute_pool(p, bs, "max"))
    mass = reference.block_attn_mass(q, k, bs, sm_scale=scale, chunk_rows=chunk)
    torch.testing.assert_close(mass, _brute_pool(p, bs, "mean"))
    torch.testing.assert_close(mass.sum(-1), torch.ones_like(mass.sum(-1)))
    assert (gt.triu(1) == 0).all() and (gt.diagonal(dim1=-2, dim2=-1) > 0).all()


def test_block_gt_float32_inputs_default_scale():
    q, k = torch.randn(1, 2, 50, 8), torch.randn(1, 1, 50, 8)
    gt = reference.block_gt(q, k, 16)
    assert gt.dtype == torch.float32
    torch.testing.assert_close(gt.double(), _brute_pool(_probs(q, k, 8 ** -0.5), 16, "max"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("per_kv_head", [False, True])
def test_block_sparse_reference_matches_masked_softmax(per_kv_head):
    torch.manual_seed(1)
    b, hq, hkv, n, d, bs = 2, 4, 2, 70, 8, 16
    nb = math.ceil(n / bs)
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64) for h in (hq, hkv, hkv))
    mask = torch.rand(b, hkv if per_kv_head else hq, nb, nb) < 0.5
    mask[0, 0, 2] = False  # an empty row
    out, lse = reference.block_sparse_attn(q, k, v, mask, block_size=bs, sm_scale=0.5, chunk_rows=32)
    full = mask.repeat_interleave(hq // hkv, 1) if per_kv_head else mask
    tok = full.repeat_interleave(bs, -1).repeat_interleave(bs, -2)[..., :n, :n]
    tok = tok & torch.ones(n, n, dtype=torch.bool).tril()
    s = (q @ k.repeat_interleave(hq // hkv, 1).transpose(-1, -2) * 0.5).masked_fill(~tok, float("-inf"))
    want_lse = torch.logsumexp(s, -1)
    want = torch.nan_to_num(torch.softmax(s, -1)) @ v.repeat_interleave(hq // hkv, 1)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, want_lse)
    assert torch.isinf(lse[0, 0, 2 * bs:3 * bs]).all() and (out[0, 0, 2 * bs:3 * bs] == 0).all()
    assert not out.isnan().any()


def test_dense_attention_matches_sdpa():
    q, k, v = torch.randn(1, 4, 77, 16), torch.randn(1, 2, 77, 16), torch.randn(1, 2, 77, 16)
    out, lse = reference.attention(q, k, v)
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                            is_causal=True)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert lse.shape == (1, 4, 77) and lse.dtype == torch.float32


def test_reference_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        reference.block_gt(torch.randn(1, 3, 8, 4), torch.randn(1, 2, 8, 4), 4)
    with pytest.raises(ValueError, match="block_mask must be"):
        reference.block_sparse_attn(torch.randn(1, 2, 8, 4), torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4),
                                    torch.ones(1, 2, 3, 3, dtype=torch.bool), block_size=4)


@pytest.mark.parametrize("n, bs, hq, hkv", [(100, 16, 4, 2), (64, 32, 2, 2), (37, 16, 3, 1)])
def test_sdpa_path_matches_the_reference(n, bs, hq, hkv):
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(2, h, n, 16, generator=g) for h in (hq, hkv, hkv))
    nb = reference.num_blocks(n, bs)
    mask = (torch.rand(2, hq, nb, nb, generator=g) < 0.4) | torch.eye(nb, dtype=torch.bool)
    want, _ = reference.block_sparse_attn(q.double(), k.double(), v.double(), mask, bs, sm_scale=0.3)
    got = reference.block_sparse_sdpa(q, k, v, mask, bs, sm_scale=0.3, chunk_rows=32)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="keep its diagonal block"):
        reference.block_sparse_sdpa(q, k, v, mask & ~torch.eye(nb, dtype=torch.bool), bs)


def test_references_keep_their_precision_under_autocast():
    # a bf16-mixed training step calls them under autocast: float32 inputs still give the float32 results
    torch.manual_seed(2)
    b, hq, hkv, n, d, bs = 1, 4, 2, 50, 8, 16
    nb = math.ceil(n / bs)
    q, k, v = (torch.randn(b, h, n, d) for h in (hq, hkv, hkv))
    mask = torch.rand(b, hq, nb, nb) < 0.6
    calls = [lambda: reference.block_sparse_attn(q, k, v, mask, block_size=bs), lambda: reference.attention(q, k, v),
             lambda: reference.block_gt(q, k, bs), lambda: reference.block_attn_mass(q, k, bs)]
    for call in calls:
        want = call()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = call()
        for w, g in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,)):
            assert g.dtype == torch.float32
            torch.testing.assert_close(g, w, rtol=0, atol=0)
