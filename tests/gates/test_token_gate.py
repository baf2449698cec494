"""gate.q_tokens: the token-level gate query against a naive float64 reference (per-token scores, explicit
log-mean-exp per query block), chunked or not, its gradients, its config checks, gate files and a training run."""

import json
import math

import pytest
import torch

from seer.checks import ConfigError
from seer.gates import AttnGate, rope_frequencies
from seer.gates.config import GateConfig
from tests.tiny import tiny_config, tiny_model

LLAMA3 = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def _rope(x, pos, inv_freq, scale):
    """Rotate-half RoPE of x [..., n, E] at positions pos [n], in float64."""
    angle = pos.double()[:, None] * inv_freq.double()[None, :]
    c, s = angle.cos() * scale, angle.sin() * scale
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def _naive(gate: AttnGate, q, k):
    """The definition, in float64 and differentiable: every token's scores [B, Hq, N, nb] at once, then for each
    query block the log of the mean of exp over its own tokens (the last block over the tokens it has)."""
    cfg = gate.config
    bs = cfg.block_size
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    nb = math.ceil(n / bs)
    qd, kd = q.double(), k.double()
    pools = []
    for j in range(nb):
        tokens = kd[:, :, j * bs:min(n, (j + 1) * bs)]
        parts = {"avg": tokens.mean(2), "max": tokens.max(2).values, "min": tokens.min(2).values,
                 "last": tokens[:, :, -1]}
        pools.append(torch.cat([parts[p] for p in cfg.k_pool], dim=-1))
    kp = torch.stack(pools, dim=2)  # [B, Hkv, nb, D * |k_pool|]
    rows = []
    for h in range(hq):
        qt = qd[:, h] if gate.q_weight is None else qd[:, h] @ gate.q_weight[h].double()  # [B, N, E]
        kg = kp[:, h // (hq // hkv)] @ gate.k_weight[h].double()  # [B, nb, E]
        if gate.rope_inv_freq is not None:
            inv_freq, scale = (gate.rope_inv_freq, gate.rope_scale) if gate.rope_at_length is None \
                else gate.rope_at_length(n)
            qt = _rope(qt, torch.arange(n), inv_freq, scale)
            kg = _rope(kg, torch.arange(nb) * bs, inv_freq, scale)
        s = qt @ kg.transpose(-1, -2) / math.sqrt(qt.shape[-1])  # [B, N, nb]
        blocks = []
        for i in range(nb):
            tokens = s[:, i * bs:min(n, (i + 1) * bs)]  # [B, n_i, nb]
            blocks.append(torch.log(torch.exp(tokens).sum(1) / tokens.shape[1]))
        rows.append(torch.stack(blocks, dim=1))
    logits = torch.stack(rows, dim=1)  # [B, Hq, nb, nb]
    return logits.masked_fill(torch.ones(nb, nb, dtype=torch.bool).triu(1), float("-inf"))


def _gate(hidden=24, k_pool=("max",), hq=4, hkv=2, rope="llama3", q_linear="auto"):
    cfg = GateConfig(block_size=16, q_tokens=True, k_pool=list(k_pool), hidden_size=hidden, q_linear=q_linear,
                     block_rope=rope is not None)
    inv_freq, scale = (rope_frequencies(tiny_config("llama", rope_parameters=LLAMA3), hidden) if rope == "llama3"
                       else (None, 1.0))
    return AttnGate(cfg, head_dim=16, num_heads=hq, num_kv_heads=hkv, rope_inv_freq=inv_freq, rope_scale=scale)


def _blocks_per_chunk(gate, b, n, blocks):
    """``token_chunk_bytes`` giving chunks of ``blocks`` query blocks."""
    nb = math.ceil(n / gate.config.block_size)
    return blocks * b * gate.num_heads * gate.config.block_size * nb * 4


@pytest.mark.parametrize("n", [5, 16, 64, 70, 97, 33])
@pytest.mark.parametrize("chunk_blocks", [1, 2, None])
def test_token_gate_matches_naive_reference(n, chunk_blocks):
    torch.manual_seed(n)
    gate = _gate(k_pool=("max", "min"))
    if chunk_blocks is not None:
        gate.token_chunk_bytes = _blocks_per_chunk(gate, 2, n, chunk_blocks)
    q, k = torch.randn(2, 4, n, 16), torch.randn(2, 2, n, 16)
    got = gate(q, k)
    nb = math.ceil(n / 16)
    assert got.shape == (2, 4, nb, nb) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _naive(gate, q, k), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["k_only", "no_rope", "default_rope_mha"])
def test_token_gate_forms_match_naive_reference(kind):
    torch.manual_seed(1)
    gate = {"k_only": lambda: _gate(hidden=16),  # hidden == head dim: no Q projection (q_linear=auto)
            "no_rope": lambda: _gate(rope=None, q_linear=True),
            "default_rope_mha": lambda: _gate(hq=3, hkv=3, rope="plain")}[kind]()
    assert (gate.q_weight is None) == (kind == "k_only")
    gate.token_chunk_bytes = 1  # one query block a chunk
    q, k = torch.randn(1, gate.num_heads, 50, 16), torch.randn(1, gate.num_kv_heads, 50, 16)
    torch.testing.assert_close(gate(q, k).double(), _naive(gate, q, k), rtol=1e-4, atol=1e-4)


def test_length_dependent_rope_is_taken_at_each_length():
    """A rope whose frequencies depend on the length (dynamic NTK: ``rope_at_length``) rotates token queries and
    block keys with the frequencies of the sequence's own length."""
    torch.manual_seed(5)
    gate = _gate(rope="plain")
    base = gate.rope_inv_freq.clone()
    gate.rope_at_length = lambda n: (base / (1 + n / 50), 1.0 + n / 1000)
    gate.token_chunk_bytes = 1
    for n in (40, 90):
        q, k = torch.randn(1, 4, n, 16), torch.randn(1, 2, n, 16)
        torch.testing.assert_close(gate(q, k).double(), _naive(gate, q, k), rtol=1e-4, atol=1e-4)


def test_tokens_within_a_block_matter_unlike_the_pooled_gate():
    """Swapping two tokens' queries inside a block leaves the block's pooled Q (avg) as is, but not the token
    gate's logits (each token is rotated at its own position); the chunk count changes nothing."""
    torch.manual_seed(2)
    gate = _gate()
    q, k = torch.randn(1, 4, 64, 16), torch.randn(1, 2, 64, 16)
    swapped = q.clone()
    swapped[:, :, [40, 45]] = q[:, :, [45, 40]]
    assert not torch.allclose(gate(q, k)[:, :, 2], gate(swapped, k)[:, :, 2])
    torch.testing.assert_close(gate(q, k)[:, :, :2], gate(swapped, k)[:, :, :2])  # other blocks untouched


@pytest.mark.parametrize("n, chunk_blocks, rope", [(70, 1, None), (64, 3, None), (70, 2, "llama3")])
def test_chunked_gradients_equal_the_naive_ones(n, chunk_blocks, rope):
    """Exact up to float64 rounding without RoPE; with it, to the float32 angles of the gate's rotary tables (the
    implementation computes ``position * inv_freq`` in float32 at any dtype, about 1e-6 off at these positions).
    K pools max and min: pool_blocks accumulates averages in float32 at any dtype."""
    torch.manual_seed(3)
    gate = _gate(k_pool=("max", "min"), rope=rope, q_linear=True).double()
    gate.token_chunk_bytes = _blocks_per_chunk(gate, 2, n, chunk_blocks)
    q = torch.randn(2, 4, n, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, n, 16, dtype=torch.float64, requires_grad=True)
    nb = math.ceil(n / 16)
    weight = torch.randn(2, 4, nb, nb, dtype=torch.float64).tril()  # a loss that reads every causal logit

    def grads(fn):
        gate.zero_grad()
        q.grad = k.grad = None
        logits = fn(gate, q, k)
        (logits.masked_fill(torch.ones(nb, nb, dtype=torch.bool).triu(1), 0) * weight).sum().backward()
        return [x.grad.clone() for x in (gate.q_weight, gate.k_weight, q, k)]

    got, want = grads(AttnGate.__call__), grads(_naive)
    assert all(w.abs().sum() > 0 for w in want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10) if rope is None else \
            torch.testing.assert_close(g, w, rtol=1e-4, atol=2e-5)


def test_chunks_bound_what_autograd_keeps():
    """Under autograd the chunked gate keeps (for the backward pass) no token-score tensor: only views of its inputs,
    the gate keys and the [B, Hq, nb, nb] logits; an unchunked naive version keeps the scores [B, Hq, N, nb]."""
    torch.manual_seed(4)
    n = 1024
    gate = _gate(k_pool=("max",))
    gate.token_chunk_bytes = _blocks_per_chunk(gate, 1, n, 8)  # 8 chunks
    q, k = torch.randn(1, 4, n, 16), torch.randn(1, 2, n, 16)
    nb = n // 16
    scores_bytes = 4 * n * nb * 4

    def kept(fn):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        for t in (q, k, gate.k_weight, gate.q_weight):
            storages.pop(t.untyped_storage().data_ptr(), None)
        return sum(storages.values())

    chunked = kept(lambda: gate(q, k))
    naive = kept(lambda: _naive_float32(gate, q, k))
    assert naive >= scores_bytes
    assert chunked < scores_bytes / 8, (chunked, scores_bytes)


def _naive_float32(gate, q, k):
    """The unchunked computation in float32 (scores [B, Hq, N, nb] whole): the memory test's contrast."""
    kg = gate._gate_keys(k, q.shape[2])
    x = torch.matmul(q, gate.q_weight)
    s = torch.matmul(x, kg.transpose(-1, -2)) / math.sqrt(x.shape[-1])
    b, h, n, nb = s.shape
    return torch.logsumexp(s.view(b, h, nb, n // nb, nb), dim=3)


def test_q_tokens_config_errors_name_the_value():
    with pytest.raises(ConfigError, match=r"^gate.q_pool=\['avg', 'max', 'min'\]: is unused with "
                                          r"gate.q_tokens=true .*gate.q_pool=\[avg\]$") as info:
        GateConfig(q_tokens=True, q_pool=["avg", "max", "min"])
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"^gate.q_pool=\['max'\]: is unused"):
        GateConfig(q_tokens=True, q_pool="max")
    with pytest.raises(ConfigError, match=r"^gate.q_tokens='yes': must be true or false$"):
        GateConfig(q_tokens="yes")
    with pytest.raises(ValueError, match=r"gate.q_linear=false needs gate.hidden_size == 16 \(token Q width\), got 24"):
        _gate(hidden=24, q_linear=False)
    assert GateConfig(q_pool=["avg", "max"]).q_tokens is False  # the default: pooled Q, any pools
    assert GateConfig().architecture_differences(GateConfig(q_tokens=True)) == ["q_tokens"]
    with pytest.raises(ValueError, match="q_tokens=true"):
        _gate().project(torch.randn(1, 4, 32, 16), torch.randn(1, 2, 32, 16))


def test_recipe_override_composes(tmp_path, experiment):
    """What experiments/quality_qwen.py passes seer.train for ``--recipes tok=...``: on the Qwen recipe (Q pooled
    avg+max+min) ``gate.q_tokens=true`` alone is refused naming q_pool; with ``gate.q_pool=[avg]`` it composes."""
    from seer.config import compose, validate

    quality_qwen = experiment("quality_qwen")

    args = quality_qwen.parse_args(["--model-dir", "/m", "--novels", "n", "--eval-novel", "e", "--recipes",
                                    "tok=gate.q_tokens=true;gate.q_pool=[avg]", "bad=gate.q_tokens=true"])
    recipes = quality_qwen.recipes(args)
    base = ["experiment=qwen05_gates", f"paths.output_dir={tmp_path}",
            f"data.corpus.corpora.0.paths=[{tmp_path}/*.txt]"]
    run = validate(compose([*base, *recipes["tok"]]))
    assert run.gate.q_tokens and run.gate.q_pool == ["avg"] and run.gate.k_pool == ["max", "min", "avg"]
    assert run.gate.blend == "vertical_slash"
    with pytest.raises(ConfigError, match=r"gate.q_pool=\['avg', 'max', 'min'\]: is unused with gate.q_tokens"):
        validate(compose([*base, *recipes["bad"]]))
    preset = validate(compose(["gate=tokens", f"paths.output_dir={tmp_path}"])).gate
    assert preset.q_tokens and preset.k_pool == ["max", "min", "avg"]


def test_gate_file_round_trip_rebuilds_token_gates(tmp_path):
    from seer.model import attach_gates, gates
    from seer.model.gate_io import load_gates, save_gates

    cfg = GateConfig(block_size=16, hidden_size=24, q_tokens=True)
    model = tiny_model()
    attach_gates(model, cfg)
    save_gates(tmp_path / "gates", model, "tiny")
    assert json.loads((tmp_path / "gates" / "gates.json").read_text())["gate"]["q_tokens"] is True
    fresh = tiny_model()
    load_gates(fresh, tmp_path / "gates")
    assert fresh.seer_context.gate_config == cfg
    q, k = torch.randn(1, 4, 40, 16), torch.randn(1, 2, 40, 16)
    for i, gate in gates(fresh).items():
        assert gate.config.q_tokens and gate.q_weight.shape == (4, 16, 24)
        torch.testing.assert_close(gate(q, k), gates(model)[i](q, k), rtol=0, atol=0)
    # the weights have the pooled-avg gate's shapes: only gates.json tells them apart, and a mismatch is refused
    with pytest.raises(ValueError, match="gate.q_tokens=True, but gate.q_tokens=False was asked for"):
        load_gates(tiny_model(), tmp_path / "gates", expected_gate=GateConfig(block_size=16, hidden_size=24))


def test_distillation_with_token_gates_lowers_the_loss():
    """A tiny distillation (the distill stage's module on random tokens) trains token gates: the loss falls and the
    gates' Q and K maps move."""
    import lightning as L

    from seer.data.synthetic import RandomTokensDataModule
    from seer.model import attach_gates, freeze_base_model, gates
    from seer.sparsity.config import SparsityConfig
    from seer.training.config import DistillConfig
    from seer.training.distill import GateDistillation

    torch.manual_seed(0)
    model = tiny_model("llama", num_hidden_layers=2)
    for layer in model.model.layers:  # sharpen attention so the ground truth has structure to learn
        layer.self_attn.q_proj.weight.data *= 4
    attach_gates(model, GateConfig(block_size=16, hidden_size=24, q_tokens=True))
    freeze_base_model(model)
    for gate in gates(model).values():
        gate.token_chunk_bytes = 1  # a chunk a query block: the checkpointed path under training
    before = {i: (g.q_weight.detach().clone(), g.k_weight.detach().clone()) for i, g in gates(model).items()}
    module = GateDistillation(model, DistillConfig(lr=2e-2, warmup_steps=0), SparsityConfig(method="topk",
                              target_density=0.5), "reference")
    data = RandomTokensDataModule(vocab_size=256, seq_len=128, train_sequences=1, val_sequences=1)
    trainer = L.Trainer(max_steps=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    trainer.fit(module, datamodule=data)
    hist = module.loss_history
    assert len(hist) == 30 and sum(hist[-5:]) / 5 < 0.8 * sum(hist[:5]) / 5
    for i, g in gates(model).items():
        assert not torch.equal(before[i][0], g.q_weight) and not torch.equal(before[i][1], g.k_weight)


def test_seer_train_with_the_token_preset_writes_loadable_gates(tmp_path):
    """seer.train end to end (tiny model, a few steps) with gate.q_tokens=true; its gate file loads as token gates."""
    from seer.config import compose, validate
    from seer.model import gates
    from seer.model.loading import load_causal_lm
    from seer.model.gate_io import load_gates
    from tests.training.conftest import train

    summary = train(tmp_path, "gate.q_tokens=true", "trainer.max_steps=3")
    fresh = load_causal_lm(validate(compose(["model=tiny_llama"])).model)
    meta = load_gates(fresh, summary["gates"])
    assert meta["gate"]["q_tokens"] is True and all(g.config.q_tokens for g in gates(fresh).values())


def test_model_card_names_token_queries():
    import dataclasses

    from seer.export_gates import model_card

    meta = {"base_model": "tiny", "model": {"num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16}}
    for cfg, want in ((GateConfig(q_tokens=True), "pools Q per token (log-mean-exp over each block), K max"),
                      (GateConfig(q_pool=["avg", "max"]), "pools Q avg+max, K max")):
        card = model_card({**meta, "gate": dataclasses.asdict(cfg)}, {}, [], [], "other", "/g")
        assert want in card
