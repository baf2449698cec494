"""Which key blocks should a selection keep: those of largest attention mass, or those whose loss changes the
attention output most? An analysis with exact attention (no gates, no training), for choosing what gates learn.

For one head, query token ``t`` and key block ``j``, with ``P`` the dense attention probabilities and ``o_t`` the dense
output, let ``p_tj = sum_{s in j} P[t, s]`` and ``u_tj = sum_{s in j} P[t, s] v_s``. Dropping block ``j`` alone (and
renormalising) moves the output by ``(p_tj o_t - u_tj) / (1 - p_tj)``, so two block scores of a query block ``i`` are

* **mass**: ``mean_{t in i} p_tj``, the block attention mass the project's gates learn and its oracle selects by;
* **output**: ``mean_{t in i} ||p_tj o_t - u_tj||``, the size of the output change the block's loss causes.

Every layer of the model attends through the selection of one scorer: in every (head, query block) row the same
number of causal key blocks is kept for both scorers (``ceil(density x causal blocks)``, at least one, the diagonal
block always kept and counted), so both run at exactly the same density, and attention is renormalised over the kept
blocks. The script reports the perplexity of held-out windows with each scorer beside dense, and each layer's
relative attention-output error (``||o_sparse - o|| / ||o||`` over its tokens and heads, measured inside the sparse
run). It runs on the CPU in float32 (a few minutes for SmolLM2 at 4k tokens).

    python experiments/output_oracle.py --eval-novel .assets/austen/emma.txt --seq-len 4096 --windows 2
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from seer.config import compose, validate
from seer.model.loading import load_causal_lm, load_tokenizer

SCORERS = ("mass", "output")
ATTENTION = "seer_output_oracle"


def block_score(scorer: str, p: torch.Tensor, v: torch.Tensor, o: torch.Tensor, block: int) -> torch.Tensor:
    """The ``scorer``'s block scores ``[H, nb, nb]`` of attention probabilities ``p`` ``[H, N, N]`` (causal, rows
    summing to 1), values ``v`` and dense output ``o = p @ v`` (both ``[H, N, D]``), ``N`` a multiple of ``block``."""
    h, n, _ = p.shape
    nb = n // block
    pb = p.view(h, n, nb, block)
    per_token = pb.sum(-1)                                                 # p_tj: [H, N, nb]
    if scorer == "output":
        u = torch.einsum("htjs,hjsd->htjd", pb, v.view(h, nb, block, -1))  # u_tj: [H, N, nb, D]
        per_token = (per_token[..., None] * o[:, :, None, :] - u).norm(dim=-1)
    return per_token.view(h, nb, block, nb).mean(2)                       # mean over a query block's tokens


def keep_blocks(scores: torch.Tensor, density: float) -> torch.Tensor:
    """The kept blocks ``[H, nb, nb]`` (bool): in each row ``i`` the diagonal block and the best others among the
    causal ones, ``max(1, ceil(density * (i + 1)))`` in all."""
    h, nb, _ = scores.shape
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    s = scores.masked_fill(~causal, -math.inf).clone()
    s[:, torch.arange(nb), torch.arange(nb)] = math.inf                # the diagonal first
    counts = torch.clamp(torch.ceil(density * torch.arange(1, nb + 1, dtype=torch.float64)), min=1).long()
    order = s.argsort(dim=-1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(nb).expand_as(order).contiguous())
    return rank < counts[None, :, None]


class Selection:
    """The attention function's state: which scorer selects (None: dense) and the per-layer output errors."""

    def __init__(self, block: int, density: float):
        self.block, self.density, self.scorer = block, density, None
        self.errors: dict[int, list[float]] = {}
        self.kept: list[float] = []

    def attention(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        """``[B, N, Hq, D]`` output (transformers' layout) of exact attention, sparse when a scorer is set."""
        b, hq, n, d = query.shape
        rep = hq // key.shape[1]
        k = key.repeat_interleave(rep, dim=1).float()
        v = value.repeat_interleave(rep, dim=1).float()
        scale = scaling if scaling is not None else d ** -0.5
        logits = (query.float() @ k.transpose(-1, -2)) * scale
        causal = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
        logits = logits.masked_fill(~causal, -math.inf)
        p = torch.softmax(logits, dim=-1)
        out = p @ v
        if self.scorer is not None:
            assert b == 1 and n % self.block == 0, "one unpadded row whose length is a multiple of the block"
            scores = block_score(self.scorer, p[0], v[0], out[0], self.block)
            kept = keep_blocks(scores, self.density)
            self.kept.append(kept.sum().item() / (kept.shape[0] * kept.shape[1] * (kept.shape[1] + 1) / 2))
            token_mask = kept.repeat_interleave(self.block, 1).repeat_interleave(self.block, 2) & causal
            sparse = torch.softmax(logits.masked_fill(~token_mask[None], -math.inf), dim=-1) @ v
            err = ((sparse - out).norm() / out.norm()).item()
            self.errors.setdefault(module.layer_idx, []).append(err)
            out = sparse
        return out.to(query.dtype).transpose(1, 2).contiguous(), None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="a conf/model option")
    ap.add_argument("--eval-novel", required=True, help="held-out text (a novel never trained on)")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--windows", type=int, default=2, help="consecutive windows from the text's start")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--out", default=None, help="also write the rows here (JSON)")
    args = ap.parse_args(argv)
    if args.seq_len % args.block or args.seq_len < 2 * args.block:
        ap.error(f"--seq-len {args.seq_len}: give a multiple of --block {args.block}, at least two blocks")
    if not 0 < args.density <= 1:
        ap.error(f"--density {args.density}: must be in (0, 1]")
    if not Path(args.eval_novel).is_file():
        ap.error(f"--eval-novel {args.eval_novel}: no such file")
    return args


def main(argv=None) -> None:
    from transformers import AttentionInterface

    args = parse_args(argv)
    start = time.time()
    cfg = validate(compose([f"model={args.model}"])).model
    tokenizer = load_tokenizer(cfg)
    model = load_causal_lm(cfg, "cpu")
    model.float()
    ids = tokenizer(Path(args.eval_novel).read_text(), return_tensors="pt").input_ids[0]
    if ids.numel() < args.windows * args.seq_len:
        raise SystemExit(f"--eval-novel {args.eval_novel}: {ids.numel()} tokens, fewer than --windows x --seq-len")
    selection = Selection(args.block, args.density)
    AttentionInterface.register(ATTENTION, selection.attention)
    model.set_attn_implementation(ATTENTION)
    rows = []
    for scorer in (None, *SCORERS):
        selection.scorer, selection.errors, selection.kept = scorer, {}, []
        nll, tokens = 0.0, 0
        for w in range(args.windows):
            x = ids[w * args.seq_len:(w + 1) * args.seq_len][None]
            with torch.no_grad():
                logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            tokens += x.shape[1] - 1
        row = {"scorer": scorer or "dense", "ppl": math.exp(nll / tokens), "tokens": tokens,
               "density": sum(selection.kept) / len(selection.kept) if selection.kept else 1.0,
               "layer_error": {layer: sum(e) / len(e) for layer, e in sorted(selection.errors.items())}}
        rows.append(row)
        print(f"[output_oracle] {row['scorer']}: ppl {row['ppl']:.4f} density {row['density']:.3f} "
              f"({time.time() - start:.0f} s)", flush=True)
    dense = rows[0]["ppl"]
    print("\n| selection | density | PPL | vs dense | mean layer output error |\n|---|---|---|---|---|")
    for row in rows:
        errs = list(row["layer_error"].values())
        print(f"| {row['scorer']} | {row['density']:.3f} | {row['ppl']:.4f} | {row['ppl'] / dense - 1:+.2%} | "
              + (f"{sum(errs) / len(errs):.4f} |" if errs else "- |"))
    layers = sorted(rows[1]["layer_error"])
    print("\n| layer | " + " | ".join(str(i) for i in layers) + " |\n|---|" + "---|" * len(layers))
    for row in rows[1:]:
        print(f"| {row['scorer']} | " + " | ".join(f"{row['layer_error'][i]:.3f}" for i in layers) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
