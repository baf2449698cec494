"""Plain-PyTorch references for the attention kernels (the ground truth the Triton kernels are tested against).

Shapes follow the kernels: ``q`` is ``[B, Hq, N, D]``, ``k`` and ``v`` are ``[B, Hkv, N, D]`` with ``Hq`` a
multiple of ``Hkv``; query head ``h`` reads key/value head ``h // (Hq // Hkv)`` (grouped-query attention).
Attention is causal: query ``i`` sees keys ``0..i``.

Every function here works block of query rows by block of query rows, so memory stays
``O(B * Hq * rows_per_chunk * N)`` instead of ``O(N^2)``; the arithmetic runs in float32, or float64 when
the inputs are float64.

* :func:`attention` - dense causal attention, returns ``(out, lse)``.
* :func:`block_gt` - the block max-pool of the causal softmax map (SeerAttention's distillation target).
* :func:`block_attn_mass` - the share of attention mass per block (what recall of a block mask is measured on).
* :func:`block_sparse_attn` - causal attention restricted to the key blocks a boolean block mask selects.
* :func:`block_sparse_sdpa` - the same output through PyTorch's SDPA with a token mask (the fast CPU path).
* :func:`block_sparse_attn_varlen` - :func:`block_sparse_attn` of sequences packed in one row (``cu_seqlens``).
* :func:`block_sparse_decode` - decode attention of new tokens over a KV cache's listed key blocks.
* :func:`vertical_slash_blend` - a gate's block logits blended with the vertical-slash estimate given by its
  per-block vectors (the fused kernel of ``seer/kernels/vs_blend.py``).
* :func:`last_rows_marginals` - the vertical and slash marginals of the last query rows' causal softmax (the
  fused kernel of ``seer/kernels/vs_marginals.py``); ``O(last_queries * N)`` memory.

Any dtype and head dim; shapes and ``sm_scale`` are checked as for the kernels (:mod:`seer.kernels.common`,
:mod:`seer.kernels.decode_index`: the only other modules of ``seer`` this one imports). Autocast is off inside them
(a mixed-precision training step calls them too), so the arithmetic keeps the dtype said above.
"""

from __future__ import annotations

import functools

import torch

from seer.kernels.common import check_qkv_shapes, check_varlen, softmax_scale
from seer.kernels.decode_index import check_decode_args, check_decode_values
from seer.kernels.sampled_rows import sampled_offsets

__all__ = ["attention", "block_attn_mass", "block_gt", "block_sparse_attn", "block_sparse_attn_varlen",
           "block_sparse_decode", "block_sparse_sdpa", "last_rows_marginals", "num_blocks", "vertical_slash_blend"]


def _without_autocast(fn):
    """``fn`` run with autocast off on its first argument's device."""
    @functools.wraps(fn)
    def wrapper(q, *args, **kwargs):
        with torch.autocast(q.device.type, enabled=False):
            return fn(q, *args, **kwargs)
    return wrapper


def num_blocks(seq_len: int, block_size: int) -> int:
    """Number of blocks covering ``seq_len`` tokens (the last one may be partial)."""
    return (seq_len + block_size - 1) // block_size


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _row_chunks(n: int, block_size: int, hq: int, b: int, chunk_rows: int | None,
                budget_elems: int = 1 << 26):
    """``(start, stop)`` of consecutive chunks of query rows, each a multiple of ``block_size`` rows (but the last),
    sized so one chunk's scores hold about ``budget_elems`` values unless ``chunk_rows`` says otherwise."""
    if chunk_rows is None:
        per_row = max(1, b * hq * n)
        chunk_rows = max(block_size, (budget_elems // per_row) // block_size * block_size)
    if chunk_rows % block_size:
        raise ValueError(f"chunk_rows ({chunk_rows}) must be a multiple of block_size ({block_size})")
    for start in range(0, n, chunk_rows):
        yield start, min(n, start + chunk_rows)


def _grouped_scores(q_chunk: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Scores ``[B, Hkv, G, rows, keys]`` of a chunk of query rows against keys, without repeating K."""
    b, hq, rows, d = q_chunk.shape
    hkv = k.shape[1]
    qg = (q_chunk * scale).reshape(b, hkv, hq // hkv, rows, d)
    return torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2))


def _causal_scores(q: torch.Tensor, k: torch.Tensor, start: int, stop: int, scale: float) -> torch.Tensor:
    """Causally masked scores of query rows ``start:stop`` against keys ``0:stop`` (``-inf`` above the diagonal)."""
    dt = _compute_dtype(q)
    s = _grouped_scores(q[:, :, start:stop].to(dt), k[:, :, :stop].to(dt), scale)
    rows = torch.arange(start, stop, device=q.device)[:, None]
    cols = torch.arange(0, stop, device=q.device)[None, :]
    return s.masked_fill_(cols > rows, float("-inf"))


@_without_autocast
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float | None = None,
              chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense causal attention. Returns ``out`` ``[B, Hq, N, D]`` (dtype of q) and ``lse`` ``[B, Hq, N]`` (float32,
    float64 for float64 inputs; the natural log of the softmax denominator of the scaled scores)."""
    n = q.shape[2]
    nb = num_blocks(n, 64) if n else 0
    full = torch.ones(q.shape[0], q.shape[1], nb, nb, dtype=torch.bool, device=q.device)
    return block_sparse_attn(q, k, v, full, block_size=64, sm_scale=sm_scale, chunk_rows=chunk_rows)


def _block_pool(q: torch.Tensor, k: torch.Tensor, block_size: int, sm_scale: float | None,
                chunk_rows: int | None, reduce: str) -> torch.Tensor:
    """Pools the causal softmax map over ``block_size x block_size`` tiles with ``max`` or ``mean`` of rows' sums."""
    b, hq, hkv, n, d = check_qkv_shapes(q, k)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    scale = softmax_scale(sm_scale, d)
    nb = num_blocks(n, block_size)
    out = torch.zeros(b, hq, nb, nb, dtype=_compute_dtype(q), device=q.device)
    for start, stop in _row_chunks(n, block_size, hq, b, chunk_rows):
        # unnormalised probabilities in place: exp(s - row max); a row's maximum over a tile, divided by the row's
        # sum, is its largest probability in that tile (and a tile's row sum over the row's sum, its mass)
        e = _causal_scores(q, k, start, stop, scale)  # [B, Hkv, G, rows, stop]
        e.sub_(e.amax(-1, keepdim=True)).exp_()
        row_sum = e.sum(-1, keepdim=True)
        kb = num_blocks(stop, block_size)
        qb = num_blocks(stop - start, block_size)
        if kb * block_size != stop:
            e = torch.nn.functional.pad(e, (0, kb * block_size - stop))
        e = e.unflatten(-1, (kb, block_size))
        per_row = (e.amax(-1) if reduce == "max" else e.sum(-1)) / row_sum  # [B, Hkv, G, rows, kb]
        real_rows = stop - start
        if reduce == "max":
            per_row = torch.nn.functional.pad(per_row, (0, 0, 0, qb * block_size - real_rows))
            pooled = per_row.unflatten(-2, (qb, block_size)).amax(-2)
        else:  # averaged over the block's real rows
            counts = torch.full((qb,), float(block_size), dtype=per_row.dtype, device=q.device)
            counts[-1] = real_rows - (qb - 1) * block_size
            per_row = torch.nn.functional.pad(per_row, (0, 0, 0, qb * block_size - real_rows))
            pooled = per_row.unflatten(-2, (qb, block_size)).sum(-2) / counts[:, None]
        first = start // block_size
        out[:, :, first:first + qb, :kb] = pooled.reshape(b, hq, qb, kb)
    return out


@_without_autocast
def block_gt(q: torch.Tensor, k: torch.Tensor, block_size: int, sm_scale: float | None = None,
             chunk_rows: int | None = None) -> torch.Tensor:
    """Block max-pool of the causal attention probabilities (SeerAttention's ground truth).

    ``gt[b, h, i, j] = max_{r in block i, c in block j} softmax_c(q_r . k_c * scale)`` with the causal mask
    (probability 0 for ``c > r``), so tiles above the diagonal are 0 and a partial last block is pooled over the
    tokens it has. Returns ``[B, Hq, nb, nb]`` float32 (float64 for float64 inputs), **not** row-normalised.
    """
    return _block_pool(q, k, block_size, sm_scale, chunk_rows, "max")


@_without_autocast
def block_attn_mass(q: torch.Tensor, k: torch.Tensor, block_size: int, sm_scale: float | None = None,
                    chunk_rows: int | None = None) -> torch.Tensor:
    """Share of attention mass per block: ``mass[b, h, i, j]`` is the probability that query rows of block ``i``
    put on key block ``j``, averaged over the rows of block ``i``; every row of the result sums to 1.
    Same shape and dtype as :func:`block_gt`. Used for recall ("how much attention a block mask keeps")."""
    return _block_pool(q, k, block_size, sm_scale, chunk_rows, "mean")


def _expand_block_mask(block_mask: torch.Tensor, b: int, hq: int, hkv: int, nb: int) -> torch.Tensor:
    if block_mask.dtype != torch.bool:
        raise ValueError(f"block_mask must be bool, got {block_mask.dtype}")
    if block_mask.dim() != 4 or block_mask.shape[0] != b or block_mask.shape[2:] != (nb, nb) \
            or block_mask.shape[1] not in (hq, hkv):
        raise ValueError(f"block_mask must be [B, Hq or Hkv, nb, nb] = [{b}, {hq} or {hkv}, {nb}, {nb}]; "
                         f"got {tuple(block_mask.shape)}")
    if block_mask.shape[1] != hq:  # one mask per key/value head, shared by its query-head group
        block_mask = block_mask.repeat_interleave(hq // hkv, dim=1)
    return block_mask


@_without_autocast
def block_sparse_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor,
                      block_size: int = 64, sm_scale: float | None = None,
                      chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention restricted to selected key blocks.

    ``block_mask`` is bool ``[B, Hq, nb, nb]`` (one mask per query head) or ``[B, Hkv, nb, nb]`` (shared by
    each query-head group); query block ``i`` attends to key block ``j`` only where ``block_mask[..., i, j]``
    and, inside the block, only causally. A row that selects no key gets ``out = 0`` and ``lse = -inf``.
    Returns ``out`` ``[B, Hq, N, D]`` in q's dtype and ``lse`` ``[B, Hq, N]`` in float32 (float64 for float64
    inputs).
    """
    b, hq, hkv, n, d = check_qkv_shapes(q, k, v)
    scale = softmax_scale(sm_scale, d)
    nb = num_blocks(n, block_size)
    mask = _expand_block_mask(block_mask, b, hq, hkv, nb)
    dt = _compute_dtype(q)
    out = torch.zeros(b, hq, n, d, dtype=dt, device=q.device)
    lse = torch.full((b, hq, n), float("-inf"), dtype=dt, device=q.device)
    for start, stop in _row_chunks(n, block_size, hq, b, chunk_rows):
        s = _causal_scores(q, k, start, stop, scale)  # [B, Hkv, G, rows, stop]
        row_blocks = torch.arange(start, stop, device=q.device) // block_size
        col_blocks = torch.arange(0, stop, device=q.device) // block_size
        m = mask[:, :, row_blocks][..., col_blocks].reshape(b, hkv, hq // hkv, stop - start, stop)
        s = s.masked_fill(~m, float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)  # -inf for empty rows
        p = torch.exp(s - row_lse.unsqueeze(-1).clamp_min(torch.finfo(dt).min))
        o = torch.einsum("bhgrk,bhkd->bhgrd", p, v[:, :, :stop].to(dt))
        out[:, :, start:stop] = o.reshape(b, hq, stop - start, d)
        lse[:, :, start:stop] = row_lse.reshape(b, hq, stop - start)
    return out.to(q.dtype), lse


@_without_autocast
def block_sparse_attn_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                             block_mask: torch.Tensor, block_size: int = 64, sm_scale: float | None = None, *,
                             seqlens: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`block_sparse_attn` of each of ``S`` sequences packed in one row (``seqlens``: the lengths on the host,
    as :func:`seer.kernels.block_sparse_attn_varlen` takes them): ``q [T, Hq, D]``, ``k``/``v``
    ``[T, Hkv, D]``, sequence ``s`` the tokens ``cu_seqlens[s] .. cu_seqlens[s + 1] - 1`` (int32 ``[S + 1]``, 0 first,
    ``T`` last); ``block_mask`` bool ``[S, Hq or Hkv, nb, nb]``, sequence ``s`` reading its top-left
    ``ceil(len_s / block_size)`` square (blocks start at its first token). No attention crosses sequences. Returns
    ``out [T, Hq, D]`` in q's dtype and ``lse [Hq, T]`` float32 (float64 for float64 inputs)."""
    lengths = check_varlen(q, k, v, cu_seqlens, block_mask, block_size, seqlens)
    offsets = [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    t, hq, d = q.shape
    out = torch.zeros(t, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.full((hq, t), float("-inf"), dtype=_compute_dtype(q), device=q.device)
    for s, (start, stop) in enumerate(zip(offsets, offsets[1:])):
        if stop == start:
            continue
        nb = num_blocks(stop - start, block_size)
        seq_q, seq_k, seq_v = (x[start:stop].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        seq_mask = block_mask[s:s + 1, :, :nb, :nb]
        seq_out, seq_lse = block_sparse_attn(seq_q, seq_k, seq_v, seq_mask, block_size, sm_scale)
        out[start:stop], lse[:, start:stop] = seq_out[0].transpose(0, 1), seq_lse[0]
    return out, lse


def block_sparse_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor,
                      block_size: int = 64, sm_scale: float | None = None, chunk_rows: int = 1024) -> torch.Tensor:
    """:func:`block_sparse_attn`'s ``out`` through ``torch.nn.functional.scaled_dot_product_attention`` with a token
    mask, chunk of query rows by chunk (the fast path on a CPU, where there is no Triton kernel). Every query-block
    row must keep its diagonal block (seer's budgets always do), so no row is empty; returns ``out`` ``[B, Hq, N, D]``
    in q's dtype."""
    b, hq, hkv, n, d = check_qkv_shapes(q, k, v)
    scale = softmax_scale(sm_scale, d)
    nb = num_blocks(n, block_size)
    mask = _expand_block_mask(block_mask, b, hq, hkv, nb)
    if not mask.diagonal(dim1=-2, dim2=-1).all():
        raise ValueError("block_sparse_sdpa needs every query-block row to keep its diagonal block")
    out = torch.empty_like(q)
    for start, stop in _row_chunks(n, block_size, hq, b, chunk_rows // block_size * block_size or block_size):
        rows = torch.arange(start, stop, device=q.device)
        cols = torch.arange(0, stop, device=q.device)
        keep = mask[:, :, rows // block_size][..., cols // block_size] & (cols[None, :] <= rows[:, None])
        out[:, :, start:stop] = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, start:stop], k[:, :, :stop], v[:, :, :stop], attn_mask=keep,
            scale=scale, enable_gqa=True)
    return out


@_without_autocast
def block_sparse_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_index: torch.Tensor,
                        cache_seqlens: torch.Tensor, block_size: int = 64,
                        sm_scale: float | None = None, validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over listed key blocks: :func:`seer.kernels.block_sparse_decode`'s contract.

    Query ``t`` of ``q [B, Hq, T, D]`` sits at position ``p = cache_seqlens[b] - T + t`` and attends key ``j`` of
    ``k_cache``/``v_cache [B, Hkv, N, D]`` when ``j <= p`` and block ``j // block_size`` is in ``block_index[b, h //
    (Hq // Hkv)]`` (int32 ``[B, Hkv, S]``, ``-1`` padding, repeats counted once). Values are checked (entries ``-1``
    or ``< ceil(N / block_size)``, ``T <= cache_seqlens <= N``) unless ``validate=False``, which, as the kernel's,
    skips the host read (decode loops). A row with no attended key gets ``out = 0`` and
    ``lse = -inf``. Returns ``out [B, Hq, T, D]`` in q's dtype and ``lse [B, Hq, T]`` (float32, float64 for float64
    inputs).
    """
    b, hq, hkv, t_new, n, d = check_decode_args(q, k_cache, v_cache, block_index, cache_seqlens, block_size,
                                                kernel=False)
    if validate:
        check_decode_values(block_index, cache_seqlens, t_new, n, block_size)
    scale = softmax_scale(sm_scale, d)
    nb = num_blocks(n, block_size)
    listed = torch.zeros(b, hkv, nb + 1, dtype=torch.bool, device=q.device)  # column nb: where -1 lands
    listed.scatter_(-1, torch.where(block_index < 0, nb, block_index).long(), True)
    keys = torch.arange(n, device=q.device)
    pos = cache_seqlens.long()[:, None] - t_new + torch.arange(t_new, device=q.device)  # [B, T]
    keep = listed[:, :, keys // block_size][:, :, None, :] & (keys <= pos[:, :, None])[:, None]  # [B, Hkv, T, N]
    dt = _compute_dtype(q)
    s = _grouped_scores(q.to(dt), k_cache.to(dt), scale)  # [B, Hkv, G, T, N]
    s = s.masked_fill(~keep[:, :, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf for empty rows
    p = torch.exp(s - lse.unsqueeze(-1).clamp_min(torch.finfo(dt).min))
    out = torch.einsum("bhgtn,bhnd->bhgtd", p, v_cache.to(dt))
    return out.reshape(b, hq, t_new, d).to(q.dtype), lse.reshape(b, hq, t_new)


def vertical_slash_blend(gate_logits: torch.Tensor, vertical: torch.Tensor, diagonal: torch.Tensor,
                         slash: torch.Tensor, slash_last: torch.Tensor, weight: float) -> torch.Tensor:
    """Float32 block log-scores ``[B, H, nb, nb]`` of ``(1 - weight) * softmax(gate_logits) + weight * p`` over each
    row's causal blocks, ``p`` the vertical-slash estimate's block masses (floored at 1e-30, row-normalised) spread
    from its per-block vectors ``[B, H, nb]``: ``slash[i - j] + vertical[j]`` below the diagonal (``slash_last`` in
    the last row), ``diagonal[i]`` on it; ``log(max(mixture, 1e-30))``, ``-inf`` above the diagonal (the math of
    ``seer/kernels/vs_blend.py``; ``seer.sparsity.selectors.blend_mass`` of the same masses up to rounding).
    Builds the ``[nb, nb]`` grid; float32 arithmetic."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < 1:
        raise ValueError(f"blend: weight must be in [0, 1), got {weight!r}")
    nb, dev = gate_logits.shape[-1], gate_logits.device
    i = torch.arange(nb, device=dev)[:, None]
    j = torch.arange(nb, device=dev)[None, :]
    dist = (i - j).clamp_min(0)
    below = torch.where(i == nb - 1, slash_last.float()[..., dist], slash.float()[..., dist]) \
        + vertical.float()[..., None, :]
    mass = torch.where(i == j, diagonal.float()[..., :, None], below)
    above = j > i
    p = mass.clamp_min(1e-30).masked_fill(above, 0.0)
    p = p / p.sum(-1, keepdim=True)
    gate = torch.softmax(gate_logits.float().masked_fill(above, float("-inf")), dim=-1)
    mixed = (1.0 - weight) * gate + weight * p
    return mixed.clamp_min(1e-30).log().masked_fill(above, float("-inf"))


@_without_autocast
def last_rows_marginals(q: torch.Tensor, k: torch.Tensor, last_queries: int = 64,
                        sm_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The vertical and slash marginals ``(v, s)`` ``[B, Hq, N]`` (float32, float64 for float64 inputs) of the
    causal softmax ``A`` of the last ``L = min(last_queries, N)`` query rows ``start + i`` (``start = N - L``):
    ``v[c] = 1/L sum_i A[i, c]`` and ``s[o] = 1/L sum_{i: start + i - o >= 0} A[i, start + i - o]``
    (``seer/kernels/vs_marginals.py``; ``seer.sparsity.selectors._last_rows_marginals``). Builds the
    ``[B, Hq, L, N]`` probabilities and gathers each row's diagonals."""
    b, hq, hkv, n, d = check_qkv_shapes(q, k)
    if isinstance(last_queries, bool) or not isinstance(last_queries, int) or last_queries < 1:
        raise ValueError(f"last_rows_marginals: last_queries must be an integer >= 1, got {last_queries!r}")
    scale = softmax_scale(sm_scale, d)
    rows = min(last_queries, n)
    start = n - rows
    attn = torch.softmax(_causal_scores(q, k, start, n, scale), dim=-1).reshape(b, hq, rows, n)
    v = attn.sum(-2) / rows
    r = torch.arange(start, n, device=q.device)[:, None]
    o = torch.arange(n, device=q.device)[None, :]
    col = r - o  # [L, N]: row start + i's key at offset o
    diag = attn.gather(-1, col.clamp_min(0).expand(b, hq, rows, n)).masked_fill_(col < 0, 0.0)
    return v, diag.sum(-2) / rows


@_without_autocast
@torch.no_grad()
def sampled_rows_mass(q: torch.Tensor, k: torch.Tensor, candidates: torch.Tensor, rows: int, block_size: int = 64,
                      sm_scale: float | None = None, chunk_elems: int = 1 << 25) -> torch.Tensor:
    """Block masses ``[B, Hq, nb, nb]`` float32 of ``min(rows, block_size)`` sampled query rows per block over each
    row's ``candidates`` (bool ``[B, Hq, nb, nb]``, the diagonal among them), 0 off them: the contract of
    :func:`seer.kernels.sampled_rows.sampled_rows_mass` (its docstring has the math), in float32 (float64 inputs stay
    float64 until the result), chunked over query blocks so that a chunk's logits hold about ``chunk_elems``
    elements."""
    b, hq, n, d = q.shape
    nb = num_blocks(n, block_size)
    scale = softmax_scale(sm_scale, d)
    dev, dtype = q.device, _compute_dtype(q)
    per_block = min(rows, block_size)
    offsets = sampled_offsets(block_size, per_block)
    raw = torch.arange(nb, device=dev)[:, None] * block_size + torch.tensor(offsets, device=dev)  # [nb, R]
    weight = (raw < n).to(dtype)
    if min(offsets) >= n - (nb - 1) * block_size:
        weight[-1, 0] = 1.0  # a short last block holding none of the sampled rows takes its last token
    positions = raw.clamp_max(n - 1)
    keys = torch.arange(n, device=dev)
    key_block = keys // block_size
    kk = k.to(dtype).repeat_interleave(hq // k.shape[1], dim=1)
    mass = torch.zeros(b, hq, nb, nb, dtype=dtype, device=dev)
    step = max(1, chunk_elems // (b * hq * per_block * n))
    for i0 in range(0, nb, step):
        i1 = min(nb, i0 + step)
        pos = positions[i0:i1].reshape(-1)  # [(i1 - i0) * R]
        logits = q[:, :, pos].to(dtype) @ kk.transpose(-1, -2) * scale  # [B, Hq, rows, N]
        allowed = candidates[:, :, i0:i1].repeat_interleave(per_block, dim=2)[..., key_block]
        allowed &= keys <= pos[:, None]
        p = torch.softmax(logits.masked_fill_(~allowed, float("-inf")), dim=-1)
        p = torch.nn.functional.pad(p, (0, nb * block_size - n)).unflatten(-1, (nb, block_size)).sum(-1)
        w = weight[i0:i1]
        mass[:, :, i0:i1] = (p.unflatten(2, (i1 - i0, per_block)) * w[..., None]).sum(3) / w.sum(1)[:, None]
    return mass.float()
