"""The decode gates' ground truth against a brute-force float64 map."""

import math

import pytest
import torch

from seer.kernels.decode_gt import decode_block_gt


def _brute(q, k, bs, scale):
    b, hq, n, _ = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    nb = math.ceil(n / bs)
    s = torch.einsum("bhid,bhjd->bhij", q.double(), k.double().repeat_interleave(group, 1)) * scale
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.softmax(s, -1)  # [B, Hq, N, N]: the whole map, which decode_block_gt never holds
    out = torch.zeros(b, hkv, n, nb, dtype=torch.float64)
    for g in range(hkv):
        for j in range(nb):
            out[:, g, :, j] = p[:, g * group:(g + 1) * group, :, j * bs:(j + 1) * bs].amax(-1).amax(1)
    return out / out.sum(-1, keepdim=True)


@pytest.mark.parametrize("n, heads, chunk", [(45, (4, 2), 7), (32, (3, 1), None), (17, (2, 2), 1)])
def test_decode_gt_matches_brute_force(n, heads, chunk):
    torch.manual_seed(0)
    q, k = torch.randn(2, heads[0], n, 8), torch.randn(2, heads[1], n, 8)
    got = decode_block_gt(q, k, 16, sm_scale=0.4, chunk_rows=chunk)
    want = _brute(q, k, 16, 0.4)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(decode_block_gt(q.double(), k.double(), 16, sm_scale=0.4, chunk_rows=chunk) > 0, want > 0)


def test_decode_gt_refuses_bad_shapes():
    with pytest.raises(ValueError, match=r"query heads \(3\) must be a multiple of key/value heads \(2\)"):
        decode_block_gt(torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8), 16)


@pytest.mark.parametrize("n, heads, block", [(45, (4, 2), 16), (70, (2, 2), 32), (16, (3, 1), 16)])
def test_decode_gt_kernel_matches_the_reference(n, heads, block):
    from seer.kernels.decode_gt_triton import decode_gt_from_lse
    from seer.kernels.reference import attention

    torch.manual_seed(2)
    q, k, v = torch.randn(2, heads[0], n, 16), torch.randn(2, heads[1], n, 16), torch.randn(2, heads[1], n, 16)
    _, lse = attention(q, k, v, sm_scale=0.3)
    got = decode_gt_from_lse(q, k, lse.float().contiguous(), block, sm_scale=0.3)
    torch.testing.assert_close(got.double(), _brute(q, k, block, 0.3), rtol=1e-4, atol=1e-6)
