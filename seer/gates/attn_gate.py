"""AttnGate: predicts, from block-pooled Q and K of one attention layer, how much each key block matters.

For a layer with ``Hq`` query heads, ``Hkv`` key/value heads and head dim ``D``, given its Q ``[B, Hq, N, D]``
and K ``[B, Hkv, N, D]`` *before* RoPE:

1. pool Q and K over blocks of ``block_size`` tokens with the configured pools (widths ``D * |q_pool|`` and
   ``D * |k_pool|``);
2. project each head with its own bias-free linear map to ``hidden_size`` (Q is used as is in the K-only form);
   a query head's K map reads the pooled K of its key/value head (the authors repeat pooled K to the query
   heads first; projecting per key/value group computes the same without the copy);
3. rotate both by a RoPE of width ``hidden_size`` at the position of each block's first token;
4. ``logits[b, h, i, j] = q_i . k_j / sqrt(hidden_size)`` for ``j <= i``, ``-inf`` above the diagonal.

Training compares ``softmax(logits)`` with the row-normalised ground truth; inference turns the logits into a
block mask (:mod:`seer.sparsity`).

Cost: on CUDA the pooling is one Triton pass over Q and one over K (:mod:`seer.kernels.block_pool`); everything
after it works on ``[B, H, nb, .]`` tensors, ``block_size`` times smaller than Q.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from seer.gates.config import GateConfig
from seer.gates.pooling import pool_blocks
from seer.gates.rope import register_block_rope, rotary_tables, rotate


class AttnGate(nn.Module):
    """One layer's gate. ``rope_inv_freq`` (``[hidden_size // 2]``) and ``rope_scale`` come from the base model's
    rope settings (:func:`seer.gates.rope.rope_frequencies`); without them a plain RoPE with theta 10000 is used.
    ``rope_at_length``: for a rope whose frequencies depend on the sequence length (dynamic NTK), a function of the
    token count giving ``(inv_freq, scale)`` at that length, used instead of the two above."""

    def __init__(self, config: GateConfig, head_dim: int, num_heads: int, num_kv_heads: int,
                 rope_inv_freq: torch.Tensor | None = None, rope_scale: float = 1.0,
                 rope_at_length: Callable[[int], tuple[torch.Tensor, float]] | None = None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.config = config
        self.head_dim, self.num_heads, self.num_kv_heads = head_dim, num_heads, num_kv_heads
        hidden = config.hidden_size
        q_in, k_in = head_dim * len(config.q_pool), head_dim * len(config.k_pool)
        use_q_linear = config.q_linear is True or (config.q_linear == "auto" and not (
            len(config.q_pool) == 1 and hidden == head_dim))
        if not use_q_linear and q_in != hidden:
            raise ValueError(f"gate.q_linear=false needs gate.hidden_size == {q_in} (pooled Q width), got {hidden}")
        self.q_weight = nn.Parameter(torch.empty(num_heads, q_in, hidden)) if use_q_linear else None
        self.k_weight = nn.Parameter(torch.empty(num_heads, k_in, hidden))
        register_block_rope(self, hidden, rope_inv_freq, rope_scale, enabled=config.block_rope)
        self.rope_at_length = rope_at_length
        self._tables = None  # (key, cos, sin, upper) of the last block count seen: see _block_tables
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.q_weight, self.k_weight):
            if w is not None:
                nn.init.normal_(w, std=1.0 / math.sqrt(w.shape[1]))

    def project(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate Q and K ``[B, Hq, nb, hidden]`` (pooled, projected and rotated) from Q ``[B, Hq, N, D]`` and
        K ``[B, Hkv, N, D]``."""
        self._check(q, k)
        bs = self.config.block_size
        dtype = self.k_weight.dtype
        qp = pool_blocks(q, bs, self.config.q_pool, dtype)  # reads Q/K in their dtype: no full-size copy
        kp = pool_blocks(k, bs, self.config.k_pool, dtype)
        b, hkv, nb, c = kp.shape
        group = self.num_heads // hkv
        # per-head projections as broadcast matmuls ([B, H, nb, C] @ [H, C, E]); K per KV group, no repeat
        qg = qp if self.q_weight is None else torch.matmul(qp, self.q_weight)
        w = self.k_weight.view(hkv, group, c, -1)
        kg = torch.matmul(kp.unsqueeze(2), w).reshape(b, self.num_heads, nb, -1)
        if self.rope_inv_freq is not None:
            cos, sin, _ = self._block_tables(nb, q.device, qg.dtype, q.shape[2])
            qg, kg = rotate(qg, cos, sin), rotate(kg, cos, sin)
        return qg, kg

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Block-causal logits ``[B, Hq, nb, nb]`` (float32 or the gate's dtype), ``-inf`` above the diagonal."""
        qg, kg = self.project(q, k)
        logits = torch.matmul(qg, kg.transpose(-1, -2)).div_(math.sqrt(qg.shape[-1]))
        _, _, upper = self._block_tables(logits.shape[-1], q.device, qg.dtype, q.shape[2])
        return logits.masked_fill_(upper, float("-inf"))

    def _block_tables(self, nb: int, device: torch.device, dtype: torch.dtype, n_tokens: int | None = None):
        """RoPE ``cos``/``sin`` tables at the blocks' first tokens (None without block RoPE) and the bool
        above-diagonal mask, for ``nb`` blocks (of ``n_tokens`` tokens, for ``rope_at_length``). Kept for the last
        ``(nb, device, dtype)`` asked, so calls at one length build them once."""
        key = (nb, device, dtype, n_tokens if self.rope_at_length is not None else None)
        if self._tables is None or self._tables[0] != key:
            cos = sin = None
            if self.rope_inv_freq is not None:
                pos = torch.arange(nb, device=device) * self.config.block_size
                inv_freq, scale = (self.rope_inv_freq, self.rope_scale) if key[3] is None \
                    else self.rope_at_length(n_tokens)
                cos, sin = rotary_tables(pos, inv_freq, scale, dtype)
            upper = torch.ones(nb, nb, dtype=torch.bool, device=device).triu_(1)
            self._tables = (key, cos, sin, upper)
        return self._tables[1:]

    def _check(self, q: torch.Tensor, k: torch.Tensor) -> None:
        if q.dim() != 4 or k.dim() != 4:
            raise ValueError(f"q and k must be [B, H, N, D]; got {tuple(q.shape)} and {tuple(k.shape)}")
        if q.shape[1] != self.num_heads or k.shape[1] != self.num_kv_heads:
            raise ValueError(f"gate expects {self.num_heads} query and {self.num_kv_heads} key heads; got q "
                             f"{tuple(q.shape)}, k {tuple(k.shape)}")
        if q.shape[3] != self.head_dim or k.shape[3] != self.head_dim or q.shape[2] != k.shape[2] \
                or q.shape[0] != k.shape[0]:
            raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and length and have "
                             f"head dim {self.head_dim}")
        if q.shape[2] < 1:
            raise ValueError("gate needs at least one token")

    def extra_repr(self) -> str:
        c = self.config
        return (f"block_size={c.block_size}, q_pool={c.q_pool}, k_pool={c.k_pool}, hidden={c.hidden_size}, "
                f"q_linear={self.q_weight is not None}, block_rope={c.block_rope}")
