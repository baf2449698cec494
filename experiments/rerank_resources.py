"""Registers, spills, shared memory and software pipelining of the rerank kernel as compiled for an H100/H200
(sm_90), on the CPU: no GPU needed.

    python -m experiments.rerank_resources [--n 32768 --hq 14 --hkv 2 --d 64 --block 64] [--rows 8 16]
                                           [--launch default n32 w8]

It compiles ``seer.kernels.sampled_rows._sampled_rows_kernel`` for ``cuda:90`` the way a launch of
:func:`seer.kernels.sampled_rows.sampled_rows_mass` on contiguous bf16 inputs of that shape specialises it (pointers
16-byte aligned, integer arguments divisible by 16 marked so, those equal to 1 made constants: what Triton's launcher
does) and runs the bundled ``ptxas -v`` on the PTX. ``async copies`` counts the copies the software pipeliner issues
ahead of their use (0: the key tiles are read by plain loads, the loop waits on each); ``loop loads`` and ``loop
conversions`` count, in the main loop over the list (the first ``scf.for`` of the compiled TTGIR), the plain loads
(each one a wait of the step on memory) and the layout conversions (each a round trip through shared memory between
barriers); ``loop SASS`` and ``loop MUFU`` count the machine instructions (``nvdisasm`` of the cubin) of the SASS loop
that holds the tensor-core instructions, and its special-function ones (the ``exp2``), statically: the diagonal
block's masking branch is among them, though only the diagonal's step runs it. Each instruction is one issue slot of
a warp (a quarter of an SM issues one a cycle) and each ``MUFU`` 8 cycles of its quarter's special-function unit, so
per key tile a step takes at least the larger of the two, in cycles of one SM (its four warps run on the four
quarters side by side). ``--launch`` takes ``experiments.bench_rerank``'s launch specs (``n32`` 32-key tiles, ``w8``
eight warps, ``s2`` two stages). Without the marks a compile is not pipelined at all, which is why they are made
here."""

from __future__ import annotations

import argparse
import os
import re
import subprocess

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from experiments.bench_rerank import add_shape_arguments, launch_settings
from seer.kernels import sampled_rows
from seer.kernels.sampled_rows import program_layout

POINTERS = {"Q": "*bf16", "K": "*bf16", "Idx": "*i32", "Cnt": "*i32", "Out": "*fp32", "Part": "*fp32"}


def launch_values(n: int, hq: int, hkv: int, d: int, block: int, rows: int, blocks: int = 1) -> tuple[dict, dict]:
    """The run-time integer arguments and the constexprs of one launch over contiguous inputs (batch 1, the whole
    scratch in one launch, ``blocks`` query blocks a program), as :func:`seer.kernels.sampled_rows.sampled_rows_mass`
    passes them."""
    nb = triton.cdiv(n, block)
    groups = triton.cdiv(nb, blocks)
    per_block = min(rows, block)
    p, pp, rp = program_layout(hq // hkv, per_block, block)
    lists = hkv * (hq // hkv // p)
    prog_rows = blocks * pp * rp
    ints = dict(stride_qb=hq * n * d, stride_qh=n * d, stride_qn=d, stride_kb=hkv * n * d, stride_kh=n * d,
                stride_kn=d, stride_ib=lists * groups * nb, stride_ih=groups * nb, stride_ir=nb,
                stride_cb=lists * groups, stride_ch=groups, stride_ob=hq * nb * nb,
                stride_oh=nb * nb, stride_or=nb, stride_pp=groups * nb * prog_rows, stride_pi=nb * prog_rows,
                stride_pe=prog_rows, G0=0, LISTS=lists, CHUNKS=hq // hkv // p, GROUP=hq // hkv, N=n)
    offsets = sampled_rows.sampled_offsets(block, per_block)
    const = dict(D=d, BS=block, R=per_block, RP=rp, P=p, PP=pp, QB=blocks,
                 LAST_FALLBACK=min(offsets) >= n - (nb - 1) * block, ONE_PASS=True, DOT_PRECISION="tf32",
                 INTERP=False)
    return ints, const


def main_loop(ttgir: str) -> list[str]:
    """The lines of the first ``scf.for`` of a TTGIR listing, from its header to its closing brace."""
    lines = ttgir.splitlines()
    start = next(i for i, line in enumerate(lines) if " scf.for " in line)
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = next(i for i in range(start + 1, len(lines))
               if lines[i].strip().startswith("}") and len(lines[i]) - len(lines[i].lstrip()) == indent)
    return lines[start:end + 1]


def sass_loop(sass: str) -> list[str]:
    """The instructions of the SASS loop (a label and the backward branch to it) that holds ``HGMMA`` or ``HMMA``."""
    lines = sass.splitlines()
    labels = {line.strip().rstrip(":"): i for i, line in enumerate(lines) if re.match(r"^\.L_x_\d+:", line)}
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and labels.get(m[1], i) < i:
            body = [x for x in lines[labels[m[1]]:i + 1] if re.match(r"\s*/\*[0-9a-f]+\*/", x)]
            if any("HGMMA" in x or "HMMA" in x for x in body):
                return body
    return []


def compile_report(n: int, hq: int, hkv: int, d: int, block: int, rows: int, launch: dict, blocks: int = 1) -> dict:
    """``{"registers", "spill_bytes", "async_copies", "shared_bytes", "loop_loads", "loop_conversions", "loop_sass",
    "loop_mufu"}`` of the
    kernel compiled for sm_90 under ``launch`` (a :data:`seer.kernels.sampled_rows.LAUNCH` dict)."""
    ints, const = launch_values(n, hq, hkv, d, block, rows, blocks)
    const.update(BLOCK_N=min(launch["block_n"] or 64, block), HEAVIEST_FIRST=bool(launch["heaviest_first"]))
    kernel = sampled_rows._sampled_rows_kernel
    sig, attrs, consts = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in const:
            sig[name], consts[(i,)] = "constexpr", const[name]
        elif name in POINTERS:
            sig[name], attrs[(i,)] = POINTERS[name], [["tt.divisibility", 16]]
        elif name == "qk_scale":
            sig[name] = "fp32"
        elif ints[name] == 1:
            sig[name], consts[(i,)] = "constexpr", 1
        else:
            sig[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    options = {"num_warps": launch["num_warps"]}
    if launch["num_stages"]:
        options["num_stages"] = launch["num_stages"]
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options=options)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    ptx = f"/tmp/seer_rerank_{os.getpid()}.ptx"
    with open(ptx, "w") as f:
        f.write(compiled.asm["ptx"])
    try:
        info = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", os.devnull], capture_output=True, text=True,
                              check=True).stderr
    finally:
        os.remove(ptx)
    loop = main_loop(compiled.asm["ttgir"])
    cubin = f"/tmp/seer_rerank_{os.getpid()}.cubin"
    with open(cubin, "wb") as f:
        f.write(compiled.asm["cubin"])
    try:
        sass = subprocess.run([os.path.join(os.path.dirname(ptxas), "nvdisasm"), "-c", cubin], capture_output=True,
                              text=True, check=True).stdout
    finally:
        os.remove(cubin)
    body = sass_loop(sass)
    return {"registers": int(re.search(r"Used (\d+) registers", info)[1]),
            "spill_bytes": int(re.search(r"(\d+) bytes spill stores", info)[1]),
            "async_copies": compiled.asm["ttgir"].count("ttg.async_copy_global_to_local"),
            "shared_bytes": compiled.metadata.shared,
            "loop_loads": sum(" tt.load " in line for line in loop),
            "loop_conversions": sum("ttg.convert_layout" in line for line in loop),
            "loop_sass": len(body), "loop_mufu": sum("MUFU" in x for x in body)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(ap)
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--launch", nargs="+", default=["default", "n32"])
    ap.add_argument("--blocks-per-program", type=int, nargs="+", default=[1],
                    help="query blocks a program (sampled_rows_mass's blocks_per_program)")
    args = ap.parse_args()
    if sampled_rows.INTERPRET:
        ap.error("TRITON_INTERPRET=1 is set: the kernels are then Python functions, which cannot be compiled; unset it")
    try:
        launches = [(spec, launch_settings(spec)) for spec in args.launch]
    except ValueError as err:
        ap.error(str(err))
    print(f"Compiled for sm_90 by triton {triton.__version__} on the CPU; shape: Hq {args.hq}, Hkv {args.hkv}, "
          f"N {args.n}, D {args.d}, {args.block}-token blocks, bf16.\n")
    print("| rows | launch | blocks a program | registers | spill bytes | async copies | shared bytes | loop loads | "
          "loop conversions | loop SASS | loop MUFU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for rows in args.rows:
        for (spec, launch), blocks in [(ln, qb) for ln in launches for qb in args.blocks_per_program]:
            r = compile_report(args.n, args.hq, args.hkv, args.d, args.block, rows, launch, blocks)
            print(f"| {rows} | {spec} | {blocks} | {r['registers']} | {r['spill_bytes']} | {r['async_copies']} | "
                  f"{r['shared_bytes']} | {r['loop_loads']} | {r['loop_conversions']} | {r['loop_sass']} | "
                  f"{r['loop_mufu']} |", flush=True)


if __name__ == "__main__":
    main()
