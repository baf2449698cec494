"""A gate's block logits blended with the vertical-slash estimate in one Triton pass (inference, no autograd).

MInference's vertical-slash estimate of one head (:class:`seer.sparsity.selectors.VerticalSlash`) reduces to four
per-block vectors ``[B, H, nb]`` (:meth:`~seer.sparsity.selectors.VerticalSlash.vectors`): ``vertical[j]``,
``diagonal[i]``, ``slash[d]`` and ``slash_last[d]``. Its block masses are

* ``mass[i, j] = slash[i - j] + vertical[j]`` for ``j < i < nb - 1``;
* ``mass[nb - 1, j] = slash_last[nb - 1 - j] + vertical[j]`` for ``j < nb - 1`` (the last, maybe partial, block row);
* ``mass[i, i] = diagonal[i]``;
* 0 above the diagonal.

With ``g`` the gate's block logits ``[B, H, nb, nb]`` and ``w`` the estimate's share (``0 <= w < 1``), the blend
(:func:`seer.sparsity.selectors.blend_mass`) over each row's causal blocks ``j <= i`` is

* ``p[i, j] = max(mass[i, j], 1e-30) / sum_{j' <= i} max(mass[i, j'], 1e-30)`` (the estimate, floored, normalised);
* ``gate[i, j] = softmax_{j <= i}(g[i, j])``;
* ``out[i, j] = log(max((1 - w) * gate[i, j] + w * p[i, j], 1e-30))`` for ``j <= i``, ``-inf`` above.

The mixture's row sums are 1 (up to rounding), so ``out`` is normalised like every selector's log-scores.
``blend_mass`` divides by the computed row sum instead; the two agree to float32 rounding.

One program per (batch, head, query block row ``i``) walks the row in tiles of key blocks twice: first the
causal tiles for the gate's row max and softmax denominator (online, rescaled per tile) and the estimate's row
sum, then every tile to write ``out`` (``-inf`` above the diagonal). The ``[nb, nb]`` mass grid is never
materialised; the gate logits are read twice (the row is a few KB, the second read hits the cache), the output
written once. No host sync.
"""

from __future__ import annotations

import numbers

import torch
import triton
import triton.language as tl

from seer.kernels.common import INTERPRET, check_device

__all__ = ["MASS_FLOOR", "vertical_slash_blend"]

MASS_FLOOR = 1e-30  # seer.sparsity.selectors.MASS_FLOOR (this package imports nothing else of seer)
_MAX_TILE = 1024  # key blocks per tile
_FLOOR = tl.constexpr(MASS_FLOOR)


@triton.jit
def _vs_mass(Vec, stride_vk, cols, i, NB, causal):
    """The estimate's block masses of row ``i`` at key blocks ``cols`` (0 where not ``causal``); ``Vec`` points at
    this head's ``vertical`` row of the stacked ``[4, nb]`` vectors."""
    below = causal & (cols < i)
    vert = tl.load(Vec + cols, mask=below, other=0.0)
    slash_row = 2 + (i == NB - 1).to(tl.int32)  # slash, or slash_last in the last row
    slash = tl.load(Vec + slash_row * stride_vk + (i - cols), mask=below, other=0.0)
    diag = tl.load(Vec + stride_vk + cols, mask=causal & (cols == i), other=0.0)
    return tl.where(cols == i, diag, slash + vert)


@triton.jit
def _row_stats(g_row, stride_gj, vec, stride_vk, cols, i, NB, m, z, p_sum):
    """Pass 1 over one tile of row ``i``: the gate's running max ``m`` and softmax denominator ``z`` (rescaled to
    the new max), and the floored estimate's running sum ``p_sum``."""
    causal = cols <= i
    g = tl.load(g_row + cols * stride_gj, mask=causal, other=float("-inf")).to(tl.float32)
    m_new = tl.maximum(m, tl.max(g, 0))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no inf - inf while the row is all -inf so far
    z = z * tl.exp(m - m_ref) + tl.sum(tl.exp(g - m_ref), 0)
    mass = _vs_mass(vec, stride_vk, cols, i, NB, causal)
    p_sum += tl.sum(tl.where(causal, tl.maximum(mass, _FLOOR), 0.0), 0)
    return m_new, z, p_sum


@triton.jit
def _write_tile(g_row, stride_gj, vec, stride_vk, o_row, cols, i, NB, m_ref, gate_scale, est_scale):
    """Pass 2 over one tile of row ``i``: ``log(max(keep * gate + share * p, floor))``, ``-inf`` above the
    diagonal (``gate_scale = keep / z``, ``est_scale = share / p_sum``)."""
    causal = cols <= i
    g = tl.load(g_row + cols * stride_gj, mask=causal, other=float("-inf")).to(tl.float32)
    mass = _vs_mass(vec, stride_vk, cols, i, NB, causal)
    mixed = tl.exp(g - m_ref) * gate_scale + tl.maximum(mass, _FLOOR) * est_scale
    out = tl.where(causal, tl.log(tl.maximum(mixed, _FLOOR)), float("-inf"))
    tl.store(o_row + cols, out, mask=cols < NB)


@triton.jit
def _vs_blend_kernel(
    G, Vec, Out,
    stride_gb, stride_gh, stride_gi, stride_gj,
    stride_vb, stride_vh, stride_vk,
    stride_ob, stride_oh, stride_oi,
    H, NB, keep, share,
    TILE: tl.constexpr, INTERP: tl.constexpr,
):
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    g_row = G + b * stride_gb + h * stride_gh + i.to(tl.int64) * stride_gi
    vec = Vec + b * stride_vb + h * stride_vh
    o_row = Out + b * stride_ob + h * stride_oh + i.to(tl.int64) * stride_oi
    offs = tl.arange(0, TILE)

    # pass 1 (the causal tiles): gate row max and softmax denominator (online), estimate row sum
    m = tl.full([], float("-inf"), tl.float32)
    z = tl.zeros([], tl.float32)
    p_sum = tl.zeros([], tl.float32)
    if INTERP:  # the interpreter (NumPy 2) cannot use a run-time value as a range() bound (seer.kernels.common)
        j0 = 0
        while j0 <= i:
            m, z, p_sum = _row_stats(g_row, stride_gj, vec, stride_vk, j0 + offs, i, NB, m, z, p_sum)
            j0 += TILE
    else:
        for j0 in range(0, i + 1, TILE):
            m, z, p_sum = _row_stats(g_row, stride_gj, vec, stride_vk, j0 + offs, i, NB, m, z, p_sum)

    # pass 2 (the whole row): the mixture's log, -inf above the diagonal
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    gate_scale = keep / z
    est_scale = share / p_sum
    if INTERP:
        j0 = 0
        while j0 < NB:
            _write_tile(g_row, stride_gj, vec, stride_vk, o_row, j0 + offs, i, NB, m_ref, gate_scale, est_scale)
            j0 += TILE
    else:
        for j0 in range(0, NB, TILE):
            _write_tile(g_row, stride_gj, vec, stride_vk, o_row, j0 + offs, i, NB, m_ref, gate_scale, est_scale)


def vertical_slash_blend(gate_logits: torch.Tensor, vertical: torch.Tensor, diagonal: torch.Tensor,
                         slash: torch.Tensor, slash_last: torch.Tensor, weight: float) -> torch.Tensor:
    """Block log-scores ``[B, H, nb, nb]`` float32 of ``(1 - weight) * softmax(gate_logits) + weight * p`` over each
    row's causal blocks, ``p`` the vertical-slash estimate given by its per-block vectors (module docstring):
    what ``blend_mass(gate_logits, VerticalSlash().mass(x), weight)`` returns, without the mass grid.

    ``gate_logits``: ``[B, H, nb, nb]``, any float dtype and strides (entries above the diagonal are not read);
    ``vertical``, ``diagonal``, ``slash``, ``slash_last``: ``[B, H, nb]`` (float32 is what the estimate gives);
    ``0 <= weight < 1``. CUDA tensors, or CPU ones under ``TRITON_INTERPRET=1``. No autograd."""
    if gate_logits.dim() != 4 or gate_logits.shape[-1] != gate_logits.shape[-2]:
        raise ValueError(f"vertical_slash_blend: gate_logits must be [B, H, nb, nb]; got {tuple(gate_logits.shape)}")
    b, h, nb, _ = gate_logits.shape
    vectors = {"vertical": vertical, "diagonal": diagonal, "slash": slash, "slash_last": slash_last}
    for name, t in vectors.items():
        if t.shape != (b, h, nb):
            raise ValueError(f"vertical_slash_blend: {name} must be [{b}, {h}, {nb}]; got {tuple(t.shape)}")
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not 0 <= weight < 1:
        raise ValueError(f"blend: weight must be in [0, 1), got {weight!r}")
    check_device(gate_logits=gate_logits, **vectors)
    out = torch.empty(b, h, nb, nb, dtype=torch.float32, device=gate_logits.device)
    if out.numel() == 0:
        return out
    vec = torch.stack([vertical, diagonal, slash, slash_last], 2).float()  # [B, H, 4, nb], last stride 1
    tile = min(triton.next_power_of_2(nb), _MAX_TILE)
    _vs_blend_kernel[(nb, b * h)](
        gate_logits, vec, out,
        gate_logits.stride(0), gate_logits.stride(1), gate_logits.stride(2), gate_logits.stride(3),
        vec.stride(0), vec.stride(1), vec.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        h, nb, 1.0 - float(weight), float(weight),
        TILE=tile, INTERP=INTERPRET, num_warps=4,
    )
    return out
