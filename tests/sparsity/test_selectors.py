"""Training-free block selectors: the score contract (shape, causality, normalisation), independence from
future tokens, values against plain float64 brute force, FlexPrefill's per-head choice, parameter checks."""

import math

import pytest
import torch

from seer.sparsity.masks import causal_blocks
from seer.sparsity.selectors import (SELECTORS, Antidiagonal, BlockMean, FlexPrefill, LayerInputs, Oracle,
                                     RandomScores, Reranked, Streaming, VerticalSlash, build_selector)

SMALL = {  # parameters that suit the tiny test shapes (block 16)
    "oracle": {},
    "streaming": {"sink_blocks": 1},
    "block_mean": {},
    "vertical_slash": {"last_queries": 8},
    "antidiagonal": {"stride": 4},
    "flexprefill": {"last_queries": 8},
    "random": {"seed": 3},
    "reranked": {"base": "block_mean", "rows": 4, "top_p": 0.9},
}
LAST_ROWS = {"vertical_slash", "flexprefill"}  # read the last query rows by design


def make_inputs(b=2, hq=4, hkv=2, n=75, d=16, bs=16, dtype=torch.float32, seed=0, layer_idx=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, d, generator=g, dtype=torch.float64) * spread
    k = torch.randn(b, hkv, n, d, generator=g, dtype=torch.float64) * spread
    return LayerInputs(q.to(dtype), k.to(dtype), bs, d ** -0.5, layer_idx)


def with_qk(x, q, k):
    return LayerInputs(q, k, x.block_size, x.scale, x.layer_idx)


# ---------------------------------------------------------------------------------------------------------------
# float64 brute force, written plainly


def dense_probs(q, k, scale):
    """Causal softmax ``[B, Hq, N, N]`` in float64, K repeated over the query-head groups."""
    n = q.shape[2]
    kk = k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = q.double() @ kk.transpose(-1, -2) * scale
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1)


def log_normalise(mass):
    """Reference for the score normalisation: log of the mass (floored at 1e-30), log-softmax over j <= i."""
    nb = mass.shape[-1]
    s = mass.clamp_min(1e-30).log().masked_fill(~causal_blocks(nb), float("-inf"))
    return s.log_softmax(-1)


def brute_block_mass(p, bs):
    n = p.shape[-1]
    nb = math.ceil(n / bs)
    out = torch.zeros(*p.shape[:2], nb, nb, dtype=torch.float64)
    for i in range(nb):
        for j in range(i + 1):
            out[..., i, j] = p[..., i * bs:(i + 1) * bs, j * bs:(j + 1) * bs].sum(-1).mean(-1)
    return out


def assert_scores_close(got, want, atol=2e-4):
    nb = got.shape[-1]
    causal = causal_blocks(nb)
    assert torch.isneginf(got[..., ~causal]).all()
    torch.testing.assert_close(got[..., causal].double(), want[..., causal].double(), atol=atol, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# contract


def test_registry_and_names():
    assert set(SELECTORS) == set(SMALL)
    for name, cls in SELECTORS.items():
        assert cls.name == name
        assert isinstance(build_selector(name), cls)


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 4, 2, 75, 16), (1, 3, 3, 64, 16), (2, 6, 2, 9, 16), (1, 2, 1, 1, 16)])
def test_score_contract(name, dtype, shape):
    b, hq, hkv, n, bs = shape
    x = make_inputs(b, hq, hkv, n, bs=bs, dtype=dtype)
    s = build_selector(name, **SMALL[name]).scores(x)
    nb = math.ceil(n / bs)
    assert s.shape == (b, hq, nb, nb) and s.dtype == torch.float32 and s.device == x.q.device
    causal = causal_blocks(nb)
    assert torch.isfinite(s[..., causal]).all(), "finite on and below the diagonal"
    assert torch.isneginf(s[..., ~causal]).all(), "-inf above the diagonal"
    torch.testing.assert_close(s.exp().sum(-1), torch.ones(b, hq, nb), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(set(SMALL) - LAST_ROWS))
def test_rows_ignore_future_tokens(name):
    x = make_inputs(n=75, bs=16)
    sel = build_selector(name, **SMALL[name])
    base = sel.scores(x)
    g = torch.Generator().manual_seed(7)
    for i in range(x.nb - 1):
        cut = (i + 1) * x.block_size
        q, k = x.q.clone(), x.k.clone()
        q[:, :, cut:] = torch.randn(q[:, :, cut:].shape, generator=g) * 3
        k[:, :, cut:] = torch.randn(k[:, :, cut:].shape, generator=g) * 3
        s = sel.scores(with_qk(x, q, k))
        torch.testing.assert_close(s[:, :, :i + 1], base[:, :, :i + 1], atol=1e-5, rtol=1e-5)
        if name not in ("streaming", "random"):
            assert not torch.allclose(s[:, :, i + 1:], base[:, :, i + 1:], atol=1e-3), "later rows must see it"


def test_vertical_slash_reads_only_last_rows():
    x = make_inputs(n=75, bs=16)
    sel = VerticalSlash(last_queries=8)
    base = sel.scores(x)
    q = x.q.clone()
    q[:, :, :75 - 8] = torch.randn(q[:, :, :75 - 8].shape) * 3
    torch.testing.assert_close(sel.scores(with_qk(x, q, x.k)), base, atol=1e-5, rtol=1e-5)
    q = x.q.clone()
    q[:, :, -8:] = torch.randn(q[:, :, -8:].shape) * 3
    assert not torch.allclose(sel.scores(with_qk(x, q, x.k)), base, atol=1e-3)


def test_flexprefill_reads_last_rows_for_its_choice():
    x = make_inputs(n=75, bs=16, hq=8, hkv=2)
    sel = FlexPrefill(last_queries=8, tau=0.1)
    dist, qa = sel.decide(x)
    assert qa.any() and (~qa).any(), "want both kinds of heads in this input"
    q = x.q.clone()
    q[:, :, :75 - 8] = torch.randn(q[:, :, :75 - 8].shape) * 3
    y = with_qk(x, q, x.k)
    dist2, qa2 = sel.decide(y)
    torch.testing.assert_close(dist2, dist)
    assert torch.equal(qa2, qa)
    s, s_bm, s_vs = sel.scores(y), BlockMean().scores(y), VerticalSlash(last_queries=8).scores(y)
    torch.testing.assert_close(s[qa], s_bm[qa])
    torch.testing.assert_close(s[~qa], s_vs[~qa])
    torch.testing.assert_close(s[~qa], sel.scores(x)[~qa])  # vertical-slash heads ignore the early rows


# ---------------------------------------------------------------------------------------------------------------
# values against brute force


@pytest.mark.parametrize("n,bs", [(75, 16), (64, 8), (5, 16)])
def test_oracle_is_log_block_mass(n, bs):
    x = make_inputs(n=n, bs=bs, dtype=torch.float64)
    want = log_normalise(brute_block_mass(dense_probs(x.q, x.k, x.scale), bs))
    assert_scores_close(Oracle().scores(x), want)


def test_oracle_floors_vanishing_mass():
    # every query matches key block 0 by a margin of 225 nats: the other blocks' mass underflows to 0 in float32
    u = torch.zeros(1, 1, 48, 16)
    u[..., 0] = 30.0
    k = torch.zeros_like(u)
    k[:, :, :16] = u[:, :, :16]
    x = LayerInputs(u, k, 16, 0.25)
    s = Oracle().scores(x)
    causal = causal_blocks(3)
    assert torch.isfinite(s[..., causal]).all()
    assert s[0, 0, 2, 2].item() == pytest.approx(math.log(1e-30), abs=1e-3)
    assert s[0, 0, 2, 0].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("n,bs", [(75, 16), (64, 8)])
def test_block_mean_matches_explicit_means(n, bs):
    x = make_inputs(n=n, bs=bs, dtype=torch.float64)
    nb, g = math.ceil(n / bs), x.q.shape[1] // x.k.shape[1]
    want = torch.full((x.q.shape[0], x.q.shape[1], nb, nb), float("-inf"), dtype=torch.float64)
    for h in range(x.q.shape[1]):
        for i in range(nb):
            qm = x.q[:, h, i * bs:(i + 1) * bs].mean(-2)
            for j in range(i + 1):
                km = x.k[:, h // g, j * bs:(j + 1) * bs].mean(-2)
                want[:, h, i, j] = x.scale * (qm * km).sum(-1)
    assert_scores_close(BlockMean().scores(x), want.log_softmax(-1))


@pytest.mark.parametrize("n,bs,last", [(21, 4, 5), (24, 4, 4), (13, 8, 40)])
def test_vertical_slash_matches_loops(n, bs, last):
    x = make_inputs(b=2, hq=2, hkv=1, n=n, bs=bs, dtype=torch.float64)
    p = dense_probs(x.q, x.k, x.scale)
    rows = list(range(max(0, n - last), n))
    v = torch.zeros(2, 2, n, dtype=torch.float64)
    s = torch.zeros(2, 2, n, dtype=torch.float64)
    for r in rows:
        for c in range(r + 1):
            v[..., c] += p[..., r, c] / len(rows)
            s[..., r - c] += p[..., r, c] / len(rows)
    nb = math.ceil(n / bs)
    mass = torch.zeros(2, 2, nb, nb, dtype=torch.float64)
    for i in range(nb):
        block_rows = range(i * bs, min(n, (i + 1) * bs))
        for j in range(i + 1):
            for r in block_rows:
                for c in range(j * bs, min(r, (j + 1) * bs - 1) + 1):
                    mass[..., i, j] += (v[..., c] + s[..., r - c]) / len(block_rows)
    assert_scores_close(VerticalSlash(last_queries=last).scores(x), log_normalise(mass))


@pytest.mark.parametrize("n,bs,stride", [(21, 8, 4), (32, 8, 2), (19, 4, 4)])
def test_antidiagonal_matches_loops(n, bs, stride):
    x = make_inputs(b=2, hq=2, hkv=1, n=n, bs=bs, dtype=torch.float64)
    nb = math.ceil(n / bs)
    q = torch.nn.functional.pad(x.q, (0, 0, 0, nb * bs - n))
    k = torch.nn.functional.pad(x.k, (0, 0, 0, nb * bs - n)).repeat_interleave(2, dim=1)
    nr, real = nb * bs // stride, math.ceil(n / stride)
    logits = torch.full((2, 2, nr, nr), float("-inf"), dtype=torch.float64)
    for g in range(nr):
        for h in range(g + 1):
            acc = 0
            for t in range(stride):  # the antidiagonal of tile (g, h): row gS+S-1-t meets column hS+t
                acc = acc + (q[:, :, g * stride + stride - 1 - t] * k[:, :, h * stride + t]).sum(-1)
            logits[..., g, h] = acc * x.scale / stride
    p = logits.softmax(-1)
    rb = bs // stride
    mass = torch.zeros(2, 2, nb, nb, dtype=torch.float64)
    for g in range(real):
        for h in range(g + 1):
            mass[..., g // rb, h // rb] += p[..., g, h]
    assert_scores_close(Antidiagonal(stride=stride).scores(x), log_normalise(mass))


def test_antidiagonal_stride_one_is_the_oracle():
    x = make_inputs(n=37, bs=8)
    assert_scores_close(Antidiagonal(stride=1).scores(x), Oracle().scores(x).double(), atol=1e-4)


def test_antidiagonal_sees_a_slash_that_block_means_miss():
    # keys: noise plus a copy of the query 3 positions later (a slash at offset 3); block means average it away.
    # (An even stride samples only odd offsets - r - c = (g - h) S + S - 1 - 2t - so the slash is at an odd one.)
    torch.manual_seed(0)
    n, bs, d = 128, 16, 32
    q = torch.randn(1, 1, n, d) * 2
    k = torch.randn(1, 1, n, d) * 0.3
    k[:, :, :-3] += q[:, :, 3:]  # query r matches key r - 3
    x = LayerInputs(q, k, bs, 1.0 / math.sqrt(d))
    true = Oracle().scores(x).exp()

    def err(sel):
        return (sel.scores(x).exp() - true).abs().sum(-1).mean().item()

    assert err(Antidiagonal(stride=4)) < 0.5 * err(BlockMean())
    assert err(VerticalSlash(last_queries=64)) < 0.5 * err(BlockMean())
    assert err(BlockMean()) < err(RandomScores())


def test_streaming_values_and_order():
    x = make_inputs(b=1, hq=2, hkv=1, n=100, bs=10)
    nb = x.nb
    s = Streaming(sink_blocks=2).scores(x)
    for i in range(nb):
        w = torch.tensor([2 * math.exp(1e-3 * (1 - j)) if j < 2 else 1 / (1 + i - j) for j in range(i + 1)],
                         dtype=torch.float64)
        torch.testing.assert_close(s[0, 0, i, :i + 1].double(), (w / w.sum()).log(), atol=1e-5, rtol=1e-5)
        order = s[0, 1, i, :i + 1].argsort(descending=True).tolist()
        sinks = [j for j in range(min(2, i + 1))]
        assert order == sinks + [j for j in range(i, -1, -1) if j >= 2]  # sinks, then nearest first
    s0 = Streaming(sink_blocks=0).scores(x)
    assert s0[0, 0, nb - 1].argsort(descending=True).tolist() == list(range(nb - 1, -1, -1))


def test_random_reproducible_and_uniform():
    x = make_inputs(b=2, hq=3, hkv=1, n=128, bs=16, layer_idx=4)
    s = RandomScores(seed=5).scores(x)
    assert torch.equal(s, RandomScores(seed=5).scores(x))
    assert torch.equal(s, RandomScores(seed=5).scores(make_inputs(2, 3, 1, 128, bs=16, layer_idx=4, seed=9)))
    assert not torch.equal(s, RandomScores(seed=6).scores(x))
    assert not torch.equal(s, RandomScores(seed=5).scores(make_inputs(2, 3, 1, 128, bs=16, layer_idx=5)))
    assert not torch.equal(s[0], s[1]) and not torch.equal(s[:, 0], s[:, 1])
    # a prefix keeps its scores (independent of N for a given block)
    short = RandomScores(seed=5).scores(make_inputs(2, 3, 1, 64, bs=16, layer_idx=4))
    torch.testing.assert_close(short, s[:, :, :4, :4])
    # 4000 rows of two blocks: block 0 beats block 1 about half the time
    many = RandomScores(seed=0).scores(LayerInputs(torch.zeros(1, 4000, 2, 1), torch.zeros(1, 1, 2, 1), 1, 1.0))
    share = (many[0, :, 1, 0] > many[0, :, 1, 1]).float().mean().item()
    assert abs(share - 0.5) < 0.04


def _flexprefill_inputs():
    """Head 0: keys constant inside each block, so pooled q . pooled k is exactly what the rows see (query-aware).
    Head 1: one needle key that takes all the attention of the last rows while its block mean dilutes it."""
    torch.manual_seed(0)
    n, bs, d = 64, 16, 16
    u = torch.zeros(d)
    u[0] = 1.0
    q = torch.randn(1, 2, n, d)
    k = torch.zeros(1, 2, n, d)
    q[0, 0, -bs:] = u * 4
    kappa = torch.randn(4, d) * 0.5
    k[0, 0] = kappa.repeat_interleave(bs, dim=0)
    k[0, 0, -bs:] = -u * 2  # the last key block scores low (its causal half barely matters then)
    q[0, 1, -bs:] = u
    noise = torch.randn(n, d) * 2
    noise[:, 0] = 0
    k[0, 1] = noise
    k[0, 1, 20] = u * 80  # needle in key block 1: q . k * scale = 20 for every last row, 20/16 after pooling
    return LayerInputs(q, k, bs, d ** -0.5)


def test_flexprefill_picks_query_aware_or_vertical_slash():
    x = _flexprefill_inputs()
    sel = FlexPrefill(last_queries=16, tau=0.1)
    dist, qa = sel.decide(x)
    # brute-force JS distance
    p = dense_probs(x.q, x.k, x.scale)[:, :, -16:]
    true = p.sum(-2).reshape(1, 2, 4, 16).sum(-1) / 16
    qbar = x.q[:, :, -16:].double().mean(-2)
    kbar = x.k.double().reshape(1, 2, 4, 16, 16).mean(-2)
    est = (x.scale * (kbar * qbar[:, :, None]).sum(-1)).softmax(-1)
    m = (true + est) / 2
    js = 0.5 * (true * (true / m).log()).sum(-1) + 0.5 * (est * (est / m).log()).sum(-1)
    torch.testing.assert_close(dist.double(), js.sqrt(), atol=1e-4, rtol=1e-4)
    assert dist[0, 0] < 0.05 and dist[0, 1] > 0.2
    assert qa.tolist() == [[True, False]]
    s = sel.scores(x)
    torch.testing.assert_close(s[:, 0], BlockMean().scores(x)[:, 0])
    torch.testing.assert_close(s[:, 1], VerticalSlash(last_queries=16).scores(x)[:, 1])
    # tau bounds: 0 sends every head to vertical-slash, 1 (> sqrt(ln 2)) every head to query-aware
    assert not FlexPrefill(tau=0.0, last_queries=16).decide(x)[1].any()
    assert FlexPrefill(tau=1.0, last_queries=16).decide(x)[1].all()


# ---------------------------------------------------------------------------------------------------------------
# reranked


@pytest.mark.parametrize("n", [75, 64, 200])
def test_reranked_every_row_every_block_is_the_oracle(n):
    x = make_inputs(n=n, bs=16, dtype=torch.float64, seed=n)
    assert_scores_close(Reranked(rows=16, top_p=1.0).scores(x), Oracle().scores(x), atol=1e-6)


@pytest.mark.parametrize("n,rows,top_p,base,max_share", [
    (75, 4, 0.8, "block_mean", 1.0), (93, 3, 0.6, "vertical_slash", 1.0), (40, 1, 0.5, "streaming", 1.0),
    (93, 3, 0.99, "vertical_slash", 0.3),  # the cap binds: at most ceil(0.3 (i + 1)) candidates in row i
])
def test_reranked_matches_loops(n, rows, top_p, base, max_share):
    """Candidates (base's top-p set, capped, and the diagonal) and their masses from sampled rows, against float64
    loops."""
    x = make_inputs(b=1, hq=4, hkv=2, n=n, bs=16, dtype=torch.float64, seed=rows)
    sel = Reranked(base=base, rows=rows, top_p=top_p, max_share=max_share)
    probs = build_selector(base).scores(x).exp().double()
    bs, nb = 16, x.nb
    kk = x.k.repeat_interleave(2, dim=1)
    want = torch.zeros(1, 4, nb, nb, dtype=torch.float64)
    cand = torch.zeros(1, 4, nb, nb, dtype=torch.bool)
    for h in range(4):
        for i in range(nb):
            row = probs[0, h, i, :i + 1]
            total, taken = 0.0, 0
            for j in row.argsort(descending=True).tolist():  # the top-p prefix: blocks until the mass reaches top_p
                if total < top_p and taken < math.ceil(max_share * (i + 1)):
                    cand[0, h, i, j] = True
                    taken += 1
                total += row[j].item()
            cand[0, h, i, i] = True
            offsets = [bs - 1] if rows == 1 else [round(t * (bs - 1) / (rows - 1) + 1e-9) for t in range(rows)]
            sampled = [i * bs + o for o in offsets]
            sampled = [r for r in sampled if r < n] or [n - 1]
            keys = [c for c in range(n) if cand[0, h, i, c // bs]]
            for r in sampled:
                ks = [c for c in keys if c <= r]
                p = torch.softmax(x.q[0, h, r] @ kk[0, h, ks].T * x.scale, -1)
                for c, pc in zip(ks, p):
                    want[0, h, i, c // bs] += pc / len(sampled)
    assert torch.equal(sel.candidates(x), cand)
    assert_scores_close(sel.scores(x), log_normalise(want), atol=1e-5)
    assert (want[cand == 0] == 0).all() and torch.isfinite(sel.scores(x)[..., causal_blocks(nb)]).all()


# parameters


@pytest.mark.parametrize("name,params,field", [
    ("antidiagonal", {"stride": 0}, "stride"),
    ("antidiagonal", {"stride": 2.0}, "stride"),
    ("streaming", {"sink_blocks": -1}, "sink_blocks"),
    ("streaming", {"sink_blocks": 1.5}, "sink_blocks"),
    ("streaming", {"sink_blocks": True}, "sink_blocks"),
    ("vertical_slash", {"last_queries": 0}, "last_queries"),
    ("flexprefill", {"last_queries": 0}, "last_queries"),
    ("flexprefill", {"tau": -0.1}, "tau"),
    ("flexprefill", {"tau": float("nan")}, "tau"),
    ("flexprefill", {"tau": "0.1"}, "tau"),
    ("flexprefill", {"gamma": 0.9}, "gamma"),
    ("random", {"seed": -1}, "seed"),
    ("reranked", {"rows": 0}, "rows"),
    ("reranked", {"top_p": 0.0}, "top_p"),
    ("reranked", {"top_p": 1.5}, "top_p"),
    ("reranked", {"max_share": 0.0}, "max_share"),
    ("reranked", {"max_share": 1.5}, "max_share"),
    ("reranked", {"base": "oracle"}, "base"),
    ("reranked", {"base": "reranked"}, "base"),
    ("oracle", {"foo": 1}, "foo"),
    ("nope", {}, "nope"),
])
def test_bad_params_name_the_field(name, params, field):
    with pytest.raises(ValueError, match=field):
        build_selector(name, **params)


def test_stride_must_divide_block():
    sel = build_selector("antidiagonal", stride=3)
    x = make_inputs(b=1, hq=1, hkv=1, n=128, bs=64)
    with pytest.raises(ValueError, match="stride"):
        sel.scores(x)
    assert build_selector("antidiagonal", stride=16).scores(x).shape == (1, 1, 2, 2)


@pytest.mark.parametrize("bad", [
    dict(q=torch.zeros(1, 3, 8, 4), k=torch.zeros(1, 2, 8, 4)),  # heads
    dict(q=torch.zeros(1, 2, 8, 4), k=torch.zeros(1, 2, 9, 4)),  # length
    dict(q=torch.zeros(2, 8, 4), k=torch.zeros(2, 8, 4)),  # rank
    dict(block_size=0),
    dict(scale=0.0),
    dict(scale=float("inf")),
    dict(layer_idx=-1),
])
def test_layer_inputs_validation(bad):
    args = dict(q=torch.zeros(1, 2, 8, 4), k=torch.zeros(1, 1, 8, 4), block_size=4, scale=0.5)
    args.update(bad)
    with pytest.raises(ValueError):
        LayerInputs(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(SMALL))
def test_cuda_matches_cpu(name):
    x = make_inputs(n=200, bs=16, dtype=torch.bfloat16)
    sel = build_selector(name, **SMALL[name])
    got = sel.scores(with_qk(x, x.q.cuda(), x.k.cuda()))
    assert got.is_cuda
    want = sel.scores(x)
    causal = causal_blocks(x.nb)
    assert torch.isneginf(got.cpu()[..., ~causal]).all()
    torch.testing.assert_close(got.cpu()[..., causal], want[..., causal], atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("weight", [0.25, 0.5, 0.9])
def test_blend_scores_is_the_row_mixture(weight):
    from seer.sparsity.selectors import blend_scores

    x = make_inputs(n=75, bs=16)
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(x.batch, x.q_heads, x.nb, x.nb, generator=g, dtype=torch.float64) * 3
    partner = VerticalSlash(last_queries=8).scores(x)
    got = blend_scores(logits.float(), partner, weight)
    causal = causal_blocks(x.nb)
    p_gate = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
    want = ((1 - weight) * p_gate + weight * partner.double().exp()).clamp_min(1e-30)
    torch.testing.assert_close(got.exp().masked_fill(~causal, 0).double(), want.masked_fill(~causal, 0), atol=1e-6,
                               rtol=1e-5)
    assert torch.isinf(got[..., ~causal]).all() and (got[..., ~causal] < 0).all()
    with pytest.raises(ValueError, match="differ"):
        blend_scores(logits[..., :-1, :-1].float(), partner, weight)
