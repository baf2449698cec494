"""An experiment, not a product option: perplexity where a row's selection has not seen the text after it.

``seer.eval`` scores a window's perplexity from one forward, every position at once. A selector that estimates the
whole map from the *last* query rows (vertical-slash, FlexPrefill; the default's blend takes its candidates partly
from vertical-slash) then picks the key blocks of row ``t`` from queries at the end of the window, up to ``N - t``
tokens later: the mask that predicts token ``t + 1`` is a function of the text after ``t``, that token included. In
a prefill that answers a prompt this never happens (the last rows are the prompt's end), so a full-window perplexity
can flatter such selectors. The gate, the oracle and the rerank decide per query block, from that block's rows: at
most one block of later text, as every block-sparse prefill.

This wrapper adds, for the positions ``P = [N/2, N - B)`` of each evaluated window (``B`` the block size; the last
query block, which the default computes whole, is left out), two perplexities to every row:

* ``ppl_p``: from the usual single forward;
* ``ppl_prefix``: from forwards of prefixes ``ids[:, :e]``, ``e = N, N - C, N - 2C, ...`` (``C`` =
  ``SEER_PREFIX_CHUNK`` tokens, default 512, a multiple of ``B``), each scoring the ``C`` positions before its last
  query block: a row's selection sees at most ``C + B`` later tokens;

and ``density_prefix`` (the prefixes' mean achieved density). Dense attention gives ``ppl_prefix == ppl_p`` (one
forward serves both), and so does any selection that decides per query block (tested). The dense pass is measured in
the run (a cached one lacks these keys). Run a command with it:

    SEER_PREFIX_CHUNK=512 python experiments/prefix_ppl.py -m seer.eval <seer.eval overrides>
    python experiments/prefix_ppl.py experiments/quality_qwen.py <its arguments, without --dense-from>
"""

from __future__ import annotations

import math
import os
import sys

import torch
from run_patched import run_command

from seer.evaluation import harness

_perplexity = harness.Evaluator._perplexity
_row = harness.Evaluator._row
CHUNK = 512


def chunk_tokens() -> int:
    """``SEER_PREFIX_CHUNK`` as a positive int (default 512); anything else is refused."""
    raw = os.environ.get("SEER_PREFIX_CHUNK", "512")
    if not raw.isdigit() or int(raw) < 1:
        raise SystemExit(f"SEER_PREFIX_CHUNK must be a positive number of tokens, got {raw!r}")
    return int(raw)


def prefix_ends(n: int, block: int, chunk: int) -> list[tuple[int, int, int]]:
    """``(e, lo, hi)`` for each prefix ``ids[:, :e]``: it scores the NLL columns ``lo .. hi - 1`` (column ``j``
    predicts token ``j + 1``), the ``chunk`` columns before its last query block, clipped at ``n // 2``; together
    they cover ``[n // 2, n - block)`` once, in order."""
    if chunk % block:
        raise SystemExit(f"SEER_PREFIX_CHUNK must be a multiple of the block size {block}, got {chunk}")
    spans, e = [], n
    while e - block > n // 2:
        spans.append((e, max(n // 2, e - block - chunk), e - block))
        e -= chunk
    return spans[::-1]


def prefix_measures(ev: harness.Evaluator, rows: torch.Tensor, single: list[torch.Tensor] | None = None) -> dict:
    """``ppl_p``, ``ppl_prefix`` and ``density_prefix`` of the windows ``rows`` (module docstring); ``single``: the
    single forward's NLL of each batch of ``rows`` where a pass already computed it (else computed here)."""
    ctx = ev.ctx
    n, block = rows.shape[1], ctx.block_size
    spans = prefix_ends(n, block, CHUNK)
    full, prefix, density = [], [], []
    sparse = ctx.mode == "sparse"
    with ctx.running():
        for i, batch in enumerate(ev._batches(rows)):
            ctx.clear_step()
            nll = single[i] if single else ev._forward_nll(batch).cpu()
            full.append(nll[:, n // 2:n - block])
            if not sparse:
                prefix.append(full[-1])
                continue
            parts = []
            for e, lo, hi in spans:
                ctx.clear_step()
                parts.append(ev._forward_nll(batch[:, :e]).cpu()[:, lo:hi])
                density.append(ctx.mean_density())
            prefix.append(torch.cat(parts, dim=1))
    full, prefix = torch.cat(full), torch.cat(prefix)
    return {"ppl_p": math.exp(float(full.mean())), "ppl_prefix": math.exp(float(prefix.mean())),
            "density_prefix": sum(density) / len(density) if density else 1.0, "prefix_chunk": CHUNK}


def perplexity_with_prefixes(self, rows: torch.Tensor, recall: bool, label: str) -> dict:
    """:meth:`seer.evaluation.harness.Evaluator._perplexity` and :func:`prefix_measures`, which reuses the single
    forward's NLL of that pass."""
    single, forward_nll = [], self._forward_nll

    def kept(ids: torch.Tensor) -> torch.Tensor:
        nll = forward_nll(ids)
        single.append(nll.cpu())
        return nll

    self._forward_nll = kept
    try:
        out = _perplexity(self, rows, recall, label)
    finally:
        del self._forward_nll
    out.update(prefix_measures(self, rows, single))
    print(f"[prefix_ppl] {label}: ppl_p {out['ppl_p']:.4f} ppl_prefix {out['ppl_prefix']:.4f} "
          f"(chunk {CHUNK}, density {out['density']:.3f} / prefixes {out['density_prefix']:.3f})", flush=True)
    return out


def row_with_dense(self, name, sparsity, calibration, got, dense, decode) -> dict:
    """:meth:`seer.evaluation.harness.Evaluator._row` and the dense pass's ``ppl_p`` beside the row's."""
    row = _row(self, name, sparsity, calibration, got, dense, decode)
    row["ppl_p_dense"] = dense.get("ppl_p")
    return row


def main(argv: list[str]) -> None:
    global CHUNK
    if not argv:
        raise SystemExit(__doc__)
    CHUNK = chunk_tokens()
    print(f"[prefix_ppl] full-window and prefix perplexities, chunks of {CHUNK} tokens", flush=True)
    harness.Evaluator._perplexity = perplexity_with_prefixes
    harness.Evaluator._row = row_with_dense
    harness.Evaluator._dense_cache_path = lambda self: None  # a cached dense pass has no ppl_p
    run_command(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
