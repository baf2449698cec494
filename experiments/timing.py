"""Shared timing for the experiment scripts: median milliseconds of a GPU callable over CUDA events."""

from __future__ import annotations

import statistics

import torch


def cuda_median_ms(fn, reps: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs timed with CUDA events, after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
