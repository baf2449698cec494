"""Greedy decoding with each one-token step replayed as a CUDA graph: the fast decode loop.

Called eagerly, a decode step of a small batch costs the host more than the GPU: every layer launches dozens of
small kernels, and sparse decode adds its gate, budget and block list (docs/bench_decode.md: 0.08-0.24 ms of host time
per kernel call against 8-73 us of GPU time). transformers' ``generate()`` runs its steps that way, so sparse decode
there is no faster than dense. :func:`greedy_generate` prefills the prompt into a transformers ``StaticCache`` (its
keys at fixed addresses), captures one decode step in a CUDA graph (:class:`GraphStep`) and replays it for each new
token, feeding back its own argmax on the device: what ``experiments/bench_decode_model.py --graph`` times.

What makes a step capturable is the model's: a StaticCache layer keeps its length in a device tensor that the step
advances in place, and sparse decode (:mod:`seer.model.decode`) reads its lengths from the compressed-K cache
(``seqlens``, advanced in place), fixes every shape on the host and reads nothing back. So one captured step replays
the whole generation. Warm-up steps before the capture (on a side stream, as the PyTorch docs ask) compile and tune
the Triton kernels; :class:`GraphStep`'s ``reset`` rewinds both caches to the prompt after each of them.

On a CPU there are no graphs: the same loop runs its steps eagerly over the StaticCache, which is how the tests check
it against ``generate()``. Prompts of one length only (no padding): a StaticCache keeps every row's keys from
position 0.
"""

from __future__ import annotations

import torch

STOP_CHECK = 16  # new tokens between the loop's reads of "has every row stopped?" (one host sync each)


def rewind(cache, length: int) -> None:
    """Cuts every layer of ``cache`` back to its first ``length`` tokens: a StaticCache layer's length (a device
    tensor, where a captured step reads it) is set in place; other layers become views of their first tokens."""
    for layer in cache.layers:
        if hasattr(layer, "cumulative_length") and hasattr(layer, "max_cache_len"):
            layer.cumulative_length.fill_(length)
        else:
            layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]


class GraphStep:
    """One decode step ``model(input_ids=ids, past_key_values=cache, use_cache=True)`` over a transformers
    StaticCache, captured in a CUDA graph (on a GPU; on the CPU, where there are no graphs, :meth:`replay` runs it
    eagerly): ``ids`` (``[B, 1]``) is a static input, copied into before a replay; ``logits`` the static output.
    The step reads its position from the cache and, with sparse decode on, its lengths from the compressed-K cache,
    both advanced in place by the step itself, so replays continue the sequence; ``reset()`` (called before each
    warm-up step and after the capture) rewinds both in place.

    Capture as the PyTorch docs say: warm-up steps on a side stream first (they compile and tune the Triton kernels
    and allocate what the first step allocates: the density sums), then one step under ``torch.cuda.graph``."""

    def __init__(self, model, cache, ids: torch.Tensor, reset, warmup: int = 1):
        self.model, self.cache, self.ids, self.graph = model, cache, ids.clone(), None
        self.logits = None
        if not ids.is_cuda:
            reset()
            return
        with torch.no_grad():
            stream = torch.cuda.Stream(ids.device)
            stream.wait_stream(torch.cuda.current_stream(ids.device))
            with torch.cuda.stream(stream):
                for _ in range(max(warmup, 1)):
                    reset()
                    self._forward()
            torch.cuda.current_stream(ids.device).wait_stream(stream)
            reset()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._forward()
        reset()

    def _forward(self) -> torch.Tensor:
        return self.model(input_ids=self.ids, past_key_values=self.cache, use_cache=True).logits

    def replay(self) -> None:
        if self.graph is None:
            with torch.no_grad():
                self.logits = self._forward()
        else:
            self.graph.replay()


def static_cache(model, length: int):
    """A transformers StaticCache for ``length`` tokens, rounded up to whole key blocks of sparse decode (64 tokens
    without it; aligned rows for SDPA's mask and the decode kernel), the compressed-K cache sized from it."""
    from transformers import StaticCache

    ctx = getattr(model, "seer_decode", None)
    block = ctx.block_size if ctx is not None else 64
    return StaticCache(config=model.config, max_cache_len=-(-length // block) * block)


@torch.no_grad()
def greedy_generate(model, ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | list[int] | None = None,
                    pad_token_id: int | None = None, warmup: int = 1) -> torch.Tensor:
    """Greedy continuation of the unpadded prompts ``ids [B, N]``: ``[B, N + new]`` as ``generate()`` returns it
    (after a row's first stop token, one of ``eos_token_id``, ``pad_token_id`` or else the first stop token);
    ``new`` is ``max_new_tokens``, or less once every row has stopped (checked every :data:`STOP_CHECK` tokens, so up
    to that many more than ``generate()``'s, padded). The prefill (sparse where the model has prefill gates) fills a
    StaticCache, then every decode step is one replay of a step captured in a CUDA graph (eager steps on a CPU). The
    sparse decode densities of :attr:`model.seer_decode` cover the generated steps only (the warm-up steps' are
    zeroed)."""
    if ids.dim() != 2 or ids.shape[1] < 1:
        raise ValueError(f"ids of shape {tuple(ids.shape)}: give [batch, tokens] with at least one token")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 1")
    prompt = ids.shape[1]
    stops = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    stop_ids = torch.tensor(stops, device=ids.device, dtype=ids.dtype)
    cache = static_cache(model, prompt + max_new_tokens)
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    token = logits[:, -1:].argmax(-1)  # [B, 1]
    tokens = [token]
    done = torch.isin(token[:, 0], stop_ids)  # [B]: rows past their stop token, on the device
    if max_new_tokens > 1:
        ctx = getattr(model, "seer_decode", None)
        key_cache = ctx.cache if ctx is not None else None
        after_prefill = key_cache.clone() if key_cache is not None else None

        def reset() -> None:  # both caches back to the prompt
            rewind(cache, prompt)
            if after_prefill is not None:
                key_cache.copy_(after_prefill)

        step = GraphStep(model, cache, token, reset, warmup)
        if ctx is not None:
            ctx.reset_density()
        for i in range(1, max_new_tokens):
            if stops and i % STOP_CHECK == 0 and bool(done.all()):  # one host read every STOP_CHECK tokens
                break
            step.ids.copy_(token)
            step.replay()
            token = step.logits[:, -1:].argmax(-1)
            tokens.append(token)
            done |= torch.isin(token[:, 0], stop_ids)
    out = torch.cat([ids, *tokens], dim=1)
    if stops:  # generate()'s padding after each row's first stop token
        new = out[:, prompt:]
        stopped = torch.isin(new, stop_ids)
        after = (stopped.cumsum(1) - stopped.long()) > 0  # positions after the first stop
        new.masked_fill_(after, stops[0] if pad_token_id is None else pad_token_id)
    return out
