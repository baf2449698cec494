"""Distillation losses between gate logits and the block ground truth, per layer."""

from __future__ import annotations

import torch

from seer.sparsity import causal_blocks


def normalize_rows(gt: torch.Tensor) -> torch.Tensor:
    """Each query-block row of the block max-pool scaled to sum to 1 (rows are never empty: the diagonal > 0)."""
    return gt / gt.sum(-1, keepdim=True).clamp_min(torch.finfo(gt.dtype).tiny)


def first_kept_row(nb: int, skip_first_rows: float) -> int:
    """Index of the first query-block row the loss uses; the release drops the first quarter for stability."""
    return min(int(skip_first_rows * nb), nb - 1)


# ``logmse``: targets at or below this floor count as the floor (blocks no threshold budget keeps), and each block's
# squared log error is weighted by its floored target to this power, the weights normalised per row
LOG_FLOOR = 1e-5
LOG_WEIGHT_POWER = 0.5


def gate_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "kl",
              skip_first_rows: float = 0.0) -> torch.Tensor:
    """Mean over kept rows (and batch, heads) of a per-row loss between ``q = softmax(logits)`` and ``target`` ``p``
    over causal blocks (rows of ``p`` sum to 1; the triangle above the diagonal contributes nothing):

    * ``kl``: ``KL(p || q)``, the release's; a block counts about in proportion to its mass, so errors on the
      blocks near a threshold budget's cut (masses of a few thousandths) barely count;
    * ``mse``: ``sum_j (q_j - p_j)^2`` (paper v1);
    * ``logmse``: ``sum_j w_j (log q_j - log p_j)^2`` with ``w_j`` proportional to ``max(p_j, f)^LOG_WEIGHT_POWER``
      (``f = LOG_FLOOR``), normalised per row; a block with ``p_j <= f`` counts ``(log q_j - log f)^2`` only when
      ``q_j > f``. Relative errors, which decide whether a block clears a threshold, weighted by the square root
      of its mass instead of the mass.
    """
    nb = logits.shape[-1]
    start = first_kept_row(nb, skip_first_rows)
    logits, target = logits[..., start:, :].float(), target[..., start:, :].float()
    causal = causal_blocks(nb, logits.device)[start:]
    log_q = torch.log_softmax(logits, dim=-1)
    if kind == "kl":
        per_block = torch.xlogy(target, target) - target * log_q.masked_fill(~causal, 0.0)
    elif kind == "mse":
        per_block = (log_q.exp() - target) ** 2
    elif kind == "logmse":
        above = target > LOG_FLOOR
        log_p = target.clamp_min(LOG_FLOOR).log()
        weights = (LOG_WEIGHT_POWER * log_p).exp().masked_fill(~causal, 0.0)
        weights = weights / weights.sum(-1, keepdim=True)
        error = log_q - log_p  # below the floor only a q above it is an error
        per_block = weights * torch.where(above, error, error.clamp_min(0.0)) ** 2
    else:
        raise ValueError(f"unknown loss {kind!r}")
    return per_block.masked_fill(~causal, 0.0).sum(-1).mean()


def documents_gate_loss(losses: list[torch.Tensor], logits: list[torch.Tensor],
                        skip_first_rows: float = 0.0) -> torch.Tensor:
    """One layer's gate loss over the documents of a ``data.packing=documents`` batch: each document's
    :func:`gate_loss` (of its ``logits [1, H, nb_d, nb_d]``) weighted by its kept query-block rows, i.e. the mean
    over all documents' kept rows; a single loss (one sequence per row) is returned as it is."""
    if len(losses) == 1:
        return losses[0]
    rows = [nb - first_kept_row(nb, skip_first_rows) for nb in (x.shape[-1] for x in logits)]
    weights = torch.tensor(rows, dtype=torch.float32, device=losses[0].device)
    return (torch.stack(losses) * weights).sum() / weights.sum()


def decode_gate_loss(logits: torch.Tensor, target: torch.Tensor, skip_first_tokens: float = 0.0) -> torch.Tensor:
    """Mean over tokens (but the first ``skip_first_tokens`` share of each row), batch and KV heads of
    ``KL(target || softmax(logits))`` over blocks, for decode-gate logits and targets ``[B, Hkv, N, nb]`` (``-inf``
    logits and zero targets after each token's block; target rows sum to 1)."""
    start = min(int(skip_first_tokens * logits.shape[2]), logits.shape[2] - 1)
    logits, target = logits[:, :, start:].float(), target[:, :, start:].float()
    log_q = torch.log_softmax(logits, dim=-1)
    per_block = torch.xlogy(target, target) - target * log_q.masked_fill(target == 0, 0.0)
    return per_block.sum(-1).mean()
