"""Block-sparse attention kernel (seer/kernels/block_sparse.py) against the PyTorch reference.

On machines without CUDA these run on CPU tensors under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1); sizes are small so the file takes a few minutes there. Cases marked ``gpu`` run bf16 at
4k-32k on a CUDA device.
"""

from __future__ import annotations

import math

import pytest
import torch

from seer.kernels import block_sparse as bs
from seer.kernels import reference
from seer.kernels.block_sparse import block_sparse_attn, block_sparse_attn_indexed, build_block_index
from seer.kernels.tuning import force_config
from tests.kernels.masks import random_qkv, random_shape, special_mask

CPU = torch.device("cpu")


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else CPU


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _check(out, lse, ref_out, ref_lse, dtype):
    assert not torch.isnan(out).any(), "NaN (or unwritten element) in out"
    assert not torch.isnan(lse).any(), "NaN (or unwritten element) in lse"
    assert lse.dtype == torch.float32 and out.dtype == dtype
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "empty rows differ"
    tol = 1e-5 if dtype == torch.float32 else (3e-3 if dtype == torch.float16 else 1.5e-2)
    assert _rel_err(out, ref_out) < tol
    fin = torch.isfinite(ref_lse)
    lse_tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert not fin.any() or (lse[fin].double() - ref_lse[fin].double()).abs().max().item() < lse_tol
    empty = torch.isneginf(ref_lse)
    assert (out[empty.unsqueeze(-1).expand_as(out)] == 0).all(), "empty rows must give zeros"


def _check_case(b, hq, hkv, n, d, block, dtype, mask_heads, pair, density=0.4, seed=0, sm_scale=None,
              transpose=False):
    gen = torch.Generator().manual_seed(seed)
    dev = _device()
    q, k, v = random_qkv(b, hq, hkv, n, d, dtype, gen, transpose)
    nb = math.ceil(n / block)
    mask = special_mask(b, mask_heads, nb, density, gen)
    q, k, v, mask = q.to(dev), k.to(dev), v.to(dev), mask.to(dev)
    out = torch.full((b, hq, n, d), float("nan"), dtype=dtype, device=dev)  # poisoned: unwritten -> NaN
    lse = torch.full((b, hq, n), float("nan"), dtype=torch.float32, device=dev)
    res = block_sparse_attn(q, k, v, mask, block, sm_scale, pair=pair, out=out, lse=lse)
    assert res[0] is out and res[1] is lse
    ref_out, ref_lse = reference.block_sparse_attn(q.double(), k.double(), v.double(), mask, block, sm_scale)
    _check(out, lse, ref_out, ref_lse, dtype)
    return q, k, v, mask, out, lse


# (B, Hq, Hkv, N, D, block, dtype, mask heads: "q" or "kv", pair layout)
CASES = [
    (1, 4, 1, 65, 16, 16, torch.float32, "kv", False),   # GQA 4:1, mask shared per KV head, odd N
    (1, 4, 1, 200, 16, 16, torch.float16, "q", True),    # GQA 4:1, per-query-head mask, pair layout
    (2, 2, 2, 63, 32, 32, torch.float32, "q", True),     # 1:1, batch 2, N < 2 blocks
    (1, 2, 2, 200, 32, 32, torch.float16, "kv", False),  # 1:1, block 32
    (1, 2, 1, 1, 16, 16, torch.float32, "q", False),     # N = 1
    (1, 2, 1, 1, 16, 16, torch.float16, "kv", True),
    (1, 4, 2, 130, 16, 32, torch.float32, "kv", True),   # GQA 2:1, pair with odd number of blocks
]


@pytest.mark.parametrize("b,hq,hkv,n,d,block,dtype,mh,pair", CASES)
def test_matches_reference(b, hq, hkv, n, d, block, dtype, mh, pair):
    _check_case(b, hq, hkv, n, d, block, dtype, hq if mh == "q" else hkv, pair)


@pytest.mark.parametrize("seed", range(6))
def test_random_shapes(seed):
    """Fresh random shapes, layouts and densities (the kernel must compute the same function on any input)."""
    pick, hq, hkv, block, n = random_shape(100 + seed, max_blocks=6)
    _check_case(pick([1, 2]), hq, hkv, n, pick([16, 32]), block, pick([torch.float32, torch.float16]),
              pick([hq, hkv]), pick([False, True]), density=pick([0.1, 0.5, 0.9]), seed=seed)


@pytest.mark.parametrize("density", [0.0, 1.0])
def test_empty_and_full_masks(density):
    gen = torch.Generator().manual_seed(3)
    dev = _device()
    b, h, n, d, block = 1, 2, 50, 16, 16
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to(dev) for _ in range(3))
    mask = torch.full((b, h, 4, 4), density > 0, dtype=torch.bool, device=dev)
    for pair in (False, True):
        out = torch.full_like(q, float("nan"))
        lse = torch.full((b, h, n), float("nan"), device=dev)
        block_sparse_attn(q, k, v, mask, block, pair=pair, out=out, lse=lse)
        if density == 0:
            assert (out == 0).all() and torch.isneginf(lse).all()
        else:
            ref_out, ref_lse = reference.attention(q.double(), k.double(), v.double())
            _check(out, lse, ref_out, ref_lse, torch.float32)


def test_subtiles_transposed_inputs_and_scale():
    """Key tiles narrower than a mask block (the loop over sub-tiles), [B, N, H, D] storage, a custom scale."""
    with force_config("block_sparse", BLOCK_N=16):
        _check_case(1, 2, 1, 90, 16, 32, torch.float32, 1, False, transpose=True, sm_scale=0.3)


@pytest.mark.parametrize("pair", [False, True])
def test_tma_path(monkeypatch, pair):
    """The tensor-descriptor (copy engine) path; on the CPU the interpreter emulates the descriptors."""
    monkeypatch.setattr(bs, "tma_ok", lambda *t: True)
    with force_config("block_sparse", USE_TMA=True):
        _check_case(1, 4, 2, 75, 16, 16, torch.float16, 2, pair, seed=9)


def test_hopper_candidates(monkeypatch):
    """Capability >= 9: the default (with its Hopper override, D 128 row lists: one stage, the copy engine) first,
    then that with the copy engine where it differs (the only Hopper candidate); any other device: the table's
    default alone."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for key in ((128, 64, False), (128, 64, True), (128, 128, False), (64, 32, False)):
        default = bs._default_config(key)
        monkeypatch.setattr(bs, "is_hopper", lambda device: False)
        assert bs._cuda_config(key) == [default]
        monkeypatch.setattr(bs, "is_hopper", lambda device: True)
        got = bs._cuda_config(key)
        assert all(set(c) == set(bs.FIELDS) for c in got)
        first = dict(default, num_stages=1, USE_TMA=True) if key == (128, 64, False) else default
        assert got == ([first] if first["USE_TMA"] else [first, dict(first, USE_TMA=True)])


def test_out_as_transposed_view():
    """``out`` may be a [B, N, H, D] buffer seen as [B, H, N, D] (what a Hugging Face layer returns)."""
    gen = torch.Generator().manual_seed(21)
    dev = _device()
    b, h, n, d, block = 1, 2, 40, 16, 16
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to(dev) for _ in range(3))
    mask = special_mask(b, h, 3, 0.6, gen).to(dev)
    buf = torch.full((b, n, h, d), float("nan"), device=dev)
    out, lse = block_sparse_attn(q, k, v, mask, block, out=buf.transpose(1, 2))
    ref_out, ref_lse = reference.block_sparse_attn(q.double(), k.double(), v.double(), mask, block)
    _check(buf.transpose(1, 2), lse, ref_out, ref_lse, torch.float32)


def _python_index(mask: torch.Tensor, pair: bool) -> tuple[list, list]:
    b, h, nb, _ = mask.shape
    lists, counts = [], []
    for bi in range(b):
        for hi in range(h):
            rows = range(0, nb, 2) if pair else range(nb)
            for r in rows:
                entries = []
                for c in range(nb):
                    top = c <= r and bool(mask[bi, hi, r, c])
                    if pair:
                        bot = r + 1 < nb and c <= r + 1 and bool(mask[bi, hi, r + 1, c])
                        if top or bot:
                            entries.append(4 * c + int(top) + 2 * int(bot))
                    elif top:
                        entries.append(c)
                lists.append(entries)
                counts.append(len(entries))
    return lists, counts


@pytest.mark.parametrize("pair", [False, True])
@pytest.mark.parametrize("nb", [1, 7, 40])
def test_build_block_index(pair, nb):
    gen = torch.Generator().manual_seed(nb)
    mask = torch.rand(2, 3, nb, nb, generator=gen) < 0.3
    mask[0, 0, -1, :] = True
    mask[1, 2] = False
    dev = _device()
    idx, cnt = build_block_index(mask.to(dev), pair=pair)
    rows = (nb + 1) // 2 if pair else nb
    assert idx.shape == (2, 3, rows, nb) and cnt.shape == (2, 3, rows)
    assert idx.dtype == torch.int32 and cnt.dtype == torch.int32
    lists, counts = _python_index(mask, pair)
    idx, cnt = idx.cpu().reshape(-1, nb), cnt.cpu().reshape(-1)
    assert cnt.tolist() == counts
    for r, entries in enumerate(lists):
        assert idx[r, :len(entries)].tolist() == entries


def test_build_block_index_strided_mask():
    """A non-contiguous mask view (e.g. one expanded over heads) gives the same lists."""
    gen = torch.Generator().manual_seed(11)
    base = torch.rand(1, 1, 9, 9, generator=gen) < 0.5
    dev = _device()
    idx, cnt = build_block_index(base.to(dev).expand(1, 3, 9, 9))
    idx0, cnt0 = build_block_index(base.to(dev))
    for h in range(3):
        assert torch.equal(cnt[:, h], cnt0[:, 0])
        for r in range(9):
            c = int(cnt0[0, 0, r])
            assert torch.equal(idx[0, h, r, :c], idx0[0, 0, r, :c])


def test_indexed_matches_masked():
    gen = torch.Generator().manual_seed(5)
    dev = _device()
    b, hq, hkv, n, d, block = 1, 4, 2, 100, 16, 16
    q = torch.randn(b, hq, n, d, generator=gen).to(dev)
    k, v = (torch.randn(b, hkv, n, d, generator=gen).to(dev) for _ in range(2))
    mask = special_mask(b, hkv, math.ceil(n / block), 0.5, gen).to(dev)
    for pair in (False, True):
        ref = block_sparse_attn(q, k, v, mask, block, pair=pair)
        idx, cnt = build_block_index(mask, pair=pair)
        got = block_sparse_attn_indexed(q, k, v, idx, cnt, block, pair=pair)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize("mask_heads", ["q", "kv"])
def test_heaviest_first_schedule_on_skewed_masks(mask_heads):
    """Per-head densities from 0.02 to 0.9 (what calibrated budgets give): the sorted 1-d launch equals the reference
    and the per-head launch, and its order is a permutation of all row programs, longest lists first."""
    gen = torch.Generator().manual_seed(7)
    b, hq, hkv, n, d, block = 2, 4, 2, 150, 16, 16
    nb = -(-n // block)
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for h in (hq, hkv, hkv))
    hm = hq if mask_heads == "q" else hkv
    dens = torch.linspace(0.02, 0.9, hm).view(1, hm, 1, 1)
    mask = (torch.rand(b, hm, nb, nb, generator=gen) < dens) | torch.eye(nb, dtype=torch.bool)
    dev = _device()
    q, k, v, mask = q.to(dev), k.to(dev), v.to(dev), mask.to(dev)
    ref_out, ref_lse = reference.block_sparse_attn(q.double(), k.double(), v.double(), mask, block)
    runs = {}
    for schedule in ("heaviest_first", "rows"):
        out = torch.full_like(q, float("nan"))  # poisoned: unwritten -> NaN
        lse = torch.full(q.shape[:3], float("nan"), device=dev)
        block_sparse_attn(q, k, v, mask, block, out=out, lse=lse, schedule=schedule)
        _check(out, lse, ref_out, ref_lse, torch.float32)
        runs[schedule] = out
    torch.testing.assert_close(runs["heaviest_first"], runs["rows"], rtol=0, atol=0)
    _, counts = build_block_index(mask)
    order = bs.heaviest_first(counts, hq)
    assert sorted(order.tolist()) == list(range(b * hq * nb))
    work = counts.repeat_interleave(hq // hm, dim=1).reshape(-1)[order.long()]
    assert (work[:-1] >= work[1:]).all()
    with pytest.raises(ValueError, match="schedule='fastest'"):
        block_sparse_attn(q, k, v, mask, block, schedule="fastest")


def test_zero_length():
    q = torch.randn(1, 2, 0, 16)
    mask = torch.zeros(1, 2, 0, 0, dtype=torch.bool)
    out, lse = block_sparse_attn(q, q, q, mask, 16)
    assert out.shape == (1, 2, 0, 16) and lse.shape == (1, 2, 0)


def test_bad_inputs():
    dev = _device()
    q = torch.randn(1, 4, 40, 16, device=dev)
    k = torch.randn(1, 2, 40, 16, device=dev)
    mask = torch.ones(1, 4, 3, 3, dtype=torch.bool, device=dev)
    with pytest.raises(ValueError, match="bool"):
        block_sparse_attn(q, k, k, mask.int(), 16)
    with pytest.raises(ValueError, match=r"\[1, 4 or 2, 3, 3\]"):
        block_sparse_attn(q, k, k, torch.ones(1, 4, 4, 4, dtype=torch.bool, device=dev), 16)
    with pytest.raises(ValueError, match="3 heads"):
        block_sparse_attn(q, k, k, torch.ones(1, 3, 3, 3, dtype=torch.bool, device=dev), 16)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        block_sparse_attn(q, torch.randn(1, 3, 40, 16, device=dev), torch.randn(1, 3, 40, 16, device=dev),
                          mask, 16)
    with pytest.raises(ValueError, match="share a dtype"):
        block_sparse_attn(q, k.half(), k.half(), mask, 16)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        block_sparse_attn(q.double(), k.double(), k.double(), mask, 16)
    with pytest.raises(ValueError, match="block_size 48"):
        block_sparse_attn(q, k, k, mask, 48)
    with pytest.raises(ValueError, match="head dim"):
        block_sparse_attn(q[..., :12], k[..., :12], k[..., :12], mask, 16)
    with pytest.raises(ValueError, match="4-D"):
        block_sparse_attn(q[0], k, k, mask, 16)
    with pytest.raises(ValueError, match="does not match q"):
        block_sparse_attn(q, k[:, :, :30], k[:, :, :30], mask, 16)
    with pytest.raises(ValueError, match="must have the shape of k"):
        block_sparse_attn(q, k, k[..., :8], mask, 16)
    idx, cnt = build_block_index(mask)
    with pytest.raises(ValueError, match="int32"):
        block_sparse_attn_indexed(q, k, k, idx.long(), cnt, 16)
    with pytest.raises(ValueError, match="kv_indices must be"):
        block_sparse_attn_indexed(q, k, k, idx, cnt, 16, pair=True)
    with pytest.raises(ValueError, match="kv_counts must be"):
        block_sparse_attn_indexed(q, k, k, idx, cnt[..., :2], 16)
    with pytest.raises(ValueError, match="out must be"):
        block_sparse_attn(q, k, k, mask, 16, out=torch.empty(1, 4, 40, 8, device=dev))
    with pytest.raises(ValueError, match="lse must be"):
        block_sparse_attn(q, k, k, mask, 16, lse=torch.empty(1, 4, 40, dtype=torch.float64, device=dev))
    with pytest.raises(ValueError, match="must be bool"):
        build_block_index(mask.float())
    with pytest.raises(ValueError, match="sm_scale must be a positive finite number, got nan"):
        block_sparse_attn(q, k, k, mask, 16, sm_scale=float("nan"))
    with force_config("block_sparse", BLOCK_N=32), pytest.raises(ValueError, match="invalid for block_size 16"):
        block_sparse_attn(q, k, k, mask, 16)
    if dev.type == "cuda":
        with pytest.raises(ValueError, match="one device"):
            block_sparse_attn(q, k, k, mask.cpu(), 16)


# ------------------------------------------------------------------------------------------------ GPU

def _gpu_case(n, block, hq, hkv, density, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    d = 128
    q = torch.randn(1, hq, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    nb = math.ceil(n / block)
    mask = torch.rand(1, hq, nb, nb, device="cuda", generator=gen) < density
    mask[:, :, torch.arange(nb), torch.arange(nb)] = True
    mask[:, 0, 5, :] = False  # one empty row
    return q, k, v, mask


@pytest.mark.gpu
@pytest.mark.parametrize("n,block,hkv", [(4096, 64, 8), (4096 + 77, 128, 32), (16384, 64, 32), (32768, 128, 8)])
def test_gpu_bf16_matches_reference(n, block, hkv):
    q, k, v, mask = _gpu_case(n, block, 32, hkv, 0.2, n + block)
    for pair in ((False, True) if block == 64 else (False,)):
        out = torch.full_like(q, float("nan"))
        lse = torch.full(q.shape[:3], float("nan"), device="cuda")
        block_sparse_attn(q, k, v, mask, block, pair=pair, out=out, lse=lse)
        ref_out, ref_lse = reference.block_sparse_attn(q, k, v, mask, block)
        _check(out, lse, ref_out, ref_lse, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("block", [64, 128])
def test_gpu_dense_matches_sdpa(block):
    n = 8192 + 100
    q, k, v, _ = _gpu_case(n, block, 32, 8, 1.0, 7)
    nb = math.ceil(n / block)
    mask = torch.ones(1, 8, nb, nb, dtype=torch.bool, device="cuda")
    out, lse = block_sparse_attn(q, k, v, mask, block)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert _rel_err(out, ref) < 1.5e-2
    assert torch.isfinite(lse).all()


@pytest.mark.gpu
def test_gpu_float32_uses_ieee_dots():
    """float32 inputs take IEEE float32 dots: float32 accuracy against the float64 reference (tf32: ~1e-3 off)."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(1, 4, 2048, 64, device="cuda", generator=gen) for _ in range(3))
    mask = torch.rand(1, 4, 32, 32, device="cuda", generator=gen) < 0.5
    out, lse = block_sparse_attn(q, k, v, mask, 64)
    ref_out, ref_lse = reference.block_sparse_attn(q.double(), k.double(), v.double(), mask, 64)
    _check(out, lse, ref_out, ref_lse, torch.float32)


# copy-engine variants the launch table or the benchmark (experiments/bench_hopper.py) may pick, forced: (layout,
# BLOCK_N, num_warps, num_stages, USE_TMA)
HOPPER_CASES = [(pair, bn, w, st, True) for pair in (False, True) for bn in (32, 64)
                for w, st in ((4, 1), (4, 2), (8, 1), (8, 3))]


def _hopper_config(bn, w, st, tma):
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the Hopper path needs a device of compute capability >= 9")
    return dict(BLOCK_N=bn, num_warps=w, num_stages=st, USE_TMA=tma)


@pytest.mark.gpu
@pytest.mark.parametrize("pair,bn,w,st,tma", HOPPER_CASES)
def test_gpu_hopper_variants_match_reference(pair, bn, w, st, tma):
    """bf16 at 4k (GQA 4:1, a length off the block grid) and 16k on random masks against the reference."""
    config = _hopper_config(bn, w, st, tma)
    for n, hkv in ((4096 + 77, 8), (16384, 32)):
        q, k, v, mask = _gpu_case(n, 64, 32, hkv, 0.2, n + bn + w)
        out = torch.full_like(q, float("nan"))
        lse = torch.full(q.shape[:3], float("nan"), device="cuda")
        with force_config("block_sparse", **config):
            block_sparse_attn(q, k, v, mask, 64, pair=pair, out=out, lse=lse)
        ref_out, ref_lse = reference.block_sparse_attn(q, k, v, mask, 64)
        _check(out, lse, ref_out, ref_lse, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("pair,bn,w,st,tma", HOPPER_CASES)
def test_gpu_hopper_variants_dense_match_sdpa(pair, bn, w, st, tma):
    """Density 1.0 (all causal blocks) against SDPA at 8k, bf16."""
    config = _hopper_config(bn, w, st, tma)
    n = 8192
    q, k, v, _ = _gpu_case(n, 64, 32, 32, 1.0, 11)
    mask = torch.ones(1, 32, n // 64, n // 64, dtype=torch.bool, device="cuda")
    with force_config("block_sparse", **config):
        out, lse = block_sparse_attn(q, k, v, mask, 64, pair=pair)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert _rel_err(out, ref) < 1.5e-2
    assert torch.isfinite(lse).all()
