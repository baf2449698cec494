"""Host (Python + launch) time of each step of one layer's sparse prefill, beside dense SDPA.

For one SmolLM2-shaped layer (9 query / 3 key-value heads, head dim 64, bf16) at N tokens, it calls each step
200 times back to back and reports the host time per call (before synchronising) and host + GPU time (after).
When host time exceeds GPU time the step is launch-bound: then a small model's eager prefill cannot gain from
sparsity, and CUDA graphs (see bench_prefill.py) are the remedy.

    python3 experiments/host_overhead.py --seq 8192
"""

from __future__ import annotations

import argparse
import time

import torch

from seer.gates import AttnGate, GateConfig, pool_blocks
from seer.kernels import block_sparse_attn
from seer.kernels.block_sparse import build_block_index
from seer.sparsity import SparsityConfig, select_blocks


def per_call_us(fn, reps: int = 200) -> tuple[float, float]:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    host = (time.perf_counter() - start) / reps * 1e6
    torch.cuda.synchronize()
    return host, (time.perf_counter() - start) / reps * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=8192)
    args = ap.parse_args()
    b, hq, hkv, n, d = 1, 9, 3, args.seq, 64
    q = torch.randn(b, n, hq, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(b, n, hkv, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    v = torch.randn(b, n, hkv, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    gate = AttnGate(GateConfig(block_size=64, hidden_size=128), d, hq, hkv).cuda()
    sparsity = SparsityConfig(method="topk", target_density=0.1)
    with torch.no_grad():
        logits = gate(q, k)
        mask = select_blocks(logits, sparsity)
        out = torch.empty(b, n, hq, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        steps = {
            "pool Q (avg)": lambda: pool_blocks(q, 64, ["avg"], torch.float32),
            "pool K (max)": lambda: pool_blocks(k, 64, ["max"], torch.float32),
            "gate forward (avgmax, all of it)": lambda: gate(q, k),
            "top-k selection": lambda: select_blocks(logits, sparsity),
            "block index build": lambda: build_block_index(mask),
            "block_sparse_attn (index + kernel)": lambda: block_sparse_attn(q, k, v, mask, 64, out=out),
            "dense SDPA (for comparison)": lambda: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True),
        }
        print(f"N={n}, {torch.cuda.get_device_name()}, torch {torch.__version__}")
        print("| step | host us per call | host + GPU us per call |\n|---|---|---|")
        for name, fn in steps.items():
            host, total = per_call_us(fn)
            print(f"| {name} | {host:.0f} | {total:.0f} |")


if __name__ == "__main__":
    main()
