"""Block-sparse decode kernel (seer/kernels/decode.py) against the float64 PyTorch reference, the
reference against brute force, and the block-list builders (seer/kernels/decode_index.py).

On machines without CUDA the kernel runs under the Triton interpreter (tests/conftest.py); sizes are small.
bfloat16 cases are marked ``gpu``: the interpreter's bfloat16 dots are wrong (the prefill kernel's too).
"""

from __future__ import annotations

import math

import pytest
import torch

from seer.kernels import block_sparse_decode, decode, reference
from seer.kernels.decode import default_num_splits
from seer.kernels.decode_index import block_index_from_mask, block_index_from_scores
from seer.kernels.tuning import force_config, last_launch
from tests.kernels.masks import random_qkv

CPU = torch.device("cpu")


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else CPU


def _inputs(b, hq, hkv, t, n, d, dtype, gen, transpose=False):
    """``q [b, hq, t, d]`` and caches ``[b, hkv, n, d]`` from :func:`random_qkv`."""
    q, k, v = random_qkv(b, hq, hkv, n, d, dtype, gen, transpose)
    return q[:, :, n - t:], k, v


def _random_lists(b, hkv, s, nb, gen, seqlens, block):
    """Random lists with -1 padding anywhere and repeated blocks, the newest block listed; but KV head 0 of sequence
    0 lists only padding (its rows attend nothing; unless it is the only list), KV head 0 of the last sequence misses
    its newest block, and the last KV head of sequence 1 lists a block past that sequence's length (within the
    cache)."""
    idx = torch.randint(-1, nb, (b, hkv, s), generator=gen, dtype=torch.int32)
    newest = (seqlens.long() - 1) // block
    for bi in range(b):
        idx[bi, :, -1] = newest[bi]
        idx[bi, :, 0] = idx[bi, :, 1]  # a repeat
    if b > 1 and s > 2 and newest[1] + 1 < nb:
        idx[1, -1, 2] = newest[1] + 1
    idx[-1, 0] = torch.where(idx[-1, 0] >= newest[-1], -1, idx[-1, 0])
    if b * hkv > 1:
        idx[0, 0] = -1
    return idx


def _unique_lists(b, hkv, s, nb, gen, seqlens, block):
    """Random lists without repeats (as a top-k gives): distinct blocks of the cache (some past the sequence's
    length) at random positions among ``-1`` padding, the newest block listed; but KV head 0 of sequence 0 lists
    only padding (unless it is the only list)."""
    idx = torch.full((b, hkv, s), -1, dtype=torch.int32)
    newest = (seqlens.long() - 1) // block
    for bi in range(b):
        for g in range(hkv):
            blocks = torch.randperm(nb, generator=gen)[:int(torch.randint(1, min(s, nb) + 1, (1,), generator=gen))]
            if not (blocks == newest[bi]).any():
                blocks[0] = newest[bi]
            idx[bi, g, torch.randperm(s, generator=gen)[:len(blocks)]] = blocks.int()
    if b * hkv > 1:
        idx[0, 0] = -1
    return idx


def _check(out, lse, ref_out, ref_lse, dtype):
    assert not torch.isneginf(ref_lse).all(), "the case attends nothing: it would check no value"
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "NaN in the results"
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "empty rows differ"
    empty = torch.isneginf(ref_lse)
    assert (out[empty] == 0).all(), "empty rows must give zeros"
    tol = 1e-5 if dtype == torch.float32 else (3e-3 if dtype == torch.float16 else 1.5e-2)
    err = (out.double() - ref_out).norm() / ref_out.norm().clamp_min(1e-30)
    assert err.item() < tol
    fin = ~empty
    lse_tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert not fin.any() or (lse[fin].double() - ref_lse[fin]).abs().max().item() < lse_tol


def assert_matches_reference(b, hq, hkv, t, n, d, block, dtype, splits, s, seed=0, transpose=False,
                             sm_scale=None, unique_blocks=False):
    """The kernel against the float64 reference on fresh random inputs (lists without repeats with
    ``unique_blocks``)."""
    gen = torch.Generator().manual_seed(seed)
    dev = _device()
    q, k, v = _inputs(b, hq, hkv, t, n, d, dtype, gen, transpose)
    seqlens = torch.randint(t, n + 1, (b,), generator=gen, dtype=torch.int32)
    seqlens[0] = n
    if b > 2:
        seqlens[2] = t
    lists = (_unique_lists if unique_blocks else _random_lists)(b, hkv, s, math.ceil(n / block), gen, seqlens, block)
    q, k, v, lists, seqlens = (x.to(dev) for x in (q, k, v, lists, seqlens))
    out, lse = block_sparse_decode(q, k, v, lists, seqlens, block, sm_scale, num_splits=splits,
                                   unique_blocks=unique_blocks)
    ref_out, ref_lse = reference.block_sparse_decode(q.double(), k.double(), v.double(), lists, seqlens, block,
                                                     sm_scale)
    _check(out, lse, ref_out, ref_lse, dtype)
    return ref_lse


# (B, Hq, Hkv, T, N, D, block, dtype, splits, list length S)
CASES = [
    (3, 4, 4, 1, 77, 16, 16, torch.float32, 2, 6),      # GQA 1, odd N, a sequence with L = T
    (2, 4, 2, 3, 100, 16, 16, torch.float16, 3, 7),     # GQA 2, T > 1
    (2, 8, 2, 2, 90, 16, 32, torch.float16, None, 5),   # GQA 4, default splits
    (1, 7, 1, 5, 61, 16, 16, torch.float32, 9, 4),      # GQA 7 (rows padded to 16), more splits than entries
    (2, 4, 1, 20, 70, 16, 16, torch.float32, 1, 6),     # G x T = 80: two query tiles, one split (no merge)
    (1, 4, 1, 17, 60, 16, 16, torch.float16, 3, 5),     # G x T = 68: two query tiles, three splits
    (2, 4, 2, 2, 130, 64, 64, torch.float16, 2, 4),     # D 64, block 64
    (1, 4, 1, 1, 200, 128, 64, torch.float16, 3, 5),    # D 128, the 8B shape's group of 4
]


@pytest.mark.parametrize("b,hq,hkv,t,n,d,block,dtype,splits,s", CASES)
def test_matches_reference(b, hq, hkv, t, n, d, block, dtype, splits, s):
    assert_matches_reference(b, hq, hkv, t, n, d, block, dtype, splits, s)


# (B, Hq, Hkv, T, N, D, block, dtype, splits, list length S): unique lists
UNIQUE_CASES = [
    (3, 4, 2, 1, 77, 64, 16, torch.float32, 3, 6),      # D 64, odd N, lengths differ (one is T)
    (2, 8, 2, 3, 150, 128, 32, torch.float32, 4, 5),    # D 128, T > 1, a partial last block
    (1, 8, 2, 17, 60, 64, 16, torch.float32, 3, 5),     # G x T = 68: two query tiles
    (2, 4, 2, 2, 90, 64, 16, torch.float32, 9, 4),      # more splits than entries
    (2, 4, 4, 1, 100, 128, 64, torch.float16, 2, 2),    # D 128, block 64, float16
    (4, 8, 2, 1, 130, 64, 32, torch.float32, None, 5),  # default splits (one under the interpreter)
]


@pytest.mark.parametrize("b,hq,hkv,t,n,d,block,dtype,splits,s", UNIQUE_CASES)
def test_unique_blocks_match_reference(b, hq, hkv, t, n, d, block, dtype, splits, s):
    for seed in (1, 2):
        assert_matches_reference(b, hq, hkv, t, n, d, block, dtype, splits, s, seed=seed, unique_blocks=True)


@pytest.mark.parametrize("splits", [1, 2])
def test_unique_blocks_attends_a_repeated_block_twice(splits):
    """With ``unique_blocks=True`` a repeated block is attended twice (documented: wrong), so the flag does skip
    the repeat check; without it the block counts once."""
    gen = torch.Generator().manual_seed(9)
    dev = _device()
    q, k, v = (x.to(dev) for x in _inputs(1, 2, 1, 1, 48, 16, torch.float32, gen))
    seqlens = torch.tensor([48], dtype=torch.int32, device=dev)
    lists = torch.tensor([[[0, 2, 2, -1]]], dtype=torch.int32, device=dev)
    keys = torch.cat([torch.arange(0, 16), torch.arange(32, 48), torch.arange(32, 48)]).to(dev)
    s = torch.einsum("hd,jd->hj", q[0, :, 0], k[0, 0, keys]) / 4.0
    twice = (torch.softmax(s, -1) @ v[0, 0, keys], torch.logsumexp(s, -1))
    out, lse = block_sparse_decode(q, k, v, lists, seqlens, 16, num_splits=splits, unique_blocks=True)
    torch.testing.assert_close((out[0, :, 0], lse[0, :, 0]), twice, rtol=1e-5, atol=1e-5)
    ref_out, _ = reference.block_sparse_decode(q, k, v, lists, seqlens, 16)
    assert (out - ref_out).abs().max() > 1e-3
    once, _ = block_sparse_decode(q, k, v, lists, seqlens, 16, num_splits=splits)
    torch.testing.assert_close(once, ref_out, rtol=1e-5, atol=1e-5)


# (B, Hq, Hkv, T, N, D, block, dtype, splits, list length S, unique lists): the copy-engine path
TMA_CASES = [
    (3, 4, 2, 1, 77, 16, 16, torch.float32, 2, 6, False),   # odd N (a partial last block), L = T for one sequence
    (2, 8, 2, 3, 100, 16, 32, torch.float16, 3, 5, False),  # T > 1, two key tiles a block, repeats
    (1, 4, 1, 17, 60, 16, 16, torch.float32, 1, 5, True),   # G x T = 68: two query tiles, one split
]


@pytest.mark.parametrize("b,hq,hkv,t,n,d,block,dtype,splits,s,unique", TMA_CASES)
def test_tma_path(monkeypatch, b, hq, hkv, t, n, d, block, dtype, splits, s, unique):
    """The tensor-descriptor (copy engine) path; on the CPU the interpreter emulates the descriptors, their zero
    fill past each sequence's length included."""
    asked = []
    monkeypatch.setattr(decode, "tma_ok", lambda *caches: asked.append(len(caches)) or True)
    with force_config("block_sparse_decode", USE_TMA=True, BLOCK_N=min(block, 16)):
        assert_matches_reference(b, hq, hkv, t, n, d, block, dtype, splits, s, seed=n + t, unique_blocks=unique)
    assert asked == [2], "the launch did not take the copy-engine path for the K/V caches"


def test_tma_is_not_a_candidate_yet(monkeypatch):
    """The copy-engine switch is reached only with force_config until a GPU run measures it: the table's candidates
    keep it off."""
    for key in ((128, 64, 16), (64, 64, 64), (128, 128, 32)):
        assert [c["USE_TMA"] for c in decode._cuda_config(key)] == [False]


@pytest.mark.parametrize("b,hq,hkv,t,n,d,block,dtype,splits,s", CASES)
def test_lists_read_in_place_match_reference(b, hq, hkv, t, n, d, block, dtype, splits, s):
    """IN_PLACE (no compaction) on unique lists with padding, blocks past a sequence's length and empty lists."""
    with force_config("block_sparse_decode", IN_PLACE=True):
        assert_matches_reference(b, hq, hkv, t, n, d, block, dtype, splits, s, seed=n + 7, unique_blocks=True)
        assert last_launch("block_sparse_decode")["config"]["IN_PLACE"]


def test_in_place_applies_to_unique_lists_only():
    """Forced IN_PLACE with lists that may repeat a block: the compaction (and its repeat check) still runs."""
    with force_config("block_sparse_decode", IN_PLACE=True):
        assert_matches_reference(2, 4, 2, 3, 100, 16, 16, torch.float32, 2, 7, seed=3)


def test_cases_have_empty_rows_and_transposed_caches():
    """The special rows exist (some rows attend nothing), and [B, N, H, D] storage with a custom scale works."""
    ref_lse = assert_matches_reference(2, 4, 2, 3, 100, 16, 16, torch.float32, 2, 7, transpose=True, sm_scale=0.3)
    assert torch.isneginf(ref_lse).any() and torch.isfinite(ref_lse).any()


@pytest.mark.parametrize("splits", [1, 2, 5, 11])
def test_split_counts_agree(splits):
    """Every split count (past the list length too) gives the one-split result."""
    gen = torch.Generator().manual_seed(4)
    dev = _device()
    q, k, v = (x.to(dev) for x in _inputs(2, 4, 2, 2, 80, 16, torch.float32, gen))
    seqlens = torch.tensor([80, 41], dtype=torch.int32, device=dev)
    lists = torch.tensor([[[4, 0, 2, -1, 4], [1, 3, -1, -1, 4]], [[2, 2, 2, 0, -1], [-1, 1, 0, 2, -1]]],
                         dtype=torch.int32, device=dev)
    one = block_sparse_decode(q, k, v, lists, seqlens, 16, num_splits=1)
    got = block_sparse_decode(q, k, v, lists, seqlens, 16, num_splits=splits)
    torch.testing.assert_close(got, one, rtol=1e-5, atol=1e-6)


def test_strided_block_index():
    """A list view without a unit last stride (every other entry of a wider list) reads as its contiguous copy."""
    gen = torch.Generator().manual_seed(8)
    dev = _device()
    q, k, v = (x.to(dev) for x in _inputs(1, 2, 1, 1, 64, 16, torch.float32, gen))
    seqlens = torch.tensor([64], dtype=torch.int32, device=dev)
    wide = torch.tensor([[[3, 9, 0, 9, -1, 9, 2, 9]]], dtype=torch.int32, device=dev)
    got = block_sparse_decode(q, k, v, wide[..., ::2], seqlens, 16, num_splits=2)
    want = block_sparse_decode(q, k, v, wide[..., ::2].contiguous(), seqlens, 16, num_splits=2)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_no_attended_key_gives_zeros_and_neg_inf():
    """Lists of only padding, of blocks after the new tokens, and an empty list (S = 0): zeros and -inf, not NaN."""
    gen = torch.Generator().manual_seed(5)
    dev = _device()
    q, k, v = (x.to(dev) for x in _inputs(2, 2, 1, 2, 64, 16, torch.float16, gen))
    seqlens = torch.tensor([20, 64], dtype=torch.int32, device=dev)
    lists = torch.tensor([[[-1, 2, 3]], [[-1, -1, -1]]], dtype=torch.int32, device=dev)  # 2, 3: past L = 20
    for idx in (lists, lists[:, :, :0]):
        for splits in (1, 2):
            out, lse = block_sparse_decode(q, k, v, idx, seqlens, 16, num_splits=splits)
            assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("in_place", [False, True])
def test_unvalidated_lists_ignore_entries_outside_the_sequence(in_place):
    """``validate=False``: entries past the cache are skipped and lengths above N read as N (no out-of-bounds), with
    the lists compacted and read in place (unique lists, IN_PLACE)."""
    gen = torch.Generator().manual_seed(6)
    dev = _device()
    q, k, v = (x.to(dev) for x in _inputs(1, 2, 1, 1, 48, 16, torch.float32, gen))
    bad = torch.tensor([[[0, 9, -7, 2, 2**30]]], dtype=torch.int32, device=dev)
    good = torch.tensor([[[0, -1, -1, 2, -1]]], dtype=torch.int32, device=dev)
    for splits in (1, 3):
        with force_config("block_sparse_decode", IN_PLACE=in_place):
            got = block_sparse_decode(q, k, v, bad, torch.tensor([60], dtype=torch.int32, device=dev), 16,
                                      num_splits=splits, validate=False, unique_blocks=in_place)
        want = block_sparse_decode(q, k, v, good, torch.tensor([48], dtype=torch.int32, device=dev), 16,
                                   num_splits=splits)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_reference_matches_brute_force():
    """The reference against a loop over every (sequence, head, token, key) in float64."""
    gen = torch.Generator().manual_seed(7)
    b, hq, hkv, t, n, d, block = 2, 6, 2, 3, 37, 8, 16
    q, k, v = _inputs(b, hq, hkv, t, n, d, torch.float64, gen)
    seqlens = torch.tensor([37, 3], dtype=torch.int32)
    lists = torch.tensor([[[2, 1, 1, -1], [0, -1, -1, -1]], [[0, 2, -1, 0], [-1, -1, -1, -1]]], dtype=torch.int32)
    out, lse = reference.block_sparse_decode(q, k, v, lists, seqlens, block, sm_scale=0.4)
    for bi in range(b):
        for h in range(hq):
            blocks = set(lists[bi, h // (hq // hkv)].tolist()) - {-1}
            for ti in range(t):
                pos = int(seqlens[bi]) - t + ti
                keys = [j for j in range(n) if j <= pos and j // block in blocks]
                if not keys:
                    assert out[bi, h, ti].eq(0).all() and lse[bi, h, ti] == float("-inf")
                    continue
                s = torch.stack([q[bi, h, ti] @ k[bi, h // (hq // hkv), j] * 0.4 for j in keys])
                p = torch.softmax(s, 0)
                torch.testing.assert_close(out[bi, h, ti], p @ v[bi, h // (hq // hkv), keys])
                torch.testing.assert_close(lse[bi, h, ti], torch.logsumexp(s, 0))


def test_block_index_builders():
    mask = torch.tensor([[[True, False, True, True], [False, False, False, False]]])
    assert block_index_from_mask(mask).tolist() == [[[0, 2, 3, -1], [-1, -1, -1, -1]]]
    scores = torch.tensor([[[0.5, 3.0, -1.0, 2.0, float("-inf")], [1.0, float("-inf"), float("-inf"),
                                                                      float("-inf"), float("-inf")]]])
    assert block_index_from_scores(scores, 2).tolist() == [[[1, 3], [0, -1]]]
    assert block_index_from_scores(scores, 7).tolist() == [[[0, 1, 2, 3, -1, -1, -1], [0, -1, -1, -1, -1, -1, -1]]]
    assert block_index_from_scores(scores, 2).dtype == torch.int32
    with pytest.raises(ValueError, match="k must be a positive int"):
        block_index_from_scores(scores, 0)
    with pytest.raises(ValueError, match="bool tensor"):
        block_index_from_mask(mask.int())


def test_default_num_splits():
    assert default_num_splits(512, 64, 132) == 1  # enough programs: no merge
    assert default_num_splits(128, 51, 132) == 1  # three quarters of the SMs busy: no merge either
    assert default_num_splits(64, 51, 132) == 5
    assert default_num_splits(8, 32, 132) == 16  # at most one split per two entries
    assert default_num_splits(8, 512, 132) == 33  # about two programs per SM
    assert default_num_splits(8, 1, 132) == 1


def test_bad_inputs():
    dev = _device()
    q = torch.randn(1, 4, 2, 16, device=dev)
    k = torch.randn(1, 2, 40, 16, device=dev)
    idx = torch.tensor([[[0, 1, -1], [2, -1, -1]]], dtype=torch.int32, device=dev)
    lens = torch.tensor([40], dtype=torch.int32, device=dev)
    bad = [
        ((q, k, k, idx.clone().fill_(3), lens), "block_index entry 3 is beyond the cache: N=40 holds 3 blocks"),
        ((q, k, k, idx.clone().fill_(-2), lens), "block_index entry -2 is not a block"),
        ((q, k, k, idx, lens + 1), "cache_seqlens entry 41 is beyond the cache length N=40"),
        ((q, k, k, idx, lens - 39), "cache_seqlens entry 1 is below T=2"),
        ((q, k.half(), k.half(), idx, lens), "must share a dtype"),
        ((q.double(), k.double(), k.double(), idx, lens), "q dtype torch.float64 is not supported"),
        ((q[:, :3], k, k, idx, lens), r"query heads \(3\) must be a multiple of key/value heads \(2\)"),
        ((q[..., :12], k[..., :12], k[..., :12], idx, lens), "head dim 12 is not supported"),
        ((q, k[..., :8], k[..., :8], idx, lens), "does not match q"),
        ((q, k, k[:, :, :30], idx, lens), "must have the shape of k_cache"),
        ((q, k, k, idx.long(), lens), "block_index must be int32"),
        ((q, k, k, idx[:, :1], lens), r"block_index must be int32 \[B, Hkv, S\] = \[1, 2, S\]"),
        ((q, k, k, idx, lens.long()), "cache_seqlens must be int32"),
        ((q[0], k, k, idx, lens), "q must be 4-D"),
    ]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            block_sparse_decode(*args, block_size=16)
    with pytest.raises(ValueError, match="block_size 48"):
        block_sparse_decode(q, k, k, idx, lens, 48)
    with pytest.raises(ValueError, match="num_splits must be an int in 1..65535, got 0"):
        block_sparse_decode(q, k, k, idx, lens, 16, num_splits=0)
    with pytest.raises(ValueError, match="no backward"):
        block_sparse_decode(q.requires_grad_(), k, k, idx, lens, 16)
    with pytest.raises(ValueError, match="block_index entry 3 is beyond the cache"):
        reference.block_sparse_decode(q, k, k, idx.clone().fill_(3), lens, 16)


# ------------------------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.parametrize("b,t,n,splits", [(1, 1, 32768 + 77, None), (4, 4, 8192, 7), (16, 1, 4096 + 5, 1)])
def test_gpu_bf16_matches_reference(b, t, n, splits):
    """The 8B shape (32 query / 8 KV heads, D 128) in bfloat16, 64-token blocks, 10% of the blocks listed."""
    assert_matches_reference(b, 32, 8, t, n, 128, 64, torch.bfloat16, splits, max(2, math.ceil(n / 64) // 10), seed=n)


@pytest.mark.gpu
@pytest.mark.parametrize("b,t,n,splits,stages", [(1, 1, 32768 + 77, None, 3), (4, 4, 8192, 7, 4),
                                                 (16, 1, 4096 + 5, 1, 4)])
def test_gpu_bf16_tma_matches_reference(b, t, n, splits, stages):
    """The copy-engine variant (forced; the benchmark's candidate) at the 8B shape, on devices of capability >= 9."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the copy engine needs a device of compute capability >= 9")
    with force_config("block_sparse_decode", USE_TMA=True, num_stages=stages):
        assert_matches_reference(b, 32, 8, t, n, 128, 64, torch.bfloat16, splits, max(2, math.ceil(n / 64) // 10),
                                 seed=n + 3, unique_blocks=True)
        assert last_launch("block_sparse_decode")["config"]["USE_TMA"]


@pytest.mark.gpu
@pytest.mark.parametrize("b,t,n,splits", [(1, 1, 32768 + 77, None), (4, 4, 8192, 7), (2, 1, 4096 + 5, 40)])
def test_gpu_bf16_unique_blocks_match_reference(b, t, n, splits):
    """Unique lists at the 8B shape, where a tile's splits run concurrently, compacted and read in place."""
    for seed, in_place in ((n, False), (n + 1, False), (n + 2, True)):
        with force_config("block_sparse_decode", IN_PLACE=in_place):
            assert_matches_reference(b, 32, 8, t, n, 128, 64, torch.bfloat16, splits,
                                     max(2, math.ceil(n / 64) // 10), seed=seed, unique_blocks=True)
