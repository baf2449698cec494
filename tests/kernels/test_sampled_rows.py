"""The fused rerank step (seer/kernels/sampled_rows.py) and its PyTorch contract (seer.kernels.reference
.sampled_rows_mass) against float64 loops written from the definition, on fresh random inputs: N off the block grid (a
short last block with and without sampled rows), grouped-query heads (several in one program, with
a padding head, and a group split over two programs), one pass (its scratch in one launch and split over several) and
two, every row and every block (the block mass of the true
attention), one row, more rows than a block, fp16/fp32 inputs; the selectors' dispatch; argument checks.
Without CUDA the kernel runs under the Triton interpreter (tests/conftest.py)."""

from __future__ import annotations

import math

import pytest
import torch

from seer.kernels import reference
from seer.kernels.sampled_rows import program_layout, sampled_rows_mass

CASES = [  # b, hq, hkv, n, d, block, rows
    (1, 2, 1, 100, 16, 16, 4),  # G = 2, a short last block (4 tokens) holding one of the sampled rows
    (2, 3, 1, 77, 32, 16, 3),  # batch 2, G = 3, rows not dividing the block, short last block (13 tokens)
    (1, 2, 2, 66, 16, 32, 2),  # a short last block (2 tokens) holding only its first row's sample
    (1, 2, 1, 66, 16, 32, 1),  # one row per block: a short last block without it takes its last token
    (1, 1, 1, 64, 64, 16, 16),  # every row of every block
    (1, 2, 1, 40, 16, 16, 1),  # one row per block
    (1, 2, 1, 50, 16, 16, 40),  # more rows than a block: clipped to it
    (1, 7, 1, 80, 16, 16, 16),  # Qwen2.5's group of 7 heads x 16 rows in one 128-row tile (a padding head)
    (1, 12, 2, 70, 16, 32, 32),  # G = 6 at 32 rows: two programs of 3 heads per key head
    (1, 16, 1, 40, 16, 16, 4),  # G = 16 at 4 rows: two programs of 8 heads (the most a program holds)
]


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _case(b, hq, hkv, n, d, block, seed, dtype=torch.float32, density=0.5):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, n, d, generator=g, dtype=torch.float64)
    nb = math.ceil(n / block)
    cand = (torch.rand(b, hq, nb, nb, generator=g) < density) | torch.eye(nb, dtype=torch.bool)
    cand &= torch.ones(nb, nb, dtype=torch.bool).tril()
    return q.to(dtype), k.to(dtype), cand, q, k


def _loops(q, k, cand, rows, block, scale):
    """float64 masses from the definition, one sampled row at a time."""
    b, hq, n, _ = q.shape
    nb = math.ceil(n / block)
    g = hq // k.shape[1]
    r = min(rows, block)
    out = torch.zeros(b, hq, nb, nb, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            for i in range(nb):
                offsets = [block - 1] if r == 1 else [round(t * (block - 1) / (r - 1) + 1e-9) for t in range(r)]
                sampled = [i * block + o for o in offsets]
                sampled = [p for p in sampled if p < n] or [n - 1]
                keys = [c for c in range(n) if cand[bi, h, i, c // block]]
                for p in sampled:
                    ks = [c for c in keys if c <= p]
                    prob = torch.softmax(q[bi, h, p] @ k[bi, h // g, ks].T * scale, -1)
                    for c, pc in zip(ks, prob):
                        out[bi, h, i, c // block] += pc / len(sampled)
    return out


@pytest.mark.parametrize("b,hq,hkv,n,d,block,rows", CASES)
def test_kernel_and_reference_match_loops(b, hq, hkv, n, d, block, rows):
    q, k, cand, q64, k64 = _case(b, hq, hkv, n, d, block, seed=n + rows)
    want = _loops(q64, k64, cand, rows, block, d ** -0.5)
    ref = reference.sampled_rows_mass(q64, k64, cand, rows, block)
    torch.testing.assert_close(ref.double(), want, atol=1e-6, rtol=1e-5)
    dev = _device()
    got = sampled_rows_mass(q.to(dev), k.to(dev), cand.to(dev), rows, block)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.cpu().double(), want, atol=2e-5, rtol=1e-4)
    assert (got.cpu()[~cand] == 0).all(), "blocks off the candidates get no mass"
    torch.testing.assert_close(got.sum(-1).cpu(), torch.ones(b, hq, math.ceil(n / block)), atol=1e-5, rtol=0)


def test_lists_longer_than_a_finishing_step_give_the_loops_masses():
    """Lists of up to 41 entries (the key-free second loop finishes ``FINISH_ENTRIES`` = 8 a step: most lists end in a
    partial step, and lists of 16 or 32 on a step's edge) give the float64 loops' masses."""
    from seer.kernels import sampled_rows

    q, k, cand, q64, k64 = _case(1, 2, 1, 16 * 40 + 5, 16, 16, seed=11, density=0.8)
    counts = cand.sum(-1)
    assert counts.max() > 4 * sampled_rows.FINISH_ENTRIES.value and (counts == 16).any() and (counts == 32).any()
    want = _loops(q64, k64, cand, 2, 16, 16 ** -0.5)
    dev = _device()
    got = sampled_rows_mass(q.to(dev), k.to(dev), cand.to(dev), 2, 16)
    torch.testing.assert_close(got.cpu().double(), want, atol=2e-5, rtol=1e-4)
    assert (got.cpu()[~cand] == 0).all()


def test_every_row_and_every_block_is_the_block_attention_mass():
    q, k, _, q64, k64 = _case(1, 2, 1, 90, 16, 16, seed=3)
    every = torch.ones(1, 2, 6, 6, dtype=torch.bool).tril()
    dev = _device()
    got = sampled_rows_mass(q.to(dev), k.to(dev), every.to(dev), 16, 16)
    torch.testing.assert_close(got.cpu().double(), reference.block_attn_mass(q64, k64, 16).double(), atol=2e-5,
                               rtol=1e-4)


def test_half_precision_and_strided_inputs():
    q, k, cand, q64, k64 = _case(1, 4, 2, 70, 32, 16, seed=5, dtype=torch.float16)
    dev = _device()
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, N, H, D] memory seen as [B, H, N, D]
    got = sampled_rows_mass(qt.to(dev), k.to(dev), cand.to(dev), 4, 16)
    want = reference.sampled_rows_mass(q.double(), k.double(), cand, 4, 16)
    torch.testing.assert_close(got.cpu().double(), want.double(), atol=3e-3, rtol=3e-3)


def test_the_selectors_take_the_reference_off_cuda():
    from seer.sparsity.selectors import LayerInputs, sampled_rows_mass as select

    q, k, cand, _, _ = _case(1, 2, 1, 50, 16, 16, seed=8)
    x = LayerInputs(q, k, 16, 0.25)
    torch.testing.assert_close(select(x, cand, 4), reference.sampled_rows_mass(q, k, cand, 4, 16, 0.25))


def test_one_head_per_program_gives_the_same_masses():
    """``heads_per_program=1`` (a program per query head) and the default (7 heads in one program) agree."""
    q, k, cand, _, _ = _case(1, 7, 1, 90, 16, 16, seed=5)
    dev = _device()
    one = sampled_rows_mass(q.to(dev), k.to(dev), cand.to(dev), 16, 16, heads_per_program=1)
    packed = sampled_rows_mass(q.to(dev), k.to(dev), cand.to(dev), 16, 16)
    torch.testing.assert_close(one, packed, atol=1e-6, rtol=1e-5)
    assert (one > 0).sum() > 0


def test_two_passes_and_a_scratch_split_over_launches_give_the_same_masses(monkeypatch):
    """``passes=2`` (no scratch) and the one-pass kernel agree, also when the scratch holds 3 query blocks at a time
    (several launches, the last one short)."""
    from seer.kernels import sampled_rows

    q, k, cand, q64, k64 = _case(1, 4, 2, 120, 16, 16, seed=11)
    dev = _device()
    want = reference.sampled_rows_mass(q64, k64, cand, 4, 16)
    one = sampled_rows_mass(q.to(dev), k.to(dev), cand.to(dev), 4, 16)
    two = sampled_rows_mass(q.to(dev), k.to(dev), cand.to(dev), 4, 16, passes=2)
    per_block = 2 * 8 * 16 * 4  # lists x nb x rows per program x float32
    monkeypatch.setattr(sampled_rows, "SCRATCH_BYTES", 3 * per_block)
    split = sampled_rows_mass(q.to(dev), k.to(dev), cand.to(dev), 4, 16)
    for got in (one, two, split):
        torch.testing.assert_close(got.cpu().double(), want.double(), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("heaviest_first", [True, False])
def test_either_launch_order_gives_the_same_masses(heaviest_first, monkeypatch):
    """Both launch orders (``LAUNCH['heaviest_first']``: the last query block first, grid (lists, blocks), the
    default; or the first first, grid (blocks, lists)) give the reference's masses, with one launch and with the
    scratch split over several (each launch in its own order)."""
    from seer.kernels import sampled_rows

    q, k, cand, q64, k64 = _case(2, 4, 2, 120, 16, 16, seed=12)
    dev = _device()
    want = reference.sampled_rows_mass(q64, k64, cand, 4, 16)
    monkeypatch.setitem(sampled_rows.LAUNCH, "heaviest_first", heaviest_first)
    whole = sampled_rows_mass(q.to(dev), k.to(dev), cand.to(dev), 4, 16)
    monkeypatch.setattr(sampled_rows, "SCRATCH_BYTES", 3 * 2 * 2 * 8 * 16 * 4)  # 3 query blocks a launch
    split = sampled_rows_mass(q.to(dev), k.to(dev), cand.to(dev), 4, 16)
    monkeypatch.setattr(sampled_rows, "SCRATCH_BYTES", 1 << 28)
    monkeypatch.setattr(sampled_rows, "MAX_GRID_Y", 5)  # heaviest first: at most 5 query blocks a launch
    capped = sampled_rows_mass(q.to(dev), k.to(dev), cand.to(dev), 4, 16)
    for got in (whole, split, capped):
        torch.testing.assert_close(got.cpu().double(), want.double(), atol=2e-5, rtol=1e-4)
    assert (want > 0).sum() > 0


@pytest.mark.parametrize("b,hq,hkv,n,d,block,rows", CASES)
@pytest.mark.parametrize("passes", [1, 2])
def test_narrow_key_tiles_give_the_loops_masses(b, hq, hkv, n, d, block, rows, passes, monkeypatch):
    """``LAUNCH['block_n']`` 16 (16 keys a tile: a 32-token block in two tiles, a 64-token one in four) gives the
    float64 loops' masses on every case, in one pass and in two."""
    from seer.kernels import sampled_rows

    q, k, cand, q64, k64 = _case(b, hq, hkv, n, d, block, seed=7 * n + rows)
    want = _loops(q64, k64, cand, rows, block, d ** -0.5)
    monkeypatch.setitem(sampled_rows.LAUNCH, "block_n", 16)
    dev = _device()
    got = sampled_rows_mass(q.to(dev), k.to(dev), cand.to(dev), rows, block, passes=passes)
    torch.testing.assert_close(got.cpu().double(), want, atol=2e-5, rtol=1e-4)
    assert (got.cpu()[~cand] == 0).all()
    if dev.type == "cpu":
        assert sampled_rows.last_kernel_resources() == {"n_regs": None, "n_spills": None}


def test_a_key_tile_width_that_is_not_16_32_or_64_is_named(monkeypatch):
    from seer.kernels import sampled_rows

    q, k, cand, _, _ = _case(1, 2, 1, 64, 16, 16, seed=1)
    monkeypatch.setitem(sampled_rows.LAUNCH, "block_n", 48)
    with pytest.raises(ValueError, match="block_n'\\] must be None, 16, 32 or 64, got 48"):
        sampled_rows_mass(q.to(_device()), k.to(_device()), cand.to(_device()), 4, 16)


def test_program_layout_fills_at_most_128_rows():
    assert program_layout(7, 16, 64) == (7, 8, 16)  # 8 x 16 rows with a padding head
    assert program_layout(7, 8, 64) == (7, 8, 8)
    assert program_layout(7, 32, 64) == (1, 1, 32)  # 7 heads do not fit; 7 is prime
    assert program_layout(6, 32, 64) == (3, 4, 32)
    assert program_layout(4, 64, 64) == (2, 2, 64)
    assert program_layout(8, 200, 128) == (1, 1, 128)  # rows clipped to the block
    assert program_layout(1, 3, 16) == (1, 1, 16)  # padded to the 16 rows of a dot
    assert program_layout(3, 3, 16) == (3, 4, 4)
    assert program_layout(7, 16, 64, heads=1) == (1, 1, 16)  # one head per program
    assert program_layout(16, 4, 64) == (8, 8, 4)  # at most 8 heads a program (the lists' membership bits)
    with pytest.raises(ValueError, match="heads_per_program must divide the group of 7 query heads per key head "
                                         "and be at most 8, got 2"):
        program_layout(7, 16, 64, heads=2)


@pytest.mark.parametrize("b,hq,hkv,nb,heads", [(1, 7, 1, 9, 7), (2, 12, 2, 13, 3), (1, 16, 2, 40, 8), (1, 4, 4, 5, 1)])
def test_union_lists_pack_each_heads_membership_into_the_entries(b, hq, hkv, nb, heads):
    """List ``l`` (query heads ``l * heads ..``): the ascending union of its heads' causal candidates, entry
    ``c << 8 | bits`` with bit ``g`` set where the list's ``g``-th head lists ``c`` (entries above the diagonal
    ignored)."""
    from seer.kernels.sampled_rows import union_lists

    g = torch.Generator().manual_seed(nb + heads)
    cand = torch.rand(b, hq, nb, nb, generator=g) < 0.3
    idx, cnt = union_lists(cand.to(_device()), heads)
    idx, cnt = idx.cpu(), cnt.cpu()
    assert (hq // hkv) % heads == 0  # a list never mixes two key heads' query heads
    lists = hq // heads
    for bi in range(b):
        for lst in range(lists):
            h0 = lst * heads
            for r in range(nb):
                want = []
                for c in range(r + 1):
                    bits = sum(int(cand[bi, h0 + gh, r, c]) << gh for gh in range(heads))
                    if bits:
                        want.append(c << 8 | bits)
                assert cnt[bi, lst, r].item() == len(want)
                assert idx[bi, lst, r, :len(want)].tolist() == want


@pytest.mark.parametrize("b,hq,hkv,nb,heads,blocks", [(1, 2, 2, 9, 1, 4), (2, 6, 2, 7, 3, 2), (1, 4, 4, 17, 1, 8)])
def test_union_lists_over_several_query_blocks_pack_each_members_bits(b, hq, hkv, nb, heads, blocks):
    """Group ``r`` of ``blocks`` query blocks: member ``g`` is block ``r * blocks + g // P'`` of the list's
    ``g % P'``-th head (``P'`` the heads padded to a power of two), and lists the blocks at or before its own; a last
    group past ``nb`` has members with no block."""
    from seer.kernels.sampled_rows import union_lists

    g = torch.Generator().manual_seed(nb + heads + blocks)
    cand = torch.rand(b, hq, nb, nb, generator=g) < 0.3
    idx, cnt = union_lists(cand.to(_device()), heads, blocks)
    idx, cnt = idx.cpu(), cnt.cpu()
    pp = 1 << (heads - 1).bit_length()
    groups = math.ceil(nb / blocks)
    assert tuple(cnt.shape) == (b, hq // heads, groups)
    for bi in range(b):
        for lst in range(hq // heads):
            for r in range(groups):
                want = []
                for c in range(min(nb, r * blocks + blocks)):
                    bits = 0
                    for member in range(blocks * pp):
                        head, blk = member % pp, r * blocks + member // pp
                        if head < heads and blk < nb and c <= blk and cand[bi, lst * heads + head, blk, c]:
                            bits |= 1 << member
                    if bits:
                        want.append(c << 8 | bits)
                assert cnt[bi, lst, r].item() == len(want)
                assert idx[bi, lst, r, :len(want)].tolist() == want


def _most_blocks(hq, hkv, block, rows):
    """The most query blocks a program holds at the kernel's head layout (at most 8 members and 128 rows)."""
    _, pp, rp = program_layout(hq // hkv, min(rows, block), block)
    return min(8 // pp, 128 // (pp * rp))


@pytest.mark.parametrize("b,hq,hkv,n,d,block,rows", [c for c in CASES if _most_blocks(c[1], c[2], c[5], c[6]) >= 2])
@pytest.mark.parametrize("passes", [1, 2])
def test_several_query_blocks_a_program_give_the_loops_masses(b, hq, hkv, n, d, block, rows, passes):
    """``blocks_per_program`` 2 and the most that fit give the float64 loops' masses on every case whose head layout
    leaves room for two: causal masks per row, short last blocks and a last group past the blocks."""
    most = _most_blocks(hq, hkv, block, rows)
    q, k, cand, q64, k64 = _case(b, hq, hkv, n, d, block, seed=3 * n + rows)
    want = _loops(q64, k64, cand, rows, block, d ** -0.5)
    dev = _device()
    for blocks in sorted({2, 1 << (most.bit_length() - 1)}):
        got = sampled_rows_mass(q.to(dev), k.to(dev), cand.to(dev), rows, block, passes=passes,
                                blocks_per_program=blocks)
        torch.testing.assert_close(got.cpu().double(), want, atol=2e-5, rtol=1e-4, msg=f"{blocks} blocks")
        assert (got.cpu()[~cand] == 0).all()


def test_blocks_to_fill_fill_programs_to_64_rows():
    """The default blocks a program: a key head per query head at 16 rows takes 4 blocks, groups of 4 heads at 8 rows
    2, Qwen's 7 heads (64 or 128 rows) 1; never more than 8 members."""
    from seer.kernels.sampled_rows import blocks_to_fill

    layouts = {(32, 32, 16): 4, (32, 32, 8): 4, (32, 8, 8): 2, (32, 8, 16): 1, (9, 3, 8): 2, (9, 3, 16): 1,
               (14, 2, 8): 1, (14, 2, 16): 1, (4, 4, 1): 4, (16, 8, 16): 2}
    for (hq, hkv, rows), want in layouts.items():
        _, pp, rp = program_layout(hq // hkv, rows, 64)
        got = blocks_to_fill(pp, rp)
        assert got == want and got * pp <= 8, (hq, hkv, rows, got)


def test_sampled_offsets_spread_from_the_first_row_to_the_last():
    from seer.kernels.sampled_rows import sampled_offsets

    assert sampled_offsets(64, 8) == [0, 9, 18, 27, 36, 45, 54, 63]
    assert sampled_offsets(16, 1) == [15] and sampled_offsets(16, 16) == list(range(16))
    assert sampled_offsets(16, 40) == list(range(16)) and sampled_offsets(16, 3) == [0, 8, 15]


def test_bad_arguments_name_the_value():
    q, k, cand, _, _ = _case(1, 2, 1, 50, 16, 16, seed=1)
    with pytest.raises(ValueError, match="candidates must be bool"):
        sampled_rows_mass(q, k, cand[:, :, :3], 4, 16)
    with pytest.raises(ValueError, match="candidates must be bool"):
        sampled_rows_mass(q, k, cand.int(), 4, 16)
    with pytest.raises(ValueError, match="heads_per_program must divide the group of 2 query heads per key head "
                                         "and be at most 8, got 3"):
        sampled_rows_mass(q, k, cand, 4, 16, heads_per_program=3)
    with pytest.raises(ValueError, match="passes must be 1 or 2, got 3"):
        sampled_rows_mass(q, k, cand, 4, 16, passes=3)
    for blocks in (3, 8, 0, True):  # 2 heads of 8 rows: at most 4 blocks (8 members)
        with pytest.raises(ValueError, match=f"blocks_per_program must be 1, 2, 4 or 8 with at most 4 here .*, got "
                                             f"{blocks!r}"):
            sampled_rows_mass(q, k, cand, 4, 16, blocks_per_program=blocks)
    with pytest.raises(ValueError, match="rows must be an integer >= 1, got 0"):
        sampled_rows_mass(q, k, cand, 0, 16)
    with pytest.raises(ValueError, match="block_size"):
        sampled_rows_mass(q, k, cand, 4, 24)


# the kernel's masses from bf16 inputs against the float32 reference on the same values: the products are exact in
# float32 either way, so the two differ by float32 rounding only (about 1e-7 on an H100); a wrong row or entry moves a
# mass by far more (a program layout gave 4e-3 to 8e-3 on 2026-12-08, which the 1e-2 bound of before let through)
GPU_ATOL = 1e-4


def _gpu_bf16_case(hq, hkv, d, seed, n=4096 + 33):
    """bf16 q and k on the GPU (64-token blocks) and random causal candidates at 20%, the diagonal among them."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, n, d, generator=g).to(torch.bfloat16).cuda()
    k = torch.randn(1, hkv, n, d, generator=g).to(torch.bfloat16).cuda()
    nb = math.ceil(n / 64)
    cand = (((torch.rand(1, hq, nb, nb, generator=g) < 0.2) | torch.eye(nb, dtype=torch.bool))
            & torch.ones(nb, nb, dtype=torch.bool).tril()).cuda()
    return q, k, cand


def _errors(got, want):
    return (got - want).abs().max().item(), ((got - want).norm() / want.norm()).item()


def _gpu_bf16_errors(hq, hkv, d, rows, seed, n=4096 + 33, **kwargs):
    """The kernel in bf16 (64-token blocks, random candidates at 20%; 4k by default) against the float32 reference:
    its largest absolute and its relative (norm) error."""
    q, k, cand = _gpu_bf16_case(hq, hkv, d, seed, n)
    want = reference.sampled_rows_mass(q.float(), k.float(), cand, rows, 64)
    return _errors(sampled_rows_mass(q, k, cand, rows, 64, **kwargs), want)


def _union_definition(cand, heads, blocks):
    """The union lists of :func:`union_lists` from the definition, as a dense ``[B, Hq / heads, groups, nb]`` int64:
    ``c << 8 | bits`` where a member of the group lists block ``c`` at or before its own block, else 0."""
    b, hq, nb, _ = cand.shape
    pp = 1 << (heads - 1).bit_length()
    groups = math.ceil(nb / blocks)
    cols = torch.arange(nb, device=cand.device)
    bits = torch.zeros(b, hq // heads, groups, nb, dtype=torch.int64, device=cand.device)
    for member in range(blocks * pp):
        head, blk = member % pp, torch.arange(groups, device=cand.device) * blocks + member // pp
        if head < heads:
            listed = cand[:, head::heads][:, :, blk.clamp_max(nb - 1)]
            listed &= ((blk < nb)[:, None] & (cols[None, :] <= blk[:, None]))
            bits |= listed.long() << member
    return torch.where(bits != 0, cols << 8 | bits, 0)


def _lists_as_dense(idx, cnt):
    """``union_lists``' output in :func:`_union_definition`'s form; raises where a list is not strictly ascending."""
    nb = idx.shape[-1]
    valid = torch.arange(nb, device=idx.device) < cnt[..., None]
    entries = torch.where(valid, idx.long(), 0)
    cols = torch.where(valid, entries >> 8, nb)
    ascending = (cols[..., 1:] > cols[..., :-1]) | ~valid[..., 1:]
    assert bool(ascending.all()), "a union list is not strictly ascending"
    dense = torch.zeros(*idx.shape[:-1], nb + 1, dtype=torch.int64, device=idx.device)
    return dense.scatter_(-1, cols, entries)[..., :nb]


def _candidates_of_lists(dense, heads, blocks, hq):
    """The candidates ``[B, Hq, nb, nb]`` the union lists give each head's query block (its members' bits)."""
    b, lists, groups, nb = dense.shape
    pp = 1 << (heads - 1).bit_length()
    cand = torch.zeros(b, hq, groups * blocks, nb, dtype=torch.bool, device=dense.device)
    for member in range(blocks * pp):
        head, off = member % pp, member // pp
        if head < heads:
            cand[:, head::heads, off::blocks] = ((dense >> member) & 1) != 0
    return cand[:, :, :nb]


@pytest.mark.gpu
@pytest.mark.parametrize("blocks", [1, 2, 8])
@pytest.mark.parametrize("passes", [1, 2])
def test_gpu_several_query_blocks_a_program_match_the_reference(blocks, passes):
    """A key head per query head (D 128, 16 rows): 1, 2 and 8 query blocks a program."""
    largest, relative = _gpu_bf16_errors(4, 4, 128, 16, seed=1, passes=passes, blocks_per_program=blocks)
    assert largest < GPU_ATOL and relative < GPU_ATOL


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv,d,rows", [(32, 8, 128, 8), (9, 3, 64, 8), (32, 8, 128, 16), (4, 4, 128, 16)])
def test_gpu_program_layouts_match_the_reference(hq, hkv, d, rows):
    """The head layouts of Llama-3 8B (32:8) and SmolLM2 (9:3) at 8 rows (32-row programs) and 16, and a key head per
    query head (16 rows)."""
    largest, relative = _gpu_bf16_errors(hq, hkv, d, rows, seed=2)
    assert largest < GPU_ATOL and relative < GPU_ATOL


@pytest.mark.gpu
@pytest.mark.parametrize("heaviest_first,block_n", [(False, None), (True, None), (True, 32)])
@pytest.mark.parametrize("passes", [1, 2])
@pytest.mark.parametrize("rows", [8, 16])
def test_gpu_bf16_matches_the_reference_at_4k(rows, passes, heaviest_first, block_n, monkeypatch):
    """bf16 at 4k (GQA 7:1 as Qwen's, D 64, 64-token blocks), random candidates at 20%; 8 rows (7 heads in 64-row
    programs) and 16 (128 rows); one pass and two; either launch order; 32-key tiles."""
    from seer.kernels import sampled_rows

    monkeypatch.setitem(sampled_rows.LAUNCH, "heaviest_first", heaviest_first)
    monkeypatch.setitem(sampled_rows.LAUNCH, "block_n", block_n)
    largest, relative = _gpu_bf16_errors(14, 2, 64, rows, seed=0, passes=passes)
    assert largest < GPU_ATOL and relative < GPU_ATOL


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv,nb,heads,blocks", [
    (4, 4, 100, 1, 2), (4, 4, 600, 1, 2), (4, 4, 600, 1, 4), (8, 4, 600, 2, 1), (32, 8, 600, 4, 1), (32, 8, 600, 4, 2),
    (14, 2, 1100, 7, 1)])
def test_gpu_union_lists_match_the_definition(hq, hkv, nb, heads, blocks):
    """The rerank's union lists built on the GPU (one warp a list below 512 blocks, four from 512 on), against the
    definition: every member's bits, in ascending order."""
    from seer.kernels.sampled_rows import union_lists

    g = torch.Generator().manual_seed(nb + heads + blocks)
    cand = ((torch.rand(1, hq, nb, nb, generator=g) < 0.2) | torch.eye(nb, dtype=torch.bool)).cuda()
    idx, cnt = union_lists(cand, heads, blocks)
    want = _union_definition(cand, heads, blocks)
    assert torch.equal(cnt.long(), (want != 0).sum(-1))
    assert torch.equal(_lists_as_dense(idx, cnt), want)


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv,rows,heads,blocks,n", [
    (4, 4, 16, None, 2, 4096 + 33),  # one head's 16 rows, 2 blocks: the 32-row layout found off on 2026-12-08
    (2, 2, 16, None, 2, 32768 + 33),  # the same at 32k (513 blocks: four-warp list building)
    (8, 4, 16, 2, 1, 4096 + 33),  # 2 heads of 16 rows, one block
    (32, 8, 8, None, 1, 4096 + 33),  # 4 heads of 8 rows, one block (Llama-3's layout before blocks_to_fill)
    (4, 4, 16, None, 4, 4096 + 33),  # 64-row controls: 4 blocks of one head, 2 blocks of 4 heads at 8 rows
    (32, 8, 8, None, 2, 4096 + 33)])
def test_gpu_32_row_programs_match_the_reference(hq, hkv, rows, heads, blocks, n):
    """Programs of 32 sampled rows (and 64-row controls), D 128. Where the masses are off, the message tells the
    lists from the kernel: the kernel's masses against the reference on the candidates the GPU's union lists hold."""
    from seer.kernels.sampled_rows import union_lists

    q, k, cand = _gpu_bf16_case(hq, hkv, 128, seed=4, n=n)
    p, pp, rp = program_layout(hq // hkv, rows, 64, heads)
    assert pp * rp * blocks == (64 if (hq, rows, blocks) in {(4, 16, 4), (32, 8, 2)} else 32)
    got = sampled_rows_mass(q, k, cand, rows, 64, heads_per_program=heads, blocks_per_program=blocks)
    largest, relative = _errors(got, reference.sampled_rows_mass(q.float(), k.float(), cand, rows, 64))
    dense = _lists_as_dense(*union_lists(cand, p, blocks))
    lists_ok = torch.equal(dense, _union_definition(cand, p, blocks))
    of_lists = reference.sampled_rows_mass(q.float(), k.float(), _candidates_of_lists(dense, p, blocks, hq), rows, 64)
    assert largest < GPU_ATOL and relative < GPU_ATOL, (
        f"largest {largest:.2e}, relative {relative:.2e}; union lists match the definition: {lists_ok}; against the "
        f"reference on the lists' own candidates: {_errors(got, of_lists)}")
