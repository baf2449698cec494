"""flash_attn_with_gt against the PyTorch reference (CPU: Triton interpreter; `gpu`: bf16 at 4k-32k on CUDA).

Every run writes into outputs prefilled with NaN, so an element the kernel fails to write fails the test.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from seer.kernels import reference
from seer.kernels.flash_gt import fast_scratch_bytes, flash_attn, flash_attn_with_gt
from seer.kernels.flash_gt import gt_from_lse as flash_gt_from_lse
from seer.kernels.tuning import force_config


def _inputs(b, hq, hkv, n, d, dtype, device="cpu", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(device=device, dtype=dtype) for h in (hq, hkv, hkv))
    return q, k, v


def _poisoned(q, n_blocks):
    b, hq, n, d = q.shape
    out = torch.full((b, hq, n, d), float("nan"), dtype=q.dtype, device=q.device)
    lse = torch.full((b, hq, n), float("nan"), dtype=torch.float32, device=q.device)
    gt = torch.full((b, hq, n_blocks, n_blocks), float("nan"), dtype=torch.float32, device=q.device)
    return out, lse, gt


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _check_gt(gt, ref_gt, tol):
    assert not torch.isnan(gt).any(), "gt has unwritten (NaN) elements"
    nb = gt.shape[-1]
    upper = torch.ones(nb, nb, dtype=torch.bool, device=gt.device).triu(1)
    assert (gt[..., upper] == 0).all(), "tiles above the diagonal must be 0"
    lower = ~upper
    r = ref_gt.double()[..., lower]
    err = ((gt.double()[..., lower] - r).abs() / r.abs().clamp_min(1e-30)).max().item()
    assert err <= tol, f"gt max relative error {err:.3e} > {tol}"


def _forced(kernel_and_config):
    """``force_config`` of a ``(kernel, config)`` pair; no change for None."""
    return force_config(kernel_and_config[0], **kernel_and_config[1]) if kernel_and_config \
        else contextlib.nullcontext()


# (B, Hq, Hkv, N, D, dtype, block_size, mode, (kernel, forced launch config) or None for the default)
CASES = [
    (1, 2, 2, 1, 16, torch.float32, 16, "fast", None),
    (1, 4, 1, 63, 16, torch.float16, 16, "lowmem", None),
    (2, 4, 1, 64, 64, torch.float32, 64, "fast", None),
    (1, 4, 1, 65, 16, torch.float32, 32, "fast", ("flash_gt.fast", dict(BLOCK_M=64, BLOCK_N=64))),  # 2 gt blocks
    (1, 2, 2, 200, 64, torch.float16, 64, "fast", None),  # 2 key tiles per gt block (running max)
    (1, 4, 1, 200, 16, torch.float32, 32, "lowmem", None),
    (2, 2, 1, 256, 16, torch.float16, 16, "fast", ("flash_gt.fast", dict(BLOCK_M=64, BLOCK_N=16))),  # 4 gt rows
    (1, 2, 2, 256, 64, torch.float32, 64, "lowmem", None),
    (1, 4, 4, 65, 64, torch.float16, 64, "lowmem", ("flash_gt.pass2", dict(BLOCK_M=128))),  # 2 gt rows, pass 2
    (1, 4, 1, 200, 16, torch.float16, 16, "auto", None),
    (2, 4, 2, 200, 16, torch.float32, 16, "fast", ("flash_gt.fast", dict(BLOCK_M=64, BLOCK_N=64))),  # 4 gt blocks
    (1, 2, 1, 130, 32, torch.float16, 32, "fast", ("flash_gt.fast", dict(BLOCK_M=64, BLOCK_N=32, EPI=0))),  # epilogue
    (1, 2, 1, 100, 16, torch.float32, 16, "fast", ("flash_gt.fast", dict(BLOCK_M=32, BLOCK_N=32, EPI=0, JC=64))),
    (1, 4, 2, 70, 32, torch.float32, 32, "lowmem", ("flash_gt.dense", dict(BLOCK_M=64, BLOCK_N=64))),  # pass 1
]


@pytest.mark.parametrize("b,hq,hkv,n,d,dtype,bs,mode,forced", CASES,
                         ids=[f"B{c[0]}-H{c[1]}:{c[2]}-N{c[3]}-D{c[4]}-{str(c[5])[6:]}-bs{c[6]}-{c[7]}"
                              f"{'-' + c[8][0] if c[8] else ''}" for c in CASES])
def test_matches_reference(b, hq, hkv, n, d, dtype, bs, mode, forced):
    q, k, v = _inputs(b, hq, hkv, n, d, dtype, seed=n * 31 + d)
    nb = reference.num_blocks(n, bs)
    out, lse, gt = _poisoned(q, nb)
    with _forced(forced):
        res = flash_attn_with_gt(q, k, v, bs, mode=mode, out=out, lse=lse, gt=gt)
    assert res[0] is out and res[1] is lse and res[2] is gt
    ref_out, ref_lse = reference.attention(q, k, v)
    ref_gt = reference.block_gt(q, k, bs)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "unwritten out/lse elements"
    assert _rel(out, ref_out) < (1e-5 if dtype == torch.float32 else 2e-3)
    assert (lse - ref_lse).abs().max().item() < 1e-4
    _check_gt(gt, ref_gt, 1e-3)


def test_default_outputs_sm_scale_and_dense_only():
    q, k, v = _inputs(1, 2, 1, 100, 32, torch.float32, seed=7)
    out, lse, gt = flash_attn_with_gt(q, k, v, block_size=32, sm_scale=0.3)
    assert out.shape == q.shape and lse.shape == (1, 2, 100) and gt.shape == (1, 2, 4, 4)
    ref_out, ref_lse = reference.attention(q, k, v, sm_scale=0.3)
    assert _rel(out, ref_out) < 1e-5
    _check_gt(gt, reference.block_gt(q, k, 32, sm_scale=0.3), 1e-3)
    out2, lse2, none = flash_attn_with_gt(q, k, v, sm_scale=0.3, return_gt=False)
    assert none is None and _rel(out2, ref_out) < 1e-5 and (lse2 - ref_lse).abs().max() < 1e-4
    out3, lse3 = flash_attn(q, k, v, sm_scale=0.3)
    assert torch.equal(out3, out2) and torch.equal(lse3, lse2)


def test_no_grad_and_strided_inputs():
    q, k, v = _inputs(1, 4, 2, 70, 16, torch.float32, seed=3)
    q.requires_grad_(True)
    # [B, N, H, D] storage viewed as [B, H, N, D]
    qs, ks, vs = (x.detach().transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    out, lse, gt = flash_attn_with_gt(q, k, v, 16)
    assert not out.requires_grad and not gt.requires_grad
    out2, lse2, gt2 = flash_attn_with_gt(qs, ks, vs, 16)
    assert torch.allclose(out, out2) and torch.allclose(lse, lse2) and torch.allclose(gt, gt2)


@pytest.mark.parametrize("mode", ["fast", "lowmem"])
def test_output_written_into_a_transposed_buffer(mode):
    """``out`` may be the [B, H, N, D] view of a [B, N, H, D] buffer (what o_proj reads): every element written."""
    q, k, v = _inputs(2, 4, 2, 70, 16, torch.float32, seed=5)
    buffer = torch.full((2, 70, 4, 16), float("nan"))
    out, _, gt = flash_attn_with_gt(q, k, v, 16, mode=mode, out=buffer.transpose(1, 2))
    ref_out, _ = reference.attention(q.double(), k.double(), v.double())
    assert out.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(buffer.transpose(1, 2).double(), ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gt.double(), reference.block_gt(q.double(), k.double(), 16), rtol=1e-4, atol=1e-6)


def test_scratch_bytes():
    # float32 causal triangle: 32 heads x 64 x 512*513/2 x 4 bytes at 32k tokens, block 64 (about 1.0 GiB)
    assert fast_scratch_bytes(1, 32, 32768, 64) == 32 * 64 * (512 * 513 // 2) * 4
    assert fast_scratch_bytes(1, 32, 32768, 64) <= 1.52 * 2**30


@pytest.mark.parametrize("kwargs,match", [
    (dict(q=torch.zeros(2, 3, 4)), "4-D"),
    (dict(q=torch.zeros(1, 2, 8, 16, dtype=torch.float64)), "dtype"),
    (dict(k=torch.zeros(1, 2, 8, 16, dtype=torch.float16)), "share a dtype"),
    (dict(q=torch.zeros(1, 3, 8, 16)), "multiple of key/value heads"),
    (dict(k=torch.zeros(1, 2, 9, 16), v=torch.zeros(1, 2, 9, 16)), "does not match q"),
    (dict(v=torch.zeros(1, 2, 8, 32)), "shape of k"),
    (dict(q=torch.zeros(1, 2, 8, 48), k=torch.zeros(1, 2, 8, 48), v=torch.zeros(1, 2, 8, 48)), "head dim 48"),
    (dict(q=torch.zeros(1, 2, 0, 16), k=torch.zeros(1, 2, 0, 16), v=torch.zeros(1, 2, 0, 16)), ">= 1"),
    (dict(block_size=48), "block_size 48"),
    (dict(mode="fastest"), "'fastest'"),
    (dict(sm_scale=-1.0), "sm_scale"),
    (dict(out=torch.zeros(1, 2, 8, 8)), "out must be"),
    (dict(out=torch.zeros(1, 2, 16, 8).transpose(2, 3)), "unit-last-stride"),
    (dict(gt=torch.zeros(1, 2, 2, 2)), r"gt must be .*\[1, 2, 1, 1\]"),
    (dict(fast_fraction=1.5), "fast_fraction must be .* got 1.5"),
    (dict(fast_fraction="half"), "fast_fraction must be"),
])
def test_bad_inputs(kwargs, match):
    args = dict(q=torch.zeros(1, 2, 8, 16), k=torch.zeros(1, 2, 8, 16), v=torch.zeros(1, 2, 8, 16))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        flash_attn_with_gt(**args)


def test_forced_config_must_fit_the_block_size():
    q = torch.zeros(1, 2, 8, 16)
    with force_config("flash_gt.fast", BLOCK_M=32, BLOCK_N=32), \
            pytest.raises(ValueError, match=r"flash_gt.fast config .*invalid for block_size 64"):
        flash_attn_with_gt(q, q, q, block_size=64, mode="fast")
    with force_config("flash_gt.pass2", BLOCK_M=32), pytest.raises(ValueError, match="invalid for block_size 64"):
        flash_attn_with_gt(q, q, q, block_size=64, mode="lowmem")


def test_auto_mode_takes_fast_while_the_scratch_fits_the_fraction():
    from seer.kernels.flash_gt import _auto_mode

    assert _auto_mode(250, 1000, 0.25) == "fast"
    assert _auto_mode(251, 1000, 0.25) == "lowmem"
    assert _auto_mode(1, 1000, 0.0) == "lowmem"
    assert _auto_mode(1000, 1000, 1.0) == "fast"
    assert _auto_mode(10**15, None, 0.25) == "fast"  # the CPU (interpreter): no device memory to run out of


@pytest.mark.parametrize("fast_fraction", [0.0, 1.0])
def test_fast_fraction_picks_the_mode(monkeypatch, fast_fraction):
    """``mode="auto"`` with a device of 1 MiB free: a fraction of 0 sends the call to the low-memory passes, 1
    to the fast pass (its scratch is far below 1 MiB here); both give the reference."""
    from seer.kernels import flash_gt

    monkeypatch.setattr(flash_gt, "_free_bytes", lambda device: 2**20)
    q, k, v = _inputs(1, 2, 1, 40, 16, torch.float32, seed=11)
    launched = []
    for name in ("launch_forward", "launch_pass2"):
        real = getattr(flash_gt, name)
        monkeypatch.setattr(flash_gt, name, lambda *a, real=real, name=name: launched.append(name) or real(*a))
    out, lse, gt = flash_attn_with_gt(q, k, v, 16, fast_fraction=fast_fraction)
    assert launched == (["launch_forward", "launch_pass2"] if fast_fraction == 0.0 else ["launch_forward"])
    _check_gt(gt, reference.block_gt(q, k, 16), 1e-3)
    assert _rel(out, reference.attention(q, k, v)[0]) < 1e-5


def test_gt_from_lse_matches_the_fused_pass():
    q, k, v = _inputs(2, 4, 2, 90, 32, torch.float32, seed=4)
    out, lse, gt = flash_attn_with_gt(q, k, v, 32, sm_scale=0.2, mode="fast")
    gt2 = torch.full_like(gt, float("nan"))
    assert flash_gt_from_lse(q, k, lse, 32, sm_scale=0.2, gt=gt2) is gt2
    torch.testing.assert_close(gt2, gt, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match=r"lse must be a contiguous torch.float32 tensor of shape \[2, 4, 90\]"):
        flash_gt_from_lse(q, k, lse[:, :, :50], 32)
    with pytest.raises(ValueError, match="lse must be a torch.Tensor"):
        flash_gt_from_lse(q, k, None, 32)


@pytest.mark.parametrize("b, hq, hkv, n, bs", [(1, 4, 1, 100, 16), (2, 2, 2, 64, 32), (1, 2, 1, 37, 16)])
def test_block_mass_from_lse_matches_the_reference(b, hq, hkv, n, bs):
    q, k, v = _inputs(b, hq, hkv, n, 16, torch.float32, seed=n)
    _, lse = flash_attn(q, k, v, sm_scale=0.3)
    nb = -(-n // bs)
    mass = torch.full((b, hq, nb, nb), float("nan"))
    flash_gt_from_lse(q, k, lse, bs, sm_scale=0.3, gt=mass, pool="mass")
    want = reference.block_attn_mass(q.double(), k.double(), bs, sm_scale=0.3)
    assert not torch.isnan(mass).any()
    torch.testing.assert_close(mass.double(), want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(mass.sum(-1), torch.ones(b, hq, nb), rtol=1e-4, atol=1e-5)  # rows are distributions
    with pytest.raises(ValueError, match="pool='mean': choose from"):
        flash_gt_from_lse(q, k, lse, bs, sm_scale=0.3, pool="mean")


# ---------------------------------------------------------------------------------------- Hopper path (USE_TMA)


def _forced_all(configs: dict):
    """``force_config`` of each ``{kernel: config}`` entry at once."""
    stack = contextlib.ExitStack()
    for kernel, config in configs.items():
        stack.enter_context(force_config(kernel, **config))
    return stack


# (B, Hq, Hkv, N, D, dtype, block_size, mode, {kernel: forced config, USE_TMA on}); lengths off the tile grid
TMA_CASES = [
    (1, 4, 2, 75, 16, torch.float16, 16, "fast", {"flash_gt.fast": dict(BLOCK_M=32, BLOCK_N=32)}),  # 2 gt blocks/tile
    (1, 2, 1, 130, 16, torch.float16, 16, "fast", {"flash_gt.fast": dict(BLOCK_M=64, BLOCK_N=64)}),  # 4 gt blocks/tile
    (1, 4, 1, 100, 16, torch.float32, 32, "fast", {"flash_gt.fast": dict(BLOCK_M=64, BLOCK_N=16, EPI=0)}),  # run. max
    (2, 2, 2, 70, 32, torch.float32, 16, "fast", {"flash_gt.fast": dict(BLOCK_M=32, BLOCK_N=16)}),
    (1, 4, 2, 90, 16, torch.float32, 16, "lowmem", {"flash_gt.dense": dict(BLOCK_M=32, BLOCK_N=32),
                                                     "flash_gt.pass2": dict(BLOCK_M=32)}),
    (1, 4, 4, 65, 64, torch.float16, 64, "lowmem", {"flash_gt.pass2": dict(BLOCK_M=128)}),  # 2 gt rows, pass 2
]


@pytest.mark.parametrize("b,hq,hkv,n,d,dtype,bs,mode,forced", TMA_CASES,
                         ids=[f"B{c[0]}-H{c[1]}:{c[2]}-N{c[3]}-D{c[4]}-{str(c[5])[6:]}-bs{c[6]}-{c[7]}-"
                              + "+".join(k.split(".")[1] for k in c[8]) for c in TMA_CASES])
def test_tma_path_matches_reference(monkeypatch, b, hq, hkv, n, d, dtype, bs, mode, forced):
    """``USE_TMA`` forced, the copy engine taken as usable (the interpreter emulates the tensor descriptors: zero
    fill past N, writes past N dropped); ``out`` is the [B, H, N, D] view of a [B, N, H, D] buffer."""
    from seer.kernels import flash_gt_kernels

    asked = []
    monkeypatch.setattr(flash_gt_kernels, "tma_ok", lambda *t: asked.append(len(t)) or True)
    q, k, v = _inputs(b, hq, hkv, n, d, dtype, seed=n + d)
    nb = reference.num_blocks(n, bs)
    _, lse, gt = _poisoned(q, nb)
    buffer = torch.full((b, n, hq, d), float("nan"), dtype=dtype)
    with _forced_all({kernel: dict(config, USE_TMA=True) for kernel, config in forced.items()}):
        out, _, _ = flash_attn_with_gt(q, k, v, bs, mode=mode, out=buffer.transpose(1, 2), lse=lse, gt=gt)
    # tensors the launches asked about: q, k, v, out for the forward; q, k for pass 2 (lowmem: both)
    assert asked == ([4] if mode == "fast" else [4, 2] if "flash_gt.dense" in forced else [2])
    ref_out, ref_lse = reference.attention(q, k, v)
    assert not torch.isnan(buffer).any() and not torch.isnan(lse).any(), "unwritten out/lse elements"
    assert _rel(out, ref_out) < (1e-5 if dtype == torch.float32 else 2e-3)
    assert (lse - ref_lse).abs().max().item() < 1e-4
    _check_gt(gt, reference.block_gt(q, k, bs), 1e-3)


def test_tma_pass2_block_mass(monkeypatch):
    from seer.kernels import flash_gt_kernels

    monkeypatch.setattr(flash_gt_kernels, "tma_ok", lambda *t: True)
    q, k, v = _inputs(1, 4, 2, 100, 16, torch.float32, seed=2)
    _, lse = flash_attn(q, k, v)
    mass = torch.full((1, 4, 7, 7), float("nan"))
    with force_config("flash_gt.pass2", USE_TMA=True):
        flash_gt_from_lse(q, k, lse, 16, gt=mass, pool="mass")
    torch.testing.assert_close(mass.double(), reference.block_attn_mass(q.double(), k.double(), 16), rtol=1e-4,
                               atol=1e-6)


class _LaunchSpy:
    """Stands in for a Triton kernel: records the ``USE_TMA`` each launch compiles with, then launches."""

    def __init__(self, kernel, seen: list):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append(kwargs["USE_TMA"])
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("requested,usable", [(False, True), (True, False), (True, True)])
def test_tma_only_where_asked_and_the_copy_engine_can_be_used(monkeypatch, requested, usable):
    """A config with ``USE_TMA`` compiles the copy-engine path only where ``tma_ok`` holds (else the plain loads);
    a config without it never asks."""
    from seer.kernels import flash_gt_kernels as fk

    asked, seen = [], []
    monkeypatch.setattr(fk, "tma_ok", lambda *t: asked.append(len(t)) or usable)
    monkeypatch.setattr(fk, "_fwd_kernel", _LaunchSpy(fk._fwd_kernel, seen))
    monkeypatch.setattr(fk, "_gt_kernel", _LaunchSpy(fk._gt_kernel, seen))
    q, k, v = _inputs(1, 2, 1, 40, 16, torch.float32, seed=6)
    with _forced_all({kernel: dict(USE_TMA=requested) for kernel in ("flash_gt.dense", "flash_gt.pass2")}):
        out, lse, gt = flash_attn_with_gt(q, k, v, 16, mode="lowmem")
    assert seen == [requested and usable] * 2 and asked == ([4, 2] if requested else [])
    assert _rel(out, reference.attention(q, k, v)[0]) < 1e-5
    _check_gt(gt, reference.block_gt(q, k, 16), 1e-3)


def test_hopper_candidates(monkeypatch):
    """Capability >= 9: each table's candidates, then its default with the copy engine (the only Hopper candidate);
    any other device: the candidates alone, none with the copy engine. Every candidate is a config of its table."""
    from seer.kernels import flash_gt

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for table in (flash_gt.DENSE, flash_gt.FAST, flash_gt.PASS2):
        for key in ((128, 64, torch.bfloat16, 32768), (64, 32, torch.float16, 4096), (256, 128, torch.bfloat16, 1024)):
            monkeypatch.setattr(flash_gt, "is_hopper", lambda device: False)
            plain = table._candidates(key)
            assert plain and not any(c.get("USE_TMA") for c in plain)
            monkeypatch.setattr(flash_gt, "is_hopper", lambda device: True)
            hopper = table._candidates(key)
            assert hopper == plain + [dict(plain[0], USE_TMA=True)]
            assert all(set(c) <= set(table.fields) for c in hopper)


# ---------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("n,hq,hkv,d,bs,mode,forced", [
    (4096, 8, 2, 128, 64, "fast", None),
    (4096, 8, 2, 128, 64, "fast", ("flash_gt.fast", dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, EPI=0))),
    (4096, 8, 2, 128, 128, "fast", ("flash_gt.fast", dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, EPI=1))),
    (4096, 8, 8, 128, 64, "lowmem", None),
    (16384, 4, 1, 128, 128, "fast", None),
    (32768, 2, 2, 128, 64, "fast", None),
    (32768, 2, 1, 128, 64, "lowmem", None),
    (4097, 4, 2, 64, 64, "fast", None),
    (3000, 4, 4, 256, 128, "fast", None),
    (3000, 4, 4, 256, 64, "lowmem", None),
])
def test_gpu_bf16_against_sdpa_and_reference(n, hq, hkv, d, bs, mode, forced):
    q, k, v = _inputs(1, hq, hkv, n, d, torch.bfloat16, device="cuda", seed=n + d)
    nb = reference.num_blocks(n, bs)
    out, lse, gt = _poisoned(q, nb)
    with _forced(forced):
        flash_attn_with_gt(q, k, v, bs, mode=mode, out=out, lse=lse, gt=gt)
    torch.cuda.synchronize()
    kr, vr = (x.repeat_interleave(hq // hkv, dim=1) for x in (k, v))
    ref_out = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert _rel(out, ref_out) < 1e-2
    # lse from a float32 logsumexp of the scores, a few rows
    rows = torch.tensor([0, 1, n // 3, n - 2, n - 1], device="cuda")
    s = torch.einsum("bhrd,bhkd->bhrk", q[:, :, rows].float(), kr.float()) / math.sqrt(d)
    s = s.masked_fill(torch.arange(n, device="cuda")[None, None, None, :] > rows[None, None, :, None], -math.inf)
    assert (lse[:, :, rows] - torch.logsumexp(s, -1)).abs().max().item() < 1e-3
    _check_gt(gt, reference.block_gt(q, k, bs), 1e-2)


@pytest.mark.gpu
def test_gpu_float32_uses_ieee_dots():
    """float32 inputs take IEEE float32 dots: out, lse and gt to float32 accuracy (tf32 dots: about 1e-3 off)."""
    q, k, v = _inputs(1, 4, 2, 2048, 64, torch.float32, device="cuda", seed=5)
    ref_out, ref_lse = reference.attention(q.double(), k.double(), v.double())
    ref_gt = reference.block_gt(q.double(), k.double(), 64)
    for mode in ("fast", "lowmem"):
        out, lse, gt = flash_attn_with_gt(q, k, v, 64, mode=mode)
        assert _rel(out, ref_out) < 1e-5
        assert (lse.double() - ref_lse).abs().max().item() < 1e-4
        _check_gt(gt, ref_gt, 1e-4)


@pytest.mark.gpu
def test_gpu_fast_fraction_zero_takes_the_low_memory_passes(monkeypatch):
    from seer.kernels import flash_gt

    q, k, v = _inputs(1, 4, 2, 4096, 128, torch.bfloat16, device="cuda", seed=8)
    flash_attn_with_gt(q, k, v, 64, fast_fraction=0.0)  # a cold launch table tunes: one launch per candidate
    launched = []
    real = flash_gt.launch_pass2
    monkeypatch.setattr(flash_gt, "launch_pass2", lambda *a: launched.append("pass2") or real(*a))
    _, _, gt = flash_attn_with_gt(q, k, v, 64, fast_fraction=0.0)
    assert launched == ["pass2"]
    flash_attn_with_gt(q, k, v, 64, fast_fraction=1.0)  # 2 MiB of scratch: fits
    assert launched == ["pass2"]
    _check_gt(gt, reference.block_gt(q, k, 64), 1e-2)


# copy-engine configs of the launch tables' candidates at D 128 (what experiments/bench_gt.py --variants times)
HOPPER_GPU_CASES = [
    ("fast", {"flash_gt.fast": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, EPI=0)}),
    ("fast", {"flash_gt.fast": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4, EPI=0)}),
    ("fast", {"flash_gt.fast": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, EPI=0)}),
    ("fast", {"flash_gt.fast": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, EPI=1)}),
    ("lowmem", {"flash_gt.dense": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
                "flash_gt.pass2": dict(BLOCK_M=128, num_warps=4, num_stages=3)}),
    ("lowmem", {"flash_gt.dense": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4),
                "flash_gt.pass2": dict(BLOCK_M=128, num_warps=8, num_stages=2)}),
]


@pytest.mark.gpu
@pytest.mark.parametrize("mode,forced", HOPPER_GPU_CASES)
def test_gpu_hopper_tma_variants_match_reference(mode, forced):
    """``USE_TMA`` on a device of capability >= 9, bf16: a length off the tile grid with GQA 4:1, and 16k."""
    from seer.kernels.common import tma_ok

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the Hopper path needs a device of compute capability >= 9")
    for n, hq, hkv in ((4096 + 77, 8, 2), (16384, 4, 4)):
        q, k, v = _inputs(1, hq, hkv, n, 128, torch.bfloat16, device="cuda", seed=n)
        nb = reference.num_blocks(n, 64)
        out, lse, gt = _poisoned(q, nb)
        assert tma_ok(q, k, v, out)  # the copy engine really runs
        with _forced_all({kernel: dict(config, USE_TMA=True) for kernel, config in forced.items()}):
            flash_attn_with_gt(q, k, v, 64, mode=mode, out=out, lse=lse, gt=gt)
        torch.cuda.synchronize()
        kr, vr = (x.repeat_interleave(hq // hkv, dim=1) for x in (k, v))
        ref_out = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True)
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()
        assert _rel(out, ref_out) < 1e-2
        _check_gt(gt, reference.block_gt(q, k, 64), 1e-2)
