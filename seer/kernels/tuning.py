"""Launch configurations of seer's Triton kernels: one table format, tuned at most once per key, forceable.

A launch configuration is a dict of the keyword arguments of a kernel launch besides its tensors and sizes:
tile sizes and switches (compile-time constants) and ``num_warps`` / ``num_stages``. Each tuned kernel has a
:class:`LaunchTable` (its name is what :func:`force_config` takes):

========================= ============================================= ============================================
name                      what it launches                              key
========================= ============================================= ============================================
``flash_gt.dense``        attention forward without ground truth        head dim, block size, dtype, length bucket
                          (``flash_attn``; pass 1 of ``mode="lowmem"``)
``flash_gt.fast``         forward writing the tile maxima, plus the     head dim, block size, dtype, length bucket
                          pooling kernel when ``EPI=0``
``flash_gt.pass2``        the ground truth from q, k and the final lse  head dim, block size, dtype, length bucket
``block_sparse``          the block-sparse forward                      head dim, mask block size, list layout
``block_sparse_bwd.dkdv`` the block-sparse backward: dk and dv          head dim, mask block size
``block_sparse_bwd.dq``   the block-sparse backward: dq                 head dim, mask block size
========================= ============================================= ============================================

(length bucket: the next power of two of ``N``, at least 1024, at most 32768.) A table gives, for a key,

* on CUDA, candidates in order, the first being the default (the ground-truth tables and the block-sparse forward
  add Hopper variants after it on devices of capability >= 9, see below): for the sizes swept on an H100 the winner
  (``docs/bench_gt.md``, ``docs/bench_sparse.md``: head dim 128 and 64, blocks 64 and 128), for other sizes an
  untimed guess; the backward's defaults for those sizes were screened offline by registers and spills on sm_90,
  not timed (``seer/kernels/block_sparse_bwd.py``);
* under the Triton interpreter, one small config (it runs every program in turn on the CPU).

The config of a call, in this order:

1. inside :func:`force_config` for the kernel: the forced fields over the key's default; nothing is timed;
2. the config already chosen for the key in this process;
3. the default, when the key has one candidate, autotuning is off (:func:`set_autotune`), or the call is being
   captured into a CUDA graph (it then is not remembered: the first call after the capture tunes the key);
4. else the fastest candidate, timed on the call's own arguments (:func:`median_ms`, two rounds over all
   candidates with the better round of each kept, so that the clock ramp-up of an idle GPU does not count
   against the first; a candidate that fails to compile is skipped) and remembered for the key. Every run
   writes all of its outputs (``out``, ``lse``, ``gt``, scratch), so the timing runs leave nothing to restore.

So tuning costs one call per key and process, and a CUDA graph captured after a warm-up call of the same shapes
replays tuned launches. The block-sparse tables have one candidate per key, chosen offline
(``experiments/bench_sparse.py --tune``, ``experiments/bench_sparse_bwd.py``): the best config depends on the mask
density, which a timing at the first call would sample by chance, and sparse prefill is captured in CUDA graphs.
The exception: on devices of capability >= 9 the forward's table (``block_sparse``) adds its Hopper variant after
the default where it differs (the copy engine: ``seer.kernels.block_sparse.HOPPER_VARIANTS``), timed at the first
call. The ``flash_gt`` tables do the same on such devices (``seer.kernels.flash_gt.HOPPER_VARIANTS``: their default
with the copy engine), so there they time one candidate more at the first call of a key.

Why not ``triton.autotune``: it times one kernel launch per config and keys on exact argument values. Here a
config can steer two launches timed together (``EPI=0``: the forward, then the pooling kernel), keys bucket the
sequence length (exact lengths would re-tune at every new length), whether the copy engine (TMA) may read the
tensors is decided per call, and experiments force one config for one kernel whatever the key.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import triton

from seer.kernels.common import INTERPRET

__all__ = ["LaunchTable", "chosen_configs", "force_config", "kernel_names", "last_launch", "median_ms",
           "set_autotune"]

_TABLES: dict[str, LaunchTable] = {}
_FORCED: dict[str, dict] = {}
_AUTOTUNE = True


class LaunchTable:
    """The launch configs of one kernel (see the module docstring).

    Args:
        name: the kernel's name for :func:`force_config`.
        fields: the names of a config's entries.
        candidates: ``key -> [config, ...]`` on CUDA, the default first; entries :attr:`invalid` refuses are
            dropped.
        interpreter: ``key -> config`` under the Triton interpreter.
        invalid: ``(config, key) -> reason or None``: why a config cannot run for a key.
    """

    def __init__(self, name: str, fields: tuple[str, ...], candidates: Callable[[tuple], list[dict]],
                 interpreter: Callable[[tuple], dict],
                 invalid: Callable[[dict, tuple], str | None] = lambda config, key: None):
        if name in _TABLES:
            raise ValueError(f"a launch table named {name!r} exists")
        self.name, self.fields, self.invalid = name, fields, invalid
        self._candidates, self._interpreter = candidates, interpreter
        self.chosen: dict[tuple, dict] = {}
        self.last: tuple[dict, Any] | None = None
        _TABLES[name] = self

    def candidates(self, key: tuple) -> list[dict]:
        """What this key may run with, the default first."""
        if INTERPRET:
            return [self._interpreter(key)]
        return [c for c in self._candidates(key) if self.invalid(c, key) is None]

    def launch(self, key: tuple, run: Callable[[dict], Any]) -> Any:
        """``run(config)`` with the config for ``key`` (``run`` launches the kernel(s) and returns the compiled
        kernel Triton's launch returns); returns what ``run`` returns."""
        config = self.config(key, run)
        result = run(config)
        self.last = (config, result)
        return result

    def config(self, key: tuple, run: Callable[[dict], Any]) -> dict:
        """The config for ``key``; ``run`` launches with a candidate when candidates are timed."""
        forced = _FORCED.get(self.name)
        if forced is not None:
            config = {**self.candidates(key)[0], **forced}
            reason = self.invalid(config, key)
            if reason is not None:
                raise ValueError(f"forced {self.name} config {config} is invalid: {reason}")
            return config
        if key in self.chosen:
            return self.chosen[key]
        candidates = self.candidates(key)
        if len(candidates) == 1 or not _AUTOTUNE:
            choice = candidates[0]
        elif torch.cuda.is_current_stream_capturing():  # no timing inside a capture, and nothing remembered
            return candidates[0]
        else:
            choice = _fastest(self, key, candidates, run)
        self.chosen[key] = choice
        return choice


def _fastest(table: LaunchTable, key: tuple, candidates: list[dict], run: Callable[[dict], Any]) -> dict:
    times = [float("inf")] * len(candidates)
    for _ in range(2):
        for i, c in enumerate(candidates):
            try:
                t, _ = median_ms(partial(run, c), rep_ms=60)
            except Exception:  # noqa: BLE001 - a candidate that does not compile (resources) is skipped
                continue
            times[i] = min(times[i], t)
    best = min(range(len(candidates)), key=times.__getitem__)
    if times[best] == float("inf"):
        raise RuntimeError(f"no launch configuration of {table.name} compiled for key {key}")
    return candidates[best]


def median_ms(fn: Callable[[], Any], rep_ms: float = 100.0, min_runs: int = 1,
              warmup_ms: float = 25.0) -> tuple[float, int]:
    """Median milliseconds of ``fn()`` and the number of timed runs: ``triton.testing.do_bench`` (warm-up, L2
    cache cleared before every CUDA-event-timed run) over about ``rep_ms`` of runs, with more runs added while
    fewer than ``min_runs`` fit (long calls). What the tuner and the benchmarks in ``experiments/`` time with."""
    times = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
    while len(times) < min_runs:
        times += triton.testing.do_bench(fn, warmup=0, rep=(min_runs - len(times)) * statistics.median(times),
                                         return_mode="all")
    return statistics.median(times), len(times)


def kernel_names() -> list[str]:
    """The names of the tuned kernels."""
    return sorted(_TABLES)


def _table(kernel: str) -> LaunchTable:
    if kernel not in _TABLES:
        raise ValueError(f"no tuned kernel named {kernel!r}; kernels: {kernel_names()}")
    return _TABLES[kernel]


@contextlib.contextmanager
def force_config(kernel: str, **config):
    """Inside the ``with`` block every launch of ``kernel`` (one of :func:`kernel_names`) uses ``config``: its
    entries over the default config of the call's key, nothing timed; a config the key cannot run raises
    ``ValueError`` at the launch. For config sweeps and tests; process-wide, the previous state comes back at the
    end of the block. E.g. ``with force_config("flash_gt.fast", BLOCK_N=128, EPI=1): flash_attn_with_gt(...)``.
    """
    fields = _table(kernel).fields
    unknown = sorted(set(config) - set(fields))
    if unknown:
        raise ValueError(f"{kernel} configs have no entry {unknown}; entries: {list(fields)}")
    previous = _FORCED.get(kernel)
    _FORCED[kernel] = dict(config)
    try:
        yield
    finally:
        if previous is None:
            del _FORCED[kernel]
        else:
            _FORCED[kernel] = previous


def set_autotune(enabled: bool) -> None:
    """Switches the timing of candidates on (the default) or off (keys not chosen yet take their default).
    Process-wide; keys already chosen keep their config."""
    global _AUTOTUNE
    _AUTOTUNE = bool(enabled)


def chosen_configs() -> dict[str, dict[tuple, dict]]:
    """``{kernel: {key: config}}`` of the configs chosen so far in this process (forced ones are not kept)."""
    return {name: dict(table.chosen) for name, table in sorted(_TABLES.items())}


def last_launch(kernel: str) -> dict | None:
    """The config of the latest launch of ``kernel`` and, on CUDA, the registers per thread and spilled bytes of
    its compiled kernel (``n_regs``, ``n_spills``; None under the interpreter); None before its first launch."""
    last = _table(kernel).last
    if last is None:
        return None
    config, compiled = last
    return {"config": dict(config), "n_regs": getattr(compiled, "n_regs", None),
            "n_spills": getattr(compiled, "n_spills", None)}
