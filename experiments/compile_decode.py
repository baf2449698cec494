"""Compile the block-sparse decode kernels (``seer/kernels/decode.py``) for an H100/H200 (sm_90) on a
machine without a GPU and report what ptxas says per launch config: registers per thread, spill bytes, stack frame,
shared memory, Hopper tensor-core instructions (``HGMMA``) and older ones (``HMMA``), as ``compile_stats.py`` does
for the backward kernels (whose ``ptxas_stats`` it uses).

Pointers and strides are specialised as divisible by 16 (what the benchmark's contiguous caches give); sizes are
not. A config that spills here spills on the GPU too; it is a screen, not a timing.

    python experiments/compile_decode.py               # the default configs, D 64 and 128, blocks 64 and 128, bf16
    python experiments/compile_decode.py --dtype fp16 --warps 4 8 --stages 2 3 4
    python experiments/compile_decode.py --unique      # the unique-lists variant (unique_blocks=True)
"""

from __future__ import annotations

import argparse

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from compile_stats import ptxas_stats
from seer.kernels import decode as dec

TARGET = GPUTarget("cuda", 90, 32)


def compile_sm90(fn, pointers: dict[str, str], constexprs: dict, num_warps: int, num_stages: int):
    sig = {n: "constexpr" if n in constexprs else pointers.get(n) or ("fp32" if n == "qk_scale" else "i32")
           for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n in pointers or (n.startswith("stride_") and n != "stride_os")}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})


def split_kernel(d: int, block: int, block_m: int, direct: bool, unique: bool, dtype: str, config: dict):
    ptr = {n: "*" + dtype for n in ("Q", "K", "V")}
    ptr.update(Idx="*i32", Seqlens="*i32", Scratch="*i32", Out="*" + dtype if direct else "*fp32", Lse="*fp32")
    const = dict(HEAD_DIM=d, MASK_BLOCK=block, BLOCK_M=block_m, BLOCK_N=config["BLOCK_N"], DIRECT=direct,
                 UNIQUE=unique, DOT_PRECISION="tf32", INTERP=False, ENTRY_CHUNK=dec.ENTRY_CHUNK,
                 LIST_CHUNK=dec.LIST_CHUNK)
    return compile_sm90(dec._dec_split_kernel, ptr, const, config["num_warps"], config["num_stages"])


def merge_kernel(d: int, dtype: str):
    ptr = dict(OPart="*fp32", LsePart="*fp32", Out="*" + dtype, Lse="*fp32")
    const = dict(HEAD_DIM=d, CHUNK=dec.MERGE_CHUNK, INTERP=False)
    return compile_sm90(dec._dec_merge_kernel, ptr, const, 1 if d <= 64 else 2, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--d", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--blocks", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--block-m", type=int, nargs="+", default=[16, 64], help="query-row tiles (G x T rows, >= 16)")
    ap.add_argument("--warps", type=int, nargs="+", help="num_warps to try (default: the launch table's)")
    ap.add_argument("--stages", type=int, nargs="+", help="num_stages to try (default: the launch table's)")
    ap.add_argument("--unique", action="store_true", help="the unique-lists variant (unique_blocks=True)")
    args = ap.parse_args()

    print(f"sm_90, {args.dtype}" + (", unique_blocks" if args.unique else ""), flush=True)
    print("| kernel | D | block | BLOCK_M | direct | config | regs | spill B | stack B | smem B | HGMMA | HMMA |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for d in args.d:
        for block in args.blocks:
            for block_m in args.block_m:
                default = dec.CONFIGS.candidates((d, block, block_m))[0]
                configs = [dict(default, **({"num_warps": w} if w else {}), **({"num_stages": s} if s else {}))
                           for w in (args.warps or [None]) for s in (args.stages or [None])]
                for direct in (True, False):
                    for config in configs:
                        s = ptxas_stats(split_kernel(d, block, block_m, direct, args.unique, args.dtype, config))
                        print(f"| split | {d} | {block} | {block_m} | {direct} | {config} | {s['regs']} | "
                              f"{s['spill']} | {s['stack']} | {s['smem']} | {s['hgmma']} | {s['hmma']} |", flush=True)
        s = ptxas_stats(merge_kernel(d, args.dtype))
        print(f"| merge | {d} | - | - | - | - | {s['regs']} | {s['spill']} | {s['stack']} | {s['smem']} | "
              f"{s['hgmma']} | {s['hmma']} |", flush=True)


if __name__ == "__main__":
    main()
