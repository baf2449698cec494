"""seer.load: a gated Hugging Face model with sparse prefill, dense decode, and generate()."""

import pytest
import torch

from seer.gates.config import GateConfig
from seer.sparsity.config import SparsityConfig
from seer.model import ModelConfig, gates
from seer.model.gate_io import save_gates
from seer.model.inference import enable_sparse_prefill, load
from tests.tiny import tiny_config

ARCH = {"model_type": "llama", **{k: v for k, v in tiny_config("llama").to_dict().items()
                                  if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                           "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                           "bos_token_id", "eos_token_id")}}
GATE = GateConfig(block_size=16, hidden_size=16)
TINY = ModelConfig(random_init=True, architecture=ARCH, dtype="float32")


def _tiny_gated(tmp_path):
    """A random tiny Llama (seeded) plus a gate file trained for nothing but with non-trivial weights."""
    torch.manual_seed(0)
    model = load(TINY, gate_config=GATE, device="cpu")
    for g in gates(model).values():
        torch.nn.init.normal_(g.k_weight)
    save_gates(tmp_path / "g", model, "tiny")
    return model


def test_density_one_matches_dense_model_and_generate(tmp_path):
    model = _tiny_gated(tmp_path)
    ids = torch.randint(0, 300, (1, 75))
    ctx = model.seer_context
    with torch.no_grad():
        ctx.update(mode="dense")
        dense_logits = model(ids).logits
        dense_gen = model.generate(ids, max_new_tokens=6, do_sample=False)
        enable_sparse_prefill(model, SparsityConfig(method="dense"))
        torch.testing.assert_close(model(ids).logits, dense_logits, rtol=1e-4, atol=1e-4)
        gen = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(gen, dense_gen)
    assert set(ctx.densities()) == {0, 1}


def test_sparse_prefill_changes_prefill_only(tmp_path):
    model = _tiny_gated(tmp_path)
    ids = torch.randint(0, 300, (1, 96))
    enable_sparse_prefill(model, SparsityConfig(method="topk", target_density=0.3, dense_last_rows=0))  # 6 blocks
    with torch.no_grad():
        out = model(ids, use_cache=True)
        dens = model.seer_context.densities()
        # a decode step after a sparse prefill runs dense attention over the cache
        step = model(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)
    assert all(abs(d - 0.3) < 0.1 for d in dens.values())
    assert step.logits.shape == (1, 1, model.config.vocab_size) and torch.isfinite(step.logits).all()


def test_load_gate_file_and_triton_kernel_matches_reference(tmp_path):
    _tiny_gated(tmp_path)
    torch.manual_seed(0)
    spars = {"method": "topk", "target_density": 0.5, "sink_blocks": 1}
    ref = load(TINY, gates=tmp_path / "g", sparsity=spars, device="cpu", kernel="reference")
    torch.manual_seed(0)
    # the Triton kernel (the interpreter on CPU)
    tri = load(TINY, gates=tmp_path / "g", sparsity=spars, device="cpu", kernel="triton")
    ids = torch.randint(0, 300, (1, 50))
    with torch.no_grad():
        a, b = ref(ids).logits, tri(ids).logits
    torch.testing.assert_close(b, a, rtol=2e-4, atol=2e-4)
    assert ref.seer_context.densities() == tri.seer_context.densities()


def test_load_rejects_bad_arguments_before_loading(tmp_path):
    with pytest.raises(ValueError, match="needs gates=PATH"):
        load("some/model")
    with pytest.raises(FileNotFoundError, match="no gate checkpoint"):
        load("some/model", gates=tmp_path / "nothing")
    with pytest.raises(ValueError, match="sparsity.target_density=2"):
        load("some/model", gate_config=GATE, sparsity={"target_density": 2})
    with pytest.raises(ValueError, match="kernel='cuda'"):
        load("some/model", gate_config=GATE, kernel="cuda")
    with pytest.raises(ValueError, match="model.dtype='float8'"):
        load({"name_or_path": "some/model", "dtype": "float8"}, gate_config=GATE)


def test_sparse_prefill_engages_while_tracing(tmp_path, monkeypatch):
    """Under CUDA-graph capture or torch.compile, transformers' SDPA mask builds a full causal mask (it cannot look at
    the padding mask's values); seer's mask function still hands a plain prefill no mask, so the gates run."""
    import transformers.masking_utils as mu

    model = _tiny_gated(tmp_path)
    enable_sparse_prefill(model, SparsityConfig(method="topk", target_density=0.5))
    import transformers.utils.import_utils as iu

    for module in (mu, iu):
        monkeypatch.setattr(module, "is_tracing", lambda *args, **kwargs: True)
    ids = torch.randint(0, 300, (1, 64))
    with torch.no_grad():
        sparse = model(ids, use_cache=False).logits  # no cache: transformers also probes for packed rows
        assert set(model.seer_context.densities()) == {0, 1}
        model.seer_context.clear_step()
        padded = model(ids, attention_mask=torch.ones_like(ids)).logits  # a padding mask: dense fallback
    assert model.seer_context.densities() == {}
    assert not torch.allclose(sparse, padded, atol=1e-4)


def test_graphed_prefill_needs_cuda(tmp_path):
    from seer.model.inference import GraphedPrefill

    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        GraphedPrefill(_tiny_gated(tmp_path), 1, 64)


def test_sparse_attention_gives_the_kernel_one_dtype(tmp_path, monkeypatch):
    """Under bf16 autocast a float32 model's rotary tables make q/k float32 beside a bf16 v; the kernels (which
    refuse mixed dtypes) get one dtype."""
    import seer.kernels.reference as ref
    from seer.model.attention import attention_layers, seer_attention

    seen = []
    kernel = ref.block_sparse_sdpa

    def checked(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return kernel(q, k, v, *args, **kwargs)

    monkeypatch.setattr(ref, "block_sparse_sdpa", checked)
    model = _tiny_gated(tmp_path)
    enable_sparse_prefill(model, SparsityConfig(method="topk", target_density=0.5), kernel="reference")
    layer = attention_layers(model)[0]
    q, k = torch.randn(1, 4, 64, 16), torch.randn(1, 2, 64, 16)
    layer.seer_stash.q, layer.seer_stash.k = q, k  # what the pre-RoPE hooks would have stashed
    out, _ = seer_attention(layer, q, k, torch.randn(1, 2, 64, 16).bfloat16(), None)
    assert seen == [(torch.bfloat16,) * 3] and out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
