"""Whole-model decode tokens/s (issue 18 part 6): the 8B shape with random weights, dense decode against sparse decode
(decode gates -> token budget -> Triton block-sparse decode kernel) on the same KV cache.

The eager mode ran on one H200 with the compressed-K cache before its static-shape rewrite (issue 18: sparse 0.72x dense
at 1 x 32k, 0.38x at 8 x 32k, 0.71x at 1 x 128k; host-bound); ``--graph`` ran there too (docs/bench_decode_model.md:
10.1x transformers' SDPA at 8 x 32k and 1.47x kernel@1.0, before the gate-free kernel dense baseline existed; a
``--profile`` of eager steps then showed the small kernels of the gate and the selection dominating a step).
Defaults: all 32 decoder layers, prompts 32k and 128k, batch 1 and 8; batch 8 x 128k is skipped (its KV cache alone is
128 GiB). Expected well within 5 minutes of wall time: the model is drawn on the GPU in seconds, a prefill takes about
2 s (1 x 32k) to 10-15 s (8 x 32k, 1 x 128k), and each case decodes about 80 steps of tens of ms.

The model is ``conf/model/<--model>.yaml`` (default ``llama3_8b``: 32 layers, 32 query / 8 KV heads, D 128, vocab
128256) built with ``model.random_init=true`` in bf16 on CUDA (``--layers N`` keeps the first N decoder layers),
prepared for the ``"seer"`` attention function with decode gates of random init
(:func:`seer.model.decode.attach_decode_gates`, :class:`~seer.gates.decode_config.DecodeGateConfig`); sparse decode
is switched on and off with the API ``seer.load`` uses (``model.seer_decode.enable(DecodeSparsityConfig(
token_budget=--budget), "triton")`` / ``.disable()``). A top-k token budget keeps ``budget / 64`` blocks per KV head
whatever the gates' weights, so random gates give the same work as trained ones; speed does not depend on the weights.

For each (prompt length, batch) that fits (estimated weights + KV cache + prefill activations within
``--mem-limit-gib``; else a one-line note):

1. one dense prefill of random token ids (whole, or in ``--prefill-chunk`` pieces) with sparse decode on, so the
   compressed-K cache of the decode gates is filled beside the KV cache;
2. correctness: ``--check-steps`` decode steps with a budget covering every block, then (the cache rewound to the
   prompt) the same steps dense: the logits must agree to ``--tol`` (relative L2 error; bf16) and the achieved
   density must be 1.0 (a failure is printed and marked in the report, the timings still run, and the script
   exits 1 at the end). With random weights attention is nearly uniform, so this check is weak: the kernel's own
   tests (tests/kernels) carry the correctness; this one catches plumbing errors (cache, lengths, positions);
3. dense: ``--warmup`` steps, rewind, ``--steps`` timed steps, rewind;
4. sparse at ``--budget`` tokens per KV head: the same, from a copy of the compressed-K cache as it was after the
   prefill, and the achieved decode density (kept share of valid blocks, mean over layers, heads, rows and steps).

So dense and sparse decode the same random tokens over the same prefilled KV cache: the cache is not copied and not
re-prefilled, it is rewound (its length cut back to the prompt) between runs; the compressed-K cache is restored from
a copy taken after the prefill. A step is ``model(input_ids=[B, 1], past_key_values=cache, use_cache=True)``: the
whole model (embedding, 32 layers, final norm, LM head over the vocabulary), no sampling, in a Python loop under
``torch.no_grad``, timed with CUDA events around the loop of ``--steps`` steps. Tokens/s = batch x steps / time.

KV cache (``--cache``): ``reserved`` (default) is transformers' DynamicCache whose layers write into a buffer
allocated once for the prompt and the steps and hand out views of its filled part; ``dynamic`` is the stock
DynamicCache, which ``torch.cat``s each layer's whole cache at every step, i.e. copies the full KV cache per step
(at batch 8 / 32k, 32 GiB read and written per step: more than dense attention reads), which caps any attention
speedup; run it to see what ``generate()`` pays today.

The measured speedup of the eager mode is the model's, host overhead included: eager decode steps are host-bound at
small batches (docs/bench_decode.md: ~0.1-0.2 ms of Python and launches per kernel call), and the sparse path adds per
layer and step the decode gate, the compressed-K update, the budget's top-k, the block list and the kernel.

``--graph`` (its plumbing is also tested on the CPU, where each "replay" runs the step eagerly) takes the host out: the
KV cache is transformers' StaticCache of prompt + steps tokens (``--cache`` is ignored), and after the prefill ONE
decode step ``model(input_ids=static_ids, past_key_values=cache, use_cache=True)`` is captured in a
``torch.cuda.CUDAGraph`` (warm-up steps on a side stream first, as the PyTorch docs ask: they compile and tune the
Triton kernels and allocate what a first step allocates), four times: ``dense``, transformers' SDPA over the whole
static cache with a mask (which makes transformers repeat K/V per query head, more traffic than the eager mode's dense
step); ``kernel dense``, our decode kernel listing every block of the cache with sparse decode off (no decode gate, no
compressed-K update, no top-k: :func:`kernel_dense_attention`), the dense decode of ours; ``kernel@1.0``, sparse decode
at a budget of every block (the same kernel work plus each layer's gate, compressed-K update and top-k: what the gate
costs, not a dense baseline); and sparse decode at ``--budget``. Each is replayed ``--steps`` times, timed with CUDA
events (the next token copied into ``static_ids`` before each replay); ``vs best`` is sparse against the faster of
``dense`` and ``kernel dense``. The step reads its position from the cache itself: in transformers 5.x a StaticCache
layer keeps its length as a device tensor (``cumulative_length``) that the captured ``update`` advances in place, the
model derives ``position_ids`` and the causal mask's offset from it (there is no ``cache_position`` argument), kernel
dense takes each row's length from ``position_ids``, and sparse decode from the compressed-K cache's ``seqlens``, also
advanced in place; so replays continue the sequence and a rewind sets both back in place (the compressed-K cache from
a copy taken after the prefill, :meth:`~seer.model.decode_cache.DecodeKeyCache.copy_`). Before timing: the replays'
logits must equal eager steps' (relative error <= ``GRAPH_TOL``), kernel dense and kernel@1.0 must equal dense within
``--tol`` (kernel@1.0 at density 1.0), and after the timed replays the caches must hold prompt + steps tokens.
``--profile`` profiles ``--profile-steps`` replays of the timed budget step of the first case (so with
``--compile-gate`` the compiled one).

``--compile-gate`` runs the sparse runs (every block and the budget) with ``DecodeSparsityConfig(compile=True)``: each
layer's gate / compressed-K update / block selection / density sums of a one-token step through ``torch.compile``
(inductor, static shapes; :func:`seer.model.decode.sparse_decode_step`) instead of some 70 small PyTorch kernels.
The first eager step of each shape and budget compiles it (the check steps and the warm-up steps, before any timing
and before any capture); the compile limit of torch's dynamo is raised so that every case and budget gets its own
compiled graph. Compare its rows with a run without it.

    PYTHONPATH=. python experiments/bench_decode_model.py --out docs/bench_decode_model.md
    PYTHONPATH=. python experiments/bench_decode_model.py --layers 8 --prompts 32768 --batch 8   # a quicker look
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import sys
import time
from collections.abc import Iterator

import torch

from seer.model.graph_decode import GraphStep, rewind

GIB = 2**30
GRAPH_TOL = 1e-3  # relative L2 error allowed between a CUDA-graph replay and the same eager step
KERNEL_DENSE_ATTENTION = "seer_bench_kernel_dense"  # the attention function of the `kernel dense` baseline


def kv_cache_bytes(layers: int, batch: int, kv_heads: int, length: int, head_dim: int, dtype_bytes: int = 2) -> int:
    """Bytes of the K and V caches: ``2 x layers x batch x kv_heads x length x head_dim x dtype_bytes``."""
    return 2 * layers * batch * kv_heads * length * head_dim * dtype_bytes


def _shape(arch: dict) -> tuple[int, int, int, int, int, int]:
    hidden, heads = arch["hidden_size"], arch["num_attention_heads"]
    head_dim = arch.get("head_dim") or hidden // heads
    return hidden, arch["intermediate_size"], heads, arch.get("num_key_value_heads") or heads, head_dim, \
        arch["vocab_size"]


def weight_bytes(arch: dict, layers: int, dtype_bytes: int = 2) -> int:
    """Bytes of a Llama-shaped model's weights with ``layers`` decoder layers (embedding and LM head untied unless
    ``tie_word_embeddings``)."""
    hidden, inter, heads, kv_heads, head_dim, vocab = _shape(arch)
    layer = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * inter + 2 * hidden
    embed = vocab * hidden * (1 if arch.get("tie_word_embeddings") else 2)
    return (layers * layer + embed + hidden) * dtype_bytes


def estimate_bytes(arch: dict, layers: int, batch: int, length: int, chunk: int = 0, dtype_bytes: int = 2) -> int:
    """A rough peak: weights, the KV cache of ``length`` tokens, and the prefill's transient activations of one
    layer over ``batch x chunk`` tokens (the MLP's three ``intermediate_size`` tensors and a few hidden-size ones;
    ``chunk`` 0: the whole prompt at once)."""
    hidden, inter, heads, kv_heads, head_dim, _ = _shape(arch)
    tokens = batch * (min(chunk, length) if chunk else length)
    transient = tokens * (3 * inter + 6 * hidden) * dtype_bytes
    return weight_bytes(arch, layers, dtype_bytes) + kv_cache_bytes(layers, batch, kv_heads, length, head_dim,
                                                                     dtype_bytes) + transient


def decode_tokens(args) -> int:
    """Decode tokens drawn per case, for which its KV cache has room after the prompt: the longest run of steps
    (timed, warm-up, check, profiled)."""
    return max(args.steps, args.warmup, args.check_steps, args.profile_steps if args.profile else 0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3_8b", help="a conf/model name with an architecture block")
    ap.add_argument("--layers", type=int, help="decoder layers to keep (default: all of the model's)")
    ap.add_argument("--prompts", type=int, nargs="+", default=[32768, 131072], help="prompt lengths (tokens)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=32, help="timed one-token decode steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before each timed loop")
    ap.add_argument("--check-steps", type=int, default=3, help="steps of the dense = sparse@every-block check")
    ap.add_argument("--budget", type=int, default=2048, help="sparse decode token budget per KV head")
    ap.add_argument("--block-size", type=int, default=64, help="decode gate block size")
    ap.add_argument("--selection", choices=["gate", "quest"], default="gate",
                    help="what scores the blocks of a sparse step: random decode gates, or Quest's key bounds alone "
                         "(training-free, no decode gates: seer.model.decode.attach_quest_decode)")
    ap.add_argument("--estimate", default="quest", choices=["quest", "quest_mass", "moments"],
                    help="--selection quest: the training-free estimate (DecodeSparsityConfig.estimate)")
    ap.add_argument("--rerank-blocks", type=int, default=0,
                    help="the budget's top blocks by the estimate ranked again by their own keys "
                         "(DecodeSparsityConfig.rerank_blocks; 0: none)")
    ap.add_argument("--cache", choices=["reserved", "dynamic"], default="reserved",
                    help="KV cache of the eager steps: preallocated views (reserved) or transformers' torch.cat "
                         "DynamicCache (dynamic); --graph uses a StaticCache")
    ap.add_argument("--graph", action="store_true",
                    help="decode steps as CUDA-graph replays of one captured step over a StaticCache (see above)")
    ap.add_argument("--compile-gate", action="store_true",
                    help="sparse runs with DecodeSparsityConfig(compile=True): the per-layer gate and selection "
                         "work through torch.compile (compiled by the first eager steps)")
    ap.add_argument("--profile", help="--graph: also profile the timed CUDA-graph replays at --budget of the first "
                    "case (torch.profiler; the CUDA kernels by their total time) and write the table here")
    ap.add_argument("--profile-steps", type=int, default=4, help="replays the profile covers")
    ap.add_argument("--prefill-chunk", type=int, default=0,
                    help="prefill in pieces of this many tokens (0: the whole prompt in one forward)")
    ap.add_argument("--mem-limit-gib", type=float, default=130.0, help="skip combinations estimated above this")
    ap.add_argument("--tol", type=float, default=0.05, help="relative L2 error allowed in the correctness check")
    ap.add_argument("--out", help="write the markdown report here (else print it only)")
    args = ap.parse_args(argv)
    for name in ("steps", "warmup", "check_steps", "budget", "prefill_chunk", "profile_steps"):
        if getattr(args, name) < (1 if name in ("steps", "budget", "profile_steps") else 0):
            ap.error(f"--{name.replace('_', '-')}={getattr(args, name)} is too small")
    if args.layers is not None and args.layers < 1:
        ap.error(f"--layers={args.layers} must be >= 1")
    if min(args.prompts) < 2 or min(args.batch) < 1:
        ap.error(f"--prompts {args.prompts} / --batch {args.batch}: need prompts >= 2 and batch >= 1")
    return args


def model_config(name: str, layers: int | None, dtype: str = "bfloat16"):
    """The ``ModelConfig`` of ``conf/model/<name>.yaml`` with random weights, ``layers`` decoder layers."""
    from seer.config import compose, validate

    run = validate(compose([f"model={name}", "model.random_init=true", f"model.dtype={dtype}"]))
    if run.model.architecture is None:
        raise SystemExit(f"--model {name}: conf/model/{name}.yaml has no architecture block")
    if layers is not None:
        run.model.architecture = {**run.model.architecture, "num_hidden_layers": layers}
    return run.model


def build_model(mcfg, device, block_size: int = 64, selection: str = "gate"):
    """The random-weight model on ``device`` with the ``"seer"`` attention function and random decode gates
    (``selection="quest"``: none, Quest's key bounds score the blocks)."""
    from seer.gates.decode_config import DecodeGateConfig
    from seer.model.attention import prepare_model
    from seer.model.decode import attach_decode_gates, attach_quest_decode
    from seer.model.loading import load_causal_lm

    torch.manual_seed(0)
    model = load_causal_lm(mcfg, device)
    model.config.use_cache = True
    prepare_model(model, block_size)
    if selection == "quest":
        attach_quest_decode(model, block_size)
    else:
        attach_decode_gates(model, DecodeGateConfig(block_size=block_size))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_cache(kind: str, capacity: int):
    """A transformers DynamicCache; ``reserved``: its layers keep ``capacity`` tokens allocated at their first update
    and return views of the filled part (no per-step concatenation)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    class ReservedLayer(DynamicLayer):
        def lazy_initialization(self, key_states, value_states):
            super().lazy_initialization(key_states, value_states)
            b, h, _, d = key_states.shape
            self.k_buf = key_states.new_empty(b, h, capacity, d)
            self.v_buf = value_states.new_empty(b, h, capacity, value_states.shape[-1])
            self.keys, self.values = self.k_buf[:, :, :0], self.v_buf[:, :, :0]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, t = self.keys.shape[-2], key_states.shape[-2]
            if n + t > capacity:
                raise ValueError(f"reserved KV cache: {n} + {t} tokens exceed its capacity {capacity}")
            self.k_buf[:, :, n:n + t].copy_(key_states)
            self.v_buf[:, :, n:n + t].copy_(value_states)
            self.keys, self.values = self.k_buf[:, :, :n + t], self.v_buf[:, :, :n + t]
            return self.keys, self.values

    cache = DynamicCache()
    if kind == "reserved":
        cache.layer_class_to_replicate = ReservedLayer
    return cache


def copy_key_cache(cache):
    """A copy of a :class:`~seer.model.decode_cache.DecodeKeyCache` that later steps of either do not change (the
    gates shared)."""
    return cache.clone()


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _timed_steps(n: int, step, cuda: bool, keep: bool) -> tuple[float, list[torch.Tensor]]:
    """``n`` calls ``step(i)`` (each returning logits ``[B, T, V]``): milliseconds (CUDA events on a GPU, else wall
    time) and, with ``keep``, each step's last-position float32 logits."""
    logits = []
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for i in range(n):
        out = step(i)
        if keep:
            logits.append(out[:, -1].float())
    if cuda:
        end.record()
        end.synchronize()
        return start.elapsed_time(end), logits
    return (time.perf_counter() - t0) * 1e3, logits


@torch.no_grad()
def decode_steps(model, cache, ids: torch.Tensor, n: int, keep: bool = False) -> tuple[float, list[torch.Tensor]]:
    """Runs ``n`` one-token steps (token ``ids[i]``, ``[B, 1]``) over ``cache``: milliseconds (CUDA events on a GPU,
    else wall time) and, with ``keep``, each step's float32 logits."""
    return _timed_steps(n, lambda i: model(input_ids=ids[i], past_key_values=cache, use_cache=True).logits,
                        ids.is_cuda, keep)


@torch.no_grad()
def prefill(model, cache, ids: torch.Tensor, chunk: int = 0) -> None:
    """A dense prefill of ``ids [B, N]`` into ``cache`` (whole, or ``chunk`` tokens at a time)."""
    step = chunk or ids.shape[1]
    for first in range(0, ids.shape[1], step):
        model(input_ids=ids[:, first:first + step], past_key_values=cache, use_cache=True, logits_to_keep=1)


def replay_steps(step: GraphStep, ids: torch.Tensor, n: int, keep: bool = False) -> tuple[float, list[torch.Tensor]]:
    """``n`` replays of ``step`` (token ``ids[i]`` copied into its static input before replay ``i``): milliseconds
    (CUDA events on a GPU, else wall time) and, with ``keep``, each step's float32 logits."""
    def one(i: int) -> torch.Tensor:
        step.ids.copy_(ids[i])
        step.replay()
        return step.logits

    return _timed_steps(n, one, ids.is_cuda, keep)


def profile_replays(step: GraphStep, ids: torch.Tensor, args) -> None:
    """``--profile``: ``--profile-steps`` replays of a timed ``step`` (token ``ids[i]`` before replay ``i``) under
    torch.profiler, so exactly the kernels a timed replay runs (the compiled gate's with ``--compile-gate``); the
    kernels by total device time (on the CPU, where a replay runs the step eagerly: the ops by total CPU time) written
    to ``--profile``."""
    from torch.profiler import ProfilerActivity, profile

    cuda = ids.is_cuda
    _sync(ids.device)
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        replay_steps(step, ids, args.profile_steps)
        _sync(ids.device)
    table = prof.key_averages().table(sort_by="self_device_time_total" if cuda else "cpu_time_total", row_limit=30,
                                      max_name_column_width=90)
    gate = "through torch.compile (--compile-gate)" if getattr(args, "compile_gate", False) else "eager PyTorch"
    with open(args.profile, "w") as f:
        f.write(f"{args.profile_steps} CUDA-graph replays of the sparse decode step at a budget of {args.budget} "
                f"tokens (gate and selection {gate})\n\n{table}\n")
    print(table, flush=True)


def kernel_dense_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, *, blocks: torch.Tensor, block_size: int, kernel: str,
                           position_ids: torch.Tensor, **kwargs):
    """The ``kernel dense`` baseline's attention function (transformers' AttentionInterface signature): a one-token
    decode step over a StaticCache (``key``/``value [B, Hkv, max_cache_len, D]``) through our decode kernel
    (``kernel``: ``triton``, or the PyTorch ``reference``) listing ``blocks``, every block of the cache, for each row
    and KV head; a row's length is its position + 1, on the device (transformers derives ``position_ids`` from the
    cache's length). No decode gate, compressed-K cache or block selection. The lists name each block once, so the
    kernel skips its repeat check (``unique_blocks``), as sparse decode's steps do. Returns
    ``([B, 1, Hq, D], None)``."""
    if kernel == "triton":
        from seer.kernels import block_sparse_decode as decode

        block_sparse_decode = functools.partial(decode, unique_blocks=True)
    else:
        from seer.kernels.reference import block_sparse_decode

    b, _, t, _ = query.shape
    if t != 1 or blocks.numel() * block_size < key.shape[2]:
        raise ValueError(f"the kernel dense baseline attends one-token steps over {blocks.numel()} blocks of "
                         f"{block_size}; got {t} queries over {key.shape[2]} keys")
    seqlens = (position_ids[:, -1].expand(b) + 1).to(torch.int32)
    out = block_sparse_decode(query, key, value, blocks.expand(b, key.shape[1], -1), seqlens, block_size, scaling,
                              validate=False)[0]
    return out.transpose(1, 2), None


@contextlib.contextmanager
def kernel_dense(model, cache, kernel: str) -> Iterator[None]:
    """Inside the block ``model`` attends through :func:`kernel_dense_attention` (registered with the ``"seer"``
    mask function, the sparse steps' one) listing every block of ``cache`` (a StaticCache; blocks of the decode
    gates' size); its attention function is restored when it ends. Switch sparse decode off first."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    from seer.model.attention import seer_mask

    bs = model.seer_decode.block_size
    blocks = torch.arange(-(-cache.layers[0].max_cache_len // bs), dtype=torch.int32, device=model.device)
    AttentionInterface.register(KERNEL_DENSE_ATTENTION, functools.partial(kernel_dense_attention, blocks=blocks,
                                                                          block_size=bs, kernel=kernel))
    ALL_MASK_ATTENTION_FUNCTIONS.register(KERNEL_DENSE_ATTENTION, seer_mask)
    before = model.config._attn_implementation
    model.set_attn_implementation(KERNEL_DENSE_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def _rel_err(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max([((a - b).norm() / b.norm()).item() for a, b in zip(got, want)], default=0.0)


@dataclasses.dataclass
class PrefilledCase:
    """One (prompt, batch) after its prefill: the random prompt's decode tokens ``steps [extra, B, 1]``, the budgets
    (``every`` block of every step, and ``--budget``), the KV ``cache`` and a copy of the compressed-K cache as the
    prefill left it."""
    ctx: object
    cuda: bool
    steps: torch.Tensor
    every: object
    budget: object
    cache: object
    prefill_s: float
    after_prefill: object
    key_cache_mib: float


def prefilled_case(model, batch: int, prompt: int, args, device, kernel: str, make_kv_cache) -> PrefilledCase:
    """Random prompt and decode tokens (seeded by the case), then one prefill into ``make_kv_cache(prompt + steps)``
    with sparse decode on, which fills the compressed-K cache; the peak-memory counter starts before it."""
    from seer.sparsity.decode import DecodeSparsityConfig

    ctx = model.seer_decode
    cuda = torch.device(device).type == "cuda"
    g = torch.Generator(device=device).manual_seed(prompt * 16 + batch)
    vocab = model.config.vocab_size
    ids = torch.randint(vocab, (batch, prompt), device=device, generator=g)
    extra = decode_tokens(args)
    steps = torch.randint(vocab, (extra, batch, 1), device=device, generator=g)
    bs = ctx.block_size
    compiled = getattr(args, "compile_gate", False)
    scored = {"estimate": getattr(args, "estimate", "quest"), "estimate_weight": 1.0} if not ctx.gated else {}
    every = DecodeSparsityConfig(token_budget=-(-(prompt + extra) // bs) * bs, compile=compiled, **scored)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    cache = make_kv_cache(prompt + extra)
    ctx.enable(every, kernel)
    _sync(device)
    t0 = time.perf_counter()
    prefill(model, cache, ids, args.prefill_chunk)
    _sync(device)
    prefill_s = time.perf_counter() - t0
    budget = DecodeSparsityConfig(token_budget=args.budget, compile=compiled,
                                  rerank_blocks=getattr(args, "rerank_blocks", 0), **scored)
    return PrefilledCase(ctx, cuda, steps, every, budget, cache, prefill_s, copy_key_cache(ctx.cache),
                         (ctx.cache.memory_bytes() + ctx.cache.bounds_memory_bytes()) / 2**20)


@torch.no_grad()
def bench_case_graph(model, batch: int, prompt: int, args, device, kernel: str = "triton") -> dict:
    """One (prompt, batch) with ``--graph``: decode steps as CUDA-graph replays over a StaticCache (see the module
    docstring)."""
    from transformers import StaticCache

    bs = model.seer_decode.block_size
    # room for the steps, rounded up to whole blocks (aligned rows for SDPA's mask and the kernel); the compressed-K
    # cache is sized for it
    case = prefilled_case(model, batch, prompt, args, device, kernel,
                          lambda length: StaticCache(config=model.config, max_cache_len=-(-length // bs) * bs))
    ctx, cuda, steps, every, budget, cache = case.ctx, case.cuda, case.steps, case.every, case.budget, case.cache
    prefill_s, after_prefill, key_cache_mib = case.prefill_s, case.after_prefill, case.key_cache_mib
    problems = []

    def reset() -> None:  # the KV cache back to the prompt and, with sparse decode on, the compressed-K cache too
        rewind(cache, prompt)
        if ctx.cache is not None:
            ctx.cache.copy_(after_prefill)

    def sparse(config) -> None:
        ctx.enable(config, kernel)
        ctx.cache = after_prefill.clone()

    def check_position(n: int) -> None:  # did the replays advance the sequence by one token each?
        length = int(cache.layers[0].cumulative_length)
        seqlens = ctx.cache.seqlens[min(ctx.gates)].tolist() if ctx.cache is not None else [prompt + n] * batch
        if length != prompt + n or seqlens != [prompt + n] * batch:
            problems.append(f"after {n} replays the KV cache holds {length} tokens and the compressed-K cache "
                            f"{seqlens}, not {prompt + n}")

    def timed(step: GraphStep) -> float:
        reset()
        replay_steps(step, steps, args.warmup)
        reset()
        ctx.reset_density()
        ms, _ = replay_steps(step, steps, args.steps)
        check_position(args.steps)
        return ms

    # dense: transformers' SDPA over the StaticCache; the eager steps are the reference
    def eager_reference(n: int) -> list[torch.Tensor]:  # n eager steps' logits, after n untimed ones (tuning)
        reset()
        decode_steps(model, cache, steps, n)
        reset()
        return decode_steps(model, cache, steps, n, keep=True)[1]

    ctx.disable()
    want = eager_reference(args.check_steps)
    step = GraphStep(model, cache, steps[0], reset, args.warmup)
    _, dense_graph = replay_steps(step, steps, args.check_steps, keep=True)
    graph_errs = {"dense": _rel_err(dense_graph, want)}
    dense_ms = timed(step)
    del step
    # our kernel listing every block, no gate (sparse decode off: no compressed-K cache either): against dense, timed
    with kernel_dense(model, cache, kernel):
        eager = eager_reference(args.check_steps)
        step = GraphStep(model, cache, steps[0], reset, args.warmup)
        _, got = replay_steps(step, steps, args.check_steps, keep=True)
        graph_errs["kernel dense"] = _rel_err(got, eager)
        kernel_dense_err = max(_rel_err(got, want), _rel_err(eager, want))
        kernel_dense_ms = timed(step)
        del step
    if kernel_dense_err > args.tol:
        problems.append(f"the kernel's dense decode (every block, no gate) against dense: relative error "
                        f"{kernel_dense_err:.3g} (--tol {args.tol})")
    # sparse decode with a budget of every block (the gate runs): the eager steps and the replays against dense
    sparse(every)
    eager = eager_reference(args.check_steps)
    step = GraphStep(model, cache, steps[0], reset, args.warmup)
    ctx.reset_density()
    _, got = replay_steps(step, steps, args.check_steps, keep=True)
    full_density = ctx.mean_density() if args.check_steps else 1.0
    graph_errs["every block"] = _rel_err(got, eager)
    err = max(_rel_err(got, want), _rel_err(eager, want))
    full_ms = timed(step)
    del step
    # sparse decode at the budget: one eager step (the reference of the first replay), capture, time
    sparse(budget)
    eager = eager_reference(1)
    step = GraphStep(model, cache, steps[0], reset, args.warmup)
    _, got = replay_steps(step, steps, 1, keep=True)
    graph_errs["budget"] = _rel_err(got, eager)
    sparse_ms = timed(step)
    density = ctx.mean_density()
    if args.profile and not getattr(args, "_profiled", False):
        reset()
        profile_replays(step, steps, args)
        args._profiled = True
    del step
    ctx.disable()
    graph_err = max(graph_errs["kernel dense"], graph_errs["every block"], graph_errs["budget"])  # ours, not SDPA
    check_ok = err <= args.tol and abs(full_density - 1.0) <= 1e-6 and graph_err <= GRAPH_TOL \
        and graph_errs["dense"] <= args.tol and not problems
    if not check_ok:  # reported, and the run exits 1 at the end; the timings are still measured
        print(f"CHECK FAILED: prompt {prompt}, batch {batch}: sparse decode over every block against dense: "
              f"relative error {err:.3g} (--tol {args.tol}), density {full_density:.4f} (want 1); CUDA-graph "
              f"replays against eager steps: {', '.join(f'{k} {v:.3g}' for k, v in graph_errs.items())} "
              f"(want <= {GRAPH_TOL}; dense, transformers' SDPA, <= --tol); {'; '.join(problems)}",
              flush=True)
    peak = torch.cuda.max_memory_allocated(device) / GIB if cuda else float("nan")
    tokens = batch * args.steps
    return dict(prompt=prompt, batch=batch, prefill_s=prefill_s, check_err=err, check_ok=check_ok,
                graph_err=graph_err, dense_graph_err=graph_errs["dense"], dense_ms=dense_ms / args.steps,
                kernel_dense_ms=kernel_dense_ms / args.steps, kernel_dense_err=kernel_dense_err,
                full_ms=full_ms / args.steps, sparse_ms=sparse_ms / args.steps, dense_tps=tokens / dense_ms * 1e3,
                sparse_tps=tokens / sparse_ms * 1e3, speedup=dense_ms / sparse_ms,
                speedup_best=min(dense_ms, kernel_dense_ms) / sparse_ms, density=density, peak_gib=peak,
                key_cache_mib=key_cache_mib)


def bench_case(model, batch: int, prompt: int, args, device, kernel: str = "triton") -> dict:
    """One (prompt, batch): prefill, check, dense and sparse timed loops (see the module docstring)."""
    if getattr(args, "graph", False):
        row = bench_case_graph(model, batch, prompt, args, device, kernel)
        gc.collect()  # the StaticCache and the graphs' memory pools
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        return row
    case = prefilled_case(model, batch, prompt, args, device, kernel, lambda length: make_cache(args.cache, length))
    ctx, cuda, steps, every, budget, cache = case.ctx, case.cuda, case.steps, case.every, case.budget, case.cache
    prefill_s, after_prefill, key_cache_mib = case.prefill_s, case.after_prefill, case.key_cache_mib

    def sparse(config) -> None:
        ctx.enable(config, kernel)
        ctx.cache = copy_key_cache(after_prefill)

    sparse(every)
    _, got = decode_steps(model, cache, steps, args.check_steps, keep=True)
    full_density = ctx.mean_density() if args.check_steps else 1.0
    rewind(cache, prompt)
    ctx.disable()
    _, want = decode_steps(model, cache, steps, args.check_steps, keep=True)
    rewind(cache, prompt)
    err = max([((a - b).norm() / b.norm()).item() for a, b in zip(got, want)], default=0.0)
    check_ok = err <= args.tol and abs(full_density - 1.0) <= 1e-6
    if not check_ok:  # reported, and the run exits 1 at the end; the timings are still measured
        print(f"CHECK FAILED: prompt {prompt}, batch {batch}: sparse decode over every block against dense: "
              f"relative error {err:.3g} (--tol {args.tol}), density {full_density:.4f} (want 1)", flush=True)

    decode_steps(model, cache, steps, args.warmup)  # dense
    rewind(cache, prompt)
    dense_ms, _ = decode_steps(model, cache, steps, args.steps)
    rewind(cache, prompt)

    sparse(budget)
    decode_steps(model, cache, steps, args.warmup)  # compiles and tunes the kernel on the first case
    rewind(cache, prompt)
    sparse(budget)
    sparse_ms, _ = decode_steps(model, cache, steps, args.steps)
    density = ctx.mean_density()
    rewind(cache, prompt)
    ctx.disable()
    peak = torch.cuda.max_memory_allocated(device) / GIB if cuda else float("nan")
    del cache
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    tokens = batch * args.steps
    return dict(prompt=prompt, batch=batch, prefill_s=prefill_s, check_err=err, check_ok=check_ok,
                dense_ms=dense_ms / args.steps, sparse_ms=sparse_ms / args.steps, dense_tps=tokens / dense_ms * 1e3,
                sparse_tps=tokens / sparse_ms * 1e3, speedup=dense_ms / sparse_ms, density=density, peak_gib=peak,
                key_cache_mib=key_cache_mib)


def report(rows: list[dict], skipped: list[str], info: dict, args, layers: int, cmd: str) -> str:
    from seer.kernels.bench import fmt

    graph = getattr(args, "graph", False)
    if graph:
        how = (f"{args.steps} one-token steps of the whole model (LM head included, no sampling) as replays of one "
               f"step captured in a CUDA graph over a StaticCache (rewound in place to the prompt between runs), "
               f"timed with CUDA events, after {args.warmup} warm-up replays; dense and sparse decode the same tokens "
               "over the same KV cache. Tokens/s = batch x steps / time. No host overhead: the GPU's time. `dense`: "
               "transformers' SDPA over the StaticCache (its mask makes SDPA repeat K/V per query head); `kernel "
               "dense`: our decode kernel listing every block of the cache, no decode gate, compressed-K update or "
               "top-k; `kernel@1.0`: sparse decode at a budget of every block (the kernel over every block plus the "
               "gate, compressed-K update and top-k of each layer and step); `vs best`: sparse against the faster of "
               "`dense` and `kernel dense`. `check`: relative L2 error of `kernel@1.0` against dense, `kernel dense "
               f"check` that of `kernel dense` (eager steps and replays), {args.check_steps} steps (bf16; at most "
               f"--tol {args.tol}); `graph`: CUDA-graph replays of ours (kernel dense, kernel@1.0, budget) against "
               f"the same eager steps (at most {GRAPH_TOL}); `dense graph`: the same for transformers' SDPA step, "
               "whose replays differ from its eager steps by bf16 rounding at batch 8 (at most --tol).")
    else:
        how = (f"{args.steps} one-token steps of the whole model (LM head included, no sampling) timed with CUDA "
               f"events around an eager loop, after {args.warmup} warm-up steps; dense and sparse decode the same "
               f"tokens over the same KV cache (`{args.cache}` cache; rewound to the prompt between runs). Tokens/s "
               "= batch x steps / time. The times include the model's host overhead (Python, launches; the sparse "
               "path adds the gate, the compressed-K update, the top-k and the block list per layer). `check`: "
               f"relative L2 error of sparse decode over every block against dense, {args.check_steps} steps "
               "(bf16).")
    compiled = ("; the gate, compressed-K update and block selection of each layer's step through torch.compile "
                "(inductor; `--compile-gate`, compiled by the first eager steps of each case and budget)"
                if getattr(args, "compile_gate", False) else "")
    lines = [f"Device: {info['device']}; torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, "
             f"transformers {info['transformers']}, Python {info['python']}; {info['date']}.", "",
             f"Command: `{cmd}`", "",
             f"`{args.model}` shape with random weights, {layers} decoder layers, bf16, "
             + ("random decode gates" if getattr(args, "selection", "gate") == "gate" else
                f"the training-free estimate `{getattr(args, 'estimate', 'quest')}` alone (no decode gates; "
                "`compressed K` is the key bounds, or for `moments` the keys' float32 moments instead)")
             + (f", reranked over its top {args.rerank_blocks} blocks by their keys"
                if getattr(args, "rerank_blocks", 0) else "")
             + f" (block {args.block_size}), sparse decode at a token budget of {args.budget} per KV head (Triton "
             f"kernel{compiled}). Per (prompt, batch): one dense prefill, then {how}", "",
             "| prompt | batch | dense ms/step | dense tok/s | sparse ms/step | sparse tok/s | speedup | density "
             "| compressed K (MiB) | peak mem (GiB) | prefill (s) | check |"
             + (" kernel dense ms/step | kernel dense check | kernel@1.0 ms/step | vs best | graph | dense graph |"
                if graph else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|---|---|---|" if graph else "")]
    for r in rows:
        line = (f"| {r['prompt'] // 1024}k | {r['batch']} | {fmt(r['dense_ms'], 2)} | {fmt(r['dense_tps'], 1)} "
                f"| {fmt(r['sparse_ms'], 2)} | {fmt(r['sparse_tps'], 1)} | {r['speedup']:.2f}x "
                f"| {fmt(r['density'], 3)} | {fmt(r['key_cache_mib'], 1)} | {fmt(r['peak_gib'], 1)} "
                f"| {fmt(r['prefill_s'], 1)} | {r['check_err']:.1e}{'' if r['check_ok'] else ' FAILED'} |")
        if graph:
            line += (f" {fmt(r['kernel_dense_ms'], 2)} | {r['kernel_dense_err']:.1e} | {fmt(r['full_ms'], 2)} "
                     f"| {r['speedup_best']:.2f}x | {r['graph_err']:.1e} | {r['dense_graph_err']:.1e} |")
        lines.append(line)
    lines += [""] + [f"Skipped: {s}" for s in skipped]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_decode_model.py needs a CUDA GPU (none found)")
    import transformers

    from seer.kernels.bench import env_info

    mcfg = model_config(args.model, args.layers)
    arch = mcfg.architecture
    layers = arch["num_hidden_layers"]
    _, _, _, kv_heads, head_dim, _ = _shape(arch)
    extra = decode_tokens(args)
    cases, skipped = [], []
    for prompt in args.prompts:
        for batch in args.batch:
            kv = kv_cache_bytes(layers, batch, kv_heads, prompt + extra, head_dim)
            need = estimate_bytes(arch, layers, batch, prompt + extra, args.prefill_chunk)
            if need > args.mem_limit_gib * GIB:
                skipped.append(f"prompt {prompt}, batch {batch}: KV cache {kv / GIB:.1f} GiB, estimated peak "
                               f"{need / GIB:.1f} GiB > {args.mem_limit_gib:g} GiB")
                print(skipped[-1], flush=True)
            else:
                cases.append((prompt, batch))
    device = torch.device("cuda")
    if args.compile_gate:  # one compiled graph per case (shape) and budget, kept for the whole run
        import torch._dynamo as dynamo

        dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 8 * len(cases) + 8)
    model = build_model(mcfg, device, args.block_size, args.selection)
    print(f"{args.model}: {layers} layers, weights {torch.cuda.memory_allocated() / GIB:.1f} GiB", flush=True)
    rows = []
    for prompt, batch in cases:
        rows.append(bench_case(model, batch, prompt, args, device))
        r = rows[-1]
        graph = f", kernel dense {r['kernel_dense_ms']:.2f} ms/step (check {r['kernel_dense_err']:.1e}), kernel@1.0 " \
            f"{r['full_ms']:.2f} ms/step, {r['speedup_best']:.2f}x against the faster dense, graph vs eager " \
            f"{r['graph_err']:.1e}" if args.graph else ""
        print(f"prompt {prompt} batch {batch}: dense {r['dense_ms']:.2f} ms/step ({r['dense_tps']:.1f} tok/s), "
              f"sparse {r['sparse_ms']:.2f} ms/step ({r['sparse_tps']:.1f} tok/s), {r['speedup']:.2f}x, density "
              f"{r['density']:.3f}, peak {r['peak_gib']:.1f} GiB, prefill {r['prefill_s']:.1f} s, check "
              f"{r['check_err']:.1e}{graph}", flush=True)
    info = {**env_info(), "transformers": transformers.__version__}
    cmd = "python experiments/bench_decode_model.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = report(rows, skipped, info, args, layers, cmd)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    if not all(r["check_ok"] for r in rows):
        sys.exit("the correctness check failed (see the rows marked FAILED)")


if __name__ == "__main__":
    main()
