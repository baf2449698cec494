"""Sparse decode in generate(): decode gates score each step's blocks, the budget picks them, the decode kernel's
reference attends them over transformers' KV cache; with prefill gates both phases are sparse in one generate()."""

import math

import pytest
import torch

import seer.model.inference
from seer.gates.config import GateConfig
from seer.gates.decode_config import DecodeGateConfig
from seer.model import attention_layers, gates
from seer.model.attention import prepare_model, seer_attention
from seer.model.decode import attach_decode_gates, decode_gates
from seer.model.decode_gate_io import save_decode_gates
from seer.model.gate_io import save_gates
from seer.model.inference import load
from seer.model.loading import load_causal_lm
from seer.sparsity.decode import DecodeCalibration, DecodeSparsityConfig, save_decode_calibration
from tests.model.test_inference import ARCH, TINY
from tests.tiny import tiny_model

BS = 16
DECODE = DecodeGateConfig(block_size=BS, hidden_size=16)
ALL_BLOCKS = {"token_budget": 1024}  # more than any sequence here: decode density 1.0


@pytest.fixture(scope="module")
def gate_folder(tmp_path_factory):
    return write_gate_folder(tmp_path_factory.mktemp("gates"))


def write_gate_folder(folder):
    """Prefill gates and decode gates of the tiny model (random, non-trivial weights) in one folder."""
    torch.manual_seed(0)
    model = load(TINY, gate_config=GateConfig(block_size=BS, hidden_size=16), device="cpu")
    for g in gates(model).values():
        torch.nn.init.normal_(g.k_weight)
    save_gates(folder, model, "tiny")
    attach_decode_gates(model, DECODE)
    for g in decode_gates(model).values():
        torch.nn.init.normal_(g.k_weight, std=2.0)
    save_decode_gates(folder, model, "tiny", extra={"decode_sparsity": {"token_budget": 32}})
    return folder


def _load(**kwargs):
    torch.manual_seed(0)  # the same random base model every time
    return load(TINY, device="cpu", **kwargs)


def _generate(model, ids, new=8, **kwargs):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=2, **kwargs)


def _expected_density(prompt: int, new: int, blocks: int) -> float:
    """Mean kept share of valid blocks of the decode steps (sequence lengths prompt+1 .. prompt+new-1) when
    ``blocks`` blocks are kept."""
    shares = [min(blocks, nb) / nb for nb in (math.ceil(n / BS) for n in range(prompt + 1, prompt + new))]
    return sum(shares) / len(shares)


def test_decode_density_one_generates_the_dense_tokens(gate_folder):
    model = _load(decode_gates=gate_folder, decode_sparsity=ALL_BLOCKS)
    ids = torch.randint(3, 300, (1, 40))
    sparse = _generate(model, ids, new=16)
    assert model.seer_decode.densities() == {0: 1.0, 1: 1.0}
    model.seer_decode.disable()
    assert torch.equal(sparse, _generate(model, ids, new=16))
    torch.manual_seed(0)
    assert torch.equal(sparse, _generate(load_causal_lm(TINY, torch.device("cpu")), ids, new=16))  # no seer at all


def test_steps_of_several_tokens_keep_the_cache_in_step(gate_folder):
    """A cached step of three tokens (attended densely) adds them to the compressed-K cache: the one-token step after
    it scores the right blocks, and at density 1.0 every step gives the logits of one dense forward."""
    model = _load(decode_gates=gate_folder, decode_sparsity=ALL_BLOCKS)
    ids = torch.randint(3, 300, (1, 50))
    with torch.no_grad():
        out = model(ids[:, :46], use_cache=True)
        chunk = model(ids[:, 46:49], past_key_values=out.past_key_values, use_cache=True)
        step = model(ids[:, 49:], past_key_values=chunk.past_key_values, use_cache=True)
        model.seer_decode.disable()
        dense = model(ids, use_cache=False).logits
    torch.testing.assert_close(torch.cat([out.logits, chunk.logits, step.logits], 1), dense, rtol=1e-4, atol=1e-4)
    assert model.seer_decode.cache is None  # disabled: no compressed keys kept
    assert all(layer.seer_decode_stash.k is None for layer in attention_layers(model))  # nor stashed keys


def test_decode_budget_gives_its_density_beside_a_sparse_prefill(gate_folder):
    """Both phases sparse in one generate(): the prefill's densities are its own, the decode steps keep the budget's
    two blocks (the first and the newest) of every token's sequence."""
    both = _load(gates=gate_folder, sparsity={"method": "topk", "target_density": 0.5}, decode_gates=gate_folder)
    prefill_only = _load(gates=gate_folder, sparsity={"method": "topk", "target_density": 0.5})
    ids = torch.randint(3, 300, (1, 70))
    out, alone = _generate(both, ids, new=12), _generate(prefill_only, ids, new=12)
    assert both.seer_decode.sparsity.token_budget == 32  # the budget stored with the decode gates
    assert both.seer_context.densities() == prefill_only.seer_context.densities()
    assert 0 < both.seer_context.mean_density() < 0.8
    for density in both.seer_decode.densities().values():
        assert density == pytest.approx(_expected_density(70, 12, 2))
    assert out[0, 70] == alone[0, 70]  # the first new token comes from the (same) prefill
    assert not torch.equal(out, alone)  # later ones from the sparse decode steps


def test_decode_step_attends_the_budgets_blocks_of_each_row():
    """One layer's decode step on a left-padded batch of two sequences: the output equals softmax attention over the
    blocks that the decode gate (on each whole sequence) and a three-block budget pick, computed here in float64."""
    model = tiny_model("llama")
    prepare_model(model, BS)
    ctx = attach_decode_gates(model, DECODE)
    torch.manual_seed(1)
    for g in decode_gates(model).values():
        torch.nn.init.normal_(g.k_weight, std=2.0)
    ctx.enable(DecodeSparsityConfig(token_budget=3 * BS))
    layer = attention_layers(model)[0]
    gate, stash = layer.seer_decode_gate, layer.seer_decode_stash
    hq, hkv, d, n = 4, 2, 16, 70
    firsts = [0, 21]  # row 1: 21 padding tokens, then 49 real ones
    k_pre, q_pre = torch.randn(2, hkv, n + 1, d), torch.randn(2, hq, 1, d)
    query, key, value = torch.randn(2, hq, 1, d), torch.randn(2, hkv, n + 1, d), torch.randn(2, hkv, n + 1, d)
    real = torch.arange(n + 1)[None, :] >= torch.tensor(firsts)[:, None]
    prefill_mask = (real[:, None, None, :n] & torch.ones(n, n, dtype=torch.bool).tril())
    prefill_mask.seer_spans = tuple((first, n) for first in firsts)  # what seer_mask attaches
    stash.q, stash.k = torch.randn(2, hq, n, d), k_pre[:, :, :n]
    with torch.no_grad():
        seer_attention(layer, torch.randn(2, hq, n, d), key[:, :, :n], value[:, :, :n], prefill_mask,
                       scaling=layer.scaling, use_cache=True)
        stash.q, stash.k = q_pre, k_pre[:, :, n:]
        out, _ = seer_attention(layer, query, key, value, real[:, None, None], scaling=layer.scaling, use_cache=True)
    kept_shares = []
    for row, first in enumerate(firsts):
        length = n + 1 - first
        newest = (length - 1) // BS
        logits = gate(q_pre[row:row + 1], k_pre[row:row + 1, :, first:])[0, :, -1]  # [Hkv, blocks]
        for h in range(hq):
            g = h // (hq // hkv)
            others = [j for j in logits[g].argsort(descending=True).tolist() if j not in (0, newest)]
            kept = {0, newest, others[0]}
            keys = [first + j for j in range(length) if j // BS in kept]
            s = (query[row, h, 0].double() @ key[row, g, keys].double().T) * layer.scaling
            want = torch.softmax(s, -1) @ value[row, g, keys].double()
            torch.testing.assert_close(out[row, 0, h].double(), want, rtol=1e-5, atol=1e-6)
            kept_shares.append(len(kept) / (newest + 1))
    assert ctx.densities()[0] == pytest.approx(sum(kept_shares) / len(kept_shares))


def test_left_padded_batch_gives_each_prompt_alone_tokens(gate_folder):
    model = _load(gates=gate_folder, sparsity={"method": "topk", "target_density": 0.5}, decode_gates=gate_folder)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(3, 300, (n,), generator=g) for n in (45, 26)]
    alone = [_generate(model, s[None])[0, len(s):] for s in seqs]
    ids = torch.full((2, 45), 2)
    mask = torch.zeros(2, 45, dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, 45 - len(s):], mask[row, 45 - len(s):] = s, 1
    out = _generate(model, ids, attention_mask=mask)
    assert [row.tolist() for row in out[:, 45:]] == [a.tolist() for a in alone]
    assert 0 < model.seer_decode.mean_density() < 1


def test_triton_decode_kernel_gives_the_reference_tokens(gate_folder):
    """The decode kernel under Triton's interpreter in the generation loop (validate=False) against the reference."""
    ids = torch.randint(3, 300, (1, 50))
    runs = {kernel: _load(decode_gates=gate_folder, kernel=kernel) for kernel in ("reference", "triton")}
    tokens = {kernel: _generate(model, ids, new=4) for kernel, model in runs.items()}
    assert torch.equal(tokens["triton"], tokens["reference"])
    assert runs["triton"].seer_decode.densities() == pytest.approx(runs["reference"].seer_decode.densities())


def test_stored_decode_calibration_gives_the_threshold(gate_folder, tmp_path):
    import shutil

    folder = tmp_path / "g"
    shutil.copytree(gate_folder, folder)
    budget = DecodeSparsityConfig(method="threshold", target_density=0.3)
    save_decode_calibration(folder, DecodeCalibration(budget, threshold=0.07, density=0.3, tokens=100, seq_len=64))
    model = _load(decode_gates=folder, decode_sparsity={"method": "threshold", "target_density": 0.3})
    assert model.seer_decode.threshold == 0.07
    _generate(model, torch.randint(3, 300, (1, 40)), new=3)
    assert set(model.seer_decode.densities()) == {0, 1}


def test_load_refuses_bad_decode_arguments_before_loading(gate_folder, monkeypatch):
    monkeypatch.setattr(seer.model.inference, "load_causal_lm", lambda *a, **k: pytest.fail("the model was loaded"))

    def refused(model=TINY, **kwargs) -> str:
        with pytest.raises(ValueError) as info:
            load(model, device="cpu", **kwargs)
        assert "\n" not in str(info.value)
        return str(info.value)

    weights = gate_folder / "decode_gates.safetensors"
    three_layers = {"random_init": True, "dtype": "float32", "architecture": {**ARCH, "num_hidden_layers": 3}}
    assert refused(three_layers, decode_gates=gate_folder) == (
        f"gate file {weights} was made for tiny with num_layers=2, but this model has num_layers=3")
    assert refused(decode_gates=gate_folder, decode_sparsity={"token_budget": 8}) == (
        "decode_sparsity.token_budget=8: is below one block (16 tokens); the budget is whole blocks")
    assert refused(decode_gates=gate_folder, decode_sparsity={"method": "topk"}).startswith(
        "decode_sparsity.method='topk': choose from")
    assert refused(decode_gates=gate_folder, decode_sparsity={"method": "threshold", "target_density": 0.3}) \
        .startswith(f"decode_sparsity.target_density=0.3: no decode calibration for threshold target_density=0.3 in "
                    f"{gate_folder / 'decode_calibration.json'} (stored: none)")
    assert refused(decode_gates="/no/decode") == ("decode_gates='/no/decode': no decode gates there (a gates folder "
                                                  "written by stage=distill_decode, outputs/<run>/gates)")
    assert refused(gate_config=GateConfig(block_size=BS, hidden_size=16), decode_sparsity=ALL_BLOCKS).startswith(
        "decode_sparsity.estimate=None: sparse decode without decode gates scores the blocks by a training-free "
        "estimate: give estimate=quest and estimate_weight=1")
    assert refused(decode_sparsity={**QUEST_ALONE, "estimate_weight": 0.5}).startswith(
        "decode_sparsity.estimate_weight=0.5: without decode gates the estimate scores alone")
    assert refused(gates=gate_folder, decode_sparsity={**QUEST_ALONE, "token_budget": 8}) == (
        "decode_sparsity.token_budget=8: is below one block (16 tokens); the budget is whole blocks")
    assert refused(decode_sparsity={**QUEST_ALONE, "token_budget": 32}) == (  # no prefill gates: blocks of 64
        "decode_sparsity.token_budget=32: is below one block (64 tokens); the budget is whole blocks")
    assert refused(decode_sparsity={**QUEST_ALONE, "token_budget": 256, "rerank_blocks": 3}) == (
        "decode_sparsity.rerank_blocks=3: candidates are fewer than the 256-token budget's 4 blocks of 64 tokens; "
        "give at least that many (or 0: no rerank)")


QUEST_ALONE = {"token_budget": 48, "estimate": "quest", "estimate_weight": 1.0}


def test_load_gives_training_free_decode_without_decode_gates(gate_folder):
    """``decode_sparsity`` with Quest alone and no decode gates: beside sparse prefill, the same tokens as decode
    gates with Quest at weight 1 (which ignores the gates), in the prefill gates' blocks; beside a dense prefill, blocks
    of 64 tokens (one kept of two: density 0.5)."""
    ids = torch.randint(3, 300, (2, 70), generator=torch.Generator().manual_seed(5))
    gated = _load(gates=gate_folder, decode_gates=gate_folder, decode_sparsity=QUEST_ALONE)
    model = _load(gates=gate_folder, decode_sparsity=QUEST_ALONE)
    assert model.seer_decode.config is None and model.seer_decode.block_size == BS
    assert not any(".seer_decode_gate." in n for n, _ in model.named_parameters())
    out = _generate(model, ids, new=12)
    assert torch.equal(out, _generate(gated, ids, new=12))
    assert 0 < model.seer_decode.mean_density() < 1
    newest_only = {**QUEST_ALONE, "token_budget": 64, "first_block": False}
    model = _load(decode_sparsity=newest_only)
    assert model.seer_decode.block_size == 64 and model.seer_context.gate_config is None
    _generate(model, ids, new=12)  # sequences of 71-81 tokens: two blocks, the newest kept
    assert model.seer_decode.mean_density() == pytest.approx(0.5)


@pytest.mark.parametrize("budget", [{"token_budget": 32}, {"token_budget": 80, "first_block": False},
                                    {"method": "threshold", "threshold": 0.3},
                                    {"token_budget": 48, "estimate": "quest", "estimate_weight": 0.5}, "quest alone"])
def test_decode_steps_read_nothing_back_from_the_device(gate_folder, monkeypatch, budget):
    """An unpadded batch's decode steps call no tensor-to-host conversion (what synchronises with a GPU) in the
    decode handler, and give each prompt's tokens alone and the mean of their densities."""
    ids = torch.randint(3, 300, (2, 70), generator=torch.Generator().manual_seed(5))
    model = _load(gates=gate_folder, decode_sparsity=QUEST_ALONE) if budget == "quest alone" else \
        _load(decode_gates=gate_folder, decode_sparsity=budget)
    alone = [(_generate(model, row[None], new=12), model.seer_decode.densities()) for row in ids]
    steps = []
    _refuse_host_reads(monkeypatch, steps)
    out = _generate(model, ids, new=12)
    assert len(steps) == 2 * 11  # two layers, every new token but the prefill's
    assert torch.equal(out, torch.cat([tokens for tokens, _ in alone]))
    for layer, density in model.seer_decode.densities().items():
        assert density == pytest.approx(sum(d[layer] for _, d in alone) / 2)


def _greedy_loop(model, ids, new, cache):
    """A prefill then ``new - 1`` one-token steps over ``cache``: the tokens ``[B, new]`` and each step's logits."""
    tokens, logits = [], []
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        for _ in range(new):
            logits.append(out.logits[:, -1])
            tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
            if len(tokens) < new:
                out = model(input_ids=tokens[-1], past_key_values=cache, use_cache=True)
    return torch.cat(tokens, 1), torch.stack(logits, 1)


def _refuse_host_reads(monkeypatch, steps: list):
    """Makes every tensor-to-host conversion in DecodeContext._step raise; the steps' output shapes go to ``steps``."""
    from seer.model.decode import DecodeContext

    step = DecodeContext._step

    def refuse(name):
        def call(*args, **kwargs):
            raise AssertionError(f"torch.Tensor.{name} in a decode step: a host synchronisation on a GPU")
        return call

    def guarded_step(self, *args, **kwargs):
        with monkeypatch.context() as patch:
            for name in ("item", "tolist", "cpu", "numpy", "__int__", "__index__", "__float__", "__bool__"):
                patch.setattr(torch.Tensor, name, refuse(name))
            out = step(self, *args, **kwargs)
        steps.append(out.shape)
        return out

    monkeypatch.setattr(DecodeContext, "_step", guarded_step)


@pytest.mark.parametrize("budget", [{"token_budget": 32}, {"method": "threshold", "threshold": 0.3},
                                    {"token_budget": 48, "estimate": "quest", "estimate_weight": 1.0}])
def test_static_cache_decodes_as_the_dynamic_cache_without_host_reads(gate_folder, monkeypatch, budget):
    """transformers' StaticCache (keys [B, Hkv, max_cache_len, D], each row's from 0): an unpadded batch decodes
    the tokens and densities of a DynamicCache (a sparse prefill too), its steps read nothing back from the device,
    and the compressed-K cache is sized by the KV cache's length."""
    from transformers import DynamicCache, StaticCache

    ids = torch.randint(3, 300, (2, 70), generator=torch.Generator().manual_seed(6))
    model = _load(gates=gate_folder, sparsity={"method": "topk", "target_density": 0.5}, decode_gates=gate_folder,
                  decode_sparsity=budget)
    want, want_logits = _greedy_loop(model, ids, 12, DynamicCache())
    dynamic, prefill = model.seer_decode.densities(), model.seer_context.densities()
    assert 0 < model.seer_context.mean_density() < 0.8
    steps = []
    _refuse_host_reads(monkeypatch, steps)
    model.seer_context.density.clear()
    got, got_logits = _greedy_loop(model, ids, 12, StaticCache(config=model.config, max_cache_len=90))
    assert len(steps) == 2 * 11 and model.seer_decode.cache.capacity == -(-90 // BS)
    assert torch.equal(got, want)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    assert model.seer_decode.densities() == pytest.approx(dynamic)
    assert model.seer_context.densities() == pytest.approx(prefill)
    assert 0 < model.seer_decode.mean_density() < 1


def test_static_cache_at_density_one_gives_the_dense_logits(gate_folder):
    from transformers import StaticCache

    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(7))
    model = _load(decode_gates=gate_folder, decode_sparsity=ALL_BLOCKS)
    got, sparse = _greedy_loop(model, ids, 20, StaticCache(config=model.config, max_cache_len=64))
    assert model.seer_decode.densities() == {0: 1.0, 1: 1.0}
    model.seer_decode.disable()
    want, dense = _greedy_loop(model, ids, 20, StaticCache(config=model.config, max_cache_len=64))
    assert torch.equal(got, want)
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-4)


def test_static_cache_refuses_a_left_padded_prompt(gate_folder):
    from transformers import StaticCache

    model = _load(decode_gates=gate_folder, decode_sparsity=ALL_BLOCKS)
    ids, mask = torch.randint(3, 300, (2, 30)), torch.ones(2, 30, dtype=torch.long)
    mask[1, :7] = 0
    with pytest.raises(ValueError, match="sparse decode over a static KV cache .* needs unpadded prompts"):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, past_key_values=StaticCache(config=model.config,
                                                                                   max_cache_len=40), use_cache=True)


@pytest.mark.parametrize("sparse", [True, False])
def test_a_whole_model_step_over_a_static_cache_reads_nothing_from_the_device(gate_folder, monkeypatch, sparse):
    """What a CUDA graph of one decode step needs (experiments/bench_decode_model.py --graph): after an eager step,
    the whole forward of the next (embedding, transformers' mask and positions from the StaticCache, every layer,
    the LM head) converts no tensor to a host value, dense or sparse."""
    from transformers import StaticCache

    model = _load(decode_gates=gate_folder, decode_sparsity={"token_budget": 32})
    if not sparse:
        model.seer_decode.disable()
    ids = torch.randint(3, 300, (2, 50), generator=torch.Generator().manual_seed(8))
    cache = StaticCache(config=model.config, max_cache_len=64)
    with torch.no_grad():
        model(input_ids=ids[:, :40], past_key_values=cache, use_cache=True)
        model(input_ids=ids[:, 40:41], past_key_values=cache, use_cache=True)
        with monkeypatch.context() as patch:
            for name in ("item", "tolist", "cpu", "numpy", "__int__", "__index__", "__float__", "__bool__"):
                patch.setattr(torch.Tensor, name, lambda *args, name=name, **kwargs: pytest.fail(
                    f"torch.Tensor.{name} in a decode step"))
            for i in range(41, 45):
                model(input_ids=ids[:, i:i + 1], past_key_values=cache, use_cache=True)
    assert int(cache.layers[0].cumulative_length) == 45
    if sparse:
        assert model.seer_decode.cache.seqlens[0].tolist() == [45, 45]


def test_generate_gives_the_tokens_of_a_manual_sparse_decode_loop(gate_folder):
    """generate() at a small budget takes the path of the teacher-forced loop experiments/quality_decode.py measures:
    its greedy tokens are those of prefill + one-token steps over a DynamicCache, step for step."""
    from transformers import DynamicCache

    model = _load(decode_gates=gate_folder, decode_sparsity={"token_budget": 32})
    ids = torch.randint(3, 300, (1, 90), generator=torch.Generator().manual_seed(3))
    want, _ = _greedy_loop(model, ids, 24, DynamicCache())
    got = _generate(model, ids, new=24)[:, 90:]
    assert 0 < model.seer_decode.mean_density() < 1
    assert torch.equal(got, want)


def test_triton_decode_steps_pass_unique_lists(gate_folder, monkeypatch):
    """The model's decode steps call the kernel with ``unique_blocks=True`` on lists that never repeat a block, and
    the kernel gives there what it gives with its repeat check (budgets of 1, 2 and 3 blocks over short caches)."""
    import seer.kernels

    kernel, calls = seer.kernels.block_sparse_decode, []

    def spy(q, k, v, index, seqlens, *args, **kwargs):
        calls.append(kwargs.get("unique_blocks"))
        for row in index.reshape(-1, index.shape[-1]):
            kept = row[row >= 0]
            assert kept.unique().numel() == kept.numel(), row
        out = kernel(q, k, v, index, seqlens, *args, **kwargs)
        checked = kernel(q, k, v, index, seqlens, *args, **dict(kwargs, unique_blocks=False))
        assert torch.equal(out[0], checked[0]) and torch.equal(out[1], checked[1])
        return out

    monkeypatch.setattr(seer.kernels, "block_sparse_decode", spy)
    ids = torch.randint(3, 300, (1, 30))
    for budget, first in ((BS, True), (2 * BS, False), (3 * BS, True)):
        model = _load(decode_gates=gate_folder, kernel="triton",
                      decode_sparsity={"token_budget": budget, "first_block": first})
        _generate(model, ids, new=4)
    assert calls and all(calls)


def test_shared_gate_scores_the_prefill_with_the_decode_gates(gate_folder):
    """shared_gate=True: each layer's prefill block scores are its decode gate's block scores of the layer's pre-RoPE
    Q and K (caught here by hooks of the test's own), the prefill is sparse, and both phases run in one generate()."""
    model = _load(decode_gates=gate_folder, shared_gate=True, sparsity={"method": "topk", "target_density": 0.5})
    assert model.seer_context.gate_config == GateConfig(block_size=BS)
    caught = {}
    for layer in attention_layers(model):
        i = layer.layer_idx
        layer.q_proj.register_forward_hook(lambda m, a, out, i=i: caught.__setitem__(("q", i), out))
        layer.k_proj.register_forward_hook(lambda m, a, out, i=i: caught.__setitem__(("k", i), out))
    ids = torch.randint(3, 300, (1, 70))
    with torch.no_grad(), model.seer_context.observing() as observed:
        model(ids, use_cache=False)
    for layer in attention_layers(model):
        i, heads = layer.layer_idx, model.config.num_attention_heads
        kv, d = model.config.num_key_value_heads, layer.head_dim
        q = caught["q", i].view(1, 70, heads, d).transpose(1, 2)
        k = caught["k", i].view(1, 70, kv, d).transpose(1, 2)
        want = layer.seer_decode_gate.block_scores(q, k).repeat_interleave(heads // kv, dim=1)
        torch.testing.assert_close(observed.scores()[i], want)
    _generate(model, ids, new=12)
    assert 0 < model.seer_context.mean_density() < 0.8
    assert all(0 < density < 1 for density in model.seer_decode.densities().values())
    with torch.no_grad():
        sparse = model(ids, use_cache=False).logits
        dense = _load(decode_gates=gate_folder)(ids, use_cache=False).logits  # dense prefill
    assert (sparse - dense).abs().max() > 1e-3


def test_shared_gate_refuses_bad_arguments_before_loading(gate_folder, monkeypatch):
    monkeypatch.setattr(seer.model.inference, "load_causal_lm", lambda *a, **k: pytest.fail("the model was loaded"))

    def refused(**kwargs) -> str:
        with pytest.raises(ValueError) as info:
            load(TINY, device="cpu", shared_gate=True, **kwargs)
        return str(info.value)

    need = "shared_gate=True makes the decode gates score the prefill too: give decode_gates=PATH and no gates="
    assert refused() == need
    assert refused(gates=gate_folder, decode_gates=gate_folder) == need
    assert refused(decode_gates=gate_folder, gate_config={"hidden_size": 8}) == (
        "gate_config ['hidden_size'] with shared_gate=True: the shared decode gates take only blend, blend_weight, "
        "rerank_rows, rerank_top_p, rerank_max_share")
    assert refused(decode_gates=gate_folder, sparsity={"method": "threshold", "target_density": 0.1}).endswith(
        "(the shared decode gates have no prefill calibration: give a top-k budget)")
