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
import torch.nn.functional as F
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
        n = k.shape[2]
        pooled, k_blocks = self._pooled_keys(k)
        return self._token_logits(q, torch.arange(n - q.shape[2], n, device=q.device), pooled, k_blocks)

    def block_scores(self, q: torch.Tensor, k: torch.Tensor, chunk_bytes: int = 64 * 2**20) -> torch.Tensor:
        """The gate serving a prefill: block log-scores ``[B, Hkv, nb, nb]`` (float32) of the ``N`` tokens of
        pre-RoPE ``q [B, Hq, N, D]`` over their own keys ``k [B, Hkv, N, D]``.

        ``scores[b, g, i, j] = log(mean over the tokens t of query block i of softmax_j(logits[b, g, t, :]))``: each
        token's distribution over the blocks up to its own (:meth:`forward`: its own block pooled up to it), averaged
        over the block's tokens, as the true block mass averages the tokens' attention rows. Each row sums to 1 over
        its causal blocks (``-inf`` above the diagonal; masses floored at 1e-30 before the log). Query blocks are
        taken in chunks whose float32 token logits fit ``chunk_bytes``."""
        self._check(q, k)
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"block_scores scores a prefill: q and k need the same tokens; got {q.shape[2]} and "
                             f"{k.shape[2]}")
        bs, (b, _, n, _) = self.config.block_size, q.shape
        nb = -(-n // bs)
        pooled, k_blocks = self._pooled_keys(k)
        step = max(1, chunk_bytes // (b * self.num_kv_heads * bs * nb * 4))  # query blocks per chunk
        rows = []
        for i0 in range(0, nb, step):
            t0, t1 = i0 * bs, min(n, (i0 + step) * bs)
            probs = self._token_logits(q[:, :, t0:t1], torch.arange(t0, t1, device=q.device), pooled,
                                       k_blocks).float().softmax(-1)
            probs = F.pad(probs, (0, 0, 0, -(t1 - t0) % bs))  # a partial last block: zero rows, then its own count
            sums = probs.view(b, self.num_kv_heads, -1, bs, nb).sum(3)
            counts = (torch.arange(t0, t0 + sums.shape[2] * bs, bs, device=q.device) - n).neg().clamp(max=bs)
            rows.append(sums / counts[:, None])
        mass = torch.cat(rows, dim=2)
        above = torch.ones(nb, nb, dtype=torch.bool, device=q.device).triu(1)
        return mass.clamp_min(1e-30).log().masked_fill(above, float("-inf"))

    def _pooled_keys(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix pools of ``k [B, Hkv, N, D]`` at every token (:func:`prefix_pool_blocks`) and the gate keys of
        its ``nb`` blocks, whole (the last one as far as it goes), rotated at their first token."""
        bs, n = self.config.block_size, k.shape[2]
        nb = -(-n // bs)
        block_ends = torch.clamp(torch.arange(1, nb + 1, device=k.device) * bs, max=n) - 1
        pooled = prefix_pool_blocks(k, bs, self.config.k_pool)
        return pooled, self.gate_keys(pooled[:, :, block_ends], torch.arange(nb, device=k.device) * bs)

    def _token_logits(self, q: torch.Tensor, pos: torch.Tensor, pooled: torch.Tensor,
                      k_blocks: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, Hkv, T, nb]`` of the tokens of pre-RoPE ``q [B, Hq, T, D]`` at positions ``pos [T]`` over
        the block keys ``k_blocks``, each token's own block scored by its prefix pool (``pooled`` at ``pos``);
        ``-inf`` after the token's block."""
        b, nb = q.shape[0], k_blocks.shape[2]
        own = pos // self.config.block_size
        qg = self.gate_queries(q, pos)
        k_own = self.gate_keys(pooled[:, :, pos], own * self.config.block_size)
        scale = 1.0 / math.sqrt(qg.shape[-1])
        logits = torch.matmul(qg, k_blocks.transpose(-1, -2)) * scale
        own_logit = (qg * k_own).sum(-1, keepdim=True) * scale
        logits = logits.scatter(-1, own.expand(b, self.num_kv_heads, -1)[..., None], own_logit)
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


class SharedPrefillGate(nn.Module):
    """A decode gate serving the prefill as its layer's gate (one gate for both phases): the block log-scores of
    :meth:`DecodeGate.block_scores` ``[B, Hkv, nb, nb]``, each KV head's shared by its group's query heads
    (``[B, Hq, nb, nb]``). It shares the decode gate's parameters without owning them: the decode gate stays the
    only module they are saved, loaded and moved with."""

    def __init__(self, decode_gate: DecodeGate):
        super().__init__()
        object.__setattr__(self, "decode_gate", decode_gate)  # not a submodule: its parameters are the decode gate's

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        gate = self.decode_gate
        scores = gate.block_scores(q, k)
        b, hkv, nb, _ = scores.shape
        group = gate.num_heads // hkv
        return scores[:, :, None].expand(b, hkv, group, nb, nb).reshape(b, hkv * group, nb, nb)


def project_per_head(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x [B, H, n, i]`` times each head's ``weight [H, i, o]``: ``[B, H, n, o]``. ``torch.matmul`` broadcasts the
    weights over the batch, a copy of ``B`` weight sets (megabytes a layer at a decode step, where ``x`` has one row
    a head); with fewer rows than the weights have columns the product is batched over heads instead, on a view of
    ``x`` when ``n`` is 1, so neither operand is copied."""
    b, h, n, i = x.shape
    if n >= weight.shape[-1]:
        return torch.matmul(x, weight)
    return torch.bmm(x.transpose(0, 1).reshape(h, b * n, i), weight).view(h, b, n, -1).transpose(0, 1)
