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


def gate_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "kl",
              skip_first_rows: float = 0.0) -> torch.Tensor:
    """Mean over kept rows (and batch, heads) of ``KL(target || softmax(logits))`` or of the squared error between
    ``softmax(logits)`` and ``target``, over causal blocks. ``target`` rows sum to 1; the triangle above the
    diagonal contributes nothing."""
    nb = logits.shape[-1]
    start = first_kept_row(nb, skip_first_rows)
    logits, target = logits[..., start:, :].float(), target[..., start:, :].float()
    causal = causal_blocks(nb, logits.device)[start:]
    log_q = torch.log_softmax(logits, dim=-1)
    if kind == "kl":
        per_block = torch.xlogy(target, target) - target * log_q.masked_fill(~causal, 0.0)
    elif kind == "mse":
        per_block = (log_q.exp() - target) ** 2
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
