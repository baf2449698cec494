"""Plain-PyTorch references for the vertical-slash estimate and the gate blend of :mod:`seer.sparsity.selectors`:
the straightforward implementations the fast ones are tested (``tests/sparsity/test_selector_reference.py``) and
benchmarked (``experiments/bench_selectors.py --blend``) against. Nothing in the product calls them.

They follow the definitions literally: the true causal softmax of the last query rows, masked over all keys; the
slash marginal by gathering each row's diagonals; the block mass from float64 prefix sums with the Toeplitz slash
part indexed out of a distance matrix; every normalisation a masked ``log_softmax``; the blend exponentiates both
parts, mixes, floors, takes the log and normalises again. All float32 (the prefix sums float64), no autograd
tricks (the blend is differentiable in ``scores``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seer.sparsity.selectors import MASS_FLOOR, LayerInputs

__all__ = ["vertical_slash_marginals", "vertical_slash_block_mass", "vertical_slash_scores", "blend_scores",
           "log_mass"]


def _causal(nb: int, device) -> torch.Tensor:
    return torch.ones(nb, nb, dtype=torch.bool, device=device).tril()


def _grouped_matmul(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q [B, Hq, R, E] @ k [B, Hkv, M, E]^T -> [B, Hq, R, M]``, k broadcast over each key head's query heads."""
    b, hq, r, e = q.shape
    hkv, m = k.shape[1], k.shape[2]
    out = torch.matmul(q.reshape(b, hkv, hq // hkv, r, e), k.unsqueeze(2).transpose(-1, -2))
    return out.reshape(b, hq, r, m)


def _normalise(logits: torch.Tensor) -> torch.Tensor:
    nb = logits.shape[-1]
    return torch.log_softmax(logits.float().masked_fill(~_causal(nb, logits.device), float("-inf")), dim=-1)


def log_mass(mass: torch.Tensor) -> torch.Tensor:
    """Log-scores from non-negative block masses: floored at :data:`MASS_FLOOR`, log, masked ``log_softmax``."""
    return _normalise(mass.float().clamp_min(MASS_FLOOR).log())


def last_rows_attention(x: LayerInputs, last_queries: int) -> tuple[torch.Tensor, int]:
    """True causal softmax of the last ``L = min(last_queries, N)`` query rows against all keys ``[B, Hq, L, N]``
    float32 (0 on keys after a row), and the first of those rows' index ``N - L``."""
    n = x.seq_len
    rows = min(last_queries, n)
    start = n - rows
    logits = _grouped_matmul(x.q[:, :, start:].float() * x.scale, x.k.float())
    r = torch.arange(start, n, device=logits.device)[:, None]
    c = torch.arange(n, device=logits.device)[None, :]
    return torch.softmax(logits.masked_fill_(c > r, float("-inf")), dim=-1), start


def vertical_slash_marginals(x: LayerInputs, last_queries: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(v, s, start)`` as :func:`seer.sparsity.selectors._last_rows_marginals`: the column means of the last rows'
    attention, and the means of its diagonals gathered row by row."""
    attn, start = last_rows_attention(x, last_queries)
    b, hq, rows, n = attn.shape
    v = attn.sum(-2) / rows
    dev = attn.device
    col = torch.arange(start, start + rows, device=dev)[:, None] - torch.arange(n, device=dev)[None, :]  # [L, N]
    valid = col >= 0
    diag = attn.gather(-1, col.clamp_min(0).expand(b, hq, rows, n)).masked_fill_(~valid, 0.0)
    return v, diag.sum(-2) / rows, start


def vertical_slash_block_mass(v: torch.Tensor, s: torch.Tensor, block_size: int) -> torch.Tensor:
    """Block masses ``[B, Hq, nb, nb]`` as :func:`seer.sparsity.selectors._vertical_slash_block_mass`, from
    in-block cumulative sums of ``v`` and float64 prefix sums of ``s`` (the slash window of offset block d is
    ``S(dB + a) - S(dB + a - B)``)."""
    b, hq, n = v.shape
    bs = block_size
    nb = (n + bs - 1) // bs
    pad = nb * bs - n
    last_rows = n - (nb - 1) * bs
    dev = v.device
    cw = F.pad(v, (0, pad)).unflatten(-1, (nb, bs)).cumsum(-1)  # [B, H, nb, bs]
    v_full = cw[..., -1]
    v_diag = cw.mean(-1)
    v_diag[..., -1] = cw[..., -1, :last_rows].mean(-1)
    cum = F.pad(s.double(), (0, pad)).cumsum(-1)
    window = (cum - F.pad(cum, (bs, 0))[..., :nb * bs]).unflatten(-1, (nb, bs))  # [B, H, nb (d), bs (a)]
    h_full = window.mean(-1).float()
    h_last = window[..., :last_rows].mean(-1).float()
    ii = torch.arange(nb, device=dev)[:, None]
    jj = torch.arange(nb, device=dev)[None, :]
    dist = (ii - jj).clamp_min(0)
    slash = h_full[..., dist]
    slash[..., -1, :] = h_last[..., dist[-1]]
    vert = torch.where(ii > jj, v_full[..., None, :], torch.where(ii == jj, v_diag[..., :, None], 0.0))
    return (vert + slash).masked_fill_(ii < jj, 0.0)


@torch.no_grad()
def vertical_slash_scores(x: LayerInputs, last_queries: int = 64) -> torch.Tensor:
    """:class:`seer.sparsity.selectors.VerticalSlash` ``(last_queries).scores(x)``."""
    v, s, _ = vertical_slash_marginals(x, last_queries)
    return log_mass(vertical_slash_block_mass(v, s, x.block_size))


def blend_scores(scores: torch.Tensor, partner: torch.Tensor, weight: float) -> torch.Tensor:
    """:func:`seer.sparsity.selectors.blend_scores`: ``(1 - weight) * softmax(scores) + weight * exp(partner)``,
    floored, log, normalised."""
    mixed = (1.0 - weight) * _normalise(scores).exp() + weight * partner.float().exp()
    return log_mass(mixed)
