"""Compile the block-sparse backward kernels for an H100 (sm_90) on a machine without a GPU, and report per
launch config what ptxas says: registers per thread, spill bytes, stack frame, shared memory, and the number
of Hopper tensor-core instructions (``HGMMA``; ``HMMA`` is the older, slower path) in the SASS.

Triton compiles from the kernel's source with the target given (``GPUTarget("cuda", 90, 32)``) and the
integer/pointer specialisations a real launch gets (pointers and the strides/sizes of the benchmark shapes
divisible by 16, group sizes of 1 folded to constants); its bundled ``ptxas`` and ``cuobjdump`` do the rest.
A config that spills here spills on the GPU too; it is a screen, not a timing.

    python experiments/compile_stats.py                 # the benchmark's candidates, D 128, bf16
    python experiments/compile_stats.py --d 64 --dtype fp16 --odd-n

It runs as a file (so the benchmark beside it, ``bench_sparse_bwd.py``, whose candidates it compiles, is importable)
against the installed seer package.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bench_sparse_bwd import DKDV_CANDIDATES, DQ_CANDIDATES
from seer.kernels import block_sparse_bwd as bwd

TARGET = GPUTarget("cuda", 90, 32)
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
ONES = ("GROUP", "MASK_GROUP", "NBATCH")  # 1 in the benchmark (B 1, H 32 on 32): Triton folds such ints
NOT_DIVISIBLE = ("qk_scale", "sm_scale", "N_QPROG")


def compile_sm90(fn, pointers: dict[str, str], constexprs: dict, num_warps: int, num_stages: int):
    constexprs = dict(constexprs, **{n: 1 for n in ONES if n in fn.arg_names})
    sig = {}
    for n in fn.arg_names:
        sig[n] = ("constexpr" if n in constexprs else pointers.get(n)
                  or ("fp32" if n in ("qk_scale", "sm_scale") else "i32"))
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n] != "constexpr" and n not in NOT_DIVISIBLE}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})


def ptxas_stats(kernel) -> dict:
    with tempfile.TemporaryDirectory() as tdir:
        ptx = os.path.join(tdir, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        res = subprocess.run([os.path.join(BIN, "ptxas"), "-arch=sm_90a", "-v", ptx, "-o",
                              os.path.join(tdir, "k.o")], capture_output=True, text=True)
        cubin = os.path.join(tdir, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, res.stderr)) else -1  # noqa: E731
    return {"regs": num(r"Used (\d+) registers"), "spill": num(r"(\d+) bytes spill stores"),
            "stack": num(r"(\d+) bytes stack frame"), "smem": kernel.metadata.shared,
            "hgmma": sass.count("HGMMA"), "hmma": sass.count("HMMA")}


def dkdv(d, block, cfg, dtype, even_n):
    block_n, block_m, warps, stages, tma = cfg
    ptr = {n: "*" + dtype for n in ("Q", "K", "V", "DO", "DK", "DV")}
    ptr.update(Lse2="*fp32", Delta="*fp32", QIdx="*i32", QCnt="*i32", Cu="*i32", Order="*i32")
    const = dict(HEAD_DIM=d, MASK_BLOCK=block, BLOCK_N=block_n, BLOCK_M=block_m, EVEN_N=even_n,
                 DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", INTERP=False, USE_TMA=tma, VARLEN=False)
    return compile_sm90(bwd._bs_bwd_dkdv_kernel, ptr, const, warps, stages)


def dq(d, block, cfg, dtype, even_n):
    block_m, block_n, warps, stages, tma = cfg
    ptr = {n: "*" + dtype for n in ("Q", "K", "V", "DO", "DQ")}
    ptr.update(Lse2="*fp32", Delta="*fp32", KvIdx="*i32", KvCnt="*i32", Cu="*i32", Order="*i32")
    const = dict(HEAD_DIM=d, MASK_BLOCK=block, BLOCK_M=block_m, BLOCK_N=block_n,
                 DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", INTERP=False, USE_TMA=tma, VARLEN=False)
    return compile_sm90(bwd._bs_bwd_dq_kernel, ptr, const, warps, stages)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--blocks", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--odd-n", action="store_true", help="N not a multiple of the block (row-bounded loads)")
    args = ap.parse_args()

    print(f"sm_90, D {args.d}, {args.dtype}, {'odd' if args.odd_n else 'even'} N", flush=True)
    print("| kernel | block | config | regs | spill B | stack B | smem B | HGMMA | HMMA |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for block in args.blocks:
        for name, build, cands, table in (("dkdv", dkdv, DKDV_CANDIDATES, bwd.DKDV_TABLE),
                                          ("dq", dq, DQ_CANDIDATES, bwd.DQ_TABLE)):
            default = table.candidates((args.d, block))[0]  # the module's CUDA default, as a tuple of its fields
            cfgs = list(dict.fromkeys(cands.get(block, []) + [tuple(default[f] for f in table.fields)]))
            for cfg in cfgs:
                try:
                    s = ptxas_stats(build(args.d, block, cfg, args.dtype, not args.odd_n))
                    print(f"| {name} | {block} | {cfg} | {s['regs']} | {s['spill']} | {s['stack']} | {s['smem']} "
                          f"| {s['hgmma']} | {s['hmma']} |", flush=True)
                except Exception as exc:
                    print(f"| {name} | {block} | {cfg} | error: {type(exc).__name__}: {str(exc)[:120]} |||||",
                          flush=True)


if __name__ == "__main__":
    main()
