"""Training-free block scorers ("selectors"): rank (query block, key block) pairs without a learned gate.

Every selector maps one attention layer's inputs (:class:`LayerInputs`: Q and K after RoPE, block size, softmax
scale) to **block log-scores** ``[B, Hq, nb, nb]`` float32, ``nb = ceil(N / block_size)``:

* finite on and below the diagonal, ``-inf`` above it (block-causal);
* larger = more important;
* normalised: over the causal blocks of a row, ``logsumexp == 0``, so ``exp(scores)`` is the selector's estimate
  of how the row's attention mass spreads over its key blocks (threshold and top-p budgets read it as is; top-k
  budgets only use the order). Estimated masses are floored at ``1e-30`` before the log, so scores stay finite.

Any selector combines with any budget (:mod:`seer.sparsity.masks` or the evaluation's own), so methods are
compared at equal density with the learned gate. Scorers (``name``: class):

* ``oracle`` (:class:`Oracle`): the true block attention mass, the ceiling of any estimator.
* ``streaming`` (:class:`Streaming`): StreamingLLM / A-shape, sink blocks then recency.
* ``block_mean`` (:class:`BlockMean`): MInference's block-sparse estimate, mean-pooled Q . mean-pooled K.
* ``vertical_slash`` (:class:`VerticalSlash`): MInference's vertical-slash estimate from the last query rows.
* ``antidiagonal`` (:class:`Antidiagonal`): XAttention's strided antidiagonal sums.
* ``flexprefill`` (:class:`FlexPrefill`): per head, query-aware (block mean) or vertical-slash by a JS test.
* ``random`` (:class:`RandomScores`): reproducible random scores, the floor.
* ``reranked`` (:class:`Reranked`): another estimate's top-p candidates ranked by the exact attention of a few
  query rows per block.

All arithmetic is float32 (inputs may be bf16/fp16/fp32/fp64), on the inputs' device, without autograd. Work
that needs token-level scores runs chunk of query rows by chunk of query rows, so memory stays
``O(B * Hq * rows_per_chunk * N)`` (at most ``O(N * block_size)`` per head), never ``O(N^2)``.

Build one by name with :func:`build_selector` (unknown names, unknown parameters and bad values raise
``ValueError`` naming them); :data:`SELECTORS` maps names to classes.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass, fields
from typing import ClassVar

import torch
import torch.nn.functional as F

from seer.gates.pooling import pool_blocks
from seer.kernels import reference, sampled_rows, vs_marginals
from seer.kernels.common import BLOCK_SIZES, DTYPES, HEAD_DIMS
from seer.kernels.reference import block_attn_mass

__all__ = ["LayerInputs", "Selector", "blend_scores", "blend_mass", "Oracle", "Streaming", "BlockMean", "VerticalSlash",
           "Antidiagonal", "FlexPrefill", "RandomScores", "Reranked", "SELECTORS", "build_selector", "MASS_FLOOR",
           "log_mass", "top_p_candidates", "sampled_rows_mass"]

MASS_FLOOR = 1e-30  # estimated block masses are clamped here before the log, so scores stay finite
_CHUNK_ELEMS = 1 << 25  # score elements per chunk of query rows (128 MiB of float32)


# ----------------------------------------------------------------------------------------------------------------
# inputs


@dataclass
class LayerInputs:
    """One attention layer's inputs to a selector.

    ``q`` ``[B, Hq, N, D]`` and ``k`` ``[B, Hkv, N, D]`` are the query and key after RoPE (what attention uses);
    ``Hq % Hkv == 0`` and query head ``h`` reads key head ``h // (Hq // Hkv)``. ``scale`` is the softmax scale
    (usually ``D ** -0.5``). ``layer_idx`` only seeds the random selector.
    """

    q: torch.Tensor
    k: torch.Tensor
    block_size: int
    scale: float
    layer_idx: int = 0

    def __post_init__(self):
        if not isinstance(self.q, torch.Tensor) or not isinstance(self.k, torch.Tensor):
            raise ValueError("LayerInputs: q and k must be torch tensors")
        if self.q.dim() != 4 or self.k.dim() != 4:
            raise ValueError(f"LayerInputs: q and k must be [B, H, N, D]; got q {tuple(self.q.shape)}, "
                             f"k {tuple(self.k.shape)}")
        if not (self.q.is_floating_point() and self.k.is_floating_point()):
            raise ValueError(f"LayerInputs: q and k must be floating point; got {self.q.dtype}, {self.k.dtype}")
        b, hq, n, d = self.q.shape
        bk, hkv, nk, dk = self.k.shape
        if (bk, nk, dk) != (b, n, d):
            raise ValueError(f"LayerInputs: k {tuple(self.k.shape)} does not match q {tuple(self.q.shape)} in "
                             "batch, length or head dim")
        if hkv < 1 or hq % hkv:
            raise ValueError(f"LayerInputs: query heads ({hq}) must be a multiple of key heads ({hkv})")
        if n < 1 or b < 1 or d < 1:
            raise ValueError(f"LayerInputs: empty q {tuple(self.q.shape)}")
        if self.q.device != self.k.device:
            raise ValueError(f"LayerInputs: q on {self.q.device} but k on {self.k.device}")
        _check_int("LayerInputs", "block_size", self.block_size, 1)
        _check_int("LayerInputs", "layer_idx", self.layer_idx, 0)
        if isinstance(self.scale, bool) or not isinstance(self.scale, numbers.Real) \
                or not math.isfinite(self.scale) or self.scale <= 0:
            raise ValueError(f"LayerInputs: scale must be a finite number > 0, got {self.scale!r}")

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def q_heads(self) -> int:
        return self.q.shape[1]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def seq_len(self) -> int:
        return self.q.shape[2]

    @property
    def nb(self) -> int:
        return (self.seq_len + self.block_size - 1) // self.block_size


# ----------------------------------------------------------------------------------------------------------------
# validation helpers


def _check_int(owner: str, field: str, value, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{owner}: {field} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{owner}: {field} must be {bound}, got {value!r}")


def _check_float(owner: str, field: str, value, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{owner}: {field} must be a finite number, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{owner}: {field} must be in [{lo}, {hi}], got {value!r}")


# ----------------------------------------------------------------------------------------------------------------
# shared tensor helpers


def _causal(nb: int, device) -> torch.Tensor:
    return torch.ones(nb, nb, dtype=torch.bool, device=device).tril()


@functools.lru_cache(maxsize=64)
def _constants(kind: str, size: int, device, last: int = 0) -> torch.Tensor:
    """Read-only tensors the vertical-slash estimate and the blend use on every call, made once per shape and
    device (outside any inference mode, so autograd may save them): ``above`` ``[nb, nb]`` bool (strictly above the
    diagonal), ``below`` ``[nb, nb]`` float32 (1 strictly below the diagonal), ``floor`` ``[nb, nb]`` float32
    (:data:`MASS_FLOOR` on and below the diagonal, 0 above), ``future`` ``[L, L]`` bool (strictly above), and
    ``weights`` ``[B, 5]`` float64 (:func:`_vertical_slash_vectors`', ``last`` rows in the last block)."""
    with torch.inference_mode(False), torch.no_grad():
        if kind in ("above", "future"):
            return torch.ones(size, size, dtype=torch.bool, device=device).triu_(1)
        if kind == "below":
            return torch.ones(size, size, device=device).tril_(-1)
        if kind == "floor":
            return torch.full((size, size), MASS_FLOOR, device=device).tril_()
        if kind == "weights":
            t = torch.arange(size, device=device, dtype=torch.float64)
            return torch.stack([torch.ones_like(t), (size - t) / size, (last - t).clamp_min(0) / last, t / size,
                                t.clamp_max(last) / last], -1)
        raise ValueError(kind)


def _normalise(logits: torch.Tensor) -> torch.Tensor:
    """Block-causal log-softmax per row: ``-inf`` above the diagonal, rows' ``logsumexp`` 0 below it."""
    nb = logits.shape[-1]
    return torch.log_softmax(logits.float().masked_fill(~_causal(nb, logits.device), float("-inf")), dim=-1)


def log_mass(mass: torch.Tensor) -> torch.Tensor:
    """Log-scores from non-negative block masses (floored at :data:`MASS_FLOOR` on and below the diagonal, then
    row-normalised; ``-inf`` above it): ``log(m / sum_j<=i m)``, the log-softmax of ``log m`` over the causal
    blocks."""
    m = mass.float().clamp_min(MASS_FLOOR).masked_fill_(_constants("above", mass.shape[-1], mass.device), 0.0)
    return (m / m.sum(-1, keepdim=True)).log_()


def _grouped_matmul(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q [B, Hq, R, E] @ k [B, Hkv, M, E]^T -> [B, Hq, R, M]`` with query head h reading key head h // G: the G
    query heads of a key head stacked as one ``[G * R, E]`` operand (k is not expanded G times)."""
    b, hq, r, e = q.shape
    hkv, m = k.shape[1], k.shape[2]
    out = torch.matmul(q.reshape(b, hkv, hq // hkv * r, e), k.transpose(-1, -2))
    return out.reshape(b, hq, r, m)


def _mean_pool(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Float32 block means ``[B, H, nb, D]`` (a partial last block divides by its own length)."""
    # pool_blocks' CPU path rounds averages to x's dtype before out_dtype: give it float32 there
    return pool_blocks(x if x.is_cuda else x.float(), block_size, ["avg"], out_dtype=torch.float32)


# The fused selection kernels (seer.kernels.vs_marginals here, seer.kernels.vs_blend in the model's gate blend) run
# CUDA inference: their GPU tests pass on an H200 and they are 1.2x-1.7x faster than the PyTorch path there
# (docs/gpu_tests.md, docs/bench_selectors.md). False puts inference back on the PyTorch path (CPU and autograd
# always take it).
FUSED_SELECTION_ON_CUDA = True


def _fused_marginals(x: LayerInputs, last_queries: int) -> bool:
    """Whether :func:`_last_rows_marginals` runs the fused kernel: :data:`FUSED_SELECTION_ON_CUDA`, CUDA inputs the
    kernel takes, no gradient wanted."""
    wants_grad = torch.is_grad_enabled() and (x.q.requires_grad or x.k.requires_grad)
    return FUSED_SELECTION_ON_CUDA and x.q.is_cuda and not wants_grad and vs_marginals.supported(x.q, x.k,
                                                                                               last_queries)


def _last_rows_marginals(x: LayerInputs, last_queries: int,
                         fused: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The vertical and slash marginals of the true causal softmax ``A`` of the last ``L = min(last_queries, N)``
    query rows ``R = {N-L, .., N-1}``, and the first of those rows' index ``N - L``:
    ``v[c] = 1/L sum_{r in R} A[r, c]`` (mean probability on key c) and ``s[o] = 1/L sum_{r in R, r-o >= 0}
    A[r, r - o]`` (mean probability on the key at offset ``o`` back), both ``[B, Hq, N]`` float32, each summing to 1.

    The softmax is taken over ``L`` zero-probability columns followed by the N keys (the key rows are padded in
    front, so the padding costs the matmul nothing extra to lay out): row ``i`` of that ``[L, L + N]`` buffer,
    read from its element ``i + 1`` with a row stride of ``L + N + 1`` (a view, no copy), lists its probabilities by
    offset from the last key back (``m = N - 1 - o``), so ``s`` is one column sum of that skewed view; rows'
    future keys all lie in the last ``L`` columns and are masked there alone. No gather, no host sync.

    On CUDA, when no gradient is wanted (grad mode off, or neither q nor k requires one) and the kernel takes the
    inputs (:func:`seer.kernels.vs_marginals.supported`: fp16/bf16/fp32, a kernel head dim, ``L <= 128``), the
    fused Triton kernel :func:`seer.kernels.vs_marginals.last_rows_marginals` computes the same ``v`` and ``s``
    without the probabilities buffer; this PyTorch path runs on the CPU and for autograd. ``fused`` overrides the
    choice (True: the kernel, False: PyTorch; the benchmark times both)."""
    b, hq, n, _ = x.q.shape
    rows = min(last_queries, n)
    start = n - rows
    if _fused_marginals(x, last_queries) if fused is None else fused:
        v, s = vs_marginals.last_rows_marginals(x.q, x.k, int(last_queries), sm_scale=float(x.scale))
        return v, s, start
    width = rows + n
    k = x.k.new_empty(b, x.kv_heads, width, x.k.shape[-1], dtype=torch.float32)
    k[:, :, :rows].zero_()
    k[:, :, rows:].copy_(x.k)
    logits = _grouped_matmul(x.q[:, :, start:].float() * x.scale, k)  # [B, Hq, L, L + N]
    logits[..., :rows].fill_(float("-inf"))  # the padding columns
    # row start + i sees keys .. start + i: its future lies in the last L columns
    logits[..., width - rows:].masked_fill_(_constants("future", rows, logits.device), float("-inf"))
    p = torch.softmax(logits, dim=-1)  # p[.., i, rows + c] = A[start + i, c]
    v = p[..., rows:].sum(-2) / rows
    skew = p.as_strided((b, hq, rows, n), (hq * rows * width, rows * width, width + 1, 1), p.storage_offset() + 1)
    s = skew.sum(-2).flip(-1) / rows  # skew[i, m] = A[start + i, m + 1 + i - L]: offset o = N - 1 - m
    return v, s, start


def _vertical_slash_vectors(v: torch.Tensor, s: torch.Tensor, block_size: int) -> tuple[torch.Tensor, ...]:
    """The four per-block vectors ``[B, Hq, nb]`` float32 that :func:`_vertical_slash_block_mass` spreads over the
    ``[nb, nb]`` grid (and :func:`seer.kernels.vs_blend.vertical_slash_blend` reads directly):
    ``(vertical, diagonal, slash, slash_last)``, with

    * ``vertical[j] = sum_{c in J} v[c]``, the vertical part of every block below the diagonal;
    * ``diagonal[i]``, the whole diagonal block's mass: the mean over the block's rows of the in-block prefix sums of
      v, ``sum_t max(l - t, 0) / l * v_i[t]``, plus the slash at distance 0 (``l`` the query block's rows: ``B``,
      or fewer for the last one);
    * ``slash[d]`` (d = i - j) the slash part of a full query block's key block at distance d, and ``slash_last[d]``
      the same for the last query block's rows: the offsets ``(dB + a - B, dB + a]`` that row ``iB + a`` reaches
      in key block j are a prefix of offset block d and a suffix of block d - 1, so
      ``h_l[d] = sum_t max(l - t, 0) / l * s_d[t] + sum_t min(t, l) / l * s_{d-1}[t]``.

    All are sums of non-negative terms (float64), no differences of prefix sums, so even masses far below
    float32's epsilon keep their value."""
    b, hq, n = v.shape
    bs = block_size
    nb = (n + bs - 1) // bs
    last = n - (nb - 1) * bs
    weights = _constants("weights", bs, v.device, last)  # [bs, 5]
    blocks = F.pad(torch.stack([v, s], 2), (0, nb * bs - n)).unflatten(-1, (nb, bs)).double()
    vw, sw = (blocks @ weights).float().unbind(2)  # each [B, H, nb, 5]
    slash = sw[..., 1] + F.pad(sw[..., :-1, 3], (1, 0))  # [B, H, nb] by d
    slash_last = sw[..., 2] + F.pad(sw[..., :-1, 4], (1, 0))
    diagonal = vw[..., 1] + slash[..., :1]
    diagonal[..., -1] = vw[..., -1, 2] + slash_last[..., 0]
    return vw[..., 0], diagonal, slash, slash_last


def _vertical_slash_block_mass(v: torch.Tensor, s: torch.Tensor, block_size: int) -> torch.Tensor:
    """Block masses ``[B, Hq, nb, nb]`` float32 (not normalised, 0 above the diagonal) of the estimate
    ``A[r, c] ~ v[c] + s[r - c]`` (c <= r), averaged over the rows of each query block:
    ``mass[i, j] = 1/|I| sum_{r in I} sum_{c in J, c <= r} (v[c] + s[r - c])``, I/J the token sets of blocks i/j.

    Everything reduces to weighted sums of the blocks of ``v`` and ``s`` (:func:`_vertical_slash_vectors`):
    ``mass[i, j] = slash[i - j] + vertical[j]`` below the diagonal (``slash_last`` in the last row),
    ``diagonal[i]`` on it. The ``[nb, nb]`` matrix is the Toeplitz matrix of ``slash`` (rows of a strided view of
    one vector, flipped) plus ``vertical`` broadcast below the diagonal, with the diagonal and the last row written
    over.
    """
    b, hq, n = v.shape
    nb = (n + block_size - 1) // block_size
    vertical, diagonal, slash, slash_last = _vertical_slash_vectors(v, s, block_size)
    # Toeplitz slash[i - j] (0 above the diagonal): a Hankel view g[i' + j] of g = (slash reversed, 0 ...),
    # its rows flipped (i = nb - 1 - i'; the flip is where the matrix is first written), then one pass adding v
    g = F.pad(slash.flip(-1), (0, nb - 1))
    mass = g.as_strided((b, hq, nb, nb), (hq * (2 * nb - 1), 2 * nb - 1, 1, 1)).flip(-2)
    mass.addcmul_(_constants("below", nb, v.device), vertical[..., None, :])  # vertical, below the diagonal
    mass.diagonal(0, -2, -1).copy_(diagonal)
    last_row = slash_last.flip(-1) + vertical
    last_row[..., -1] = diagonal[..., -1]
    mass[..., -1, :] = last_row
    return mass


# ----------------------------------------------------------------------------------------------------------------
# selectors


class Selector:
    """Base class: a training-free block scorer. Subclasses are dataclasses whose fields are the
    hyper-parameters (validated in ``__post_init__``); :meth:`scores` returns block log-scores (module doc)."""

    name: ClassVar[str] = ""

    def scores(self, x: LayerInputs) -> torch.Tensor:
        """Block log-scores ``[B, Hq, nb, nb]`` float32 (see the module docstring)."""
        raise NotImplementedError

    @torch.no_grad()
    def mass(self, x: LayerInputs) -> torch.Tensor:
        """Block masses ``[B, Hq, nb, nb]`` float32, 0 above the diagonal, whose floored and row-normalised log is
        :meth:`scores` (what :func:`blend_mass` mixes a gate with); here ``exp(scores)``, selectors that estimate
        masses directly return them unnormalised and skip the log."""
        return self.scores(x).exp()

    def __call__(self, x: LayerInputs) -> torch.Tensor:
        return self.scores(x)


@dataclass
class Oracle(Selector):
    """The true block attention mass: ``score[i, j] = log(max(mass[i, j], 1e-30))`` (row-normalised), where
    ``mass[i, j]`` is the mean over the rows of query block i of their causal softmax probability on key block j
    (:func:`seer.sparsity.measures.attention_mass`: the Triton pass on CUDA, the chunked reference elsewhere). The
    ceiling any estimator can reach; costs a full attention forward."""

    name: ClassVar[str] = "oracle"

    @torch.no_grad()
    def scores(self, x: LayerInputs) -> torch.Tensor:
        if x.q.is_cuda:
            from seer.sparsity.measures import attention_mass

            return log_mass(attention_mass(x.q, x.k, x.block_size, x.scale))
        # the reference casts each chunk to float32 (float64 inputs stay float64 until the log)
        return log_mass(block_attn_mass(x.q, x.k, x.block_size, sm_scale=x.scale))


@dataclass
class Streaming(Selector):
    """StreamingLLM / A-shape: the first ``sink_blocks`` key blocks, then the nearest ones.

    Estimated mass ``p[i, j] ~ 2`` for a sink block (``j < sink_blocks``, with a tie-break of ``1e-3 * rank``
    in log space so earlier sinks rank first) and ``1 / (1 + i - j)`` for the others (power-law recency, the
    diagonal weighing 1); ``score = log_softmax(log p)`` over the causal row. Every sink outranks every other
    block and the others rank by distance, so a top-k budget of k blocks keeps the sinks plus a local window of
    ``k - sink_blocks`` blocks (the diagonal included).
    """

    name: ClassVar[str] = "streaming"
    sink_blocks: int = 1

    def __post_init__(self):
        _check_int("streaming", "sink_blocks", self.sink_blocks, 0)

    @torch.no_grad()
    def scores(self, x: LayerInputs) -> torch.Tensor:
        nb, dev = x.nb, x.q.device
        i = torch.arange(nb, device=dev, dtype=torch.float32)[:, None]
        j = torch.arange(nb, device=dev, dtype=torch.float32)[None, :]
        logits = -torch.log1p((i - j).clamp_min(0))
        sink = math.log(2.0) + 1e-3 * (self.sink_blocks - 1 - j)
        logits = torch.where(j < self.sink_blocks, sink, logits)
        return _normalise(logits).expand(x.batch, x.q_heads, nb, nb).contiguous()


@dataclass
class BlockMean(Selector):
    """MInference's block-sparse estimate: ``score[i, j] = log_softmax_j(scale * mean_q[i] . mean_k[j])`` over
    the causal blocks j <= i, with ``mean_q[i]`` / ``mean_k[j]`` the block means of Q / K (a partial last block
    averages its own tokens; GQA: each query head reads its group's key head)."""

    name: ClassVar[str] = "block_mean"

    @torch.no_grad()
    def scores(self, x: LayerInputs) -> torch.Tensor:
        return _block_mean_scores(x, _mean_pool(x.k, x.block_size))


def _block_mean_scores(x: LayerInputs, k_mean: torch.Tensor) -> torch.Tensor:
    q_mean = _mean_pool(x.q, x.block_size)
    return _normalise(_grouped_matmul(q_mean * x.scale, k_mean))


@dataclass
class VerticalSlash(Selector):
    """MInference's vertical-slash estimate from the last ``last_queries`` query rows.

    With ``A`` the true causal softmax of rows ``r in R = {N-L, .., N-1}`` (``L = min(last_queries, N)``):
    vertical ``v[c] = 1/L sum_{r in R} A[r, c]``, slash ``s[o] = 1/L sum_{r in R, r-o >= 0} A[r, r - o]``
    (each sums to 1). The token-level estimate is ``A~[r, c] = v[c] + s[r - c]`` for ``c <= r``; a block gets its
    mean over the rows of query block ``I`` (``|I|`` real tokens) of the mass on key block ``J``:

    ``mass[i, j] = 1/|I| sum_{r in I} sum_{c in J, c <= r} (v[c] + s[r - c])``,
    ``score[i, j] = log_softmax_j(log max(mass[i, j], 1e-30))`` over j <= i.

    For j < i the vertical part is ``sum_{c in J} v[c]`` and the slash part is the diagonals crossing the tile,
    ``sum_t w(t) s[(i-j)B + t]`` with ``w(t) = (B - |t|)/B`` (|t| < B) for full blocks; the diagonal tile counts
    only its causal half. Scores depend on Q only through the last L rows (by design); cost O(L * N * D).
    """

    name: ClassVar[str] = "vertical_slash"
    last_queries: int = 64

    def __post_init__(self):
        _check_int("vertical_slash", "last_queries", self.last_queries, 1)

    @torch.no_grad()
    def scores(self, x: LayerInputs) -> torch.Tensor:
        return log_mass(self.mass(x))

    @torch.no_grad()
    def mass(self, x: LayerInputs) -> torch.Tensor:
        v, s, _ = _last_rows_marginals(x, self.last_queries)
        return _vertical_slash_block_mass(v, s, x.block_size)

    @torch.no_grad()
    def vectors(self, x: LayerInputs) -> tuple[torch.Tensor, ...]:
        """The per-block vectors ``(vertical, diagonal, slash, slash_last)``, each ``[B, Hq, nb]`` float32, that
        :meth:`mass` spreads over the ``[nb, nb]`` grid (:func:`_vertical_slash_vectors`): what the fused
        :func:`seer.kernels.vs_blend.vertical_slash_blend` blends a gate with, without the grid."""
        v, s, _ = _last_rows_marginals(x, self.last_queries)
        return _vertical_slash_vectors(v, s, x.block_size)


@dataclass
class Antidiagonal(Selector):
    """XAttention's antidiagonal scoring at ``stride`` S (S must divide the block size B).

    Q and K are zero-padded to ``nb * B`` tokens and cut into groups of S tokens; group ``g`` of Q is flattened
    in *reversed* order, ``Q'[g] = [q[gS+S-1], .., q[gS]]``, and K in order, ``K'[g] = [k[gS], .., k[gS+S-1]]``,
    so ``Q'[g] . K'[h] = sum_{t<S} q[gS+S-1-t] . k[hS+t]``, the sum along the antidiagonal of the S x S tile
    (g, h). As in the paper's estimate, those sums are scaled by ``scale / S`` and softmaxed per reduced row g
    over the causal reduced keys h <= g:

    ``P[g, h] = softmax_{h <= g}(scale / S * Q'[g] . K'[h])`` (reduced rows made only of padding are dropped),
    ``mass[i, j] = sum_{g in block i, h in block j} P[g, h]`` (``B/S x B/S`` reduced cells per block),
    ``score[i, j] = log_softmax_j(log max(mass[i, j], 1e-30))`` over j <= i.

    With S = 1 this is exactly the oracle. Cost ``O(N^2 D / S)``, chunked over block rows. Note that a sampled
    cell's offset ``r - c = (g - h) S + S - 1 - 2t`` has the parity of ``S - 1``: an even stride never samples an
    even diagonal (the main diagonal included), so a one-token-wide slash at an even offset is invisible to it.
    """

    name: ClassVar[str] = "antidiagonal"
    stride: int = 8

    def __post_init__(self):
        _check_int("antidiagonal", "stride", self.stride, 1)

    @torch.no_grad()
    def scores(self, x: LayerInputs) -> torch.Tensor:
        st, bs = self.stride, x.block_size
        if bs % st:
            raise ValueError(f"antidiagonal: stride ({st}) must divide block_size ({bs})")
        b, hq, n = x.batch, x.q_heads, x.seq_len
        nb = x.nb
        rb = bs // st  # reduced rows (and keys) per block
        pad = nb * bs - n
        nr = nb * rb  # reduced length
        real_rows = (n + st - 1) // st
        qr = F.pad(x.q.float(), (0, 0, 0, pad)).unflatten(2, (nr, st)).flip(3).flatten(3) * (x.scale / st)
        kr = F.pad(x.k.float(), (0, 0, 0, pad)).unflatten(2, (nr, st)).flatten(3)
        mass = torch.zeros(b, hq, nb, nb, dtype=torch.float32, device=x.q.device)
        per_block_row = b * hq * rb * nr
        step = max(1, _CHUNK_ELEMS // per_block_row)
        dev = x.q.device
        for i0 in range(0, nb, step):
            i1 = min(nb, i0 + step)
            r0, r1 = i0 * rb, i1 * rb
            logits = _grouped_matmul(qr[:, :, r0:r1], kr[:, :, :r1])  # [B, Hq, rows, r1]
            rows = torch.arange(r0, r1, device=dev)[:, None]
            logits.masked_fill_(torch.arange(r1, device=dev)[None, :] > rows, float("-inf"))
            p = torch.softmax(logits, dim=-1).masked_fill_(rows >= real_rows, 0.0)
            mass[:, :, i0:i1, :i1] = p.unflatten(-1, (i1, rb)).sum(-1).unflatten(-2, (i1 - i0, rb)).sum(-2)
        return log_mass(mass)


@dataclass
class FlexPrefill(Selector):
    """FlexPrefill's per-head choice between a query-aware and the vertical-slash estimate.

    From the last ``L = min(last_queries, N)`` query rows (FlexPrefill's "last query block"), per (batch, head):

    * true distribution ``a[j] = 1/L sum_{r in R} sum_{c in J} A[r, c]`` (their causal softmax, summed per key
      block);
    * pooled estimate ``a^[j] = softmax_j(scale * mean_{r in R} q[r] . mean_k[j])`` over all nb key blocks;
    * ``d = sqrt(JS(a^, a))`` with natural logs (0 <= d <= sqrt(ln 2) ~ 0.83);
    * ``d < tau``: the head is *query-aware* and gets :class:`BlockMean`'s scores (every row's own pooled
      query); otherwise it gets :class:`VerticalSlash`'s scores (same ``last_queries``).

    FlexPrefill's coverage ``gamma`` and minimum budget belong to the budget applied to these scores (top-p on
    them reproduces its per-row cumulative selection), so they are not fields here. :meth:`decide` returns the
    JS distances and the per-head choices.
    """

    name: ClassVar[str] = "flexprefill"
    tau: float = 0.1
    last_queries: int = 64

    def __post_init__(self):
        _check_float("flexprefill", "tau", self.tau, 0.0, 1.0)
        _check_int("flexprefill", "last_queries", self.last_queries, 1)

    def _run(self, x: LayerInputs, with_scores: bool):
        v, s, start = _last_rows_marginals(x, self.last_queries)
        bs, nb, n = x.block_size, x.nb, x.seq_len
        true = F.pad(v, (0, nb * bs - n)).unflatten(-1, (nb, bs)).sum(-1)  # [B, Hq, nb]
        k_mean = _mean_pool(x.k, bs)
        q_last = x.q[:, :, start:].float().mean(2, keepdim=True) * x.scale  # [B, Hq, 1, D]
        est = torch.softmax(_grouped_matmul(q_last, k_mean)[:, :, 0], dim=-1)
        mid = 0.5 * (true + est)
        js = 0.5 * (torch.xlogy(true, true) - torch.xlogy(true, mid)).sum(-1) \
            + 0.5 * (torch.xlogy(est, est) - torch.xlogy(est, mid)).sum(-1)
        dist = js.clamp_min(0.0).sqrt()
        query_aware = dist < self.tau
        if not with_scores:
            return dist, query_aware, None
        qa_scores = _block_mean_scores(x, k_mean)
        vs_scores = log_mass(_vertical_slash_block_mass(v, s, bs))
        return dist, query_aware, torch.where(query_aware[..., None, None], qa_scores, vs_scores)

    @torch.no_grad()
    def decide(self, x: LayerInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """``(js_distance, query_aware)``, both ``[B, Hq]``: the square-root JS divergence between the pooled
        estimate and the true block attention of the last rows, and ``js_distance < tau``."""
        dist, query_aware, _ = self._run(x, with_scores=False)
        return dist, query_aware

    @torch.no_grad()
    def scores(self, x: LayerInputs) -> torch.Tensor:
        return self._run(x, with_scores=True)[2]


_M32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """``(x * c) mod 2^32`` for 32-bit ``x`` (int or int64 tensor) without overflowing int64."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _hash32(x):
    """A 32-bit integer mixer (xorshift-multiply); works on Python ints and int64 tensors alike."""
    x = x & _M32
    x = _mul32(x ^ (x >> 16), 0x7FEB352D)
    x = _mul32(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)


@dataclass
class RandomScores(Selector):
    """Random block scores, the floor: ``score[b, h, i, j] = log_softmax_j(log u)`` over j <= i, with ``u`` in
    (0, 1) a counter-based hash of ``(seed, layer_idx, b, h, i, j)``: reproducible for a given seed and layer,
    the same on every device, independent of N for a given block (a prefix gets the same scores), no RNG state
    touched. ``exp(score)`` is a uniformly-weighted random distribution; top-k of it is a uniform random subset.
    """

    name: ClassVar[str] = "random"
    seed: int = 0

    def __post_init__(self):
        _check_int("random", "seed", self.seed, 0, (1 << 63) - 1)

    @torch.no_grad()
    def scores(self, x: LayerInputs) -> torch.Tensor:
        key = _hash32(_hash32(_hash32(self.seed & _M32) ^ (self.seed >> 32)) + 0x9E3779B9 + x.layer_idx)
        dev, nb = x.q.device, x.nb

        def ar(n, dim):
            shape = [1, 1, 1, 1]
            shape[dim] = n
            return torch.arange(n, device=dev, dtype=torch.int64).view(shape)

        h = _hash32(ar(x.batch, 0) + key)
        h = _hash32(h + ar(x.q_heads, 1))
        h = _hash32(h + ar(nb, 2))
        h = _hash32(h + ar(nb, 3))  # [B, Hq, nb, nb]
        u = ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))
        return _normalise(u.log())


@dataclass
class Reranked(Selector):
    """A training-free scorer's candidates, ranked again by exact attention of a few query rows per block.

    1. **Candidates**: per row of block scores, the smallest set of ``base``'s most likely blocks whose estimated mass
       reaches ``top_p`` (top-p of ``exp(base scores)``), at most ``max_share`` of the row's causal blocks, plus the
       diagonal block.
    2. **Rerank**: in each query block ``I``, ``R = min(rows, B)`` sampled rows, spread evenly from the block's first
       row to its last (:func:`seer.kernels.sampled_rows.sampled_offsets`; in a short last block those before its
       end, or its last token alone when none is), attend exactly to the keys of their candidate blocks (causal):
       ``a_r = softmax_{c in C(i), c <= r}(scale * q_r . k_c)``, and

       ``mass[i, j] = 1/R sum_r sum_{c in J} a_r[c]`` (R: the rows sampled) for candidate blocks j, 0 for the others;
       ``score[i, j] = log_softmax_j(log max(mass[i, j], 1e-30))`` over j <= i.

    With ``rows >= B`` and ``top_p = 1`` this is the oracle (every row, every block); with fewer rows it costs about
    ``R / B`` times the candidates' share of the logits of dense attention (no ``P V`` product). Non-candidates keep
    the floor, so any budget takes them last. ``base``: a selector of :data:`SELECTORS` that reads no ground truth
    (not ``oracle``, ``random`` or ``reranked``), with its default parameters."""

    name: ClassVar[str] = "reranked"
    base: str = "vertical_slash"
    rows: int = 16
    top_p: float = 0.99
    max_share: float = 1.0

    def __post_init__(self):
        if self.base not in SELECTORS or self.base in ("oracle", "random", "reranked"):
            raise ValueError(f"reranked: base must be a training-free estimate of "
                             f"{sorted(set(SELECTORS) - {'oracle', 'random', 'reranked'})}, got {self.base!r}")
        _check_int("reranked", "rows", self.rows, 1)
        _check_float("reranked", "top_p", self.top_p, 1e-6, 1.0)
        _check_float("reranked", "max_share", self.max_share, 1e-6, 1.0)

    @torch.no_grad()
    def candidates(self, x: LayerInputs) -> torch.Tensor:
        """The candidate blocks ``[B, Hq, nb, nb]`` (bool, block-causal): ``base``'s top-p set of each row and the
        diagonal."""
        return top_p_candidates(build_selector(self.base).scores(x), self.top_p, self.max_share)

    @torch.no_grad()
    def scores(self, x: LayerInputs) -> torch.Tensor:
        return log_mass(self.mass(x))

    @torch.no_grad()
    def mass(self, x: LayerInputs) -> torch.Tensor:
        return sampled_rows_mass(x, self.candidates(x), self.rows)


def top_p_candidates(scores: torch.Tensor, top_p: float, max_share: float = 1.0) -> torch.Tensor:
    """Per row of block log-scores ``scores [B, H, nb, nb]`` (normalised over the causal blocks, ``-inf`` above the
    diagonal), the fewest most likely blocks whose mass ``exp(scores)`` reaches ``top_p`` (every causal block at 1),
    at most ``ceil(max_share * (i + 1))`` of them in row ``i`` (its causal blocks), and the diagonal block: bool
    ``[B, H, nb, nb]``, block-causal. The cap bounds the rerank's cost where the scores are flat (a top-p set of a
    flat row is most of it)."""
    probs = scores.float().exp()
    ranked, order = probs.sort(-1, descending=True)
    before = ranked.cumsum(-1) - ranked  # the mass of the blocks ranked above each
    nb = scores.shape[-1]
    wanted = (before < top_p) | (top_p >= 1)
    if max_share < 1:
        cap = torch.ceil(max_share * torch.arange(1, nb + 1, device=scores.device, dtype=torch.float32))
        wanted &= torch.arange(nb, device=scores.device) < cap[:, None]  # rank < the row's cap
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, wanted)
    keep &= _causal(nb, scores.device)
    return keep | torch.eye(nb, dtype=torch.bool, device=scores.device)


def sampled_rows_mass(x: LayerInputs, candidates: torch.Tensor, rows: int) -> torch.Tensor:
    """Block masses ``[B, Hq, nb, nb]`` float32 of :class:`Reranked`'s rerank step: in each query block, ``min(rows,
    B)`` sampled query rows (see :class:`Reranked`) attend exactly, with a causal softmax, to the keys of the row's
    ``candidates`` ``[B, Hq, nb, nb]`` (bool, each row's diagonal among them); a block's mass is their mean
    probability on its keys (0 off the candidates). On CUDA (no gradient, :data:`FUSED_SELECTION_ON_CUDA`, a kernel
    block size, dtype and head dim) the fused kernel :func:`seer.kernels.sampled_rows.sampled_rows_mass`; elsewhere
    its PyTorch contract :func:`seer.kernels.reference.sampled_rows_mass`."""
    if FUSED_SELECTION_ON_CUDA and x.q.is_cuda and x.block_size in BLOCK_SIZES and x.q.dtype in DTYPES \
            and x.k.dtype == x.q.dtype and x.q.shape[-1] in HEAD_DIMS:
        return sampled_rows.sampled_rows_mass(x.q, x.k, candidates, rows, x.block_size, x.scale)
    return reference.sampled_rows_mass(x.q, x.k, candidates, rows, x.block_size, x.scale, _CHUNK_ELEMS)


SELECTORS: dict[str, type[Selector]] = {cls.name: cls for cls in (
    Oracle, Streaming, BlockMean, VerticalSlash, Antidiagonal, FlexPrefill, RandomScores, Reranked)}


def blend_scores(scores: torch.Tensor, partner: torch.Tensor, weight: float) -> torch.Tensor:
    """Block log-scores of the mixture ``(1 - weight) * softmax(scores) + weight * exp(partner)`` over each row's
    causal blocks: ``scores`` any block logits ``[B, H, nb, nb]`` (a gate's), ``partner`` a selector's normalised
    log-scores of the same shape. The result is normalised like every selector's (``-inf`` above the diagonal).
    :func:`blend_mass` with ``exp(partner)``."""
    if scores.shape != partner.shape:
        raise ValueError(f"blend_scores: scores {tuple(scores.shape)} and partner {tuple(partner.shape)} differ")
    return blend_mass(scores, partner.float().exp(), weight)


def blend_mass(scores: torch.Tensor, mass: torch.Tensor, weight: float) -> torch.Tensor:
    """Block log-scores of the mixture ``(1 - weight) * softmax(scores) + weight * p`` over each row's causal
    blocks, ``p`` the partner's block masses ``mass`` (:meth:`Selector.mass`, 0 above the diagonal) floored at
    :data:`MASS_FLOOR` and row-normalised: ``log(max(mixed, 1e-30) / sum_j<=i max(mixed, 1e-30))``, ``-inf`` above
    the diagonal. ``0 <= weight < 1``. Differentiable in ``scores`` (what blend-aware distillation trains through).

    The mixture is computed over ``1 - weight`` (one fused multiply-add; the normalisation takes the factor out, the
    floor scales with it). Its row sums are ``1 / (1 - weight) >= 1``, so the floors would add less than
    ``nb * 1e-30`` to them, far below float32's rounding: the sum is taken before flooring, which leaves the entries
    above the diagonal free to be floored too (a finite log there, so no NaN gradient through the mask)."""
    if scores.shape != mass.shape:
        raise ValueError(f"blend_mass: scores {tuple(scores.shape)} and mass {tuple(mass.shape)} differ")
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not 0 <= weight < 1:
        raise ValueError(f"blend: weight must be in [0, 1), got {weight!r}")
    nb, dev = scores.shape[-1], scores.device
    above = _constants("above", nb, dev)
    partner = torch.clamp(mass.float(), min=_constants("floor", nb, dev))
    gate = torch.softmax(torch.where(above, float("-inf"), scores.float()), dim=-1)
    mixed = torch.addcmul(gate, partner, (weight / (1.0 - weight)) / partner.sum(-1, keepdim=True))
    total = mixed.sum(-1, keepdim=True)
    return (mixed.clamp_min(MASS_FLOOR / (1.0 - weight)) / total).log().masked_fill_(above, float("-inf"))


def build_selector(name: str, **params) -> Selector:
    """The selector registered as ``name`` with hyper-parameters ``params``. An unknown name, an unknown
    parameter or a bad value raises ``ValueError`` naming it."""
    if name not in SELECTORS:
        raise ValueError(f"unknown selector {name!r}; known: {', '.join(sorted(SELECTORS))}")
    cls = SELECTORS[name]
    known = [f.name for f in fields(cls)]
    for key in params:
        if key not in known:
            raise ValueError(f"selector {name!r} has no parameter {key!r}; its parameters: "
                             f"{', '.join(known) if known else '(none)'}")
    return cls(**params)
