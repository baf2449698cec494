"""Generation speed of seer.generate's two decode loops on a GGUF model: transformers' ``generate()`` (eager steps over
a DynamicCache) against one captured step replayed (``graph=true``: :func:`seer.model.graph_decode.greedy_generate`),
for dense decode and for sparse decode by Quest alone at ``--budget`` tokens per KV head, after a dense prefill of
one ``--prompt-len``-token prompt of a novel.

Per loop and decode: the wall time of a generation of one new token (the prefill alone: the graph loop captures
nothing then) and of ``--new`` tokens, and from their difference the decode time per token (the graph loop's warm-up
step and capture included), each the median of ``--repeats`` runs; the graph loop's tokens are checked against
``generate()``'s (free-running greedy tokens: a near-tie may flip one in bf16, counted in ``same tokens``).
Dense decode over a StaticCache is transformers' own attention with a mask over the whole static cache, which the
graph loop then replays: the table shows what that costs.

    python3 experiments/bench_generate.py --model-dir /root/models/qwen05 --gguf qwen05.gguf \\
        --eval-novel .assets/austen/emma.txt --prompt-len 32000 --new 256 --out $OUT/bench_generate.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from seer.model.graph_decode import greedy_generate

LOOPS = ("generate", "graph")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", required=True, help="folder holding the GGUF file")
    ap.add_argument("--gguf", default="qwen05.gguf")
    ap.add_argument("--model", default="qwen2_5_coder_0_5b", help="the conf/model option the GGUF is an instance of")
    ap.add_argument("--eval-novel", required=True, help="the text the prompt is cut from")
    ap.add_argument("--prompt-len", type=int, default=32000)
    ap.add_argument("--new", type=int, default=256, help="new tokens of a timed generation")
    ap.add_argument("--budget", type=int, default=2048, help="sparse decode's token budget per KV head (Quest alone)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default="/tmp/seer_bench_generate", help="the GGUF's converted copy")
    ap.add_argument("--out", required=True, help="the markdown table")
    args = ap.parse_args(argv)
    if args.prompt_len < 1 or args.new < 2 or args.repeats < 1:
        ap.error(f"--prompt-len {args.prompt_len}, --new {args.new}, --repeats {args.repeats}: need >= 1, >= 2, >= 1")
    return args


def generation(model, ids: torch.Tensor, new: int, loop: str, pad: int) -> torch.Tensor:
    with torch.no_grad():
        if loop == "graph":
            return greedy_generate(model, ids, new, pad_token_id=pad)
        return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=pad)


def timed(model, ids: torch.Tensor, new: int, loop: str, pad: int) -> tuple[float, torch.Tensor]:
    """Seconds of one generation of ``new`` tokens (synchronised on a GPU) and its tokens."""
    if ids.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = generation(model, ids, new, loop, pad)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, out[:, ids.shape[1]:]


def measure(model, ids: torch.Tensor, new: int, repeats: int, pad: int, decode: str) -> list[dict]:
    """One row per loop: prefill seconds (one new token), decode milliseconds per token, tokens per second of the
    decode, the decode density and the share of the graph loop's tokens equal to generate()'s."""
    rows, tokens = [], {}
    for loop in LOOPS:
        timed(model, ids, new, loop, pad)  # compiles and tunes (the first call of each kernel shape)
        one = statistics.median(timed(model, ids, 1, loop, pad)[0] for _ in range(repeats))
        runs = [timed(model, ids, new, loop, pad) for _ in range(repeats)]
        whole = statistics.median(t for t, _ in runs)
        tokens[loop] = runs[-1][1]
        ctx = getattr(model, "seer_decode", None)
        density = ctx.mean_density() if ctx is not None and ctx.sparsity is not None else 1.0
        per_token = (whole - one) / (new - 1) if whole > one else float("nan")  # nan: lost in the timing noise
        rows.append(dict(decode=decode, loop=loop, prefill_s=one, whole_s=whole, ms_per_token=per_token * 1e3,
                         tokens_per_s=1 / per_token, density=density))
    rows[-1]["same_tokens"] = float((tokens["graph"] == tokens["generate"]).float().mean())
    return rows


def table(rows: list[dict]) -> list[str]:
    base = {r["loop"]: r["ms_per_token"] for r in rows if r["decode"] == "dense"}
    lines = ["| decode | loop | prefill (s) | whole generation (s) | decode ms/token | tokens/s | vs dense generate() "
             "| decode density | same tokens as generate() |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = f"{base['generate'] / r['ms_per_token']:.2f}x" if "generate" in base else "-"
        same = f"{r['same_tokens']:.1%}" if "same_tokens" in r else "-"
        lines.append(f"| {r['decode']} | {r['loop']} | {r['prefill_s']:.2f} | {r['whole_s']:.2f} | "
                     f"{r['ms_per_token']:.2f} | {r['tokens_per_s']:.1f} | {vs} | {r['density']:.3f} | {same} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    from quality_smollm2 import environment  # the sibling script (experiments/ is on the path when run as a file)

    from seer.checks import build
    from seer.config import compose
    from seer.data import TextFilesCorpus
    from seer.evaluation.data import HeldOutText
    from seer.model.config import ModelConfig
    from seer.model.inference import load
    from seer.model.loading import load_causal_lm, load_tokenizer

    args = parse_args(argv)
    cfg = compose([f"model={args.model}", "model.package=null", f"model.name_or_path={args.model_dir}",
                   f"model.gguf_file={args.gguf}", f"model.gguf_cache_dir={args.work}/gguf"])
    mcfg = build(ModelConfig, "model", dict(cfg.model))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(mcfg)
    text = HeldOutText(TextFilesCorpus(args.eval_novel), tokenizer, split="all", progress=False)
    ids = text.tokens(args.prompt_len)[None].to(device)
    pad = tokenizer.pad_token_id or tokenizer.eos_token_id
    quest = {"token_budget": args.budget, "estimate": "quest", "estimate_weight": 1.0}
    rows = []
    for decode in ("dense", f"Quest alone, {args.budget} tokens"):
        torch.manual_seed(0)
        if decode == "dense":  # transformers' own model and attention
            model = load_causal_lm(mcfg, device)
        else:
            model = load(mcfg, device=str(device), decode_sparsity=quest)
        rows += measure(model, ids, args.new, args.repeats, pad, decode)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    lines = [f"# Generation speed: generate() against the captured decode step ({args.model}, {args.gguf})", "",
             environment(device), "", "Command: `python3 " + " ".join(sys.argv) + "`", "",
             f"One prompt of {ids.shape[1]} tokens, {args.new} new tokens, dense prefill; medians of {args.repeats} "
             "runs; decode ms/token from the whole generation less the one-token one.", "", *table(rows)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
