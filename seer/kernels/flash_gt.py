r"""Fused causal FlashAttention forward that also emits SeerAttention's block ground truth.

Math
----
For one query head, rows ``r`` and keys ``c`` (causal: ``c <= r``), with ``s[r, c] = q_r . k_c * sm_scale``::

    m[r]   = max_c s[r, c]                          (running max, online softmax)
    l[r]   = sum_c exp(s[r, c] - m[r])
    out[r] = sum_c exp(s[r, c] - m[r]) / l[r] * v_c
    lse[r] = m[r] + log(l[r])                       (natural log, float32)

The ground truth is the max-pool of the probability map over ``BS x BS`` tiles (``BS = block_size``)::

    gt[i, j] = max_{r in block i, c in block j, c <= r} exp(s[r, c] - lse[r])
             = exp( max_{r in block i} ( t[r, j] - lse[r] ) ),   t[r, j] = max_{c in block j, c <= r} s[r, c]

``exp`` is monotone, so the tile max needs **one** exponential per tile, not one per score. ``t[r, j]`` is a
by-product of the online softmax (the row max of the tile's scores); what is missing while the key loop runs
is ``lse[r]``, known only after the last key tile. Two ways to get it:

* ``mode="fast"``: one attention pass. Each program (``BLOCK_M`` query rows) writes ``t[r, j]`` of its rows to
  a scratch buffer as it walks the key tiles (one ``BLOCK_M``-vector store per tile: the row max it computes
  anyway). The pooling ``gt[i, j] = exp2(max_r (t2[r, j] - lse2[r]))`` then runs either in a small second
  kernel that streams the scratch once (``EPI=0``: the H100 winner at head dim 128, 0.4 ms for 1 GiB) or at the
  end of each program over its own rows (``EPI=1``, serialised on the SM; slower at head dim 128, the launch
  config of the other head dims). The scratch is **float32** and holds only the causal triangle (``j <= i``),
  packed per head: ``BS * nb * (nb + 1) / 2`` values, about ``2 * N * nb`` bytes per head, i.e. the same bytes
  as the authors' bf16 ``N x nb`` buffer but exact (1.0 GiB at 32k tokens x 32 heads, block 64). Values are
  stored in log2 units (``t * log2(e)``, the kernel works with ``exp2``), so the only error in ``gt`` is float32
  rounding of ``t`` and ``lse`` (relative error of ``gt`` about ``|t| * 2^-24 * ln 2``, i.e. < 1e-5) on top of
  the scores' own error (bf16/fp16 inputs, float32 accumulation; float32 inputs use IEEE float32 dots, not
  tf32).
* ``mode="lowmem"``: two passes. Pass 1 is the dense forward (no scratch) and writes ``out`` and ``lse``;
  pass 2 (:func:`gt_from_lse`) recomputes ``q k^T`` per tile (no softmax, no ``P V``: half the matrix work and
  no exponentials except one per tile) and max-pools ``s - lse``. Extra memory: none beyond ``gt`` itself.
* ``mode="auto"`` (default) takes ``fast`` when its scratch fits in ``fast_fraction`` (default a quarter) of
  the free device memory (``torch.cuda.mem_get_info`` plus what PyTorch's caching allocator holds unused),
  ``lowmem`` otherwise; on the CPU (Triton interpreter) always ``fast``.

Tiles above the diagonal are 0 (written by the kernels, so preallocated outputs need no zeroing). The result
is not row-normalised (same as :func:`seer.kernels.reference.block_gt`).

Kernel structure (FlashAttention-2 style, cf. Triton's fused-attention tutorial), in
:mod:`seer.kernels.flash_gt_kernels`: one program per (``BLOCK_M`` query rows, batch x query head); programs of
a head are launched longest-rows-first; the key loop is split in an unmasked off-diagonal part and a masked
diagonal part; ``log2(e)`` is folded into the scale so the softmax uses ``exp2``. GQA reads key/value head
``h // (Hq // Hkv)``; K/V are never repeated. Batch and head offsets are int64; offsets inside one head are
int32 (checked by the wrapper).

Launch configs: the tables ``flash_gt.dense``, ``flash_gt.fast`` and ``flash_gt.pass2`` of
:mod:`seer.kernels.tuning` (candidates timed once per head dim, block size, dtype and length bucket).

Hopper path: on devices of capability >= 9 each table adds its default with ``USE_TMA`` on (Q, K, V tiles in and
the output tile out through tensor descriptors, :data:`HOPPER_VARIANTS`) as a further candidate, which the runtime
tuner times against the default at the first call of a key; it runs only where the copy engine can address the
tensors (:func:`seer.kernels.common.tma_ok`).

There is no backward: the kernels run as if under ``torch.no_grad()`` (inputs come from a frozen model), the
outputs never require grad.
"""

from __future__ import annotations

import contextlib

import torch

from seer.kernels.common import (INT32_MAX, LOG2E, check_block_size, check_device, check_qkv, check_tensor,
                                 is_hopper, output, softmax_scale, with_variants, with_unit_last_stride)
from seer.kernels.flash_gt_kernels import launch_epilogue, launch_forward, launch_pass2
from seer.kernels.tuning import LaunchTable

__all__ = ["fast_scratch_bytes", "flash_attn", "flash_attn_with_gt", "gt_from_lse"]

MODES = ("auto", "fast", "lowmem")
POOLS = ("max", "mass")  # what gt_from_lse pools: the largest probability of a block, or its attention mass


# --------------------------------------------------------------------------------------------------------------
# Launch configurations (keys: head dim, block size, dtype, length bucket)
# --------------------------------------------------------------------------------------------------------------


def _fwd_invalid(config: dict, key: tuple) -> str | None:
    block_size = key[1]
    bm, bn = config["BLOCK_M"], config["BLOCK_N"]
    if bm % block_size or bm % bn or (block_size % bn and bn % block_size):
        return (f"invalid for block_size {block_size}: BLOCK_M must be a multiple of block_size and of BLOCK_N, "
                "and BLOCK_N must divide or be a multiple of block_size")
    return None


def _dense_candidates(key: tuple) -> list[dict]:
    head_dim = key[0]
    if head_dim >= 256:
        return [dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2),
                dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)]
    if head_dim >= 128:  # H100, 32k (ms): BN128 s3 16.9, BN64 s4 17.6, BN64 s3 17.7
        return [dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
                dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4)]
    return [dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
            dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
            dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)]


def _fast_candidates(key: tuple) -> list[dict]:
    if key[0] == 128:  # H100, 32k, bs 64 (ms): BN64 s3 EPI0 17.8, BN64 s4 19.0 (EPI1), BN128 s3 EPI0 20.5
        return [dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, EPI=0, JC=64),
                dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4, EPI=0, JC=64),
                dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, EPI=0, JC=64)]
    return [dict(c, EPI=1, JC=64) for c in _dense_candidates(key)]


def _interpreter_fwd(key: tuple) -> dict:
    block_size = key[1]
    return dict(BLOCK_M=max(block_size, 32), BLOCK_N=min(block_size, 32), num_warps=4, num_stages=1)


def _pass2_candidates(key: tuple) -> list[dict]:
    if key[0] >= 256:
        return [dict(BLOCK_M=128, num_warps=8, num_stages=2), dict(BLOCK_M=64, num_warps=4, num_stages=2)]
    # H100, 32k, D 128, bs 64 (ms): w4 s3 8.54, w8 s3 8.93, w8 s2 9.07
    return [dict(BLOCK_M=128, num_warps=4, num_stages=3), dict(BLOCK_M=128, num_warps=8, num_stages=2),
            dict(BLOCK_M=128, num_warps=8, num_stages=3)]


def _pass2_invalid(config: dict, key: tuple) -> str | None:
    block_size = key[1]
    return None if config["BLOCK_M"] % block_size == 0 else \
        f"invalid for block_size {block_size}: BLOCK_M must be a multiple of block_size"


# what the Hopper candidate changes in a key's default: Q/K/V (pass 2: Q/K) in and the output out through the copy
# engine (USE_TMA; a config without the entry has it off). Added after the default on devices of capability >= 9,
# so the runtime tuner times both at the first call of a key; the launchers drop it where the tensors do not allow
# it (seer.kernels.common.tma_ok), the candidate then runs the plain loads.
HOPPER_VARIANTS: tuple[dict, ...] = (dict(USE_TMA=True),)


def _with_hopper(candidates):
    """``candidates`` (key -> configs), followed on a device of capability >= 9 by the default with each of
    :data:`HOPPER_VARIANTS`."""
    def on_device(key: tuple) -> list[dict]:
        configs = candidates(key)
        if is_hopper(torch.device("cuda", torch.cuda.current_device())):
            return with_variants(configs, HOPPER_VARIANTS)
        return configs
    return on_device


_TILES = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "USE_TMA")
DENSE = LaunchTable("flash_gt.dense", _TILES, _with_hopper(_dense_candidates), _interpreter_fwd, _fwd_invalid)
FAST = LaunchTable("flash_gt.fast", _TILES + ("EPI", "JC"), _with_hopper(_fast_candidates),
                   lambda key: dict(_interpreter_fwd(key), EPI=1, JC=16), _fwd_invalid)
PASS2 = LaunchTable("flash_gt.pass2", ("BLOCK_M", "num_warps", "num_stages", "USE_TMA"),
                    _with_hopper(_pass2_candidates),
                    lambda key: dict(BLOCK_M=max(key[1], 32), num_warps=4, num_stages=1), _pass2_invalid)


def _key(head_dim: int, block_size: int, dtype: torch.dtype, n: int) -> tuple:
    """Tuning key; the length in buckets: powers of two from 1k, one bucket for everything >= 32k."""
    return head_dim, block_size, dtype, min(1 << max(10, (n - 1).bit_length()), 32768)


# --------------------------------------------------------------------------------------------------------------
# Python API
# --------------------------------------------------------------------------------------------------------------


def fast_scratch_bytes(batch: int, q_heads: int, seq_len: int, block_size: int = 64) -> int:
    """Bytes of the float32 causal-triangle scratch that ``mode="fast"`` allocates."""
    nb = (seq_len + block_size - 1) // block_size
    return batch * q_heads * block_size * (nb * (nb + 1) // 2) * 4


def _free_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device, counting what PyTorch's caching allocator holds unused; None on the CPU."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _auto_mode(scratch_bytes: int, free_bytes: int | None, fast_fraction: float) -> str:
    return "fast" if free_bytes is None or scratch_bytes <= fast_fraction * free_bytes else "lowmem"


def _on(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check_rows(b: int, hq: int, n: int) -> None:
    if n < 1:
        raise ValueError(f"sequence length must be >= 1, got {n}")
    if b < 1 or hq < 1:
        raise ValueError(f"batch ({b}) and heads ({hq}) must be >= 1")


@torch.no_grad()
def flash_attn_with_gt(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int = 64,
                       sm_scale: float | None = None, mode: str = "auto", return_gt: bool = True, *,
                       out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                       gt: torch.Tensor | None = None, fast_fraction: float = 0.25):
    """Causal attention forward plus the block max-pooled attention map (SeerAttention's ground truth).

    Args:
        q: ``[B, Hq, N, D]``; k, v: ``[B, Hkv, N, D]``, ``Hq`` a multiple of ``Hkv`` (GQA; query head ``h`` reads
            key/value head ``h // (Hq // Hkv)``). float16, bfloat16 or float32; ``D`` in 16, 32, 64, 128, 256.
            CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
        block_size: ground-truth tile size (16, 32, 64, 128).
        sm_scale: softmax scale, default ``1 / sqrt(D)``.
        mode: ``"fast"`` (one pass, float32 causal-triangle scratch of :func:`fast_scratch_bytes`),
            ``"lowmem"`` (dense pass, then :func:`gt_from_lse`; no extra memory), ``"auto"`` (fast if its
            scratch fits in ``fast_fraction`` of the free memory). Ignored when ``return_gt`` is false.
        return_gt: if false, only the dense forward runs and ``gt`` is returned as ``None``.
        out, lse, gt: optional preallocated outputs (``[B, Hq, N, D]`` q dtype in any layout with a unit last
            stride, contiguous ``[B, Hq, N]`` float32, contiguous ``[B, Hq, nb, nb]`` float32); every element is
            written.
        fast_fraction: for ``mode="auto"``: the share of the free device memory (0 to 1) the fast mode's scratch
            may take.

    Returns:
        ``(out, lse, gt)``: ``out`` ``[B, Hq, N, D]`` in q's dtype, ``lse`` ``[B, Hq, N]`` float32 (natural log),
        ``gt`` ``[B, Hq, nb, nb]`` float32 with ``nb = ceil(N / block_size)`` (``None`` if not ``return_gt``).
        Runs under ``torch.no_grad()``: there is no backward. Launch configs: :mod:`seer.kernels.tuning`.
    """
    b, hq, _, n, d = check_qkv(q, k, v)
    check_device(q=q, k=k, v=v)
    _check_rows(b, hq, n)
    check_block_size(block_size)
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    if not (isinstance(fast_fraction, (int, float)) and 0.0 <= fast_fraction <= 1.0):
        raise ValueError(f"fast_fraction must be a number from 0 to 1, got {fast_fraction!r}")
    qk_scale = softmax_scale(sm_scale, d) * LOG2E.value
    q, k, v = with_unit_last_stride(q), with_unit_last_stride(k), with_unit_last_stride(v)
    nb = (n + block_size - 1) // block_size
    dev = q.device
    out = output("out", out, (b, hq, n, d), q.dtype, dev, contiguous=False)
    lse = output("lse", lse, (b, hq, n), torch.float32, dev, contiguous=True)
    key = _key(d, block_size, q.dtype, n)
    with _on(dev):
        if not return_gt:
            DENSE.launch(key, lambda c: launch_forward(q, k, v, out, lse, lse, lse, qk_scale, nb, 0, block_size,
                                                       False, c))
            return out, lse, None
        gt = output("gt", gt, (b, hq, nb, nb), torch.float32, dev, contiguous=True)
        scratch_bytes = fast_scratch_bytes(b, hq, n, block_size)
        if (mode if mode != "auto" else _auto_mode(scratch_bytes, _free_bytes(dev), fast_fraction)) == "fast":
            tri = block_size * (nb * (nb + 1) // 2)
            if tri > INT32_MAX:
                raise ValueError(f"N={n} with block_size={block_size} is too long for mode='fast'; use 'lowmem'")
            scratch = torch.empty(b * hq * tri, dtype=torch.float32, device=dev)

            def run_fast(c: dict):
                kernel = launch_forward(q, k, v, out, lse, scratch, gt, qk_scale, nb, tri, block_size, True, c)
                if not c["EPI"]:
                    launch_epilogue(lse, scratch, gt, nb, tri, block_size)
                return kernel
            FAST.launch(key, run_fast)
        else:
            DENSE.launch(key, lambda c: launch_forward(q, k, v, out, lse, lse, lse, qk_scale, nb, 0, block_size,
                                                       False, c))
            PASS2.launch(key, lambda c: launch_pass2(q, k, lse, gt, qk_scale, nb, block_size, c))
    return out, lse, gt


@torch.no_grad()
def gt_from_lse(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, block_size: int = 64,
                sm_scale: float | None = None, *, gt: torch.Tensor | None = None, pool: str = "max") -> torch.Tensor:
    """The ground truth from ``q``, ``k`` and the final ``lse`` of their causal attention (``mode="lowmem"``'s
    second pass): ``gt[i, j] = exp(max_{r in block i, c in block j, c <= r} (s[r, c] - lse[r]))``; with
    ``pool="mass"`` the block attention mass instead, ``mean_{r in block i} sum_{c in block j, c <= r}
    exp(s[r, c] - lse[r])`` (each row sums to 1; :func:`seer.kernels.reference.block_attn_mass`).

    ``q``, ``k``, ``block_size``, ``sm_scale``, ``gt`` as in :func:`flash_attn_with_gt`; ``lse`` contiguous
    ``[B, Hq, N]`` float32 in natural log, e.g. from :func:`flash_attn` with the same scale. Returns ``gt``
    ``[B, Hq, nb, nb]`` float32.
    """
    if pool not in POOLS:
        raise ValueError(f"pool={pool!r}: choose from {POOLS}")
    b, hq, _, n, d = check_qkv(q, k, None)
    check_device(q=q, k=k)
    _check_rows(b, hq, n)
    check_block_size(block_size)
    check_tensor("lse", lse, (b, hq, n), torch.float32, q.device, contiguous=True)
    qk_scale = softmax_scale(sm_scale, d) * LOG2E.value
    q, k = with_unit_last_stride(q), with_unit_last_stride(k)
    nb = (n + block_size - 1) // block_size
    gt = output("gt", gt, (b, hq, nb, nb), torch.float32, q.device, contiguous=True)
    with _on(q.device):
        PASS2.launch(_key(d, block_size, q.dtype, n),
                     lambda c: launch_pass2(q, k, lse, gt, qk_scale, nb, block_size, c, mass=pool == "mass"))
    return gt


def flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float | None = None, **kw):
    """Dense causal attention forward (the same kernel with the ground truth compiled out): ``(out, lse)``."""
    out, lse, _ = flash_attn_with_gt(q, k, v, sm_scale=sm_scale, return_gt=False, **kw)
    return out, lse
