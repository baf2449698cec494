"""The token-query gate kernel (seer/kernels/token_gate.py) against the gate's own PyTorch math in float64
(seer.gates.attn_gate.token_block_logits, itself checked against the naive definition in
tests/gates/test_token_gate.py), and AttnGate's dispatch to it.

Without CUDA these run on CPU tensors under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
on a GPU on CUDA tensors. Outputs are poisoned (NaN) before each launch: an unwritten entry shows.
"""

from __future__ import annotations

import math

import pytest
import torch

from seer.gates import AttnGate, rope_frequencies
from seer.gates.attn_gate import token_block_logits
from seer.gates.config import GateConfig
from seer.kernels.token_gate import token_gate_logits
from tests.tiny import tiny_config


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _reference(x, kg, block_size):
    """float64 logits of the kernel's math: the gate's PyTorch path on upcast inputs, -inf above the diagonal."""
    nb = kg.shape[2]
    upper = torch.ones(nb, nb, dtype=torch.bool).triu(1)
    return token_block_logits(x.double().cpu(), kg.double().cpu(), block_size).masked_fill(upper, float("-inf"))


def _check(got, want, dtype):
    nb = want.shape[-1]
    upper = torch.ones(nb, nb, dtype=torch.bool).triu(1)
    got = got.cpu()
    assert got.dtype == torch.float32 and not torch.isnan(got).any(), "unwritten output entries"
    assert torch.isneginf(got[..., upper]).all(), "above the diagonal must be -inf"
    assert torch.isfinite(got[..., ~upper]).all()
    tol = {torch.float32: 2e-5, torch.float16: 1e-3}[dtype]  # float16 inputs: same values, float32 accumulation
    torch.testing.assert_close(got.double()[..., ~upper], want[..., ~upper], rtol=tol, atol=tol)


# (B, Hq, N, E, block_size): N a multiple of the block size or not (partial last block), nb 1..6
CASES = [
    (1, 2, 16, 16, 16),    # nb 1, one whole block
    (1, 3, 5, 32, 16),     # nb 1, partial
    (2, 2, 64, 32, 32),    # nb 2
    (1, 4, 70, 64, 32),    # nb 3, partial (6 tokens)
    (1, 2, 256, 16, 64),   # nb 4
    (2, 3, 300, 32, 64),   # nb 5, partial (44 tokens)
    (1, 4, 81, 64, 16),    # nb 6, partial (1 token)
    (1, 2, 90, 24, 16),    # E not a power of two (padded to 32)
]


@pytest.mark.parametrize("b,hq,n,e,block_size", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_float64_reference(b, hq, n, e, block_size, dtype):
    gen = torch.Generator().manual_seed(n * 31 + e + hq)
    nb = math.ceil(n / block_size)
    x = (torch.randn(b, hq, n, e, generator=gen) * 2).to(dtype)  # spread scores: the lse is not a plain mean
    kg = torch.randn(b, hq, nb, e, generator=gen).to(dtype)
    dev = _device()
    out = torch.full((b, hq, nb, nb), float("nan"), device=dev)
    got = token_gate_logits(x.to(dev), kg.to(dev), block_size, out=out)
    assert got is out
    _check(got, _reference(x, kg, block_size), dtype)


@pytest.mark.parametrize("n", [320, 333])
def test_several_key_tiles_and_strided_queries(n):
    """nb 20-21 with 16 key blocks a tile: rows span two key tiles, and the rows of the first blocks have a key tile
    wholly above the diagonal (the -inf loop); x is a [B, N, H, E] buffer seen as [B, H, N, E]."""
    gen = torch.Generator().manual_seed(n)
    nb = math.ceil(n / 16)
    x = torch.randn(1, n, 2, 32, generator=gen).transpose(1, 2)
    kg = torch.randn(1, 2, nb, 32, generator=gen)
    dev = _device()
    out = torch.full((1, 2, nb, nb), float("nan"), device=dev)
    got = token_gate_logits(x.to(dev), kg.to(dev), 16, out=out, block_n=16)
    _check(got, _reference(x, kg, 16), torch.float32)


def test_block_rows_use_their_own_tokens():
    """Changing one token changes its block's row only (a wrong row offset or token count would show elsewhere)."""
    gen = torch.Generator().manual_seed(7)
    dev = _device()
    x, kg = torch.randn(1, 2, 50, 16, generator=gen), torch.randn(1, 2, 4, 16, generator=gen)
    base = token_gate_logits(x.to(dev), kg.to(dev), 16).cpu()
    x[:, :, 49] += 3.0  # the partial last block (2 tokens)
    moved = token_gate_logits(x.to(dev), kg.to(dev), 16).cpu()
    assert torch.equal(moved[:, :, :3], base[:, :, :3]) and not torch.allclose(moved[:, :, 3], base[:, :, 3])


def test_kernel_errors():
    dev = _device()
    x, kg = torch.randn(1, 2, 40, 16, device=dev), torch.randn(1, 2, 3, 16, device=dev)
    with pytest.raises(ValueError, match="block_size"):
        token_gate_logits(x, kg, 24)
    with pytest.raises(ValueError, match=r"kg must be \[B, Hq, ceil\(N / block_size\), E\]"):
        token_gate_logits(x, kg[:, :, :2], 16)
    with pytest.raises(ValueError, match="share one dtype"):
        token_gate_logits(x, kg.half(), 16)
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        token_gate_logits(x, kg, 16, block_n=24)


def _gate(hidden=24, dtype=torch.float32):
    cfg = GateConfig(block_size=16, q_tokens=True, k_pool=["max", "avg"], hidden_size=hidden)
    inv_freq, scale = rope_frequencies(tiny_config("llama"), hidden)
    gate = AttnGate(cfg, head_dim=16, num_heads=4, num_kv_heads=2, rope_inv_freq=inv_freq, rope_scale=scale)
    return gate.to(_device(), dtype)


@pytest.mark.parametrize("n,chunk_bytes", [(70, None), (97, 1), (64, 2 * 4 * 16 * 24 * 4)])
def test_gate_forward_with_the_kernel_equals_the_pytorch_path(monkeypatch, n, chunk_bytes):
    """AttnGate's q_tokens forward with the kernel forced (also on the CPU, under the interpreter) against its
    PyTorch path; ``chunk_bytes``: the token queries built in chunks of one and two blocks."""
    torch.manual_seed(n)
    gate = _gate()
    if chunk_bytes is not None:
        gate.token_chunk_bytes = chunk_bytes
    dev = _device()
    q, k = torch.randn(1, 4, n, 16, device=dev), torch.randn(1, 2, n, 16, device=dev)
    with torch.no_grad():
        gate.token_kernel = False
        want = gate(q, k)
        gate.token_kernel = True
        used = []
        real = AttnGate._token_kernel_forward
        monkeypatch.setattr(AttnGate, "_use_token_kernel", lambda self, q, kg, grad: self.token_kernel and not grad)
        monkeypatch.setattr(AttnGate, "_token_kernel_forward", lambda self, q, kg: used.append(1) or real(self, q, kg))
        got = gate(q, k)
    assert used == [1]
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    upper = torch.ones(got.shape[-1], got.shape[-1], dtype=torch.bool, device=dev).triu(1)
    assert torch.isneginf(got[..., upper]).all()


def test_dispatch_condition():
    """The kernel serves CUDA inputs without grad in a kernel dtype while ``token_kernel`` is on (off by default until
    timed on a GPU); never the CPU (the interpreter is for tests), training, float64 gates or a gate with it off."""
    gate = _gate()
    assert AttnGate.token_kernel is False and not gate.token_kernel
    gate.token_kernel = True
    kg32 = torch.empty(1)
    assert not gate._use_token_kernel(torch.empty(1), kg32, grad=False)

    class _Cuda:  # stands in for a CUDA query tensor (the condition reads only is_cuda)
        is_cuda = True

    assert gate._use_token_kernel(_Cuda(), kg32, grad=False)
    assert gate._use_token_kernel(_Cuda(), kg32.bfloat16(), grad=False)
    assert not gate._use_token_kernel(_Cuda(), kg32, grad=True)
    assert not gate._use_token_kernel(_Cuda(), kg32.double(), grad=False)
    gate.token_kernel = False
    assert not gate._use_token_kernel(_Cuda(), kg32, grad=False)


def test_training_keeps_the_pytorch_path(monkeypatch):
    """Under autograd the gate never reaches the kernel, even where it would be used without grad."""
    monkeypatch.setattr(AttnGate, "_use_token_kernel", lambda self, q, kg, grad: not grad)
    monkeypatch.setattr(AttnGate, "_token_kernel_forward", lambda *a: pytest.fail("kernel used under autograd"))
    gate = _gate()
    dev = _device()
    q, k = torch.randn(1, 4, 40, 16, device=dev), torch.randn(1, 2, 40, 16, device=dev)
    gate(q, k).masked_fill(torch.ones(3, 3, dtype=torch.bool, device=dev).triu(1), 0).sum().backward()
    assert gate.q_weight.grad is not None


@pytest.mark.gpu
def test_bf16_gate_on_the_gpu_matches_the_pytorch_path():
    """bf16 gate at N=4173 (66 blocks of 64, the last partial), the Qwen shape (14/2 heads, D 64, hidden 128): the
    kernel path (float32 scores of the bf16 queries) against the PyTorch path (bf16 score matmul), both cast to
    bf16. The PyTorch scores are rounded to bf16 before the lse: the gap is that rounding, not a kernel error."""
    torch.manual_seed(0)
    cfg = GateConfig(block_size=64, q_tokens=True, k_pool=["max", "min", "avg"], hidden_size=128)
    inv_freq, scale = rope_frequencies(tiny_config("llama"), 128)
    gate = AttnGate(cfg, head_dim=64, num_heads=14, num_kv_heads=2, rope_inv_freq=inv_freq,
                    rope_scale=scale).cuda().bfloat16()
    gate.token_kernel = True
    q = torch.randn(1, 14, 4173, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 4173, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert gate._use_token_kernel(q, gate.k_weight, grad=False)
        got = gate(q, k)
        gate.token_kernel = False
        want = gate(q, k)
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape == (1, 14, 66, 66)
    upper = torch.ones(66, 66, dtype=torch.bool, device="cuda").triu(1)
    assert torch.isneginf(got[..., upper]).all() and torch.isfinite(got[..., ~upper]).all()
    diff = (got.float() - want.float())[..., ~upper].abs()
    scale_ = want.float()[..., ~upper].abs().mean()
    assert diff.max() <= 0.05 * scale_ + 0.05 and diff.mean() <= 0.01 * scale_ + 0.01, (diff.max(), scale_)
