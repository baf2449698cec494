"""What the kernel benchmarks in ``experiments/`` share: one timer, FlexAttention over a bool block mask as the
baseline, the environment line of a report and the number format of its tables. Needs a CUDA GPU (and, for
:class:`Flex`, ``torch.compile``); nothing else in seer imports it."""

from __future__ import annotations

import datetime
import math
import platform
from collections.abc import Callable
from typing import Any

import torch
import triton

from seer.kernels.tuning import median_ms

__all__ = ["Flex", "env_info", "fmt", "graph_ms", "ms", "publish", "tflops"]


def ms(fn: Callable[[], Any], rep_ms: float = 250.0, min_runs: int = 5) -> float:
    """Median milliseconds of ``fn()`` over about ``rep_ms`` of runs and at least ``min_runs`` runs
    (:func:`seer.kernels.tuning.median_ms`, what the tuner times with)."""
    return median_ms(fn, rep_ms=rep_ms, min_runs=min_runs)[0]


def graph_ms(fn: Callable[[], Any], rep_ms: float = 100.0) -> float:
    """Median milliseconds of ``fn()`` replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``): the GPU
    time alone, without the host's launch overhead (what a decode loop captured in a graph pays); L2 is not cleared
    between runs."""
    return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")


def tflops(n: int, h: int, d: int, time_ms: float, b: int = 1) -> float:
    """TFLOP/s of a causal attention forward (``2 b h n^2 d`` flops: the two matmuls over the causal half) taking
    ``time_ms`` milliseconds."""
    return 2.0 * b * h * n * n * d / (time_ms * 1e-3) / 1e12


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


class Flex:
    """FlexAttention (``torch.compile``d, one compile per shape kept) over the blocks of a bool block mask."""

    def __init__(self):
        import torch._dynamo
        torch._dynamo.config.cache_size_limit = 64  # one compile per (N, block size): stay compiled
        if hasattr(torch._dynamo.config, "recompile_limit"):
            torch._dynamo.config.recompile_limit = 64
        from torch.nn.attention.flex_attention import BlockMask, flex_attention
        self.BlockMask = BlockMask
        self.fn = torch.compile(flex_attention, dynamic=False)

    def build(self, mask: torch.Tensor, block: int, n: int, backward: bool = False):
        """BlockMask at ``block`` tokens from a bool block mask ``[B, H, nb, nb]``: off-diagonal blocks full, the
        diagonal partial; ``backward``: with the transposed lists the backward walks.

        The mask_mod is plain causal: compiled FlexAttention visits only the listed blocks (eager mode would apply
        the mask_mod densely and ignore the lists)."""
        b, h, nb, _ = mask.shape
        i = torch.arange(nb, device=mask.device)
        full = mask & (i[None, :] < i[:, None])
        full_num = full.sum(-1, dtype=torch.int32)
        full_idx = torch.argsort(full.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        part_num = mask[..., i, i].to(torch.int32)
        part_idx = i.to(torch.int32).view(1, 1, nb, 1).expand(b, h, nb, nb).contiguous()
        return self.BlockMask.from_kv_blocks(part_num, part_idx, full_num, full_idx, BLOCK_SIZE=block,
                                             mask_mod=_causal, seq_lengths=(n, n), compute_q_blocks=backward)

    def __call__(self, q, k, v, block_mask, kernel_options: dict | None = None):
        return self.fn(q, k, v, block_mask=block_mask, kernel_options=kernel_options)


def env_info() -> dict:
    """The GPU, the versions and the date: the environment line of a benchmark report."""
    p = torch.cuda.get_device_properties(0)
    return {"device": f"{p.name} ({p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB)",
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "cudnn": str(torch.backends.cudnn.version()), "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def fmt(x: float | None, digits: int = 3) -> str:
    """A table cell: ``x`` with ``digits`` decimals, ``-`` for a missing value (None or NaN)."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def publish(text: str, out: str | None) -> None:
    """Prints a benchmark report and, given ``out``, writes it there too."""
    if out:
        with open(out, "w") as f:
            f.write(text)
    print(text)
