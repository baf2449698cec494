"""Benchmark of batched block-sparse prefill over packed prompts (:func:`seer.kernels.block_sparse_attn_varlen`)
against the same prompts one by one, dense varlen attention and the authors' varlen GQA kernel (issue 19, part 4).

Its run on one H200 (2026-12-04) is ``docs/bench_varlen.md``.

Shape: the 8B model's attention (32 query / 8 KV heads, D 128, bf16), a batch of prompts of mixed lengths packed
in one row (default 2k, 4k, 6k, 8k, 12k, 16k, 24k, 32k tokens; ``--lens``), 64-token blocks, one random block mask
per prompt and KV head at ``--density`` (default 0.1: each query-block row keeps its share of its causal blocks,
the diagonal always among them, the others at random; :func:`seer.sparsity.topk_mask` on random scores). Times
(forward unless said):

* ``batched``: ours, the packed row in one call (``cu_seqlens`` and the lengths on the host, ``seqlens=``, so no
  device sync; the block index build included); ``batched, cu_seqlens read`` the same without ``seqlens`` (the
  offsets read on the host: one sync, after which the GPU idles while the host builds the index and launches);
* ``one by one``: ours, :func:`seer.kernels.block_sparse_attn` on each prompt in turn (the sum: one timed loop);
* ``flex doc``: dense FlexAttention (``torch.compile``d) over the packed row with a document mask (causal within
  each prompt; ``create_block_mask``), GQA without repeating K/V;
* ``SDPA one by one``: dense causal SDPA on each prompt in turn (GQA);
* ``release``: the authors' varlen GQA kernel (``seer_attn/kernels/varlen/block_sparse_attn_varlen_gqa.py``,
  microsoft/SeerAttention, loaded by ``experiments/release_kernels.py`` with ``--release-dir``) on the same masks,
  converted outside the timed region to its format (one row of key blocks per query *token*, per KV head:
  ``[S, Hkv, longest, nb]``, :func:`release_mask`);
* ``batched fwd+bwd`` / ``one by one fwd+bwd``: ours with gradients in q, k, v (the Triton backward).

Ratios (time of the other / time of ``batched``): one by one (goal >= 1: no slower), dense varlen (the faster of
flex doc and SDPA one by one), release (goal >= 1.3).

Before timing, on the GPU: ours batched against :func:`seer.kernels.reference.block_sparse_attn_varlen` (float32
reference on bf16 inputs; odd lengths and a one-token prompt; forward and the gradients of q, k, v), each prompt
one by one against its slice of the batched output, the release kernel against the reference, and the two dense
baselines against each other. Timing: :func:`seer.kernels.bench.ms` (``triton.testing.do_bench``: warm-up, L2
cleared before each CUDA-event-timed run; median of at least 5 runs of about ``--rep-ms``). The whole run takes
well under two minutes on an H200 (most of it FlexAttention's compile; ``--no-flex`` skips it).

    python experiments/bench_varlen.py --out docs/bench_varlen.md --release-dir .assets/release
    python experiments/bench_varlen.py --lens 1000 3000 33000 --density 0.2
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from seer.kernels import block_sparse_attn, block_sparse_attn_varlen, reference
from seer.kernels.bench import env_info, fmt, ms, publish
from seer.sparsity import topk_mask

DEV = "cuda"
HQ, HKV, D, BLOCK = 32, 8, 128, 64
LENS = [2048, 4096, 6144, 8192, 12288, 16384, 24576, 32768]
CHECK_LENS = [1, 100, 64, 1000, 2100]


def packed_inputs(lens: list[int], seed: int = 0, device: str = DEV):
    """``q [T, HQ, D]``, ``k``/``v [T, HKV, D]`` bf16 and int32 ``cu_seqlens`` of prompts of ``lens`` packed."""
    g = torch.Generator(device=device).manual_seed(seed)
    t = sum(lens)
    q, k, v = (torch.randn(t, h, D, device=device, generator=g, dtype=torch.bfloat16) for h in (HQ, HKV, HKV))
    cu_seqlens = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, cu_seqlens


def random_masks(lens: list[int], density: float, seed: int = 0, device: str = DEV) -> torch.Tensor:
    """One random block mask per prompt and KV head at ``density`` (diagonal kept), packed as the varlen kernel
    reads them: bool ``[S, HKV, nb, nb]``, prompt ``s`` in its top-left ``ceil(len_s / BLOCK)`` square."""
    g = torch.Generator(device=device).manual_seed(seed)
    nb = -(-max(lens) // BLOCK)
    packed = torch.zeros(len(lens), HKV, nb, nb, dtype=torch.bool, device=device)
    for s, n in enumerate(lens):
        seq_nb = -(-n // BLOCK)
        scores = torch.rand(1, HKV, seq_nb, seq_nb, device=device, generator=g)
        packed[s, :, :seq_nb, :seq_nb] = topk_mask(scores, density)[0]
    return packed


def density_of(mask: torch.Tensor, lens: list[int]) -> float:
    """Kept share of the prompts' causal blocks."""
    kept = total = 0
    for s, n in enumerate(lens):
        seq_nb = -(-n // BLOCK)
        kept += int(mask[s, :, :seq_nb, :seq_nb].tril().sum())
        total += mask.shape[1] * seq_nb * (seq_nb + 1) // 2
    return kept / total


def release_mask(mask: torch.Tensor, lens: list[int]) -> torch.Tensor:
    """Our packed block masks in the release kernel's format: one row of key blocks per query token, ``[S, Hkv,
    longest, nb]`` (token ``t`` of a prompt reads the row of its block, ``t // BLOCK``)."""
    return mask.repeat_interleave(BLOCK, dim=2)[:, :, :max(lens)].contiguous()


def prompts(x: torch.Tensor, lens: list[int]) -> list[torch.Tensor]:
    """Each prompt's ``[1, H, n, D]`` slice of a packed ``[T, H, D]`` tensor (contiguous copies)."""
    out, start = [], 0
    for n in lens:
        out.append(x[start:start + n].transpose(0, 1).unsqueeze(0).contiguous())
        start += n
    return out


def prompt_masks(mask: torch.Tensor, lens: list[int]) -> list[torch.Tensor]:
    """Each prompt's ``[1, HKV, nb_s, nb_s]`` block mask (contiguous copies)."""
    return [mask[s:s + 1, :, :-(-n // BLOCK), :-(-n // BLOCK)].contiguous() for s, n in enumerate(lens)]


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def check(release) -> None:
    """Ours (forward, gradients, one by one) and the release's kernel against the reference, on small prompts."""
    q, k, v, cu = packed_inputs(CHECK_LENS, seed=1)
    mask = random_masks(CHECK_LENS, 0.3, seed=1)
    ref_in = [x.float().requires_grad_() for x in (q, k, v)]
    ref_out, _ = reference.block_sparse_attn_varlen(*ref_in, cu, mask, BLOCK)
    ours_in = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, _ = block_sparse_attn_varlen(*ours_in, cu, mask, BLOCK)
    dout = torch.randn_like(out)
    out.backward(dout)
    ref_out.backward(dout.float())
    errors = {"out": relative_error(out, ref_out)}
    errors.update({f"d{name}": relative_error(a.grad, b.grad) for name, a, b in zip("qkv", ours_in, ref_in)})
    assert all(e < 2e-2 for e in errors.values()), f"ours disagrees with the reference: {errors}"
    with torch.no_grad():
        for s, (pq, pk, pv, pm) in enumerate(zip(prompts(q, CHECK_LENS), prompts(k, CHECK_LENS),
                                                 prompts(v, CHECK_LENS), prompt_masks(mask, CHECK_LENS))):
            alone, _ = block_sparse_attn(pq, pk, pv, pm, BLOCK)
            start = sum(CHECK_LENS[:s])
            piece = out[start:start + CHECK_LENS[s]].detach().transpose(0, 1).unsqueeze(0)
            assert relative_error(alone, piece) < 1e-2, f"prompt {s} alone differs from its batched slice"
        if release is not None:
            err = relative_error(release(q, k, v, cu, release_mask(mask, CHECK_LENS), max(CHECK_LENS)), ref_out)
            assert err < 2e-2, f"the release's varlen kernel disagrees with the reference: relative error {err:.3g}"
    print(f"GPU check against the reference: ok {errors}" + (", release ok" if release else ""), flush=True)


def release_fn(release_dir: str | None):
    """The release's varlen GQA forward as ``fn(q, k, v, cu_seqlens, mask in its format, longest)``; None without
    ``release_dir``."""
    if release_dir is None:
        return None
    from experiments import release_kernels
    mod = release_kernels.load(release_dir, "seer_attn.kernels.varlen.block_sparse_attn_varlen_gqa")

    def fn(q, k, v, cu_seqlens, mask, longest):
        out, _ = mod.blocksparse_flash_attn_varlen_fwd(q, k, v, cu_seqlens, cu_seqlens, longest, D ** -0.5, mask,
                                                       block_size=BLOCK)
        return out

    return fn


def flex_document(lens: list[int]):
    """Dense FlexAttention over the packed row with a causal document mask: ``fn(q, k, v)`` on ``[1, H, T, D]``."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    document = torch.repeat_interleave(torch.arange(len(lens), device=DEV), torch.tensor(lens, device=DEV))

    def causal_document(b, h, q_idx, kv_idx):
        return (document[q_idx] == document[kv_idx]) & (q_idx >= kv_idx)

    t = sum(lens)
    block_mask = create_block_mask(causal_document, None, None, t, t, device=DEV, _compile=True)  # not [T, T]
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask, enable_gqa=True)


def bench(args, release) -> dict:
    lens = args.lens
    q, k, v, cu = packed_inputs(lens, seed=args.seed)
    mask = random_masks(lens, args.density, seed=args.seed)
    pq, pk, pv, pm = prompts(q, lens), prompts(k, lens), prompts(v, lens), prompt_masks(mask, lens)
    times = {"density": density_of(mask, lens)}

    def one_by_one():
        for x in zip(pq, pk, pv, pm):
            block_sparse_attn(*x, BLOCK)

    def sdpa_one_by_one():
        return [F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True) for a, b, c in zip(pq, pk, pv)]

    times["batched"] = ms(lambda: block_sparse_attn_varlen(q, k, v, cu, mask, BLOCK, seqlens=lens),
                          rep_ms=args.rep_ms)
    times["batched_sync"] = ms(lambda: block_sparse_attn_varlen(q, k, v, cu, mask, BLOCK), rep_ms=args.rep_ms)
    times["one_by_one"] = ms(one_by_one, rep_ms=args.rep_ms)
    times["sdpa"] = ms(sdpa_one_by_one, rep_ms=args.rep_ms)
    times["flex"] = float("nan")
    if not args.no_flex:
        flex = flex_document(lens)
        q4, k4, v4 = (x.transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k, v))
        flex_out = flex(q4, k4, v4)[0].transpose(0, 1)
        err = relative_error(flex_out, torch.cat([o[0].transpose(0, 1) for o in sdpa_one_by_one()]))
        assert err < 2e-2, f"FlexAttention with the document mask disagrees with SDPA one by one: {err:.3g}"
        times["flex"] = ms(lambda: flex(q4, k4, v4), rep_ms=args.rep_ms)
        del q4, k4, v4, flex_out
    times["release"] = float("nan")
    if release is not None:
        converted = release_mask(mask, lens)
        times["release"] = ms(lambda: release(q, k, v, cu, converted, max(lens)), rep_ms=args.rep_ms)
        del converted
    grads = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    dout = torch.randn_like(q)

    def batched_fwd_bwd():
        out, _ = block_sparse_attn_varlen(*grads, cu, mask, BLOCK, seqlens=lens)
        out.backward(dout)

    prompt_grads = [[x.detach().clone().requires_grad_() for x in xs] for xs in zip(pq, pk, pv)]
    prompt_douts = prompts(dout, lens)

    def one_by_one_fwd_bwd():
        for (a, b, c), m, g in zip(prompt_grads, pm, prompt_douts):
            out, _ = block_sparse_attn(a, b, c, m, BLOCK)
            out.backward(g)

    times["batched_bwd"] = ms(batched_fwd_bwd, rep_ms=args.rep_ms)
    times["one_by_one_bwd"] = ms(one_by_one_fwd_bwd, rep_ms=args.rep_ms)
    return times


def report(times: dict, info: dict, args, cmd: str) -> str:
    batched = times["batched"]
    dense = min((x for x in (times["flex"], times["sdpa"]) if x == x), default=float("nan"))
    rows = [("ours batched (varlen, one call; lengths given on the host)", batched, None),
            ("ours batched, cu_seqlens read on the host (one sync)", times["batched_sync"], None),
            (f"ours one by one ({len(args.lens)} calls)", times["one_by_one"], "goal >= 1 (batched no slower)"),
            ("FlexAttention, document mask (dense)", times["flex"], None),
            (f"SDPA one by one (dense, {len(args.lens)} calls)", times["sdpa"], None),
            ("dense varlen (the faster of the two above)", dense, None),
            (f"release varlen GQA (commit {args.release_commit})", times["release"], "goal >= 1.3"),
            ("ours batched, forward + backward", times["batched_bwd"], None),
            ("ours one by one, forward + backward", times["one_by_one_bwd"], "vs batched forward + backward")]
    lines = [f"Device: {info['device']}; torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, "
             f"Python {info['python']}; {info['date']}.", "", f"Command: `{cmd}`", "",
             f"{HQ} query / {HKV} KV heads, D {D}, bf16, {BLOCK}-token blocks; {len(args.lens)} prompts of "
             f"{', '.join(f'{n / 1024:g}k' for n in args.lens)} tokens ({sum(args.lens)} in all) packed in one row; "
             f"random block masks per prompt and KV head at density {args.density} (diagonal kept; achieved "
             f"{times['density']:.3f} of the causal blocks). Times in ms (median of CUDA-event-timed runs); the ratio "
             "is the row's time over ours batched (the forward + backward rows: over ours batched forward + "
             "backward).", "",
             "| path | ms | ratio | |", "|---|---|---|---|"]
    for name, t, note in rows:
        base = times["batched_bwd"] if "backward" in name else batched
        ratio = "-" if t != t or t is batched else f"{t / base:.2f}x"
        lines.append(f"| {name} | {fmt(t, 3)} | {ratio} | {note or ''} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lens", type=int, nargs="+", default=LENS, help="prompt lengths in tokens")
    ap.add_argument("--density", type=float, default=0.1, help="share of each prompt's causal blocks kept")
    ap.add_argument("--rep-ms", type=float, default=100.0, help="about this many ms of timed runs per path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile is most of the run)")
    ap.add_argument("--release-dir", help="a copy of microsoft/SeerAttention holding seer_attn/ (see release_kernels)")
    ap.add_argument("--out", help="write the markdown table here (else print it)")
    args = ap.parse_args(argv)
    if min(args.lens) < 1 or not 0 < args.density <= 1:
        ap.error(f"--lens must be >= 1 and --density in (0, 1]; got {args.lens} and {args.density}")
    return args


def main() -> None:
    args = parse_args()
    args.release_commit = "-"
    if args.release_dir:
        from experiments import release_kernels
        args.release_commit = release_kernels.commit(args.release_dir)
    if not torch.cuda.is_available():
        sys.exit("bench_varlen.py needs a CUDA GPU (none is visible); --help lists its options")
    release = release_fn(args.release_dir)
    check(release)
    cmd = "python experiments/bench_varlen.py " + " ".join(sys.argv[1:])
    text = report(bench(args, release), env_info(), args, cmd)
    publish(text, args.out)


if __name__ == "__main__":
    main()
