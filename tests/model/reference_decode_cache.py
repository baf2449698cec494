"""The compressed-K cache as it was before the static-shape rewrite (seer/model/decode_cache.py at 2738bd2): the
reference the new one must equal. Test code only."""

from __future__ import annotations

import math

import torch

from seer.gates.decode_gate import DecodeGate
from seer.gates.pooling import pool_blocks


class ReferenceDecodeKeyCache:
    """Compressed keys of ``batch_size`` sequences for the decode ``gates`` (``{layer_idx: DecodeGate}``, one block
    size), stored in ``dtype`` (default: the gates'). ``lengths[layer]`` (host ints) and ``seqlens[layer]`` (int32
    on the device) hold each row's cached keys."""

    def __init__(self, gates: dict[int, DecodeGate], batch_size: int, dtype: torch.dtype | None = None):
        if not gates:
            raise ValueError("a decode key cache needs at least one decode gate")
        sizes = {g.config.block_size for g in gates.values()}
        if len(sizes) != 1:
            raise ValueError(f"decode gates of one model must share a block size; got {sorted(sizes)}")
        self.gates, self.batch_size = gates, batch_size
        self.block_size = sizes.pop()
        gate = next(iter(gates.values()))
        self.dtype = dtype or gate.k_weight.dtype
        device = gate.k_weight.device
        self.keys = {i: torch.zeros(batch_size, g.num_kv_heads, 0, g.config.hidden_size, dtype=self.dtype,
                                    device=device) for i, g in gates.items()}
        self.tails = {i: [torch.zeros(g.num_kv_heads, 0, g.head_dim, device=device) for _ in range(batch_size)]
                      for i, g in gates.items()}
        self.lengths = {i: [0] * batch_size for i in gates}
        self.seqlens = {i: torch.zeros(batch_size, dtype=torch.int32, device=device) for i in gates}

    def update(self, layer: int, k: torch.Tensor, new_tokens: torch.Tensor | None = None) -> None:
        """Appends pre-RoPE keys ``k [B, Hkv, T, D]`` of layer ``layer``: ``new_tokens [B]`` of them for each row
        (the first ones; default all ``T``); every block this fills gets its gate key."""
        gate, bs = self.gates[layer], self.block_size
        if k.dim() != 4 or k.shape[0] != self.batch_size or k.shape[1] != gate.num_kv_heads \
                or k.shape[3] != gate.head_dim:
            raise ValueError(f"layer {layer}: keys must be [{self.batch_size}, {gate.num_kv_heads}, T, "
                             f"{gate.head_dim}]; got {tuple(k.shape)}")
        counts = [k.shape[2]] * self.batch_size if new_tokens is None else new_tokens.tolist()
        if len(counts) != self.batch_size or min(counts) < 0 or max(counts) > k.shape[2]:
            raise ValueError(f"layer {layer}: new_tokens must be {self.batch_size} counts in [0, {k.shape[2]}]; "
                             f"got {counts}")
        lengths, tails = self.lengths[layer], self.tails[layer]
        made = []
        for row in range(self.batch_size):
            tokens = torch.cat((tails[row], k[row, :, :counts[row]].to(tails[row].dtype)), dim=1)
            full = tokens.shape[1] // bs
            first = lengths[row] // bs
            if full:
                pooled = pool_blocks(tokens[None, :, :full * bs], bs, gate.config.k_pool)
                starts = (first + torch.arange(full, device=k.device)) * bs
                made.append((row, first, gate.gate_keys(pooled, starts)[0].to(self.dtype)))
            tails[row] = tokens[:, full * bs:]
            lengths[row] += counts[row]
        if new_tokens is None:
            self.seqlens[layer] += k.shape[2]
        else:
            self.seqlens[layer] = torch.tensor(lengths, dtype=torch.int32, device=self.seqlens[layer].device)
        blocks = max(lengths) // bs
        store = self.keys[layer]
        if blocks > store.shape[2]:
            grown = store.new_zeros(*store.shape[:2], max(blocks, 2 * store.shape[2]), store.shape[3])
            grown[:, :, :store.shape[2]] = store
            self.keys[layer] = store = grown
        for row, first, keys in made:
            store[row, :, first:first + keys.shape[1]] = keys

    def scores(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Gate logits ``[B, Hkv, nb]`` of each row's newest token (pre-RoPE ``q [B, Hq, 1, D]``, its key already
        in the cache) over the blocks of the longest row; ``-inf`` after a row's newest block."""
        gate, bs = self.gates[layer], self.block_size
        lengths = self.lengths[layer]
        if min(lengths) < 1:
            raise ValueError(f"layer {layer}: every row needs a cached key (its own) before scoring; lengths "
                             f"{lengths}")
        if q.dim() != 4 or q.shape[:3] != (self.batch_size, gate.num_heads, 1):
            raise ValueError(f"layer {layer}: q must be [{self.batch_size}, {gate.num_heads}, 1, {gate.head_dim}]; "
                             f"got {tuple(q.shape)}")
        device = q.device
        nb = -(-max(lengths) // bs)
        position = self.seqlens[layer].long() - 1  # each row's newest token, on the device
        newest = position // bs
        qg = gate.gate_queries(q, position[:, None])  # [B, Hkv, 1, E]
        scale = 1.0 / math.sqrt(qg.shape[-1])
        full = self.keys[layer][:, :, :nb].to(qg.dtype)
        logits = torch.cat((full, full.new_zeros(*full.shape[:2], nb - full.shape[2], full.shape[3])), dim=2) \
            if full.shape[2] < nb else full
        logits = torch.matmul(qg, logits.transpose(-1, -2)).squeeze(2) * scale
        for row, tail in enumerate(self.tails[layer]):
            if tail.shape[1]:  # a partial newest block: pooled over its keys so far
                key = gate.gate_keys(pool_blocks(tail[None], bs, gate.config.k_pool), newest[row:row + 1] * bs)
                logits[row, :, (lengths[row] - 1) // bs] = (qg[row, :, 0] * key[0, :, 0]).sum(-1) * scale
        after = torch.arange(nb, device=device)[None, :] > newest[:, None]
        return logits.masked_fill(after[:, None], float("-inf"))

    def memory_bytes(self) -> int:
        """Bytes the cache holds: the gate keys of full blocks (as allocated) and the partial blocks' keys."""
        keys = sum(t.numel() * t.element_size() for t in self.keys.values())
        return keys + sum(t.numel() * t.element_size() for rows in self.tails.values() for t in rows)
