"""Block-sparse attention of packed sequences (cu_seqlens), forward and backward, against the PyTorch reference.

On machines without CUDA these run on CPU tensors under the Triton interpreter (tests/conftest.py), at small sizes;
the case marked ``gpu`` runs bf16 at 1k-32k on a CUDA device (passed on an H200: docs/gpu_tests.md).
"""

from __future__ import annotations

import math

import pytest
import torch

import seer.kernels.block_sparse as block_sparse_module
import seer.kernels.block_sparse_bwd as bwd_module
from seer.kernels import block_sparse_attn, block_sparse_attn_varlen, reference
from seer.kernels.common import varlen_order
from seer.kernels.tuning import force_config
from tests.kernels.masks import special_mask


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _packed(lengths, hq, hkv, d, block, mask_heads, dtype=torch.float32, seed=0, density=0.4):
    gen = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    q, k, v = (torch.randn(t, h, d, generator=gen).to(dtype) for h in (hq, hkv, hkv))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    nb = max(1, math.ceil(max(lengths) / block))
    mask = special_mask(len(lengths), mask_heads, nb, density, gen)
    dev = _device()
    return q.to(dev), k.to(dev), v.to(dev), cu.to(dev), mask.to(dev)


@pytest.mark.parametrize("lengths, hq, hkv, d, block, mask_heads", [
    ((37, 1, 0, 80, 16), 4, 2, 16, 16, 4),     # odd lengths, a one-token and an empty sequence, a mask per query head
    ((0, 50, 33), 4, 1, 32, 16, 1),            # empty first sequence, a mask per key/value head (GQA 4:1)
    ((70, 64, 5), 2, 2, 16, 32, 2),            # 32-token blocks, a sequence of exactly two blocks
    ((1, 0, 150, 0, 3, 17), 6, 2, 16, 16, 2),  # lengths 0 to 150 (10 blocks vs 1): most padded programs not launched
    ((1,), 2, 1, 16, 16, 2),                   # a single one-token sequence
])
def test_packed_sequences_match_the_reference_and_each_sequence_alone(lengths, hq, hkv, d, block, mask_heads):
    q, k, v, cu, mask = _packed(lengths, hq, hkv, d, block, mask_heads)
    out = torch.full_like(q, float("nan"))  # poisoned: an unwritten row shows as NaN
    lse = torch.full((hq, q.shape[0]), float("nan"), device=q.device)
    res = block_sparse_attn_varlen(q, k, v, cu, mask, block, out=out, lse=lse)
    assert res[0] is out and res[1] is lse and not out.isnan().any() and not lse.isnan().any()
    ref_out, ref_lse = reference.block_sparse_attn_varlen(q.double(), k.double(), v.double(), cu, mask, block)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))  # empty rows (head 0's first row) alike
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin].double(), ref_lse[fin], rtol=1e-5, atol=1e-5)
    offsets = cu.tolist()
    for s, (a, b) in enumerate(zip(offsets, offsets[1:])):  # the reference is each sequence alone
        if a == b:
            continue
        nb = math.ceil((b - a) / block)
        alone, alone_lse = reference.block_sparse_attn(*(x[a:b].double().transpose(0, 1)[None] for x in (q, k, v)),
                                                       mask[s:s + 1, :, :nb, :nb], block)
        torch.testing.assert_close(ref_out[a:b], alone[0].transpose(0, 1))
        torch.testing.assert_close(ref_lse[:, a:b], alone_lse[0])


def test_host_lengths_give_the_same_result_without_reading_the_offsets(monkeypatch):
    """``seqlens=`` (the lengths on the host): no read of cu_seqlens, the reference's result."""
    lengths = (37, 1, 0, 80, 16)
    q, k, v, cu, mask = _packed(lengths, 4, 2, 16, 16, 2, seed=3)
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: pytest.fail("cu_seqlens read on the host"))
    out, lse = block_sparse_attn_varlen(q, k, v, cu, mask, 16, seqlens=list(lengths))
    monkeypatch.undo()
    ref_out, ref_lse = reference.block_sparse_attn_varlen(q.double(), k.double(), v.double(), cu, mask, 16)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin].double(), ref_lse[fin], rtol=1e-5, atol=1e-5)


def test_host_lengths_that_do_not_fit_the_row_are_refused():
    q, k, v, cu, mask = _packed((20, 12), 2, 1, 16, 16, 1)
    for seqlens, message in (([20], "must list the 2 sequence lengths"), ([20, -1], "none negative"),
                             ([20, 10], "end at the row length T=32; it ends at 30")):
        with pytest.raises(ValueError, match=message):
            block_sparse_attn_varlen(q, k, v, cu, mask, 16, seqlens=seqlens)


@pytest.mark.parametrize("tile, last_first", [(16, True), (16, False), (32, True), (8, False)])
def test_varlen_order_is_the_padded_grid_order_without_the_empty_programs(tile, last_first):
    """Each real program once, in the linear order of the padded 2-d grid ``(n_prog, S * heads)`` that main launched
    (each sequence and head in turn; its tiles last-to-first for query tiles, first-to-last for key tiles)."""
    lengths, heads = (37, 1, 0, 150, 16, 0), 3
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    n_prog = math.ceil(max(lengths) / tile)
    order = varlen_order(cu, list(lengths), heads, tile, n_prog, last_first)
    padded = []  # the padded grid's programs in launch order, p = program_id(0) or n_prog - 1 - program_id(0)
    for bh in range(len(lengths) * heads):
        for i in range(n_prog):
            padded.append((bh, n_prog - 1 - i if last_first else i))
    want = [bh * n_prog + p for bh, p in padded if p * tile < lengths[bh // heads]]
    assert order.dtype == torch.int32 and order.tolist() == want
    assert len(want) == heads * sum(math.ceil(n / tile) for n in lengths)
    assert varlen_order(cu[:1], [], heads, tile, n_prog, last_first).numel() == 0
    empty = torch.zeros(3, dtype=torch.int32)
    assert varlen_order(empty, [0, 0], heads, tile, n_prog, last_first).numel() == 0


class _Grids:
    """Records the grid of every launch of the wrapped Triton kernels (module attributes swapped by monkeypatch)."""

    def __init__(self, monkeypatch, names):
        self.grids = {name: [] for name in names}
        for name in names:
            module = block_sparse_module if name == "_bs_attn_fwd_kernel" else bwd_module
            monkeypatch.setattr(module, name, self._wrap(name, getattr(module, name)))

    def _wrap(self, name, kernel):
        grids = self.grids[name]

        class Wrapped:
            def __getitem__(self, grid):
                grids.append(tuple(grid))
                return kernel[grid]
        return Wrapped()

    def programs(self, name):
        return [math.prod(g) for g in self.grids[name]]


def test_varlen_launches_only_the_programs_inside_sequences(monkeypatch):
    """The varlen forward, dk/dv and dq kernels launch one program per (sequence, head, tile inside the sequence),
    not the longest sequence's count for every sequence; the preprocess keeps its padded grid."""
    grids = _Grids(monkeypatch, ["_bs_attn_fwd_kernel", "_bs_bwd_dkdv_kernel", "_bs_bwd_dq_kernel"])
    lengths, hq, hkv, block = (150, 1, 0, 20), 4, 2, 16  # 10, 1, 0 and 2 blocks of 16: 13 real of 4 x 10
    q, k, v, cu, mask = _packed(lengths, hq, hkv, 16, block, 2)
    q.requires_grad_()
    out, _ = block_sparse_attn_varlen(q, k, v, cu, mask, block)
    assert grids.programs("_bs_attn_fwd_kernel") == [hq * 13]
    out.sum().backward()
    for name, heads in (("_bs_bwd_dkdv_kernel", hkv), ("_bs_bwd_dq_kernel", hq)):
        assert grids.programs(name) == [heads * 13], name  # interpreter tiles: the mask block (16)


def test_full_masks_are_attention_that_never_crosses_sequences():
    """With every block kept, packed attention is SDPA with a document mask (an independent check)."""
    lengths, block = (21, 40, 3), 16
    q, k, v, cu, _ = _packed(lengths, 4, 2, 16, block, 2, dtype=torch.float64)
    full = torch.ones(3, 2, 3, 3, dtype=torch.bool, device=q.device)
    doc = torch.repeat_interleave(torch.arange(3, device=q.device), torch.tensor(lengths, device=q.device))
    pos = torch.arange(q.shape[0], device=q.device)
    allowed = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
    want = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                            attn_mask=allowed, enable_gqa=True).transpose(0, 1)
    got, _ = reference.block_sparse_attn_varlen(q, k, v, cu, full, block)
    torch.testing.assert_close(got, want)
    tri, _ = block_sparse_attn_varlen(q.float(), k.float(), v.float(), cu, full, block)
    torch.testing.assert_close(tri.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn", [block_sparse_attn_varlen, reference.block_sparse_attn_varlen])
def test_bad_packed_input_is_refused_in_one_line(fn):
    q, k, v, cu, mask = _packed((20, 12), 2, 1, 16, 16, 1)
    cases = [
        (torch.tensor([0, 25, 20, 32], dtype=torch.int32), mask, "never decrease; got 25 -> 20 at index 2"),
        (torch.tensor([3, 20, 32], dtype=torch.int32), mask, "start at 0"),
        (torch.tensor([0, 20, 30], dtype=torch.int32), mask, "end at the row length T=32; it ends at 30"),
        (cu.long(), mask, "1-D int32 tensor"),
        (cu, mask[:1], r"does not match the packed sequences: need \[S=2"),
        (cu, mask[:, :, :1, :1], "nb >= 2 blocks of 16 for the longest sequence"),
        (cu, mask.int(), "must be a bool tensor"),
    ]
    for offsets, m, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            fn(q, k, v, offsets.to(q.device), m, 16)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"3-D tensor \[T, H, D\]"):
        fn(q[None], k, v, cu, mask, 16)


@pytest.mark.gpu
def test_gpu_bf16_mixed_lengths_match_each_sequence_alone():
    """8B-shaped heads, bf16, sequences of 1k to 32k tokens (and one token) packed: each equals the unpacked kernel
    on that sequence alone, up to bf16 rounding."""
    lengths, block = (1024, 32768, 4097, 1, 8000), 64
    q, k, v, cu, _ = _packed(lengths, 32, 8, 128, block, 32, dtype=torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(0)
    nb = math.ceil(max(lengths) / block)
    mask = torch.rand(len(lengths), 32, nb, nb, device="cuda", generator=gen) < 0.1
    mask[:, :, torch.arange(nb), torch.arange(nb)] = True
    out, lse = block_sparse_attn_varlen(q, k, v, cu, mask, block)
    offsets = cu.tolist()
    for s, (a, b) in enumerate(zip(offsets, offsets[1:])):
        sb = math.ceil((b - a) / block)
        alone, alone_lse = block_sparse_attn(*(x[a:b].transpose(0, 1)[None] for x in (q, k, v)),
                                             mask[s:s + 1, :, :sb, :sb], block)
        err = (out[a:b].double() - alone[0].transpose(0, 1).double()).norm() / alone.double().norm()
        assert err < 1e-2, (s, err)
        torch.testing.assert_close(lse[:, a:b], alone_lse[0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("lengths, hq, hkv, block, mask_heads, with_lse", [
    ((37, 1, 0, 80, 16), 4, 2, 16, 4, False),  # odd lengths, a one-token and an empty sequence
    ((0, 50, 33), 4, 1, 16, 1, True),          # GQA 4:1, a mask per key/value head, a loss on lse too
    ((1, 0, 130, 3), 6, 2, 16, 2, False),      # lengths 0 to 130 (9 blocks vs 1), GQA 3:1
    ((1,), 2, 1, 16, 2, True),                 # a single one-token sequence
])
def test_packed_gradients_match_the_reference(lengths, hq, hkv, block, mask_heads, with_lse):
    _check_gradients(lengths, hq, hkv, block, mask_heads, with_lse)


def test_packed_subtiles_launch_only_the_tiles_inside_sequences(monkeypatch):
    """dq and dk/dv tiles of half a mask block (two programs per block): gradients still match, and each kernel
    launches one program per (sequence, head, 16-token tile inside the sequence)."""
    grids = _Grids(monkeypatch, ["_bs_bwd_dkdv_kernel", "_bs_bwd_dq_kernel"])
    lengths, hq, hkv = (1, 0, 90, 17, 33), 4, 2  # 1, 0, 6, 2 and 3 tiles of 16
    tiles = dict(num_warps=4, num_stages=1, USE_TMA=False)
    with force_config("block_sparse_bwd.dkdv", BLOCK_N=16, BLOCK_M=16, **tiles), \
            force_config("block_sparse_bwd.dq", BLOCK_M=16, BLOCK_N=16, **tiles):
        _check_gradients(lengths, hq, hkv, 32, 2, True)
    assert grids.programs("_bs_bwd_dkdv_kernel") == [hkv * 12]
    assert grids.programs("_bs_bwd_dq_kernel") == [hq * 12]


def _check_gradients(lengths, hq, hkv, block, mask_heads, with_lse):
    """Forward and gradients of the packed kernel (float32) against the float64 reference."""
    q, k, v, cu, mask = _packed(lengths, hq, hkv, 16, block, mask_heads, seed=5)
    gen = torch.Generator().manual_seed(6)
    dout = torch.randn(q.shape, generator=gen).to(q.device)
    dlse = torch.randn(hq, q.shape[0], generator=gen).to(q.device)
    grads, outs = [], []
    for fn, dtype in ((block_sparse_attn_varlen, torch.float32), (reference.block_sparse_attn_varlen, torch.float64)):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        out, lse = fn(*leaves, cu, mask, block)
        outs.append((out.detach(), lse.detach()))
        live = torch.isfinite(lse)  # rows that attend to something (empty rows have lse = -inf)
        loss = (out * dout.to(dtype)).sum() + ((lse * dlse.to(dtype))[live].sum() if with_lse else 0)
        grads.append(torch.autograd.grad(loss, leaves))
    (out, lse), (ref_out, ref_lse) = outs
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin].double(), ref_lse[fin], rtol=1e-5, atol=1e-5)
    for got, want in zip(*grads):
        assert not got.isnan().any()
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
