"""DecodeGate (SeerAttention-R): for each query token, how much each key block matters to its GQA group.

For a layer with ``Hq`` query heads, ``Hkv`` key/value heads (groups of ``G = Hq / Hkv``) and head dim ``D``, given
pre-RoPE Q ``[B, Hq, T, D]`` (the last ``T`` of ``N`` tokens) and pre-RoPE K ``[B, Hkv, N, D]``:

1. the queries of a group's ``G`` heads, side by side (``G * D`` channels), are projected per KV head to
   ``hidden_size``;
2. K is pooled per block of ``block_size`` tokens (the ``k_pool`` types side by side) and projected per KV head;
   the token's own block is pooled over its tokens up to the query (what a decode step has of its newest block), so
   teacher-forced training sees no future key;
3. gate queries are rotated at the token's position, gate keys at their block's first token;
4. ``logits[b, g, t, j] = q_t . k_j / sqrt(hidden_size)`` for blocks ``j`` not after the token's block, ``-inf``
   after it. One softmax over blocks per KV head serves its whole group.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from seer.gates.decode_config import DecodeGateConfig
from seer.gates.rope import register_block_rope, rotary_tables, rotate


def prefix_pool_blocks(x: torch.Tensor, block_size: int, kinds: list[str]) -> torch.Tensor:
    """``[B, H, N, D * len(kinds)]``: at each token, the pools of its block's tokens up to and including it (the
    last token of a block holds the whole block's pools). Averages accumulate in float32."""
    b, h, n, d = x.shape
    nb = -(-n // block_size)
    blocks = torch.nn.functional.pad(x, (0, 0, 0, nb * block_size - n)).reshape(b, h, nb, block_size, d)
    out = []
    for kind in kinds:
        if kind == "avg":
            counts = torch.arange(1, block_size + 1, device=x.device, dtype=torch.float32)[:, None]
            out.append((blocks.cumsum(3, dtype=torch.float32) / counts).to(x.dtype))
        elif kind == "max":
            out.append(blocks.cummax(3).values)
        elif kind == "min":
            out.append(blocks.cummin(3).values)
        elif kind == "last":
            out.append(blocks)
        else:
            raise ValueError(f"unknown pooling type {kind!r}")
    return torch.cat(out, dim=-1).reshape(b, h, nb * block_size, -1)[:, :, :n]


class DecodeGate(nn.Module):
    """One layer's decode gate. ``rope_inv_freq`` (``[hidden_size // 2]``) and ``rope_scale`` come from the base
    model's rope settings (:func:`seer.gates.rope.rope_frequencies`); without them RoPE with theta 10000."""

    def __init__(self, config: DecodeGateConfig, head_dim: int, num_heads: int, num_kv_heads: int,
                 rope_inv_freq: torch.Tensor | None = None, rope_scale: float = 1.0):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.config = config
        self.head_dim, self.num_heads, self.num_kv_heads = head_dim, num_heads, num_kv_heads
        hidden = config.hidden_size
        self.q_weight = nn.Parameter(torch.empty(num_kv_heads, head_dim * (num_heads // num_kv_heads), hidden))
        self.k_weight = nn.Parameter(torch.empty(num_kv_heads, head_dim * len(config.k_pool), hidden))
        register_block_rope(self, hidden, rope_inv_freq, rope_scale, enabled=config.block_rope)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.q_weight, self.k_weight):
            nn.init.normal_(w, std=1.0 / math.sqrt(w.shape[1]))

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, Hkv, T, nb]`` (the gate's dtype) of the last ``T`` tokens over the ``nb`` blocks of ``N``
        keys; ``-inf`` for blocks after a token's own block."""
        self._check(q, k)
        bs = self.config.block_size
        b, t, n = q.shape[0], q.shape[2], k.shape[2]
        nb = -(-n // bs)
        pos = torch.arange(n - t, n, device=q.device)  # each query's position
        own = pos // bs
        qg = self.gate_queries(q, pos)
        block_ends = torch.clamp(torch.arange(1, nb + 1, device=q.device) * bs, max=n) - 1
        pooled = prefix_pool_blocks(k, bs, self.config.k_pool)
        # whole blocks, and each query's block up to it
        k_blocks = self.gate_keys(pooled[:, :, block_ends], torch.arange(nb, device=q.device) * bs)
        k_own = self.gate_keys(pooled[:, :, pos], own * bs)
        scale = 1.0 / math.sqrt(qg.shape[-1])
        logits = torch.matmul(qg, k_blocks.transpose(-1, -2)) * scale
        own_logit = (qg * k_own).sum(-1, keepdim=True) * scale
        logits = logits.scatter(-1, own.expand(b, self.num_kv_heads, t)[..., None], own_logit)
        after = torch.arange(nb, device=q.device)[None, :] > own[:, None]
        return logits.masked_fill(after, float("-inf"))

    def gate_queries(self, q: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Gate queries ``[B, Hkv, T, E]`` from pre-RoPE ``q [B, Hq, T, D]`` at ``positions`` (``[T]`` or
        ``[B, T]``): the group's heads side by side, projected per KV head, rotated at each token's position."""
        b, hq, t, d = q.shape
        hkv = self.num_kv_heads
        qg = q.view(b, hkv, hq // hkv, t, d).permute(0, 1, 3, 2, 4).reshape(b, hkv, t, -1)
        return self._rotate(project_per_head(qg.to(self.q_weight.dtype), self.q_weight), positions)

    def gate_keys(self, pooled: torch.Tensor, block_starts: torch.Tensor) -> torch.Tensor:
        """Gate keys ``[B, Hkv, n, E]`` from block-pooled pre-RoPE K ``[B, Hkv, n, D * |k_pool|]``, projected per KV
        head and rotated at each block's first token (``block_starts``, ``[n]`` or ``[B, n]``)."""
        return self._rotate(project_per_head(pooled.to(self.k_weight.dtype), self.k_weight), block_starts)

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``x [B, Hkv, n, E]`` rotated at ``positions`` (``[n]``, or ``[B, n]`` per row); as is without RoPE."""
        if self.rope_inv_freq is None:
            return x
        cos, sin = rotary_tables(positions.reshape(-1), self.rope_inv_freq, self.rope_scale, x.dtype)
        if positions.dim() == 2:  # per row: [B, 1, n, E] against [B, Hkv, n, E]
            cos, sin = (t.view(positions.shape[0], 1, positions.shape[1], -1) for t in (cos, sin))
        return rotate(x, cos, sin)

    def _check(self, q: torch.Tensor, k: torch.Tensor) -> None:
        if q.dim() != 4 or k.dim() != 4:
            raise ValueError(f"q and k must be [B, H, N, D]; got {tuple(q.shape)} and {tuple(k.shape)}")
        if q.shape[1] != self.num_heads or k.shape[1] != self.num_kv_heads:
            raise ValueError(f"decode gate expects {self.num_heads} query and {self.num_kv_heads} key heads; got q "
                             f"{tuple(q.shape)}, k {tuple(k.shape)}")
        if q.shape[3] != self.head_dim or k.shape[3] != self.head_dim or q.shape[0] != k.shape[0]:
            raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and have head dim "
                             f"{self.head_dim}")
        if not 1 <= q.shape[2] <= k.shape[2]:
            raise ValueError(f"decode gate needs 1 <= query tokens <= keys; got {q.shape[2]} and {k.shape[2]}")

    def extra_repr(self) -> str:
        c = self.config
        return f"block_size={c.block_size}, k_pool={c.k_pool}, hidden={c.hidden_size}, block_rope={c.block_rope}"


def project_per_head(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x [B, H, n, i]`` times each head's ``weight [H, i, o]``: ``[B, H, n, o]``. ``torch.matmul`` broadcasts the
    weights over the batch, a copy of ``B`` weight sets (megabytes a layer at a decode step, where ``x`` has one row
    a head); with fewer rows than the weights have columns the product is batched over heads instead, on a view of
    ``x`` when ``n`` is 1, so neither operand is copied."""
    b, h, n, i = x.shape
    if n >= weight.shape[-1]:
        return torch.matmul(x, weight)
    return torch.bmm(x.transpose(0, 1).reshape(h, b * n, i), weight).view(h, b, n, -1).transpose(0, 1)
