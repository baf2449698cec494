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

Token queries (``gate.q_tokens=true``): step 1 pools K only; every query token ``t`` keeps its own query.

1'. ``q_t`` (``[D]``, per query head) is projected by the head's Q map (input width ``D``; none in the K-only form)
    and rotated by the gate RoPE at the token's own position ``t``; the keys are those of steps 1-3 (rotated at
    their block's first token ``j * block_size``), so a token meets key block ``j`` at the relative offset
    ``t - j * block_size``, its distance to the block's start (as the decode gate, :mod:`seer.gates.decode_gate`);
2'. ``s[t, j] = q_t . k_j / sqrt(hidden_size)``;
3'. ``logits[b, h, i, j] = logsumexp_{t in block i} s[t, j] - log(n_i)`` (the log-mean-exp over the ``n_i``
    tokens block ``i`` has; the last block may be partial), ``-inf`` above the diagonal as before. Tokens early in
    block ``i`` also score block ``i`` itself (the diagonal block, which selection always keeps).

On CUDA with no gradient needed (inference) and :attr:`AttnGate.token_kernel` on, steps 2'-3' run in one Triton
kernel that never writes the token scores (:mod:`seer.kernels.token_gate`); the token queries of step 1'
stay in PyTorch, built whole in the gate's dtype (``[B, Hq, N, hidden]``: 117 MB in bfloat16 at 32k tokens, 14
heads, hidden 128) in chunks of whole blocks whose float32 queries fit :attr:`AttnGate.token_chunk_bytes`.
Otherwise (CPU, training) the token scores ``[B, Hq, N, nb]`` are never held whole either: query blocks are taken
in chunks whose float32 scores fit :attr:`AttnGate.token_chunk_bytes` (each chunk against the key blocks up to its
last one), and under autograd each chunk is recomputed in the backward pass (``torch.utils.checkpoint``), so
training keeps only the chunks' inputs (views of Q) and the ``[B, Hq, nb, nb]`` logits. The output has the same
shape and meaning as the pooled gate's.

Training compares ``softmax(logits)`` with the row-normalised ground truth; inference turns the logits into a
block mask (:mod:`seer.sparsity`).

Cost: on CUDA the pooling is one Triton pass over Q and one over K (:mod:`seer.kernels.block_pool`); everything
after it works on ``[B, H, nb, .]`` tensors, ``block_size`` times smaller than Q. Token queries cost
``2 * N * D * hidden`` (projection) plus about ``N * nb * hidden`` (scores, half of ``[N, nb]`` being causal)
multiply-adds per head: ``block_size`` times the pooled gate's score matmul.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from seer.gates.config import GateConfig
from seer.gates.pooling import pool_blocks
from seer.gates.rope import register_block_rope, rotary_tables, rotate

# gate.q_tokens: the float32 token scores of one chunk of query blocks stay under this (AttnGate.token_chunk_bytes)
TOKEN_CHUNK_BYTES = 64 * 2**20


def token_block_logits(x: torch.Tensor, kg: torch.Tensor, block_size: int) -> torch.Tensor:
    """Steps 2'-3' (module docstring) in PyTorch, without the causal mask: the log-mean-exp over the tokens of each
    query block of ``x [B, Hq, T, E]`` (token queries from a block start; the last block may be partial) of their
    scores ``x_t . kg_j / sqrt(E)`` against every gate key of ``kg [B, Hq, nk, E]``. Returns ``[B, Hq, ceil(T /
    block_size), nk]`` of at least float32 (float64 stays). The gate's PyTorch path and the reference of the Triton
    kernel (:mod:`seer.kernels.token_gate`), which also writes ``-inf`` above the diagonal."""
    t = x.shape[2]
    c = -(-t // block_size)
    acc = torch.promote_types(kg.dtype, torch.float32)  # float32 at least (bf16 gates), float64 stays
    s = torch.matmul(x, kg.transpose(-1, -2)).to(acc).mul_(1.0 / math.sqrt(x.shape[-1]))  # [B, Hq, T, nk]
    if c * block_size > t:  # the sequence's partial last block: missing tokens count for nothing
        s = F.pad(s, (0, 0, 0, c * block_size - t), value=float("-inf"))
    lse = torch.logsumexp(s.view(*s.shape[:2], c, block_size, s.shape[-1]), dim=3)  # [B, Hq, c, nk]
    counts = torch.full((c, 1), float(block_size), dtype=acc, device=x.device)
    counts[-1] = t - (c - 1) * block_size
    return lse - counts.log()


class AttnGate(nn.Module):
    """One layer's gate. ``rope_inv_freq`` (``[hidden_size // 2]``) and ``rope_scale`` come from the base model's
    rope settings (:func:`seer.gates.rope.rope_frequencies`); without them a plain RoPE with theta 10000 is used.
    ``rope_at_length``: for a rope whose frequencies depend on the sequence length (dynamic NTK), a function of the
    token count giving ``(inv_freq, scale)`` at that length, used instead of the two above.
    ``token_chunk_bytes`` (``gate.q_tokens`` only; default :data:`TOKEN_CHUNK_BYTES`): the float32 token scores of one
    chunk of query blocks stay under it (at least one block a chunk); an attribute, not part of the architecture.
    ``token_kernel`` (``gate.q_tokens`` only; class attribute, settable per instance): True makes inference on CUDA
    (no gradient needed) take the token logits from the Triton kernel (:mod:`seer.kernels.token_gate`); False (the
    default until the kernel is checked and timed on a GPU: ``experiments/bench_token_gate.py``) keeps the chunked
    PyTorch path everywhere."""

    token_kernel: bool = False

    def __init__(self, config: GateConfig, head_dim: int, num_heads: int, num_kv_heads: int,
                 rope_inv_freq: torch.Tensor | None = None, rope_scale: float = 1.0,
                 rope_at_length: Callable[[int], tuple[torch.Tensor, float]] | None = None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.config = config
        self.head_dim, self.num_heads, self.num_kv_heads = head_dim, num_heads, num_kv_heads
        hidden = config.hidden_size
        q_in = head_dim if config.q_tokens else head_dim * len(config.q_pool)
        k_in = head_dim * len(config.k_pool)
        use_q_linear = config.q_linear is True or (config.q_linear == "auto" and not (
            q_in == head_dim and hidden == head_dim))
        if not use_q_linear and q_in != hidden:
            raise ValueError(f"gate.q_linear=false needs gate.hidden_size == {q_in} ("
                             f"{'token' if config.q_tokens else 'pooled'} Q width), got {hidden}")
        self.q_weight = nn.Parameter(torch.empty(num_heads, q_in, hidden)) if use_q_linear else None
        self.k_weight = nn.Parameter(torch.empty(num_heads, k_in, hidden))
        register_block_rope(self, hidden, rope_inv_freq, rope_scale, enabled=config.block_rope)
        self.rope_at_length = rope_at_length
        self._tables = None  # (key, cos, sin, upper) of the last block count seen: see _block_tables
        self._freqs = None  # (key, inv_freq, scale) of the last length seen: see _rope_freqs
        self.token_chunk_bytes = TOKEN_CHUNK_BYTES
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.q_weight, self.k_weight):
            if w is not None:
                nn.init.normal_(w, std=1.0 / math.sqrt(w.shape[1]))

    def project(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate Q and K ``[B, Hq, nb, hidden]`` (pooled, projected and rotated) from Q ``[B, Hq, N, D]`` and
        K ``[B, Hkv, N, D]``. Block-pooled Q only: a ``q_tokens`` gate has no block query (call the gate)."""
        if self.config.q_tokens:
            raise ValueError("AttnGate.project gives block-pooled gate queries; this gate has gate.q_tokens=true "
                             "(a query per token): call the gate itself for its block logits")
        self._check(q, k)
        dtype = self.k_weight.dtype
        qp = pool_blocks(q, self.config.block_size, self.config.q_pool, dtype)  # reads Q in its dtype: no copy
        qg = qp if self.q_weight is None else torch.matmul(qp, self.q_weight)
        kg = self._gate_keys(k, q.shape[2])
        if self.rope_inv_freq is not None:
            cos, sin, _ = self._block_tables(qg.shape[2], q.device, qg.dtype, q.shape[2])
            qg = rotate(qg, cos, sin)
        return qg, kg

    def _gate_keys(self, k: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """Gate keys ``[B, Hq, nb, hidden]``: K ``[B, Hkv, N, D]`` pooled, projected per query head (per key/value
        group, no repeat) and rotated at each block's first token."""
        kp = pool_blocks(k, self.config.block_size, self.config.k_pool, self.k_weight.dtype)
        b, hkv, nb, c = kp.shape
        group = self.num_heads // hkv
        # per-head projections as broadcast matmuls ([B, Hkv, 1, nb, C] @ [Hkv, G, C, E]); no repeat of K
        w = self.k_weight.view(hkv, group, c, -1)
        kg = torch.matmul(kp.unsqueeze(2), w).reshape(b, self.num_heads, nb, -1)
        if self.rope_inv_freq is not None:
            cos, sin, _ = self._block_tables(nb, k.device, kg.dtype, n_tokens)
            kg = rotate(kg, cos, sin)
        return kg

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Block-causal logits ``[B, Hq, nb, nb]`` (float32 or the gate's dtype), ``-inf`` above the diagonal."""
        if self.config.q_tokens:
            return self._token_forward(q, k)
        qg, kg = self.project(q, k)
        logits = torch.matmul(qg, kg.transpose(-1, -2)).div_(math.sqrt(qg.shape[-1]))
        _, _, upper = self._block_tables(logits.shape[-1], q.device, qg.dtype, q.shape[2])
        return logits.masked_fill_(upper, float("-inf"))

    def _token_forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The ``q_tokens`` logits (module docstring, steps 1'-3'), chunk by chunk of query blocks."""
        self._check(q, k)
        bs, n = self.config.block_size, q.shape[2]
        kg = self._gate_keys(k, n)
        b, hq, nb, _ = kg.shape
        per_block = b * hq * bs * nb * 4  # bytes of one query block's float32 token scores (all key blocks)
        step = max(1, self.token_chunk_bytes // per_block)
        grad = torch.is_grad_enabled() and (kg.requires_grad or q.requires_grad or (
            self.q_weight is not None and self.q_weight.requires_grad))
        if self._use_token_kernel(q, kg, grad):
            return self._token_kernel_forward(q, kg)
        chunks = []
        for i0 in range(0, nb, step):
            i1 = min(nb, i0 + step)
            args = (q[:, :, i0 * bs:min(n, i1 * bs)], kg[:, :, :i1], i0 * bs, n)  # keys up to the chunk's last block
            out = checkpoint(self._token_chunk, *args, use_reentrant=False, preserve_rng_state=False) if grad \
                else self._token_chunk(*args)
            chunks.append(F.pad(out, (0, nb - i1), value=float("-inf")) if i1 < nb else out)
        logits = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=2)
        _, _, upper = self._block_tables(nb, q.device, kg.dtype, n)
        return logits.masked_fill_(upper, float("-inf"))

    def _token_chunk(self, q: torch.Tensor, kg: torch.Tensor, start: int, n_tokens: int) -> torch.Tensor:
        """Logits ``[B, Hq, c, nk]`` of the query blocks of ``q [B, Hq, T, D]`` (the tokens from ``start``, a block
        start; ``T`` a multiple of the block size but at the sequence's end) over gate keys ``kg [B, Hq, nk, E]``:
        the log-mean-exp over each block's tokens of their scaled scores (at least float32 inside)."""
        x = self._token_queries(q, kg.dtype, start, n_tokens)
        return token_block_logits(x, kg, self.config.block_size).to(kg.dtype)

    def _token_queries(self, q: torch.Tensor, dtype: torch.dtype, start: int, n_tokens: int) -> torch.Tensor:
        """Gate queries ``[B, Hq, T, E]`` of ``dtype`` of the tokens ``q [B, Hq, T, D]`` from position ``start`` (of a
        sequence of ``n_tokens``): projected by the Q map (if any) and rotated at each token's own position."""
        x = q.to(dtype)
        if self.q_weight is not None:
            x = torch.matmul(x, self.q_weight)
        if self.rope_inv_freq is not None:
            inv_freq, scale = self._rope_freqs(n_tokens)
            cos, sin = rotary_tables(torch.arange(start, start + q.shape[2], device=q.device), inv_freq, scale,
                                     x.dtype)
            x = rotate(x, cos, sin)
        return x

    def _use_token_kernel(self, q: torch.Tensor, kg: torch.Tensor, grad: bool) -> bool:
        """Whether the token logits come from the Triton kernel (:mod:`seer.kernels.token_gate`): on CUDA, with no
        gradient needed, for a gate of a kernel dtype, when :attr:`token_kernel` is on."""
        return self.token_kernel and not grad and q.is_cuda and kg.dtype in (torch.float16, torch.bfloat16,
                                                                            torch.float32)

    def _token_kernel_forward(self, q: torch.Tensor, kg: torch.Tensor) -> torch.Tensor:
        """The ``q_tokens`` logits through the Triton kernel (no autograd): the token queries ``[B, Hq, N, E]`` are
        built whole in the gate's dtype (117 MB in bfloat16 at 32k tokens x 14 heads x hidden 128; 235 MB in
        float32), chunk by chunk of whole blocks whose float32 queries fit :attr:`token_chunk_bytes` (bounding the
        projection's and rotation's temporaries with few launches), then one kernel launch gives the logits."""
        from seer.kernels.token_gate import token_gate_logits

        bs, (b, hq, n, _) = self.config.block_size, q.shape
        e = kg.shape[-1]
        x = torch.empty(b, hq, n, e, dtype=kg.dtype, device=q.device)
        step = max(1, self.token_chunk_bytes // (b * hq * bs * e * 4)) * bs  # tokens a chunk
        for t0 in range(0, n, step):
            t1 = min(n, t0 + step)
            x[:, :, t0:t1] = self._token_queries(q[:, :, t0:t1], kg.dtype, t0, n)
        return token_gate_logits(x, kg, bs).to(kg.dtype)

    def _rope_freqs(self, n_tokens: int) -> tuple[torch.Tensor, float]:
        """The gate RoPE's ``(inv_freq, scale)`` for a sequence of ``n_tokens`` (``rope_at_length``'s, if any)."""
        if self.rope_at_length is None:
            return self.rope_inv_freq, self.rope_scale
        if self._freqs is None or self._freqs[0] != n_tokens:
            self._freqs = (n_tokens, *self.rope_at_length(n_tokens))
        return self._freqs[1:]

    def _block_tables(self, nb: int, device: torch.device, dtype: torch.dtype, n_tokens: int | None = None):
        """RoPE ``cos``/``sin`` tables at the blocks' first tokens (None without block RoPE) and the bool
        above-diagonal mask, for ``nb`` blocks (of ``n_tokens`` tokens, for ``rope_at_length``). Kept for the last
        ``(nb, device, dtype)`` asked, so calls at one length build them once."""
        key = (nb, device, dtype, n_tokens if self.rope_at_length is not None else None)
        if self._tables is None or self._tables[0] != key:
            cos = sin = None
            if self.rope_inv_freq is not None:
                pos = torch.arange(nb, device=device) * self.config.block_size
                inv_freq, scale = self._rope_freqs(n_tokens)
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
                f"q_linear={self.q_weight is not None}, block_rope={c.block_rope}, q_tokens={c.q_tokens}")
