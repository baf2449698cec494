"""What every seer kernel shares: supported sizes and dtypes, pooling names, log constants, the interpreter
switch, the checks of the arguments the attention kernels take, the tile check of the block-sparse launch tables
(:func:`tiles_invalid`), whether the copy engine can read a tensor (:func:`tma_ok`, :func:`is_hopper`) and how the
launch tables add their Hopper candidates (:func:`with_variants`).

Configs outside this package (``seer.gates.GateConfig`` and friends) validate against these constants, so a
value the kernels cannot run is refused when the config is built, not at the first launch.

Conventions every attention kernel here follows:

* ``q`` is ``[B, Hq, N, D]``, ``k`` and ``v`` are ``[B, Hkv, N, D]`` with ``Hq`` a multiple of ``Hkv``
  (grouped-query attention: query head ``h`` reads key/value head ``h // (Hq // Hkv)``), any strides with a unit
  last stride; offsets inside one head are int32 in the kernels (:func:`with_unit_last_stride` checks that they
  fit), batch and head offsets int64.
* Softmaxes run in base 2 with ``log2(e)`` folded into the scale (``exp(x) = exp2(x * LOG2E)``), and a log-sum-exp
  is returned in natural log (``lse = lse2 * LN2``).
* Dots take ``input_precision=DOT_PRECISION`` (:func:`dot_precision`): IEEE float32 for float32 inputs (tests
  compare those against a float64 reference), Triton's default ``"tf32"`` otherwise (for float16 / bfloat16
  inputs the precision setting changes nothing).
* :data:`INTERPRET`: the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` set before the kernel
  modules were imported: ``triton.jit`` decides at definition time). The interpreter runs each program as NumPy
  code and converts a loop bound with ``int(array)``, which NumPy >= 2.4 refuses for the one-element arrays it
  holds run-time scalars in; so every loop whose bound is known only at run time is written twice, selected by
  the ``INTERP`` constexpr::

      if INTERP:  # a while loop needs only the comparison, which the interpreter can evaluate
          j = lo
          while j < hi:
              ... = body(j, ...)
              j += STEP
      else:  # compiled: a counted loop (range or tl.range), software-pipelined by num_stages
          for j in range(lo, hi, STEP):
              ... = body(j, ...)

  with a body of more than one statement in one ``@triton.jit`` helper (inlined by the compiler: the PTX is
  that of the plain loop).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK_SIZES = (16, 32, 64, 128)  # token block sizes every kernel (ground truth, block-sparse, pooling) supports
HEAD_DIMS = (16, 32, 64, 128, 256)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
POOL_KINDS = ("avg", "max", "min", "last")  # the gate's block-pooling types

# constexpr, so that kernels can read them too; Python code takes ``.value``
LOG2E = tl.constexpr(1.0 / math.log(2.0))
LN2 = tl.constexpr(math.log(2.0))

INT32_MAX = 2**31 - 1
INTERPRET: bool = triton.knobs.runtime.interpret


def dot_precision(dtype: torch.dtype) -> str:
    """The ``DOT_PRECISION`` constexpr of the kernels for inputs of ``dtype``: ``"ieee"`` for float32, else
    ``"tf32"`` (Triton's default)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _one_of(values) -> str:
    names = [str(v).removeprefix("torch.") for v in values]
    return ", ".join(names[:-1]) + " or " + names[-1]


def check_qkv_shapes(q: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor | None = None) -> tuple[int, int, int, int, int]:
    """The shapes of attention inputs (any dtype): 4-D, ``k`` like ``q`` in batch, length and head dim, query
    heads a multiple of key/value heads, ``v`` (when given) the shape of ``k``. Returns ``(B, Hq, Hkv, N, D)``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t is not None and t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, N, D]; got shape {list(t.shape)}")
    b, hq, n, d = q.shape
    bk, hkv, nk, dk = k.shape
    if (bk, nk, dk) != (b, n, d):
        raise ValueError(f"k {list(k.shape)} does not match q {list(q.shape)} in batch, length or head dim")
    if hkv < 1 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v {list(v.shape)} must have the shape of k {list(k.shape)}")
    return b, hq, hkv, n, d


def check_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                 block_mask: torch.Tensor, block_size: int, seqlens: list[int] | None = None) -> list[int]:
    """The inputs of sequences packed in one row (FlashAttention's varlen layout): ``q [T, Hq, D]``, ``k``/``v``
    ``[T, Hkv, D]``; ``cu_seqlens`` int32 ``[S + 1]`` offsets, 0 first, ``T`` last, never decreasing (empty sequences
    allowed); ``block_mask`` bool ``[S, Hq or Hkv, nb, nb]`` with ``nb`` blocks covering the longest sequence. Returns
    the ``S`` lengths: ``seqlens`` when given (the lengths on the host: checked, no device read), else read from
    ``cu_seqlens`` (one host sync)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor [T, H, D] of packed sequences; got "
                             f"{list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    check_qkv_shapes(*(x.transpose(0, 1).unsqueeze(0) for x in (q, k, v)))
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 \
            or len(cu_seqlens) < 1:
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor of S + 1 sequence offsets; got "
                         f"{cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__}"
                         f" {list(getattr(cu_seqlens, 'shape', []))}")
    if seqlens is not None:
        seqlens = [int(n) for n in seqlens]
        if len(seqlens) != len(cu_seqlens) - 1 or min(seqlens, default=0) < 0:
            raise ValueError(f"seqlens must list the {len(cu_seqlens) - 1} sequence lengths of cu_seqlens, none "
                             f"negative; got {seqlens}")
        offsets = [0]
        for n in seqlens:
            offsets.append(offsets[-1] + n)
    else:
        offsets = cu_seqlens.tolist()
    drops = [i for i in range(1, len(offsets)) if offsets[i] < offsets[i - 1]]
    if offsets[0] != 0 or drops:
        where = f"{offsets[0]} first" if offsets[0] != 0 else f"{offsets[drops[0] - 1]} -> {offsets[drops[0]]} at " \
            f"index {drops[0]}"
        raise ValueError(f"cu_seqlens must start at 0 and never decrease; got {where}")
    if offsets[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens must end at the row length T={q.shape[0]}; it ends at {offsets[-1]}")
    if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool or block_mask.dim() != 4:
        raise ValueError(f"block_mask must be a bool tensor [S, H, nb, nb]; got "
                         f"{getattr(block_mask, 'dtype', type(block_mask).__name__)} "
                         f"{list(getattr(block_mask, 'shape', []))}")
    seqs, longest = len(offsets) - 1, max((b - a for a, b in zip(offsets, offsets[1:])), default=0)
    nb = block_mask.shape[2]
    if block_mask.shape[0] != seqs or block_mask.shape[1] not in (q.shape[1], k.shape[1]) \
            or block_mask.shape[3] != nb or nb * block_size < longest:
        raise ValueError(f"block_mask {list(block_mask.shape)} does not match the packed sequences: need [S={seqs}, "
                         f"Hq={q.shape[1]} or Hkv={k.shape[1]}, nb, nb] with nb >= {-(-longest // block_size)} "
                         f"blocks of {block_size} for the longest sequence ({longest} tokens)")
    return [b - a for a, b in zip(offsets, offsets[1:])]


def varlen_order(cu_seqlens: torch.Tensor, seqlens: list[int], heads: int, tile: int, n_prog: int,
                 last_first: bool) -> torch.Tensor:
    """The programs of a packed launch that have tokens to work on, in the linear order of the padded 2-d grid
    ``(n_prog, S * heads)`` they replace: int32 ``(s * heads + h) * n_prog + p``.

    Program ``p`` of sequence ``s`` covers its tokens ``[p * tile, (p + 1) * tile)`` and is real when ``p * tile <
    len_s`` (``ceil(len_s / tile) <= n_prog`` of them). Each ``(s, h)`` in turn (sequence-major, as ``pid_bh``) lists
    its real programs, ``p`` descending with ``last_first`` (query tiles: the longest causal lists first) else
    ascending (key tiles); so programs sharing a head's K/V still run together (L2 locality), only the empty ones
    past each sequence's end are gone. Built on the device from ``cu_seqlens`` without a host sync: ``seqlens`` (the
    lengths, known on the host) give the count."""
    dev = cu_seqlens.device
    rows = len(seqlens) * heads
    count = heads * sum(-(-n // tile) for n in seqlens)
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    per_row = torch.div(lens + tile - 1, tile, rounding_mode="floor").repeat_interleave(heads)  # [S * heads]
    row = torch.repeat_interleave(torch.arange(rows, device=dev), per_row, output_size=count)
    first = torch.cumsum(per_row, 0) - per_row  # each row's first position in the order
    p = torch.arange(count, device=dev) - first[row]
    if last_first:
        p = per_row[row] - 1 - p
    return (row * n_prog + p).to(torch.int32)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None) -> tuple[int, int, int, int, int]:
    """:func:`check_qkv_shapes` plus what the Triton kernels need: tensors of one supported dtype
    (:data:`DTYPES`) and a supported head dim (:data:`HEAD_DIMS`). Returns ``(B, Hq, Hkv, N, D)``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    b, hq, hkv, n, d = check_qkv_shapes(q, k, v)
    if q.dtype not in DTYPES:
        raise ValueError(f"q dtype {q.dtype} is not supported; supported: {_one_of(DTYPES)}")
    if k.dtype != q.dtype or (v is not None and v.dtype != q.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {None if v is None else v.dtype}")
    if d not in HEAD_DIMS:
        raise ValueError(f"head dim {d} is not supported; supported: {_one_of(HEAD_DIMS)}")
    return b, hq, hkv, n, d


def check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size {block_size!r} is not supported; supported: {_one_of(BLOCK_SIZES)}")


def check_device(**tensors: torch.Tensor) -> None:
    """The named tensors are on one device, on which the kernels run: CUDA, or the CPU under the interpreter."""
    (first, t0), *rest = tensors.items()
    for name, t in rest:
        if t.device != t0.device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {t0.device}: the tensors must be on one "
                             "device")
    if t0.device.type == "cpu" and not INTERPRET:
        raise ValueError(f"{first} is on the CPU: the Triton kernels need a CUDA device, or TRITON_INTERPRET=1 set "
                         "before triton is imported to run them in Triton's CPU interpreter")
    if t0.device.type not in ("cuda", "cpu"):
        raise ValueError(f"{first} is on {t0.device}: the kernels run on CUDA devices (or the CPU under "
                         "TRITON_INTERPRET=1)")


def softmax_scale(sm_scale: float | None, head_dim: int) -> float:
    """``sm_scale``, checked to be a positive finite number, or ``1 / sqrt(head_dim)`` when it is None."""
    if sm_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not (isinstance(sm_scale, (int, float)) and math.isfinite(sm_scale) and sm_scale > 0):
        raise ValueError(f"sm_scale must be a positive finite number, got {sm_scale!r}")
    return float(sm_scale)


def _head_fits_int32(x: torch.Tensor) -> bool:
    return (x.shape[2] - 1) * x.stride(2) + x.shape[3] <= INT32_MAX


def with_unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    """A ``[B, H, N, D]`` kernel input as the kernels address it: ``x`` itself when its last stride is 1 and the
    offsets inside one head fit int32, else a contiguous copy (which must fit)."""
    if x.stride(-1) != 1 or not _head_fits_int32(x):
        x = x.contiguous()
    if not _head_fits_int32(x):
        raise ValueError(f"one head of {list(x.shape)} holds more than 2^31 elements")
    return x


def check_tensor(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype, device: torch.device,
                 contiguous: bool) -> torch.Tensor:
    """``t`` of ``shape``, ``dtype`` and ``device``, and contiguous, or for ``contiguous=False`` any layout with a
    unit last stride (and int32 offsets inside a ``[B, H, N, D]`` head), e.g. the ``[B, H, N, D]`` view of a
    ``[B, N, H, D]`` buffer. Returns ``t``."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    layout_ok = t.is_contiguous() if contiguous else (t.stride(-1) == 1 and (t.dim() != 4 or _head_fits_int32(t)))
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device or not layout_ok:
        need = "contiguous" if contiguous else "unit-last-stride"
        raise ValueError(f"{name} must be a {need} {dtype} tensor of shape {list(shape)} on {device}; got "
                         f"{t.dtype} {list(t.shape)} on {t.device} (strides {t.stride()})")
    return t


def output(name: str, t: torch.Tensor | None, shape: tuple, dtype: torch.dtype, device: torch.device,
           contiguous: bool) -> torch.Tensor:
    """A kernel output: ``t`` when given (see :func:`check_tensor`), else a new contiguous tensor."""
    if t is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return check_tensor(name, t, shape, dtype, device, contiguous)


def tiles_invalid(config: dict, key: tuple) -> str | None:
    """Why ``config`` cannot run for ``key`` (mask block size ``key[1]``), or None: its tiles (``BLOCK_M``,
    ``BLOCK_N``, those it has) must divide the mask block. The check of the launch tables of the block-sparse
    forward and backward."""
    block = key[1]
    for tile in ("BLOCK_M", "BLOCK_N"):
        if tile in config and block % config[tile]:
            return f"invalid for block_size {block}: {tile} must divide the mask block size"
    return None


def _scratch(size: int, align: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def is_hopper(device: torch.device) -> bool:
    """Whether ``device`` is a CUDA device of compute capability 9.0 or later (Hopper and later: the copy engine);
    False under the interpreter."""
    return not INTERPRET and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def with_variants(configs: list[dict], variants) -> list[dict]:
    """``configs`` followed by the first of them (a launch table's default) with each of ``variants`` merged over
    it, where that is not among them yet: how the launch tables add their Hopper candidates."""
    configs = list(configs)
    for variant in variants:
        config = dict(configs[0], **variant)
        if config not in configs:
            configs.append(config)
    return configs


def tma_ok(*tensors: torch.Tensor) -> bool:
    """Whether the copy engine (TMA, Hopper and later) can read or write these [B, H, N, D] tensors; when it can,
    makes sure the calling thread has the scratch allocator device-side descriptors need (Triton keeps it in a
    context variable, so a thread that never set it, e.g. autograd's backward worker, has none)."""
    if not is_hopper(tensors[0].device):
        return False
    for t in tensors:
        es = t.element_size()
        if t.data_ptr() % 16 or t.stride(3) != 1 or any((t.stride(i) * es) % 16 for i in range(3)):
            return False
    triton.set_allocator(_scratch)
    return True
