"""Sparse decode quality (SeerAttention-R decode gates) on a GGUF model: the continuation NLL and the greedy tokens
of decode steps that attend only the blocks a token budget keeps, beside dense decode.

Run once on an H200 (Qwen2.5-Coder-0.5B at 32k, one window within the device time: docs/results/decode/qwen05_32k.md);
the teacher-forced top-1 agreement was added after that run.

1. Trains decode gates (``stage=distill_decode`` on the novels and stdlib code, ``--train-len``-token rows,
   ``--steps`` steps) unless ``--decode-gates`` gives trained ones; with ``--quest-blocks`` none at all: a model per
   block size decoding by Quest alone (training-free, :func:`seer.model.decode.attach_quest_decode`), all measured
   against one dense pass. ``--prompt-blocks`` pins that many prompt blocks in every budget, ``--recent-blocks`` keeps
   that many blocks before the newest (a local window).
2. On a held-out novel (``--eval-novel``, evaluated whole), for ``--windows`` windows of ``--prompt-len`` tokens plus
   ``--continuation`` tokens: a dense prefill of the prompt, then the continuation teacher forced one token per
   decode step over the KV cache, dense and through the decode selection at each ``--budgets`` token budget (scored
   by the gate, and with each ``--estimates`` training-free estimate mixed in, e.g. ``quest:0.5`` half Quest's
   bounds, ``quest:1`` Quest alone, the default: ``DecodeSparsityConfig.estimate``): the mean NLL of the
   continuation tokens (:func:`continuation_nll`), the share of positions where the sparse top token equals the
   dense one (both given the true text before them: greedy agreement without the drift of free-running
   generation) and the achieved decode density.
3. From each window's prompt, ``--greedy`` greedy tokens dense and sparse (no early stop): the share of positions
   where the sparse tokens equal the dense ones, and the length of their common prefix (:func:`greedy_agreement`).
4. Writes ``rows.json`` (one row per window, budget and scores) and ``results.md`` (means per budget and scores, with
   device, versions, date and command) into ``--out``, after each window.

On the GPU machine (GGUF staged in /root/models/qwen05, novels carried in .assets/austen):

    python3 experiments/quality_decode.py --model-dir /root/models/qwen05 --gguf qwen05.gguf \\
        --novels '.assets/austen/[!e]*.txt' --eval-novel .assets/austen/emma.txt --out $OUT
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from seer.config import compose, validate
from seer.data import TextFilesCorpus
from seer.evaluation.data import HeldOutText
from seer.kernels.common import BLOCK_SIZES
from seer.model.inference import load
from seer.model.loading import load_tokenizer
from seer.preflight import check_length, model_shape
from seer.sparsity.decode import DecodeSparsityConfig

from quality_smollm2 import environment  # the sibling script (experiments/ is on the path when run as a file)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", required=True, help="folder holding the GGUF file")
    ap.add_argument("--gguf", default="qwen05.gguf")
    ap.add_argument("--model", default="qwen2_5_coder_0_5b", help="the conf/model option the GGUF is an instance of")
    ap.add_argument("--novels", required=True, help="glob of the training novels")
    ap.add_argument("--eval-novel", required=True, help="a novel never trained on (evaluated whole)")
    ap.add_argument("--decode-gates", default=None, help="trained decode gates (skips training)")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--train-len", type=int, default=8192)
    ap.add_argument("--train-sequences", type=int, default=256, help="training rows (novels and stdlib code)")
    ap.add_argument("--train-overrides", nargs="*", default=[], help="more seer.train overrides")
    ap.add_argument("--budgets", type=int, nargs="+", default=[1024, 2048, 4096], help="decode token budgets")
    ap.add_argument("--estimates", nargs="*", default=["quest:1"], metavar="NAME:WEIGHT",
                    help="training-free estimates mixed into the gate's block scores, each run at every budget beside "
                         "the gate alone (quest:0.5: half Quest's; quest:1: Quest alone, the default: the "
                         "training-free baseline a learned decode gate must beat; --estimates with no value: the "
                         "gate alone)")
    ap.add_argument("--quest-blocks", type=int, nargs="*", default=[],
                    help="instead of decode gates: training-free decode, each of --estimates alone (NAME:1; Quest's "
                         "by default) at each of these key-block sizes (no training, no gate rows; "
                         "seer.model.decode.attach_quest_decode), e.g. 16 32 64")
    ap.add_argument("--prompt-blocks", type=int, default=0,
                    help="key blocks of the prompt its last queries attend most, kept at every decode step "
                         "(DecodeSparsityConfig.prompt_blocks, counted in the budget; 0: none)")
    ap.add_argument("--recent-blocks", type=int, default=0,
                    help="key blocks before the newest kept at every decode step, a local window "
                         "(DecodeSparsityConfig.recent_blocks, counted in the budget; 0: none)")
    ap.add_argument("--rerank-blocks", type=int, nargs="+", default=[0],
                    help="each budget and estimate also with its top C blocks ranked again by their true attention "
                         "over their own keys, for each C given (DecodeSparsityConfig.rerank_blocks; 0: no rerank)")
    ap.add_argument("--prompt-len", type=int, default=31488, help="with the continuation, within the model's context")
    ap.add_argument("--continuation", type=int, default=1024, help="teacher-forced tokens after each prompt")
    ap.add_argument("--greedy", type=int, default=256, help="greedy tokens after each prompt")
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--first-window", type=int, default=0,
                    help="measure windows FIRST .. FIRST + --windows - 1 of the novel (a later run goes on where an "
                         "earlier one stopped)")
    ap.add_argument("--deadline-s", type=float, default=540.0,
                    help="no window starts after this many seconds from the start (training included)")
    ap.add_argument("--work", default="outputs/quality_decode")
    ap.add_argument("--out", default="docs/results/decode")
    args = ap.parse_args(argv)
    try:
        args.estimates = [parse_estimate(text) for text in args.estimates]
    except ValueError as err:
        ap.error(str(err))
    if args.quest_blocks and (args.decode_gates or not set(args.quest_blocks) <= set(BLOCK_SIZES)):
        ap.error(f"--quest-blocks {args.quest_blocks}: block sizes of {BLOCK_SIZES}, without --decode-gates (no "
                 f"gates are used)")
    mixed = [e for e in args.estimates if e["estimate_weight"] != 1]
    if args.quest_blocks and mixed:
        name, weight = mixed[0]["estimate"], mixed[0]["estimate_weight"]
        ap.error(f"--estimates {name}:{weight:g}: --quest-blocks decodes by a training-free estimate alone (no gate "
                 f"to mix it with): give NAME:1")
    for budget in args.budgets:
        for estimate in [{}, *args.estimates]:  # a bad budget fails here, before anything loads
            for rerank in args.rerank_blocks:
                config = DecodeSparsityConfig(token_budget=budget, prompt_blocks=args.prompt_blocks,
                                              recent_blocks=args.recent_blocks, rerank_blocks=rerank, **estimate)
                for block in args.quest_blocks:
                    config.check_block_size(block)
    if min(args.prompt_len, args.continuation, args.greedy, args.windows) < 1 or args.first_window < 0:
        ap.error("--prompt-len, --continuation, --greedy and --windows must be >= 1, --first-window >= 0")
    return args


QUEST_ALONE = {"estimate": "quest", "estimate_weight": 1.0}


def quest_model(model_cfg, block_size: int, device, budget: int):
    """The model with training-free sparse decode (Quest alone in blocks of ``block_size``; dense prefill), at a
    token budget of ``budget``."""
    from seer.model.attention import prepare_model
    from seer.model.decode import attach_quest_decode
    from seer.model.loading import load_causal_lm

    model = load_causal_lm(model_cfg, device)
    model.config.use_cache = True
    prepare_model(model, block_size)
    kernel = "triton" if torch.device(device).type == "cuda" else "reference"
    attach_quest_decode(model, block_size).enable(DecodeSparsityConfig(token_budget=budget, **QUEST_ALONE), kernel)
    return model


def parse_estimate(text: str) -> dict:
    """``NAME:WEIGHT`` (``quest:0.5``) as the fields of :class:`DecodeSparsityConfig` it sets (checked there)."""
    name, _, weight = text.partition(":")
    try:
        return {"estimate": name, "estimate_weight": float(weight)}
    except ValueError:
        raise ValueError(f"--estimates {text!r}: give NAME:WEIGHT, e.g. quest:0.5") from None


def scores_name(estimate: dict) -> str:
    """What scored the blocks: ``gate``, ``gate+quest@0.5``, or ``quest`` alone (weight 1)."""
    if not estimate:
        return "gate"
    if estimate["estimate_weight"] == 1:
        return estimate["estimate"]
    return f"gate+{estimate['estimate']}@{estimate['estimate_weight']:g}"


def model_overrides(args) -> list[str]:
    """The base model's overrides, for training and evaluation alike: the GGUF's conversion is cached in ``--work``
    (the first load converts it, later ones read the converted folder)."""
    return [f"model={args.model}", "model.package=null", f"model.name_or_path={args.model_dir}",
            f"model.gguf_file={args.gguf}", f"model.gguf_cache_dir={args.work}/gguf"]


def train_decode_gates(args) -> Path:
    """Distils decode gates on the novels and Python stdlib modules (``data=text_and_code``, 10% of the documents
    held out), their validation recall measured at the smallest budget; returns their folder."""
    from seer.training.run import run_training

    over = ["stage=distill_decode", *model_overrides(args), "data=text_and_code", "trainer=gpu", "logger=none",
            f"data.corpus.corpora.0.paths=['{args.novels}']", f"data.seq_len={args.train_len}",
            f"data.train_sequences={args.train_sequences}", f"trainer.max_steps={args.steps}",
            f"stage.decode_sparsity.token_budget={min(args.budgets)}", f"paths.output_dir={args.work}/train_decode",
            f"paths.cache_dir={args.work}/cache", *args.train_overrides]
    return Path(run_training(compose(over))["gates"])


@torch.no_grad()
def continuation_nll(model, prompt: torch.Tensor, continuation: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Mean NLL of ``continuation [1, C]`` after ``prompt [1, P]``: the prompt prefilled with a KV cache, then each
    continuation token predicted and fed in one decode step at a time (teacher forcing), as the model's current
    decode mode (sparse when its decode gates are enabled) attends; and the model's top token at each of the ``C``
    positions (its greedy choice there, given the true text before it)."""
    out = model(prompt, use_cache=True)
    cache, logits = out.past_key_values, out.logits[:, -1]
    total, top = torch.zeros((), device=logits.device), []  # summed on the device: no host sync per step
    for t in range(continuation.shape[1]):
        token = continuation[:, t]
        total += torch.nn.functional.cross_entropy(logits.float(), token)
        top.append(logits[0].argmax())
        if t + 1 < continuation.shape[1]:
            out = model(token[:, None], past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits[:, -1]
    return float(total) / continuation.shape[1], torch.stack(top)


@torch.no_grad()
def greedy_tokens(model, prompt: torch.Tensor, count: int, pad_token_id: int) -> torch.Tensor:
    """``count`` greedy tokens after ``prompt [1, P]`` (an end-of-text token does not stop them)."""
    out = model.generate(prompt, max_new_tokens=count, min_new_tokens=count, do_sample=False,
                         pad_token_id=pad_token_id)
    return out[0, prompt.shape[1]:]


def greedy_agreement(sparse: torch.Tensor, dense: torch.Tensor) -> tuple[float, int]:
    """The share of positions where two greedy continuations agree, and the length of their common prefix."""
    same = (sparse == dense).tolist()
    return sum(same) / len(same), same.index(False) if False in same else len(same)


def dense_window(model, prompt: torch.Tensor, continuation: torch.Tensor, greedy: int,
                 pad_token_id: int) -> tuple[tuple, dict]:
    """Dense decode of one window (sparse decode switched off): ``(NLL, top tokens, greedy tokens)`` and its row."""
    model.seer_decode.disable()
    dense = (*continuation_nll(model, prompt, continuation), greedy_tokens(model, prompt, greedy, pad_token_id))
    return dense, {"budget": "dense", "scores": "", "nll": dense[0], "nll_increase": 0.0, "density": 1.0,
                   "top1_agree": 1.0, "greedy_agree": 1.0, "greedy_prefix": greedy}


def measure_window(model, prompt: torch.Tensor, continuation: torch.Tensor, budgets: list[int], greedy: int,
                   pad_token_id: int, kernel: str, estimates: list[dict] = (),
                   dense: tuple | None = None, prompt_blocks: int = 0, recent_blocks: int = 0,
                   rerank_blocks: tuple[int, ...] = (0,)) -> list[dict]:
    """The rows of one window: dense decode, then each budget scored by the gate and with each of ``estimates``
    (:func:`parse_estimate`) mixed in (NLL, its increase over dense, decode density, greedy agreement with dense).
    A model without decode gates (:func:`quest_model`) has rows of each of ``estimates`` alone (weight 1; Quest's
    when none), named ``<estimate>/<block size>`` (``quest/64``, ``quest_mass/64``).
    ``dense``: the window's dense ``(nll, top tokens, greedy tokens)`` measured before (then no dense row).
    ``prompt_blocks`` / ``recent_blocks``: every budget's pinned prompt blocks and kept blocks before the newest
    (``DecodeSparsityConfig.prompt_blocks`` / ``recent_blocks``). ``rerank_blocks``: each row again with each of
    these rerank candidate counts (``DecodeSparsityConfig.rerank_blocks``; 0: none), named ``+rerank<C>``."""
    decode = model.seer_decode
    gated = decode.gated
    rows = []
    if dense is None:
        dense, row = dense_window(model, prompt, continuation, greedy, pad_token_id)
        rows.append(row)
    dense_nll, dense_top, dense_tokens = dense
    for budget in budgets:
        for estimate, rerank in itertools.product([{}, *estimates] if gated else (estimates or [QUEST_ALONE]),
                                                  rerank_blocks):
            decode.enable(DecodeSparsityConfig(token_budget=budget, prompt_blocks=prompt_blocks,
                                               recent_blocks=recent_blocks, rerank_blocks=rerank, **estimate), kernel)
            nll, top = continuation_nll(model, prompt, continuation)
            density = decode.mean_density()
            agree, prefix = greedy_agreement(greedy_tokens(model, prompt, greedy, pad_token_id), dense_tokens)
            name = scores_name(estimate) if gated else f"{estimate['estimate']}/{decode.block_size}"
            name += f"+rerank{rerank}" if rerank else ""
            rows.append({"budget": budget, "scores": name, "nll": nll,
                         "nll_increase": nll / dense_nll - 1,
                         "density": density, "top1_agree": float((top == dense_top).float().mean()),
                         "greedy_agree": agree, "greedy_prefix": prefix})
    return rows


def main() -> None:
    args = parse_args()
    start = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = validate(compose(model_overrides(args)))
    check_length(f"--prompt-len {args.prompt_len} + --continuation {args.continuation} (or --greedy {args.greedy})",
                 args.prompt_len + max(args.continuation, args.greedy), model_shape(run.model), run.model.rope_scaling)
    if args.quest_blocks:  # training-free: a model per block size, no decode gates
        gates = None
        models = [quest_model(run.model, block, device, min(args.budgets)) for block in args.quest_blocks]
    else:
        gates = Path(args.decode_gates) if args.decode_gates else train_decode_gates(args)
        models = [load(run.model, decode_gates=gates, decode_sparsity={"token_budget": min(args.budgets)},
                       device=device)]
    train_s = time.time() - start
    print(f"[decode] decode gates {gates} ({train_s:.0f} s)", flush=True)
    tokenizer = load_tokenizer(run.model)
    kernel = models[0].seer_decode.kernel
    text = HeldOutText(TextFilesCorpus(args.eval_novel), tokenizer, split="all", progress=False)
    span = args.prompt_len + args.continuation
    tokens = text.tokens((args.first_window + args.windows) * span)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, skipped = [], []
    for window in range(args.first_window, args.first_window + args.windows):
        if time.time() - start > args.deadline_s:
            skipped.append(window)
            continue
        ids = tokens[window * span:(window + 1) * span][None].to(device)
        prompt, continuation = ids[:, :args.prompt_len], ids[:, args.prompt_len:]
        dense, dense_row = dense_window(models[0], prompt, continuation, args.greedy, pad)
        window_rows = [dense_row]
        for model in models:  # every block size (or the one gated model) against the same dense decode
            window_rows += measure_window(model, prompt, continuation, args.budgets, args.greedy, pad, kernel,
                                          args.estimates, dense, args.prompt_blocks, args.recent_blocks,
                                          args.rerank_blocks)
        for row in window_rows:
            rows.append({"window": window, **row})
            print(f"[decode] window {window} budget {row['budget']} {row['scores']}: nll {row['nll']:.4f} "
                  f"({row['nll_increase']:+.2%}) density {row['density']:.3f} top-1 {row['top1_agree']:.2f} "
                  f"greedy {row['greedy_agree']:.2f} (prefix {row['greedy_prefix']}) ({time.time() - start:.0f} s)",
                  flush=True)
        (out / "rows.json").write_text(json.dumps(rows, indent=1))
        write_results(out, rows, skipped, args, device, gates, train_s, time.time() - start)
    write_results(out, rows, skipped, args, device, gates, train_s, time.time() - start)


def summary_table(rows: list[dict]) -> str:
    """Means over windows per budget and scores, as a markdown table."""
    lines = ["| budget | scores | windows | decode density | NLL | NLL vs dense | top-1 agreement (teacher forced) | "
             "greedy agreement | greedy prefix |", "|---|---|---|---|---|---|---|---|---|"]
    for budget, scores in dict.fromkeys((r["budget"], r["scores"]) for r in rows):
        mine = [r for r in rows if (r["budget"], r["scores"]) == (budget, scores)]
        mean = {k: sum(r[k] for r in mine) / len(mine) for k in ("density", "nll", "nll_increase", "top1_agree",
                                                                "greedy_agree", "greedy_prefix")}
        lines.append(f"| {budget} | {scores} | {len(mine)} | {mean['density']:.3f} | {mean['nll']:.4f} | "
                     f"{mean['nll_increase']:+.2%} | {mean['top1_agree']:.1%} | {mean['greedy_agree']:.1%} | "
                     f"{mean['greedy_prefix']:.0f} |")
    return "\n".join(lines)


def write_results(out: Path, rows: list[dict], skipped: list[int], args, device, gates: Path | None, train_s: float,
                  total_s: float) -> None:
    lines = [f"# Sparse decode quality on {args.model} ({args.gguf})", "",
             f"{environment(device)} "
             + (f"Decode gates {gates} (trained in {train_s:.0f} s)" if gates is not None else
                f"No decode gates: Quest alone in blocks of {args.quest_blocks} tokens (models loaded in "
                f"{train_s:.0f} s)") + "; whole study "
             f"{total_s:.0f} s.", "",
             "Command: `python3 experiments/quality_decode.py " + " ".join(
                 f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                 for k, v in {**vars(args), "estimates": [f"{e['estimate']}:{e['estimate_weight']:g}"
                                                          for e in args.estimates]}.items()
                 if v not in (None, False, []) and k not in ("work", "out")) + "`", "",
             f"Each window: a dense prefill of {args.prompt_len} tokens of {args.eval_novel}, then {args.continuation} "
             f"teacher-forced decode steps (NLL) and {args.greedy} greedy tokens, dense and at each token budget "
             f"(scores: the gate's, or with a training-free estimate mixed in).",
             "", summary_table(rows), ""]
    if skipped:
        lines += ["## Not run (time budget)", "", f"windows {skipped}", ""]
    (out / "results.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
