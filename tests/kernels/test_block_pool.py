"""Gate kernels against their PyTorch paths: block pooling (seer/kernels/block_pool.py) and top-k block selection
(seer/kernels/block_topk.py).

On machines without CUDA these run on CPU tensors under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1) and compare with the CPU code of seer.gates.pool_blocks / seer.sparsity.topk_mask; on a GPU
they compare the CUDA kernels with the same CPU code. Outputs are poisoned before each launch.
"""

from __future__ import annotations

import math

import pytest
import torch

from seer.gates import pool_blocks
from seer.kernels.block_pool import block_pool
from seer.kernels.block_topk import topk_block_mask
from seer.sparsity import causal_blocks, row_budgets, topk_mask


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# (B, H, N, D, block, kinds, dtype, out_dtype)
POOL_CASES = [
    (1, 2, 70, 16, 16, ["avg", "max", "min", "last"], torch.float32, None),  # partial last block
    (2, 3, 64, 32, 16, ["max", "min", "avg"], torch.bfloat16, None),         # the authors' K pools, exact blocks
    (1, 2, 33, 24, 8, ["last", "avg"], torch.float16, None),                 # D not a power of two
    (1, 1, 1, 16, 16, ["avg", "min"], torch.float32, None),                  # N = 1
    (1, 2, 150, 16, 64, ["avg"], torch.bfloat16, torch.float32),             # float32 output, 3 blocks
    (1, 2, 300, 16, 160, ["max", "avg"], torch.float32, None),               # block of several chunks
]


@pytest.mark.parametrize("b,h,n,d,block,kinds,dtype,out_dtype", POOL_CASES)
@pytest.mark.parametrize("transposed", [False, True])
def test_block_pool_matches_pytorch(b, h, n, d, block, kinds, dtype, out_dtype, transposed):
    gen = torch.Generator().manual_seed(n * 7 + d)
    if transposed:  # [B, N, H, D] storage seen as [B, H, N, D], as attention layers hold Q and K
        x = torch.randn(b, n, h, d, generator=gen).to(dtype).transpose(1, 2)
    else:
        x = torch.randn(b, h, n, d, generator=gen).to(dtype)
    want = pool_blocks(x, block, kinds)  # the PyTorch path on CPU tensors
    nb = math.ceil(n / block)
    dev = _device()
    out = torch.full((b, h, nb, d * len(kinds)), float("nan"), dtype=out_dtype or dtype, device=dev)
    got = block_pool(x.to(dev), block, kinds, out=out)
    assert got is out and not torch.isnan(got).any(), "unwritten output elements"
    got = got.cpu()
    for i, kind in enumerate(kinds):
        g, w = got[..., i * d:(i + 1) * d], want[..., i * d:(i + 1) * d]
        if kind != "avg":
            assert torch.equal(g, w.to(g.dtype)), kind
        elif out_dtype == torch.float32:  # unrounded float32 average against a float64 one
            xs = torch.nn.functional.pad(x.double(), (0, 0, 0, nb * block - n)).reshape(b, h, nb, block, d)
            cnt = torch.full((nb,), block, dtype=torch.float64)
            cnt[-1] = n - (nb - 1) * block
            torch.testing.assert_close(g.double(), xs.sum(3) / cnt[:, None], rtol=1e-6, atol=1e-6)
        else:  # float32 sums in another order: at most one rounding step of the output dtype apart
            torch.testing.assert_close(g, w, rtol={torch.float32: 1e-6}.get(dtype, 1e-2), atol=1e-5)


def test_block_pool_default_output_and_errors():
    x = torch.randn(1, 2, 40, 16).to(_device())
    got = block_pool(x, 16, ["max"])
    assert got.shape == (1, 2, 3, 16) and got.dtype == x.dtype and got.is_contiguous()
    with pytest.raises(ValueError, match="distinct pooling types"):
        block_pool(x, 16, ["max", "max"])
    with pytest.raises(ValueError, match="distinct pooling types"):
        block_pool(x, 16, ["median"])


def _poisoned_mask(shape, dev) -> torch.Tensor:
    m = torch.empty(shape, dtype=torch.bool, device=dev)
    m.view(torch.int8).fill_(0x55)  # neither False nor True: an unwritten entry shows
    return m


def _special_scores(b, h, nb, dtype, gen) -> torch.Tensor:
    """Scores with exact ties (small integers), NaN, +-inf and -0.0, as a non-contiguous view."""
    shape = (b, h, nb, nb)
    s = torch.where(torch.rand(shape, generator=gen) < 0.5, torch.randint(-3, 4, shape, generator=gen).float(),
                    torch.randn(shape, generator=gen))
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0])
    pick = torch.rand(s.shape, generator=gen) < 0.08
    s[pick] = specials[torch.randint(0, 5, (int(pick.sum()),), generator=gen)]
    return s.to(dtype).transpose(-1, -2).contiguous().transpose(-1, -2)


@pytest.mark.parametrize("nb", [1, 5, 33, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_kernel_matches_sort_path(nb, dtype):
    gen = torch.Generator().manual_seed(nb)
    dev = _device()
    scores = _special_scores(2, 1, nb, dtype, gen)
    for ratio, nz, sink, dense in ((0.9, False, 0, 0), (0.5, False, 2, 3), (0.75, True, 1, 0), (0.0, False, 0, 0)):
        want = topk_mask(scores, 1.0 - ratio, nz, sink, dense_last_rows=dense)  # CPU: stable argsort path
        budget = row_budgets(nb, 1.0 - ratio, nz, dev)
        out = _poisoned_mask(scores.shape, dev)
        got = topk_block_mask(scores.to(dev), budget, sink, out=out)
        assert got is out and ((got.view(torch.int8) == 0) | (got.view(torch.int8) == 1)).all()
        got = got.cpu()
        dense_rows = slice(max(0, nb - dense), nb)  # kept whole after the selection, as topk_mask does
        got[..., dense_rows, :] |= causal_blocks(nb)[dense_rows]
        assert torch.equal(got, want), (ratio, nz, sink, dense)
