"""Backward of the block-sparse attention kernel (seer/kernels/block_sparse_bwd.py) against autograd of the reference.

On machines without CUDA these run on CPU tensors under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1) with float32 inputs, compared with the PyTorch reference differentiated in float64. Every
buffer the backward allocates is poisoned (NaN, or 0 in index lists, which would add wrong blocks if read past
a count) so unwritten values show. Cases marked ``gpu`` run bf16/fp16 at 4k+ against the float32 reference.
"""

from __future__ import annotations

import math

import pytest
import torch

from seer.kernels import block_sparse as bs
from seer.kernels import block_sparse_bwd as bwd
from seer.kernels import reference, tuning
from seer.kernels.block_sparse import block_sparse_attn, block_sparse_attn_indexed, build_block_index
from seer.kernels.block_sparse_bwd import block_sparse_attn_backward, build_block_col_index
from seer.kernels.tuning import force_config, last_launch
from tests.kernels.masks import random_qkv, random_shape, special_mask

CPU = torch.device("cpu")


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else CPU


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    """Every buffer of the backward starts as NaN (floats) or 0 (ints): an unwritten or wrongly read value shows."""
    def alloc(shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else 0
        return torch.full(shape, fill, dtype=dtype, device=device)

    def alloc_like(x):
        return torch.full_like(x, float("nan"))

    monkeypatch.setattr(bwd, "_alloc", alloc)
    monkeypatch.setattr(bwd, "_alloc_like", alloc_like)


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _check_grad(name: str, got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == ref.shape and got.dtype == dtype, name
    assert not torch.isnan(got).any(), f"NaN (or unwritten element) in {name}"
    if ref.abs().max() == 0:
        assert (got == 0).all(), f"{name} must be zero"
        return
    tol = 2e-5 if dtype == torch.float32 else (4e-3 if dtype == torch.float16 else 2.5e-2)
    err = _rel_err(got, ref)
    assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"
    if dtype == torch.float32:  # elementwise too, relative to the largest entry
        worst = (got.double() - ref.double()).abs().max().item() / ref.abs().max().item()
        assert worst < 1e-5, f"{name}: worst element off by {worst:.2e} of the largest"


def _reference_grads(q, k, v, mask, block, sm_scale, do, dlse, dtype=torch.float64):
    """(out, lse, dq, dk, dv) of the PyTorch reference, differentiated by autograd in ``dtype``."""
    qr, kr, vr = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    out, lse = reference.block_sparse_attn(qr, kr, vr, mask, block, sm_scale)
    outs, grads = [out], [do.to(dtype)]
    if dlse is not None:
        outs.append(lse)
        grads.append(dlse.to(dtype).masked_fill(torch.isneginf(lse), 0.0))  # lse = -inf there: no derivative
    dq, dk, dv = torch.autograd.grad(outs, (qr, kr, vr), grads)
    return out, lse, dq, dk, dv


def _check_case(b, hq, hkv, n, d, block, mask_heads, *, dtype=torch.float32, pair=False, density=0.4, seed=0,
                sm_scale=None, transpose=False, use_lse=True, mask=None):
    gen = torch.Generator().manual_seed(seed)
    dev = _device()
    q, k, v = random_qkv(b, hq, hkv, n, d, dtype, gen, transpose)
    nb = math.ceil(n / block)
    if mask is None:
        mask = special_mask(b, mask_heads, nb, density, gen)
    do = torch.randn(b, hq, n, d, generator=gen).to(dtype)
    dlse = torch.randn(b, hq, n, generator=gen) if use_lse else None
    q, k, v, mask, do = (x.to(dev) for x in (q, k, v, mask, do))
    dlse = None if dlse is None else dlse.to(dev)
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    out, lse = block_sparse_attn(qg, kg, vg, mask, block, sm_scale, pair=pair)
    assert out.requires_grad and lse.requires_grad
    outs, grads = ([out, lse], [do, dlse]) if use_lse else ([out], [do])
    dq, dk, dv = torch.autograd.grad(outs, (qg, kg, vg), grads)
    ref = _reference_grads(q, k, v, mask, block, sm_scale, do, dlse,
                           torch.float64 if dev.type == "cpu" else torch.float32)
    assert _rel_err(out, ref[0]) < (1e-5 if dtype == torch.float32 else 2e-2)
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), ref[2:]):
        _check_grad(name, got, want, dtype)
    # a query row that attends to nothing (empty mask row) gets dq = 0
    empty = torch.isneginf(ref[1])
    assert (dq[empty.unsqueeze(-1).expand_as(dq)] == 0).all()
    return dq, dk, dv


# (B, Hq, Hkv, N, D, block, mask heads: "q" or "kv", forward pair layout)
CASES = [
    (1, 4, 1, 65, 16, 16, "kv", False),   # GQA 4:1, mask shared per KV head, odd N
    (1, 4, 1, 71, 16, 16, "q", False),    # GQA 4:1, one mask per query head
    (1, 4, 2, 90, 32, 16, "q", True),     # GQA 2:1, D 32, pair-layout forward (backward builds row lists)
    (2, 2, 2, 63, 32, 32, "q", False),    # 1:1, batch 2, N < 2 blocks
    (1, 4, 2, 130, 16, 32, "kv", False),  # GQA 2:1, block 32, partial last block
    (1, 2, 1, 96, 16, 16, "kv", False),   # N a multiple of the block
    (1, 2, 1, 1, 16, 16, "q", False),     # N = 1
]


@pytest.mark.parametrize("b,hq,hkv,n,d,block,mh,pair", CASES)
def test_grads_match_reference(b, hq, hkv, n, d, block, mh, pair):
    _check_case(b, hq, hkv, n, d, block, hq if mh == "q" else hkv, pair=pair)


@pytest.mark.parametrize("seed", range(3))
def test_random_shapes(seed):
    """Fresh random shapes, group sizes, mask layouts and densities."""
    pick, hq, hkv, block, n = random_shape(200 + seed, max_blocks=5)
    _check_case(1, hq, hkv, n, 16, block, pick([hq, hkv]), density=pick([0.1, 0.5, 0.9]), seed=seed,
                use_lse=pick([False, True]))


def test_float16():
    _check_case(1, 4, 2, 77, 16, 16, 4, dtype=torch.float16, seed=4)


def test_dense_mask_matches_dense_attention():
    """A full mask is dense causal attention: gradients equal those of the dense reference."""
    gen = torch.Generator().manual_seed(3)
    dev = _device()
    b, hq, hkv, n, d, block = 1, 4, 2, 70, 16, 16
    q, k, v = (x.to(dev) for x in random_qkv(b, hq, hkv, n, d, torch.float32, gen))
    do = torch.randn(b, hq, n, d, generator=gen).to(dev)
    mask = torch.ones(b, hkv, 5, 5, dtype=torch.bool, device=dev)
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    out, _ = block_sparse_attn(qg, kg, vg, mask, block)
    got = torch.autograd.grad(out, (qg, kg, vg), do)
    qr, kr, vr = (x.detach().double().requires_grad_() for x in (q, k, v))
    want = torch.autograd.grad(reference.attention(qr, kr, vr)[0], (qr, kr, vr), do.double())
    for name, g_, w in zip(("dq", "dk", "dv"), got, want):
        _check_grad(name, g_, w, torch.float32)


def test_empty_mask_gives_zero_grads():
    gen = torch.Generator().manual_seed(8)
    dev = _device()
    q, k, v = (x.to(dev).requires_grad_() for x in random_qkv(1, 2, 1, 40, 16, torch.float32, gen))
    mask = torch.zeros(1, 2, 3, 3, dtype=torch.bool, device=dev)
    out, lse = block_sparse_attn(q, k, v, mask, 16)
    assert (out == 0).all() and torch.isneginf(lse).all()
    grads = torch.autograd.grad((out, lse), (q, k, v), (torch.randn_like(out), torch.randn_like(lse)))
    for g_ in grads:
        assert (g_ == 0).all()


def test_subtiles_transposed_inputs_and_scale():
    """Tiles narrower than a mask block (the diagonal's skipped sub-tiles, several query/key steps per block),
    [B, N, H, D] storage (gradients keep it), a custom scale."""
    with force_config("block_sparse_bwd.dkdv", BLOCK_N=16, BLOCK_M=16, num_warps=4, num_stages=1, USE_TMA=False), \
            force_config("block_sparse_bwd.dq", BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, USE_TMA=False):
        dq, dk, dv = _check_case(1, 4, 2, 90, 16, 32, 4, transpose=True, sm_scale=0.3, seed=5)
    assert dq.transpose(1, 2).is_contiguous() and dk.transpose(1, 2).is_contiguous()


def test_mixed_subtiles():
    """Key tiles of a whole block with query steps of half a block, and the reverse."""
    with force_config("block_sparse_bwd.dkdv", BLOCK_N=32, BLOCK_M=16, num_warps=4, num_stages=1, USE_TMA=False), \
            force_config("block_sparse_bwd.dq", BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1, USE_TMA=False):
        _check_case(1, 2, 1, 75, 16, 32, 2, seed=6)


def test_tma_path(monkeypatch):
    """The tensor-descriptor (copy engine) loads; on the CPU the interpreter emulates the descriptors."""
    monkeypatch.setattr(bs, "tma_ok", lambda *t: True)
    monkeypatch.setattr(bwd, "tma_ok", lambda *t: True)
    with force_config("block_sparse_bwd.dkdv", BLOCK_N=16, BLOCK_M=16, num_warps=4, num_stages=1, USE_TMA=True), \
            force_config("block_sparse_bwd.dq", BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, USE_TMA=True):
        _check_case(2, 4, 2, 75, 16, 16, 4, seed=9)
    assert all(last_launch(f"block_sparse_bwd.{kernel}")["config"]["USE_TMA"] for kernel in ("dkdv", "dq"))


def test_forced_config_is_honoured_and_checked():
    """force_config("block_sparse_bwd.dq", ...) reaches the dq launch (its fields over the key's default, the
    dk/dv launch untouched); a tile larger than the mask block is refused, naming the config and the tile."""
    key = (16, 32)
    dq_default, dkdv_default = bwd.DQ_TABLE.candidates(key)[0], bwd.DKDV_TABLE.candidates(key)[0]
    with force_config("block_sparse_bwd.dq", BLOCK_M=16):
        _check_case(1, 2, 1, 75, 16, 32, 2, seed=16)
    assert last_launch("block_sparse_bwd.dq")["config"] == dict(dq_default, BLOCK_M=16)
    assert last_launch("block_sparse_bwd.dkdv")["config"] == dkdv_default
    _check_case(1, 2, 1, 75, 16, 32, 2, seed=16)  # nothing forced: the defaults again
    assert last_launch("block_sparse_bwd.dq")["config"] == dq_default

    gen = torch.Generator().manual_seed(17)
    dev = _device()
    q, k, v = (x.to(dev) for x in random_qkv(1, 2, 1, 70, 16, torch.float32, gen))
    mask = special_mask(1, 2, 3, 0.5, gen).to(dev)
    out, lse = block_sparse_attn(q, k, v, mask, 32)
    for kernel, tile in (("dq", "BLOCK_M"), ("dq", "BLOCK_N"), ("dkdv", "BLOCK_N"), ("dkdv", "BLOCK_M")):
        with force_config(f"block_sparse_bwd.{kernel}", **{tile: 64}), pytest.raises(
                ValueError, match=rf"forced block_sparse_bwd.{kernel} config .*'{tile}': 64.* is invalid: invalid "
                                  rf"for block_size 32: {tile} must divide the mask block size"):
            block_sparse_attn_backward(out, q, k, v, out, lse, mask, 32)
    with pytest.raises(ValueError, match=r"block_sparse_bwd.dq configs have no entry \['BLOCK'\]"):
        with force_config("block_sparse_bwd.dq", BLOCK=16):
            pass


@pytest.mark.parametrize("interpret", [False, True])
def test_one_valid_default_per_key(monkeypatch, interpret):
    """Every key (head dims 16-256, blocks 16-128) has one default (nothing timed at run time) whose tiles fit the
    mask block; the H100 winners at D 128 (docs/bench_sparse_bwd.md) are the defaults there; the interpreter runs
    block-sized tiles."""
    monkeypatch.setattr(tuning, "INTERPRET", interpret)
    for table in (bwd.DKDV_TABLE, bwd.DQ_TABLE):
        for d in (16, 32, 64, 128, 256):
            for block in (16, 32, 64, 128):
                (cfg,) = table.candidates((d, block))
                assert table.invalid(cfg, (d, block)) is None and cfg["BLOCK_M"] <= block and cfg["BLOCK_N"] <= block
                if interpret:
                    assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_stages"]) == (block, block, 1)
    if not interpret:
        assert bwd.DKDV_TABLE.candidates((128, 128))[0]["BLOCK_N"] == 128
        assert bwd.DQ_TABLE.candidates((128, 64))[0]["USE_TMA"]


def test_only_some_inputs_need_grad():
    gen = torch.Generator().manual_seed(12)
    dev = _device()
    q, k, v = (x.to(dev) for x in random_qkv(1, 2, 1, 50, 16, torch.float32, gen))
    mask = special_mask(1, 2, 4, 0.6, gen).to(dev)
    do = torch.randn(1, 2, 50, 16, generator=gen).to(dev)
    kg = k.clone().requires_grad_()
    out, lse = block_sparse_attn(q, kg, v, mask, 16)
    (dk,) = torch.autograd.grad(out, kg, do)
    ref = _reference_grads(q, k, v, mask, 16, None, do, None)
    _check_grad("dk", dk, ref[3], torch.float32)
    # lse alone in the loss (no gradient reaches out)
    qg = q.clone().requires_grad_()
    dlse = torch.randn(1, 2, 50, generator=gen).to(dev)
    _, lse = block_sparse_attn(qg, k, v, mask, 16)
    (dq,) = torch.autograd.grad(lse, qg, dlse)
    ref = _reference_grads(q, k, v, mask, 16, None, torch.zeros_like(do), dlse)
    _check_grad("dq", dq, ref[2], torch.float32)


def test_backward_function_in_place():
    """The functional backward writes given (NaN-filled) buffers in place, from prebuilt lists or the mask."""
    gen = torch.Generator().manual_seed(13)
    dev = _device()
    b, hq, hkv, n, d, block = 1, 4, 2, 60, 16, 16
    q, k, v = (x.to(dev) for x in random_qkv(b, hq, hkv, n, d, torch.float32, gen))
    mask = special_mask(b, hq, 4, 0.5, gen).to(dev)
    do = torch.randn(b, hq, n, d, generator=gen).to(dev)
    out, lse = block_sparse_attn(q, k, v, mask, block)
    ref = _reference_grads(q, k, v, mask, block, None, do, None)
    bufs = [torch.full_like(x, float("nan")) for x in (q, k, v)]
    res = block_sparse_attn_backward(do, q, k, v, out, lse, mask, block, dq=bufs[0], dk=bufs[1], dv=bufs[2])
    assert all(r is x for r, x in zip(res, bufs))
    for name, got, want in zip(("dq", "dk", "dv"), bufs, ref[2:]):
        _check_grad(name, got, want, torch.float32)
    res2 = block_sparse_attn_backward(do, q, k, v, out, lse, None, block, kv_index=build_block_index(mask),
                                      q_index=build_block_col_index(mask))
    for x, y in zip(res, res2):
        assert torch.equal(x, y)


def _python_col_index(mask: torch.Tensor) -> tuple[list, list]:
    b, h, nb, _ = mask.shape
    lists = []
    for bi in range(b):
        for hi in range(h):
            for c in range(nb):
                lists.append([r for r in range(c, nb) if bool(mask[bi, hi, r, c])])
    return lists, [len(x) for x in lists]


@pytest.mark.parametrize("nb", [1, 7, 40])
def test_build_block_col_index(nb):
    gen = torch.Generator().manual_seed(nb)
    mask = torch.rand(2, 3, nb, nb, generator=gen) < 0.3
    mask[0, 0, :, 0] = True
    mask[1, 2] = False
    dev = _device()
    idx, cnt = build_block_col_index(mask.to(dev))
    assert idx.shape == (2, 3, nb, nb) and cnt.shape == (2, 3, nb)
    assert idx.dtype == torch.int32 and cnt.dtype == torch.int32
    lists, counts = _python_col_index(mask)
    idx, cnt = idx.cpu().reshape(-1, nb), cnt.cpu().reshape(-1)
    assert cnt.tolist() == counts
    for c, entries in enumerate(lists):
        assert idx[c, :len(entries)].tolist() == entries
    # a strided (expanded) mask view gives the same lists
    idx2, cnt2 = build_block_col_index(mask[:, :1].to(dev).expand(2, 3, nb, nb))
    idx1, cnt1 = build_block_col_index(mask[:, :1].to(dev))
    for h in range(3):
        assert torch.equal(cnt2[:, h], cnt1[:, 0])


def test_no_grad_forward_unchanged(monkeypatch):
    """Without grad (inputs not requiring it, or under no_grad) the forward never reaches the autograd Function,
    records nothing and still takes out=/lse= buffers; with grad, the forward values are the same."""
    gen = torch.Generator().manual_seed(14)
    dev = _device()
    q, k, v = (x.to(dev) for x in random_qkv(1, 4, 2, 50, 16, torch.float32, gen))
    mask = special_mask(1, 2, 4, 0.5, gen).to(dev)
    with_grad = block_sparse_attn(q.clone().requires_grad_(), k, v, mask, 16)

    def boom(*args):
        raise AssertionError("autograd Function used on the no-grad path")

    monkeypatch.setattr(bs._BlockSparseAttnFunction, "apply", boom)
    out, lse = block_sparse_attn(q, k, v, mask, 16)
    assert out.grad_fn is None and not out.requires_grad and lse.grad_fn is None
    assert torch.equal(out, with_grad[0].detach()) and torch.equal(lse, with_grad[1].detach())
    qg = q.clone().requires_grad_()
    buf = torch.full_like(q, float("nan"))
    with torch.no_grad():
        res = block_sparse_attn(qg, k, v, mask, 16, out=buf)
    assert res[0] is buf and torch.equal(buf, out)


def test_mask_carries_no_gradient():
    gen = torch.Generator().manual_seed(15)
    dev = _device()
    q, k, v = (x.to(dev).requires_grad_() for x in random_qkv(1, 2, 1, 40, 16, torch.float32, gen))
    mask = special_mask(1, 2, 3, 0.5, gen).to(dev)
    with pytest.raises(RuntimeError):
        mask.clone().requires_grad_()  # a bool tensor cannot require grad
    with pytest.raises(ValueError, match="bool"):
        block_sparse_attn(q, k, v, mask.float().requires_grad_(), 16)
    out, _ = block_sparse_attn(q, k, v, mask, 16)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(out.sum(), mask)
    out.sum().backward()
    assert mask.grad is None and all(x.grad is not None for x in (q, k, v))


def test_grad_refusals():
    dev = _device()
    q = torch.randn(1, 2, 40, 16, device=dev, requires_grad=True)
    k = torch.randn(1, 1, 40, 16, device=dev)
    mask = torch.ones(1, 2, 3, 3, dtype=torch.bool, device=dev)
    with pytest.raises(ValueError, match="out= and lse="):
        block_sparse_attn(q, k, k, mask, 16, out=torch.empty(1, 2, 40, 16, device=dev))
    idx, cnt = build_block_index(mask)
    with pytest.raises(ValueError, match="no backward"):
        block_sparse_attn_indexed(q, k, k, idx, cnt, 16)
    with torch.no_grad():
        block_sparse_attn_indexed(q, k, k, idx, cnt, 16)
    out, lse = block_sparse_attn(q.detach(), k, k, mask, 16)
    with pytest.raises(ValueError, match="block_mask is needed"):
        block_sparse_attn_backward(out, q.detach(), k, k, out, lse, None, 16)
    with pytest.raises(ValueError, match="dq must be"):
        block_sparse_attn_backward(out, q.detach(), k, k, out, lse, mask, 16, dq=torch.empty(1, 2, 40, 8, device=dev))


# ------------------------------------------------------------------------------------------------ GPU

def _gpu_inputs(n, d, block, hq, hkv, mask_heads, dtype, seed, density=0.3):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, hq, n, d, device="cuda", generator=gen).to(dtype)
    k = torch.randn(1, hkv, n, d, device="cuda", generator=gen).to(dtype)
    v = torch.randn(1, hkv, n, d, device="cuda", generator=gen).to(dtype)
    do = torch.randn(1, hq, n, d, device="cuda", generator=gen).to(dtype)
    nb = math.ceil(n / block)
    mask = torch.rand(1, mask_heads, nb, nb, device="cuda", generator=gen) < density
    mask[:, 0, 5, :] = False  # an empty row
    mask[:, -1, 7, :] = False  # a diagonal-only row
    mask[:, -1, 7, 7] = True
    mask[:, :, -1, -1] = True
    return q, k, v, do, mask


@pytest.mark.gpu
@pytest.mark.parametrize("n,d,block,dtype,hkv,mh", [
    (4096 + 77, 128, 64, torch.bfloat16, 2, "q"),
    (4096 + 77, 128, 128, torch.float16, 8, "kv"),
    (4096 + 33, 64, 64, torch.float16, 2, "kv"),
    (4096 + 33, 64, 128, torch.bfloat16, 8, "q"),
    (4096, 128, 64, torch.bfloat16, 8, "kv"),
])
def test_gpu_grads_match_reference(n, d, block, dtype, hkv, mh):
    hq = 8
    q, k, v, do, mask = _gpu_inputs(n, d, block, hq, hkv, hq if mh == "q" else hkv, dtype, n + d + block)
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    out, lse = block_sparse_attn(qg, kg, vg, mask, block)
    dlse = torch.randn_like(lse)
    got = torch.autograd.grad((out, lse), (qg, kg, vg), (do, dlse))
    ref = _reference_grads(q, k, v, mask, block, None, do, dlse, torch.float32)
    for name, g_, w in zip(("dq", "dk", "dv"), got, ref[2:]):
        _check_grad(name, g_, w, dtype)


@pytest.mark.gpu
def test_gpu_float32_ieee():
    q, k, v, do, mask = _gpu_inputs(1000, 64, 64, 4, 2, 4, torch.float32, 3)
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    out, _ = block_sparse_attn(qg, kg, vg, mask, 64)
    got = torch.autograd.grad(out, (qg, kg, vg), do)
    ref = _reference_grads(q, k, v, mask, 64, None, do, None, torch.float64)
    for name, g_, w in zip(("dq", "dk", "dv"), got, ref[2:]):
        _check_grad(name, g_, w, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("block", [64, 128])
def test_gpu_dense_matches_sdpa_backward(block):
    n, hq, hkv = 8192 + 100, 32, 8
    q, k, v, do, _ = _gpu_inputs(n, 128, block, hq, hkv, hkv, torch.bfloat16, 7)
    nb = math.ceil(n / block)
    mask = torch.ones(1, hkv, nb, nb, dtype=torch.bool, device="cuda")
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    out, _ = block_sparse_attn(qg, kg, vg, mask, block)
    got = torch.autograd.grad(out, (qg, kg, vg), do)
    qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
    want = torch.autograd.grad(ref, (qs, ks, vs), do)
    for g_, w in zip(got, want):
        assert not torch.isnan(g_).any()
        assert _rel_err(g_, w) < 2e-2
