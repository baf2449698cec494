"""The SeerAttention authors' released prefill gates: their forward (re-implemented here in float64 from the
release's definitions) against seer's AttnGate loaded from their weights, the budget they map to, the Hub cache
layout, and every refusal before the base model loads."""

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import seer.model.inference as inference
from seer.checks import ConfigError
from seer.model import gates
from seer.model.inference import load
from seer.model.release import convert_release, read_release
from tests.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[2]
BLOCK = 16
RELEASE_POOLS = {"max": F.max_pool3d, "min": lambda x, **kw: -F.max_pool3d(-x, **kw), "avg": F.avg_pool3d}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "rope_theta": 50000.0}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEER_CACHE_DIR", str(tmp_path / "seer-cache"))


def _pools(gate_type: str) -> tuple[list[str], list[str]]:
    q, k = gate_type[1:].split("_K")
    return re.findall("max|min|avg", q), re.findall("max|min|avg", k)


def _base(tmp_path, family="llama", name="base", **overrides) -> tuple[Path, torch.nn.Module]:
    model = tiny_model(family, **overrides)
    folder = tmp_path / name
    model.save_pretrained(folder)
    return folder, model


def _release(tmp_path, base: Path, family="llama", gate_type="Qavg_Kmaxminavg", force_double=False, hidden=16,
             fmt="pth", name="release", **fields) -> Path:
    """A release folder in the authors' layout: the base config (with ``head_dim`` as their Llama config saves it;
    their Qwen2 config has none) plus ``base_model`` and ``seerattn_*``, and random weights keyed as they save them."""
    cfg = json.loads((base / "config.json").read_text())
    cfg.pop("rope_parameters")
    if family != "llama":
        cfg.pop("head_dim", None)
    heads, kv, layers = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"]
    head_dim = cfg["hidden_size"] // heads
    n_q, n_k = map(len, _pools(gate_type))
    q_linear = n_q > 1 or hidden != head_dim or force_double
    cfg.update(base_model=str(base), seerattn_gate_type=gate_type, seerattn_gate_block_size=BLOCK,
               seerattn_gate_hidden_size=hidden, seerattn_gate_force_double=force_double,
               seerattn_sparsity_method="threshold", seerattn_threshold=2e-3, seerattn_nz_ratio=1.0,
               seerattn_last_block_dense=True, architectures=[f"SeerAttn{family.title()}ForCausalLM"])
    cfg.update(fields)
    g = torch.Generator().manual_seed(1)
    state = {}
    for i in range(layers):
        prefix = f"model.layers.{i}.self_attn.attn_gate."
        state[prefix + "mask_linear_k.weight"] = torch.randn(kv if q_linear else heads, n_k * head_dim, hidden,
                                                             generator=g, dtype=torch.float64) * 0.3
        if q_linear:
            state[prefix + "mask_linear_q.weight"] = torch.randn(heads, n_q * head_dim, hidden, generator=g,
                                                                 dtype=torch.float64) * 0.3
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    if fmt == "pth":
        torch.save(state, folder / "attn_gate_weights.pth")
    else:
        from safetensors.torch import save_file

        save_file(state, str(folder / "attn_gate_weights.safetensors"))
    return folder


def _release_inv_freq(base_model, hidden):
    """The release's block rotary embedding: the model's RoPE recipe built for width ``hidden``."""
    params = base_model.config.rope_parameters
    if params["rope_type"] == "default":
        return 1.0 / params["rope_theta"] ** (torch.arange(0, hidden, 2, dtype=torch.float32) / hidden), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    block_config = copy.deepcopy(base_model.config)
    block_config.head_dim = hidden
    return ROPE_INIT_FUNCTIONS[params["rope_type"]](block_config, None)


def release_gate_scores(q, k, state, layer, gate_type, hidden, inv_freq, attention_scaling):
    """The release's AttnGate forward at inference (softmax over key blocks) in float64, from its definitions:
    q ``[B, S, Hq, D]``, k ``[B, S, Hkv, D]`` before RoPE -> ``[B, Hq, nb, nb]``."""
    q_names, k_names = _pools(gate_type)

    def pooled(x, names):
        return torch.cat([RELEASE_POOLS[n](x, kernel_size=[BLOCK, 1, 1], stride=[BLOCK, 1, 1], ceil_mode=True)
                          for n in names], dim=-1)

    def multi_head_linear(x, weight):  # repeat heads up to the weight's, then 'bshi,hio->bsho'
        if x.shape[2] < weight.shape[0]:
            x = x.repeat_interleave(weight.shape[0] // x.shape[2], dim=2)
        return torch.einsum("bshi,hio->bsho", x, weight)

    prefix = f"model.layers.{layer}.self_attn.attn_gate."
    qg = pooled(q, q_names)
    if prefix + "mask_linear_q.weight" in state:
        qg = multi_head_linear(qg, state[prefix + "mask_linear_q.weight"])
    kg = multi_head_linear(pooled(k, k_names), state[prefix + "mask_linear_k.weight"])
    positions = torch.arange(q.shape[1])[0::BLOCK]
    freqs = inv_freq.float()[:, None] @ positions.float()[None, :]
    emb = torch.cat((freqs.T, freqs.T), dim=-1)
    cos, sin = (emb.cos() * attention_scaling).double()[:, None, :], (emb.sin() * attention_scaling).double()[:, None]

    def rope(x):
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    qg, kg = rope(qg).transpose(1, 2), rope(kg).transpose(1, 2)
    if kg.shape[1] < qg.shape[1]:
        kg = kg.repeat_interleave(qg.shape[1] // kg.shape[1], dim=1)
    attn = qg @ kg.transpose(-1, -2) * hidden ** -0.5
    nb = attn.shape[-1]
    attn = attn + torch.triu(torch.full((nb, nb), torch.finfo(attn.dtype).min, dtype=attn.dtype), diagonal=1)
    return F.softmax(attn, dim=-1)


@pytest.mark.parametrize("family,gate_type,force_double,hidden,fmt,rope", [
    ("llama", "Qavg_Kmaxminavg", False, 16, "pth", {"rope_theta": 500000.0}),   # the published form: K-only linear
    ("llama", "Qavg_Kmaxmin", True, 16, "safetensors", {}),                     # force_double: K per KV head
    ("qwen2", "Qmaxavg_Kminavg", False, 16, "pth", {"rope_parameters": YARN}),  # two Q pools; YaRN's cos/sin scale
    ("qwen2", "Qavg_Kmax", False, 24, "pth", {}),                               # hidden != head_dim: Q projected
])
def test_scores_equal_the_release_forward_in_float64(tmp_path, family, gate_type, force_double, hidden, fmt, rope):
    base, base_model = _base(tmp_path, family, **rope)
    release = _release(tmp_path, base, family, gate_type, force_double, hidden, fmt)
    model = load(gates=release, device="cpu")  # the base named by the release
    state = torch.load(release / "attn_gate_weights.pth", weights_only=True) if fmt == "pth" else \
        load_file(str(release / "attn_gate_weights.safetensors"))
    inv_freq, scaling = _release_inv_freq(base_model, hidden)
    if rope.get("rope_parameters"):
        assert scaling != 1.0  # YaRN scales cos and sin: the case that checks the scale is carried
    g = torch.Generator().manual_seed(2)
    seq = 5 * BLOCK + 7  # a partial last block: pooled over the tokens it has
    for layer, gate in gates(model).items():
        gate = copy.deepcopy(gate).double()
        q = torch.randn(2, seq, 4, 16, generator=g, dtype=torch.float64)
        k = torch.randn(2, seq, 2, 16, generator=g, dtype=torch.float64)
        expected = release_gate_scores(q, k, state, layer, gate_type, hidden, inv_freq, scaling)
        got = torch.softmax(gate(q.transpose(1, 2), k.transpose(1, 2)), dim=-1)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
        assert expected.shape == (2, 4, 6, 6) and expected[0, 0, 0, 0] == 1.0


def test_their_budget_and_no_blend_by_default_overridable(tmp_path):
    base, _ = _base(tmp_path)
    release = _release(tmp_path, base)
    model = load(gates=release, device="cpu")
    ctx = model.seer_context
    assert ctx.gate_config.blend is None
    assert (ctx.sparsity.method, ctx.sparsity.threshold, ctx.sparsity.target_density, ctx.sparsity.dense_last_rows) \
        == ("threshold", 2e-3, None, 2)
    ids = torch.randint(0, 300, (1, 6 * BLOCK))
    with torch.no_grad():
        model(ids)
    assert set(ctx.densities()) == {0, 1}
    blended = load(base, gates=release, device="cpu", gate_config={"blend": "vertical_slash"},
                   sparsity={"method": "topk", "target_density": 0.5})
    assert blended.seer_context.gate_config.blend == "vertical_slash"
    assert blended.seer_context.sparsity.method == "topk"


def test_nz_ratio_becomes_the_authors_topk_and_last_rows_off(tmp_path):
    base, _ = _base(tmp_path)
    release = read_release(_release(tmp_path, base, seerattn_sparsity_method="nz_ratio", seerattn_nz_ratio=0.2,
                                    seerattn_last_block_dense=False))
    s = release.sparsity
    assert (s.method, s.target_density, s.nz_formula, s.dense_last_rows) == ("topk", 0.2, True, 0)


def test_a_zero_threshold_warns_that_it_keeps_every_block(tmp_path):
    base, _ = _base(tmp_path)
    with pytest.warns(UserWarning, match="seerattn_threshold=0 keeps every causal block"):
        release = read_release(_release(tmp_path, base, seerattn_threshold=0.0))
    assert release.sparsity.method == "threshold" and release.sparsity.threshold == 0.0  # loaded as given


def test_converted_once_and_again_when_the_release_changes(tmp_path):
    base, _ = _base(tmp_path)
    release = _release(tmp_path, base)
    first = convert_release(release)
    assert convert_release(release) == first
    cfg = json.loads((release / "config.json").read_text())
    cfg["seerattn_threshold"] = 5e-4
    (release / "config.json").write_text(json.dumps(cfg))
    second = convert_release(release)
    assert second != first and json.loads((second / "gates.json").read_text())["sparsity"]["threshold"] == 5e-4


def assert_refused_before_loading(monkeypatch, match, **kwargs):
    def no_model(*args, **kw):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr(inference, "load_causal_lm", no_model)
    with pytest.raises(ConfigError, match=match) as info:
        load(device="cpu", **kwargs)
    assert "\n" not in str(info.value)


def test_release_for_another_base_is_refused(tmp_path, monkeypatch):
    base, _ = _base(tmp_path)
    other, _ = _base(tmp_path, name="other", num_hidden_layers=3)
    release = _release(tmp_path, base)
    assert_refused_before_loading(monkeypatch, "num_layers=2, but this model has num_layers=3", model=str(other),
                                  gates=str(release))


def test_pickle_that_is_not_a_tensor_dict_is_refused(tmp_path, monkeypatch):
    base, _ = _base(tmp_path)
    release = _release(tmp_path, base)
    torch.save({"model.layers.0.self_attn.attn_gate.mask_linear_k.weight": Path("x")},
               release / "attn_gate_weights.pth")
    assert_refused_before_loading(monkeypatch, r"attn_gate_weights.pth: not a plain tensor dict", gates=release)
    torch.save([torch.zeros(1)], release / "attn_gate_weights.pth")
    assert_refused_before_loading(monkeypatch, r"holds a list, not a dict of tensors", gates=release)


def test_missing_layer_weights_and_wrong_shapes_are_refused(tmp_path, monkeypatch):
    base, _ = _base(tmp_path)
    release = _release(tmp_path, base)
    state = torch.load(release / "attn_gate_weights.pth", weights_only=True)
    key = "model.layers.1.self_attn.attn_gate.mask_linear_k.weight"
    torch.save({k: v for k, v in state.items() if k != key}, release / "attn_gate_weights.pth")
    assert_refused_before_loading(monkeypatch, "gate weights of layer 1 are missing", gates=release)
    torch.save({**state, key: state[key][:, :-1]}, release / "attn_gate_weights.pth")
    assert_refused_before_loading(
        monkeypatch, r"has shape \[4, 47, 16\], but this release's config makes it \[4, 48, 16\]", gates=release)
    torch.save({**state, "model.layers.2.self_attn.attn_gate.mask_linear_k.weight": state[key]},
               release / "attn_gate_weights.pth")
    assert_refused_before_loading(
        monkeypatch, "'model.layers.2.self_attn.attn_gate.mask_linear_k.weight' is not a gate weight of this release",
        gates=release)


@pytest.mark.parametrize("gate_type", ["Qavg_Kavgmax", "Qlast_Kmax", "Qavg_Kmaxmax", "Kmax"])
def test_unknown_gate_type_is_refused(tmp_path, monkeypatch, gate_type):
    base, _ = _base(tmp_path)
    release = _release(tmp_path, base)
    cfg = json.loads((release / "config.json").read_text())
    (release / "config.json").write_text(json.dumps({**cfg, "seerattn_gate_type": gate_type}))
    assert_refused_before_loading(monkeypatch, f"seerattn_gate_type='{gate_type}': unknown", gates=release)


def test_other_unmappable_fields_are_refused(tmp_path, monkeypatch):
    base, _ = _base(tmp_path)
    release = _release(tmp_path, base)
    cfg = json.loads((release / "config.json").read_text())
    for change, match in [({"seerattn_sparsity_method": "token_budget"}, "seerattn_sparsity_method='token_budget'"),
                          ({"seerattn_gate_block_size": 48}, "seerattn_gate_block_size=48"),
                          ({"seerattn_gate_hidden_size": 32}, "release rotates 16 channels"),
                          ({"seerattn_threshold": 1.5}, "seerattn_threshold: sparsity.threshold=1.5")]:
        (release / "config.json").write_text(json.dumps({**cfg, **change}))
        assert_refused_before_loading(monkeypatch, match, gates=release)


def test_decode_gate_release_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "seer-r"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "qwen3", "base_model": "Qwen/Qwen3-8B", "seerattn_k_seq_pooling_type": "Kmaxminavg",
        "seerattn_q_head_pooling_type": "Qproj", "seerattn_token_budget": 4096, "seerattn_gate_block_size": 64}))
    assert_refused_before_loading(monkeypatch, "a decode-gate release .*prefill-only", gates=folder)


def _hub_cache(root: Path, repo: str, files: Path) -> None:
    """``files`` laid out as huggingface_hub's cache holds a downloaded repo: blobs, a snapshot of links, refs/main."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    entry = root / f"models--{repo.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(rev)
    snap = entry / "snapshots" / rev
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(p for p in files.iterdir() if p.is_file())):
        blob = entry / "blobs" / f"blob{i}"
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(f.read_bytes())
        os.symlink(os.path.relpath(blob, snap), snap / f.name)


def _offline_resolve(tmp_path, repo: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "PYTHONPATH": str(ROOT),
           "SEER_CACHE_DIR": str(tmp_path / "seer-cache")}
    code = f"from seer.model.gate_sources import resolve_gates; print(resolve_gates({repo!r}))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)


def test_release_from_the_hub_cache_offline(tmp_path):
    base, _ = _base(tmp_path)
    release = _release(tmp_path, base)
    _hub_cache(tmp_path / "hub", "authors/Llama-tiny-AttnGates", release)
    done = _offline_resolve(tmp_path, "authors/Llama-tiny-AttnGates")
    assert done.returncode == 0, done.stderr
    folder = Path(done.stdout.strip())
    assert json.loads((folder / "gates.json").read_text())["source"]["format"] == "seerattention-release"
    model = load(gates=folder, device="cpu")
    assert model.seer_context.sparsity.dense_last_rows == 2
    missing = _offline_resolve(tmp_path, "authors/not-cached")
    assert missing.returncode != 0
    assert "gates='authors/not-cached': no such folder here" in missing.stderr
    assert "HF_HUB_OFFLINE is set" in missing.stderr
