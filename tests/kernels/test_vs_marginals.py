"""The fused last-rows marginals (seer/kernels/vs_marginals.py) against a float64 reference on fresh random inputs:
N not a multiple of the tiles, N below the last rows, one token, batch 2, grouped-query heads (G = 1, 3), head dims
16 to 256, several lse splits and marginal tiles, fp16/bf16/fp32 inputs, strided views, each marginal summing to
1; the plain reference (``seer.kernels.reference.last_rows_marginals``) against brute force and against the
selectors' PyTorch path (``seer.sparsity.selectors._last_rows_marginals``); argument checks. Without CUDA the kernel
runs on CPU tensors under the Triton interpreter (tests/conftest.py); the ``gpu`` test compares the CUDA kernel with
the PyTorch path at a moderate size, and checks that the selectors' dispatch makes no host sync."""

from __future__ import annotations

import pytest
import torch

from seer.kernels import last_rows_marginals, reference, vs_marginals
from seer.sparsity import selectors
from seer.sparsity.selectors import LayerInputs, VerticalSlash, _last_rows_marginals

CASES = [  # b, hq, hkv, n, d, last_queries, block_n
    (1, 2, 1, 100, 64, 64, None),  # N not a multiple of the tiles, G = 2
    (2, 3, 1, 77, 64, 64, 64),  # batch 2, G = 3, two marginal tiles
    (2, 3, 3, 45, 32, 64, None),  # N < L: every row is a last row, G = 1
    (1, 3, 1, 1, 64, 64, None),  # one token
    (1, 2, 1, 300, 32, 16, 16),  # L = 16 < N: 19 marginal tiles, 3 lse tiles
    (1, 1, 1, 200, 128, 100, 128),  # D 128, L = 100 (rows padded to 128)
    (1, 2, 2, 70, 64, 5, None),  # L = 5 (rows padded to 16)
    (1, 2, 1, 50, 16, 64, None),  # D 16
    (1, 1, 1, 20, 256, 64, None),  # D 256
]


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def make(b, hq, hkv, n, d, seed, dtype=torch.float32, spread=1.0, dev=None):
    """q, k in ``dtype`` (and their float64 copies, the same values)."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, hq, n, d, generator=g, dtype=torch.float64) * spread).to(dtype)
    k = (torch.randn(b, hkv, n, d, generator=g, dtype=torch.float64) * spread).to(dtype)
    dev = dev or _device()
    return q.to(dev), k.to(dev)


def assert_marginals_close(got, want, atol=1e-6, rtol=1e-5):
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and g.shape == w.shape
        torch.testing.assert_close(g.double().cpu(), w.double().cpu(), atol=atol, rtol=rtol)
        ones = torch.ones(w.shape[:-1], dtype=torch.float64)
        torch.testing.assert_close(g.double().sum(-1).cpu(), ones, atol=1e-5, rtol=0)


def brute_marginals(q, k, last, scale):
    """Float64, row by row, from the definition."""
    b, hq, n, d = q.shape
    g = hq // k.shape[1]
    rows = min(last, n)
    v = torch.zeros(b, hq, n, dtype=torch.float64)
    s = torch.zeros(b, hq, n, dtype=torch.float64)
    for h in range(hq):
        for r in range(n - rows, n):
            a = torch.softmax(torch.einsum("bd,bcd->bc", q[:, h, r], k[:, h // g, :r + 1]).double() * scale, -1)
            v[:, h, :r + 1] += a / rows
            s[:, h, :r + 1] += a.flip(-1) / rows  # offset o is key r - o
    return v, s


@pytest.mark.parametrize("b,hq,hkv,n,d,last,block_n", CASES)
def test_matches_float64_reference(b, hq, hkv, n, d, last, block_n):
    q, k = make(b, hq, hkv, n, d, seed=n * 3 + hq)
    want = reference.last_rows_marginals(q.double(), k.double(), last)
    assert want[0].dtype == torch.float64
    assert_marginals_close(last_rows_marginals(q, k, last, block_n=block_n), want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    """fp16/bf16 operands, fp32 accumulate: products of half values are exact in fp32, so the float64 reference of
    the same (rounded) values is met to fp32 rounding; peaky attention (spread 3)."""
    q, k = make(2, 3, 1, 130, 64, seed=11, dtype=dtype, spread=3.0)
    want = reference.last_rows_marginals(q.double(), k.double(), 64)
    assert_marginals_close(last_rows_marginals(q, k, 64), want, atol=2e-6, rtol=2e-5)


def test_strided_views_and_scale():
    """q/k as [B, N, H, D] buffers seen as [B, H, N, D] (the model's layout), a non-default softmax scale, several
    lse splits (the target program count lowered)."""
    g = torch.Generator().manual_seed(5)
    qb = torch.randn(2, 150, 4, 32, generator=g, dtype=torch.float64)
    kb = torch.randn(2, 150, 2, 32, generator=g, dtype=torch.float64)
    q, k = qb.float().to(_device()).transpose(1, 2), kb.float().to(_device()).transpose(1, 2)
    assert not q.is_contiguous()
    want = reference.last_rows_marginals(qb.transpose(1, 2), kb.transpose(1, 2), 32, sm_scale=0.3)
    assert_marginals_close(last_rows_marginals(q, k, 32, sm_scale=0.3, block_n=32), want)


def test_many_lse_splits(monkeypatch):
    monkeypatch.setattr(vs_marginals, "_BLOCK_N1", 16)
    monkeypatch.setattr(vs_marginals, "_MAX_SPLIT", 4)  # 13 lse tiles in 4 splits (the last one shorter)
    q, k = make(1, 2, 1, 200, 32, seed=9)
    want = reference.last_rows_marginals(q.double(), k.double(), 64)
    assert_marginals_close(last_rows_marginals(q, k, 64), want)


@pytest.mark.parametrize("n,last,hq,hkv", [(1, 4, 2, 1), (20, 64, 3, 1), (37, 8, 2, 2)])
def test_reference_matches_brute_force(n, last, hq, hkv):
    q, k = make(2, hq, hkv, n, 16, seed=n, dtype=torch.float64, dev=torch.device("cpu"))
    want = brute_marginals(q, k, last, 16 ** -0.5)
    got = reference.last_rows_marginals(q, k, last)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("n,last", [(75, 8), (13, 40), (1, 4), (200, 64)])
def test_reference_matches_selectors_path(n, last):
    q, k = make(2, 6, 2, n, 16, seed=n, dev=torch.device("cpu"))
    x = LayerInputs(q, k, 16, 16 ** -0.5)
    v, s, start = _last_rows_marginals(x, last)
    assert start == max(0, n - last)
    want = reference.last_rows_marginals(q.double(), k.double(), last)
    assert_marginals_close((v, s), want)


def test_selectors_dispatch(monkeypatch):
    """``_last_rows_marginals`` with the kernel forced on (CPU under the interpreter): the same ``(v, s, start)``
    and vertical-slash vectors as its PyTorch path; the CPU and inputs the kernel cannot take keep PyTorch."""
    q, k = make(2, 6, 2, 90, 32, seed=4, dtype=torch.float32, spread=2.0)
    x = LayerInputs(q, k, 16, 0.2)
    assert not selectors._fused_marginals(x, 64) or x.q.is_cuda
    assert not selectors._fused_marginals(LayerInputs(q.double(), k.double(), 16, 0.2), 64)
    assert not selectors._fused_marginals(x, 200)
    want = _last_rows_marginals(x, 40)
    want_vectors = VerticalSlash(last_queries=40).vectors(x)
    monkeypatch.setattr(selectors, "_fused_marginals", lambda x, last_queries: True)
    got = _last_rows_marginals(x, 40)
    assert got[2] == want[2] == 50
    assert_marginals_close(got[:2], want[:2])
    for g, w in zip(VerticalSlash(last_queries=40).vectors(x), want_vectors):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def test_bad_arguments_are_refused():
    q, k = make(1, 2, 1, 300, 16, seed=0)
    with pytest.raises(ValueError, match="last_queries"):
        last_rows_marginals(q, k, 0)
    with pytest.raises(ValueError, match="last_queries"):
        reference.last_rows_marginals(q, k, True)
    with pytest.raises(ValueError, match="at most"):
        last_rows_marginals(q, k, vs_marginals.MAX_LAST_QUERIES + 1)
    with pytest.raises(ValueError, match="block_n"):
        last_rows_marginals(q, k, 64, block_n=32)  # below the 64 rows
    with pytest.raises(ValueError, match="block_n"):
        last_rows_marginals(q, k, 16, block_n=48)
    with pytest.raises(ValueError, match="head dim"):
        last_rows_marginals(q[..., :12], k[..., :12], 16)
    with pytest.raises(ValueError, match="dtype"):
        last_rows_marginals(q.double(), k.double(), 16)
    assert not vs_marginals.supported(q.double(), k.double(), 64)
    assert not vs_marginals.supported(q, k, 200)
    assert vs_marginals.supported(q, k, 64)


@pytest.mark.gpu
def test_cuda_kernel_matches_pytorch_path_without_host_sync(monkeypatch):
    from seer.sparsity import selectors

    monkeypatch.setattr(selectors, "FUSED_SELECTION_ON_CUDA", True)  # what the selectors do once switched on
    b, hq, hkv, n, d = 2, 14, 2, 8192 + 37, 64
    q, k = make(b, hq, hkv, n, d, seed=7, dtype=torch.bfloat16, spread=2.0, dev=torch.device("cuda"))
    x = LayerInputs(q, k, 64, d ** -0.5)
    want = reference.last_rows_marginals(q, k, 64)  # float32, the [B, Hq, L, N] probabilities
    got = last_rows_marginals(q, k, 64)
    assert_marginals_close(got, want, atol=1e-6, rtol=1e-4)
    # the selectors' dispatch: the kernel on CUDA without grad, the same numbers
    with torch.no_grad():
        v, s, start = _last_rows_marginals(x, 64)
    assert start == n - 64
    assert_marginals_close((v, s), want, atol=1e-6, rtol=1e-4)
    # a gradient wanted through q: the PyTorch path
    qg = q.float().requires_grad_(True)
    v_grad, _, _ = _last_rows_marginals(LayerInputs(qg, k.float(), 64, d ** -0.5), 64)
    assert v_grad.requires_grad
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            _last_rows_marginals(x, 64)
            last_rows_marginals(q, k, 64)
    finally:
        torch.cuda.set_sync_debug_mode("default")
