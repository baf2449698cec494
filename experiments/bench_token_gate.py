"""Gate forward cost at prefill: the pooled gate against the token-query gate (``gate.q_tokens``), its chunked
PyTorch path and its Triton kernel (:mod:`seer.kernels.token_gate`).

One attention layer of Qwen2.5-Coder-0.5B by default (B 1, 14 query heads, 2 key/value heads, head dim 64, gate
hidden 128, block 64; Q and K in bfloat16, gate weights float32 as :func:`seer.model.attach_gates` leaves them), at
8k and 32k tokens, under ``torch.no_grad`` (inference). Rows per length:

* ``pooled``: the pooled gate (Q pooled avg+max+min, K max+min+avg: the Qwen recipe);
* ``token pytorch``: the token gate with :attr:`seer.gates.AttnGate.token_kernel` off (chunked scores);
* ``token kernel``: the token gate as inference runs it on CUDA (token queries in PyTorch, then the kernel);
* ``kernel only``: the kernel launch alone on precomputed token queries and gate keys (``tf32`` too for float32
  gates: the dots on tensor cores, not what the gate runs).

Before timing, the kernel path is checked against the PyTorch path (largest absolute difference of the finite
logits, and the -inf pattern; a mismatch stops the run). Times: :func:`seer.kernels.tuning.median_ms` (CUDA
events, L2 cleared before each run), per layer and times ``--layers`` (24: the model's layers). Prints a markdown
table with the device, versions, date and command; ``--out`` writes it too::

    python experiments/bench_token_gate.py --out docs/results/qwen/bench_token_gate.md
    python experiments/bench_token_gate.py --ns 8192,32768 --gate-dtype bfloat16
"""

from __future__ import annotations

import argparse
import sys

import torch

from seer.gates import AttnGate
from seer.gates.config import GateConfig
from seer.kernels.bench import env_info, fmt, publish
from seer.kernels.token_gate import token_gate_logits
from seer.kernels.tuning import median_ms

DEV = "cuda"  # tests run the script's functions on the CPU under the Triton interpreter
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ns", default="8192,32768", help="sequence lengths, comma-separated (default 8192,32768)")
    p.add_argument("--heads", type=int, default=14, help="query heads (default 14)")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (default 2)")
    p.add_argument("--dim", type=int, default=64, help="head dim (default 64)")
    p.add_argument("--hidden", type=int, default=128, help="gate hidden size (default 128)")
    p.add_argument("--block-size", type=int, default=64, help="gate block size (default 64)")
    p.add_argument("--layers", type=int, default=24, help="layers to scale the per-layer time by (default 24)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="Q and K dtype (default bfloat16)")
    p.add_argument("--gate-dtype", choices=sorted(DTYPES), default="float32",
                   help="gate weights' dtype (default float32, as attach_gates leaves them)")
    p.add_argument("--rep-ms", type=float, default=200.0, help="timing budget per row in ms (default 200)")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    args = p.parse_args(argv)
    args.ns = [int(n) for n in str(args.ns).split(",") if n.strip()]
    if not args.ns or min(args.ns) < 1:
        p.error(f"--ns needs positive lengths; got {args.ns}")
    return args


def make_gates(args) -> tuple[AttnGate, AttnGate]:
    """The pooled and the token gate of one layer, on :data:`DEV` in ``--gate-dtype`` (plain gate RoPE)."""
    dtype = DTYPES[args.gate_dtype]
    pooled = GateConfig(block_size=args.block_size, hidden_size=args.hidden, q_pool=["avg", "max", "min"],
                        k_pool=["max", "min", "avg"])
    token = GateConfig(block_size=args.block_size, hidden_size=args.hidden, q_tokens=True, q_pool=["avg"],
                       k_pool=["max", "min", "avg"])
    torch.manual_seed(0)
    gates = tuple(AttnGate(cfg, args.dim, args.heads, args.kv_heads).to(DEV, dtype) for cfg in (pooled, token))
    gates[1].token_kernel = True  # the kernel path; the PyTorch path is timed by switching it off
    return gates


def check(gate: AttnGate, q: torch.Tensor, k: torch.Tensor) -> float:
    """Largest absolute difference of the kernel path's logits from the PyTorch path's (same -inf entries)."""
    kg = gate._gate_keys(k, q.shape[2])
    if not gate._use_token_kernel(q, kg, grad=False):
        raise RuntimeError("the token gate does not dispatch to the kernel here (needs CUDA, a kernel dtype)")
    got = gate(q, k)
    gate.token_kernel = False
    try:
        want = gate(q, k)
    finally:
        gate.token_kernel = True
    if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(torch.isinf(got), torch.isinf(want)):
        raise RuntimeError(f"kernel path: {got.dtype} {list(got.shape)} against {want.dtype} {list(want.shape)}, "
                           "or -inf entries differ")
    finite = torch.isfinite(want)
    diff = (got.float() - want.float())[finite].abs().max().item()
    if not diff <= 0.05 * want.float()[finite].abs().max().item() + 0.05:
        raise RuntimeError(f"kernel path differs from the PyTorch path by {diff}")
    return diff


def rows(args) -> list[list[str]]:
    dtype = DTYPES[args.dtype]
    pooled, token = make_gates(args)
    out = []
    for n in args.ns:
        g = torch.Generator(device=DEV).manual_seed(n)
        q = torch.randn(1, args.heads, n, args.dim, device=DEV, dtype=dtype, generator=g)
        k = torch.randn(1, args.kv_heads, n, args.dim, device=DEV, dtype=dtype, generator=g)
        with torch.no_grad():
            diff = check(token, q, k)
            kg = token._gate_keys(k, n)
            x = token._token_queries(q, kg.dtype, 0, n)

            def torch_path():
                token.token_kernel = False
                try:
                    return token(q, k)
                finally:
                    token.token_kernel = True

            timed = [("pooled", lambda: pooled(q, k)), ("token pytorch", torch_path),
                     ("token kernel", lambda: token(q, k)),
                     ("kernel only", lambda: token_gate_logits(x, kg, args.block_size))]
            if kg.dtype == torch.float32:
                timed.append(("kernel only (tf32)", lambda: token_gate_logits(x, kg, args.block_size,
                                                                               precision="tf32")))
            for name, fn in timed:
                t, runs = median_ms(fn, rep_ms=args.rep_ms, min_runs=5)
                out.append([str(n), name, fmt(t), fmt(t * args.layers, 2), str(runs),
                            fmt(diff, 4) if name == "token kernel" else ""])
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    env = env_info()
    head = ["N", "gate", "ms / layer", f"ms x {args.layers}", "runs", "max abs diff vs pytorch"]
    lines = ["# Token-query gate: PyTorch path vs Triton kernel", "",
             f"B 1, {args.heads} query / {args.kv_heads} kv heads, head dim {args.dim}, hidden {args.hidden}, block "
             f"{args.block_size}; Q/K {args.dtype}, gate {args.gate_dtype}; torch.no_grad; median of CUDA-event runs "
             "(seer.kernels.tuning.median_ms).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(args)]
    lines += ["", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
              "Command: `python " + " ".join(["experiments/bench_token_gate.py", *(sys.argv[1:] if argv is None
                                                                               else argv)]) + "`", ""]
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
