"""The argument checks every kernel shares (seer/kernels/common.py): each refusal names the value it refuses."""

from __future__ import annotations

import math

import pytest
import torch

from seer.kernels import common, reference
from seer.kernels.block_sparse import block_sparse_attn
from seer.kernels.common import (check_block_size, check_device, check_qkv, check_tensor, dot_precision, output,
                                 softmax_scale, with_unit_last_stride)
from seer.kernels.flash_gt import flash_attn_with_gt


def _qkv(hq=4, hkv=2, n=8, d=16, dtype=torch.float32):
    return torch.zeros(1, hq, n, d, dtype=dtype), torch.zeros(1, hkv, n, d, dtype=dtype), \
        torch.zeros(1, hkv, n, d, dtype=dtype)


def test_dot_precision_is_ieee_for_float32_only():
    assert dot_precision(torch.float32) == "ieee"
    assert dot_precision(torch.bfloat16) == "tf32" and dot_precision(torch.float16) == "tf32"


def test_log_constants():
    assert common.LOG2E.value == 1.0 / math.log(2.0) and common.LN2.value == math.log(2.0)


@pytest.mark.parametrize("change,match", [
    (lambda q, k, v: (q.double(), k.double(), v.double()),
     r"q dtype torch.float64 is not supported; supported: float16, bfloat16 or float32"),
    (lambda q, k, v: (q, k.half(), v.half()), r"share a dtype; got torch.float32, torch.float16, torch.float16"),
    (lambda q, k, v: (q[..., :12], k[..., :12], v[..., :12]), r"head dim 12 is not supported; supported: 16, 32"),
    (lambda q, k, v: (q[0], k, v), r"q must be 4-D \[B, H, N, D\]; got shape \[4, 8, 16\]"),
    (lambda q, k, v: (q, k[:, :, :5], v[:, :, :5]), r"k \[1, 2, 5, 16\] does not match q \[1, 4, 8, 16\]"),
    (lambda q, k, v: (q[:, :3], k, v), r"query heads \(3\) must be a multiple of key/value heads \(2\)"),
    (lambda q, k, v: (q, k, v[..., :8]), r"v \[1, 2, 8, 8\] must have the shape of k \[1, 2, 8, 16\]"),
    (lambda q, k, v: (q, k.numpy(), v), r"k must be a torch.Tensor, got ndarray"),
])
def test_check_qkv_names_what_it_refuses(change, match):
    with pytest.raises(ValueError, match=match):
        check_qkv(*change(*_qkv()))


def test_check_qkv_returns_the_sizes():
    assert check_qkv(*_qkv(hq=6, hkv=3, n=5, d=32)) == (1, 6, 3, 5, 32)


def test_kernels_and_reference_share_the_shape_checks_but_not_the_dtype_ones():
    q, k, v = (x.double() for x in _qkv(d=12))  # float64, head dim 12: fine for the reference only
    reference.attention(q, k, v)
    for kernel in (lambda: flash_attn_with_gt(q, k, v, 16), lambda: block_sparse_attn(
            q, k, v, torch.ones(1, 2, 1, 1, dtype=torch.bool), 16)):
        with pytest.raises(ValueError, match="q dtype torch.float64 is not supported"):
            kernel()
    with pytest.raises(ValueError, match=r"query heads \(3\)"):
        reference.attention(q[:, :3], k, v)


@pytest.mark.parametrize("block_size", [48, 64.0, 0, "64"])
def test_check_block_size(block_size):
    with pytest.raises(ValueError, match=rf"block_size {block_size!r} is not supported; supported: 16, 32, 64 or 128"):
        check_block_size(block_size)


def test_check_device():
    cpu, meta = torch.zeros(2), torch.zeros(2, device="meta")
    check_device(q=cpu, k=cpu)
    with pytest.raises(ValueError, match="mask is on meta but q is on cpu: the tensors must be on one device"):
        check_device(q=cpu, mask=meta)
    with pytest.raises(ValueError, match="q is on meta: the kernels run on CUDA devices"):
        check_device(q=meta)


def test_check_device_without_the_interpreter(monkeypatch):
    monkeypatch.setattr(common, "INTERPRET", False)
    with pytest.raises(ValueError, match="q is on the CPU: .* or TRITON_INTERPRET=1"):
        check_device(q=torch.zeros(2))


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), "0.1", None])
def test_softmax_scale(bad):
    assert softmax_scale(None, 64) == 0.125 and softmax_scale(0.3, 64) == 0.3
    if bad is None:
        return
    with pytest.raises(ValueError, match=f"sm_scale must be a positive finite number, got {bad!r}"):
        softmax_scale(bad, 64)


def test_with_unit_last_stride():
    x = torch.randn(1, 5, 2, 16).transpose(1, 2)  # [B, N, H, D] seen as [B, H, N, D]: kept as it is
    assert with_unit_last_stride(x) is x
    y = torch.randn(1, 2, 16, 5).transpose(2, 3)  # last stride 5: copied
    z = with_unit_last_stride(y)
    assert z.stride(-1) == 1 and torch.equal(z, y)
    # head offsets past int32 even when contiguous (meta tensors: no memory)
    with pytest.raises(ValueError, match=r"one head of \[1, 1, 134217728, 32\] holds more than 2\^31 elements"):
        with_unit_last_stride(torch.empty(1, 1, 2**27, 32, device="meta"))
    far = torch.empty_strided((1, 2, 3, 16), (2**33, 2**32, 2**31, 1), device="meta")  # head offsets past int32
    assert with_unit_last_stride(far).is_contiguous()


def test_outputs():
    dev = torch.device("cpu")
    new = output("out", None, (1, 2, 3), torch.float32, dev, contiguous=True)
    assert new.shape == (1, 2, 3) and new.is_contiguous()
    strided = torch.empty(1, 3, 2, 16).transpose(1, 2)
    assert output("out", strided, (1, 2, 3, 16), torch.float32, dev, contiguous=False) is strided
    with pytest.raises(ValueError, match=r"out must be a contiguous torch.float32 tensor of shape \[1, 2, 3, 16\] "
                                         r"on cpu; got torch.float32 \[1, 2, 3, 16\] on cpu \(strides"):
        output("out", strided, (1, 2, 3, 16), torch.float32, dev, contiguous=True)
    with pytest.raises(ValueError, match=r"lse must be a unit-last-stride torch.float32 tensor .* got torch.float64"):
        check_tensor("lse", torch.empty(1, 2, 3, dtype=torch.float64), (1, 2, 3), torch.float32, dev, False)


def test_is_hopper_and_tma_ok(monkeypatch):
    """The copy engine: devices of capability >= 9 only (never under the interpreter), tensors with 16-byte aligned
    base and strides and a unit last stride only; when it can be used the descriptor allocator is set."""
    cuda = torch.device("cuda", 0)
    assert not common.is_hopper(torch.device("cpu")) and not common.tma_ok(torch.zeros(1, 1, 8, 16))
    monkeypatch.setattr(common, "INTERPRET", True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert not common.is_hopper(cuda)  # the interpreter runs on the CPU
    monkeypatch.setattr(common, "INTERPRET", False)
    assert common.is_hopper(cuda) and not common.is_hopper(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not common.is_hopper(cuda)

    class Fake:  # what tma_ok reads of a CUDA tensor
        device = cuda

        def __init__(self, strides, ptr=0, size=2):
            self.strides, self.ptr, self.size = strides, ptr, size

        def element_size(self):
            return self.size

        def data_ptr(self):
            return self.ptr

        def stride(self, i):
            return self.strides[i]

    allocators = []
    monkeypatch.setattr(common.triton, "set_allocator", allocators.append)
    good = Fake((32 * 100 * 128, 100 * 128, 128, 1))
    assert not common.tma_ok(good)  # capability 8
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert common.tma_ok(good, good) and allocators == [common._scratch]
    assert not common.tma_ok(good, Fake((32 * 100 * 128, 100 * 128, 128, 1), ptr=8))  # base not 16-byte aligned
    assert not common.tma_ok(Fake((32 * 100 * 4, 100 * 4, 4, 1)))  # rows of 8 bytes
    assert not common.tma_ok(Fake((32 * 100 * 128, 128, 32 * 128, 1), size=2), Fake((16, 8, 4, 2)))  # last stride
    assert common.tma_ok(Fake((100 * 32 * 128, 128, 32 * 128, 1)))  # [B, N, H, D] storage seen as [B, H, N, D]
