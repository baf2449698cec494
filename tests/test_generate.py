"""The generation entry point composes and runs end to end on a tiny model (tokenizer built in code)."""

import pytest
import torch
from omegaconf import OmegaConf

import seer.model.inference
import seer.model.loading
from seer.checks import ConfigError
from seer.config import compose
from seer.gates.config import GateConfig
from seer.generate import run_generation
from seer.model.gate_io import save_gates
from seer.model.inference import load
from tests.tiny import tiny_tokenizer


def test_generate_runs_sparse_prefill_and_reports(tmp_path, monkeypatch, capsys):
    cfg = compose(["model=tiny_llama", f"gates={tmp_path / 'g'}", "sparsity=topk", "sparsity.target_density=0.5",
                   "max_new_tokens=5", "device=cpu"], "generate")
    torch.manual_seed(0)
    gated = load(OmegaConf.to_container(cfg.model), gate_config=GateConfig(block_size=16, hidden_size=16), device="cpu")
    save_gates(tmp_path / "g", gated, "tiny")
    monkeypatch.setattr(seer.model.loading, "load_tokenizer", lambda _cfg: tiny_tokenizer())
    cfg.prompt = "def f(x):\n    return x + 1\n" * 8
    result = run_generation(cfg)
    assert result["prompt_tokens"] > 16
    assert set(result["densities"]) == {0, 1} and all(0 < d <= 1 for d in result["densities"].values())
    assert result["sparse_prefill_s"] > 0 and result["dense_prefill_s"] > 0
    assert isinstance(result["text"], str)
    assert "mean block density" in capsys.readouterr().out


def test_a_prompt_longer_than_the_context_is_refused_before_loading(tmp_path, monkeypatch):
    import seer.model.inference

    cfg = compose(["model=tiny_llama", f"gates={tmp_path / 'g'}", "max_new_tokens=64", "device=cpu"], "generate")
    monkeypatch.setattr(seer.model.loading, "load_tokenizer", lambda _cfg: tiny_tokenizer())
    monkeypatch.setattr(seer.model.inference, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    cfg.prompt = "def f(x):\n    return x + 1\n" * 600
    with pytest.raises(ConfigError, match=r"the prompt is \d+ tokens and max_new_tokens=64, but random-llama has a "
                                          r"context of 4096 tokens"):
        run_generation(cfg)


def _calibrated_gates(folder, shape_overrides=()):
    """Tiny gates stored with the budget ``threshold target_density=0.4`` and its calibration, as training leaves
    them; returns the generate config's overrides."""
    from seer.sparsity.calibration import calibrate, save_calibration
    from seer.sparsity.config import SparsityConfig

    cfg = compose(["model=tiny_llama", *shape_overrides], "generate")
    torch.manual_seed(0)
    gated = load(OmegaConf.to_container(cfg.model), gate_config=GateConfig(block_size=16, hidden_size=16), device="cpu")
    budget = SparsityConfig(method="threshold", target_density=0.4)
    save_gates(folder, gated, "tiny", extra={"sparsity": vars(budget)})
    scores = {i: torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in (0, 1)}
    save_calibration(folder, calibrate(scores, budget, selector="gate", seq_len=128))
    return ["model=tiny_llama", f"gates={folder}", "max_new_tokens=3", "device=cpu"]


def test_generate_uses_the_gates_own_calibrated_budget_and_compares_dense(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(seer.model.loading, "load_tokenizer", lambda _cfg: tiny_tokenizer())
    cfg = compose(_calibrated_gates(tmp_path / "g"), "generate")
    cfg.prompt = "def f(x):\n    return x + 1\n" * 8
    result = run_generation(cfg)  # compare_dense is on by default
    assert result["dense_prefill_s"] > 0 and len(result["text"]) > 0
    assert "(threshold target_density=0.4 (global) [dense_last_rows=1])" in capsys.readouterr().out


def test_generate_refuses_before_loading(tmp_path, monkeypatch):
    import seer.model.inference

    monkeypatch.setattr(seer.model.loading, "load_tokenizer", lambda _cfg: tiny_tokenizer())
    over = _calibrated_gates(tmp_path / "g")
    _calibrated_gates(tmp_path / "g3", ["model.architecture.num_hidden_layers=3"])
    monkeypatch.setattr(seer.model.inference, "load_causal_lm", lambda *a, **k: pytest.fail("the model was loaded"))

    def refused(*overrides, prompt="def f(x):"):
        cfg = compose(over + list(overrides), "generate")
        cfg.prompt = prompt
        with pytest.raises(ConfigError) as info:
            run_generation(cfg)
        return str(info.value)

    assert refused(prompt="") == "prompt='': the prompt is empty; give the text to continue"
    assert refused("sparsity.target_density=0.2").startswith(
        "sparsity: no calibration for sparsity threshold target_density=0.2 (global) [dense_last_rows=1] with the gate "
        "scorer in")
    assert refused(f"gates={tmp_path / 'g3'}") == (
        f"gate file {tmp_path / 'g3'} was made for tiny with num_layers=3, but this model has num_layers=2")
    assert refused("sparsity.dense_layers=[5]") == "sparsity.dense_layers=[5]: [5] not among the model's layers 0..1"
    assert refused("gates=/no/gates") == "gates='/no/gates': no gate checkpoint there (a gates folder written by " \
                                         "seer.train, outputs/<run>/gates)"
    (tmp_path / "g" / "calibration.json").write_text("not json")
    assert refused().startswith(f"{tmp_path / 'g' / 'calibration.json'} is not a seer calibration file")


def test_generate_takes_an_authors_release_with_its_budget(tmp_path, monkeypatch, capsys):
    from tests.model.test_release import _base, _release

    monkeypatch.setenv("SEER_CACHE_DIR", str(tmp_path / "cache"))
    release = _release(tmp_path, _base(tmp_path)[0])
    cfg = compose(["model=tiny_llama", f"gates={release}", "max_new_tokens=3", "device=cpu"], "generate")
    monkeypatch.setattr(seer.model.loading, "load_tokenizer", lambda _cfg: tiny_tokenizer())
    cfg.prompt = "def f(x):\n    return x + 1\n" * 8
    result = run_generation(cfg)
    assert set(result["densities"]) == {0, 1}
    assert "(threshold threshold=0.002 [dense_last_rows=2])" in capsys.readouterr().out


def _recorded_loads(monkeypatch) -> list:
    """The tiny tokenizer for every model, and the list that each model seer.generate loads is appended to."""
    import seer.model.inference

    monkeypatch.setattr(seer.model.loading, "load_tokenizer", lambda _cfg: tiny_tokenizer())
    real_load, loaded = seer.model.inference.load, []
    monkeypatch.setattr(seer.model.inference, "load", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
    return loaded


def test_generate_takes_the_blend_asked_for_and_its_calibration(tmp_path, monkeypatch, capsys):
    """``blend=`` changes the gates' blend at inference: its calibration (keyed by the scorer) is looked up before
    loading, and the model runs with it; a bad blend is refused before loading."""
    overrides = _calibrated_gates(tmp_path / "g")  # the gates alone (blend null), calibrated for the "gate" scorer
    loaded = _recorded_loads(monkeypatch)
    with pytest.raises(ConfigError, match=r"with the gate\+vertical_slash@0.5 scorer"):
        run_generation(compose([*overrides, "blend=vertical_slash"], "generate"))
    with pytest.raises(ConfigError, match="gate.blend='oracle'"):
        run_generation(compose([*overrides, "blend=oracle"], "generate"))
    assert not loaded  # both refused before any model loaded
    run_generation(compose([*overrides, "blend=none"], "generate"))
    assert loaded[-1].seer_context.gate_config.blend is None and loaded[-1].seer_context.scorer_name == "gate"
    assert "mean block density" in capsys.readouterr().out


def test_generate_takes_the_rerank_rows_asked_for(tmp_path, monkeypatch):
    """``rerank_rows=`` replaces the gates' rerank rows: a calibrated budget then needs that selection's calibration
    (refused before loading), a top-k budget runs with it; a bad value or no prefill gates are refused."""
    overrides = _calibrated_gates(tmp_path / "g")
    loaded = _recorded_loads(monkeypatch)
    with pytest.raises(ConfigError, match=r"with the gate\+rerank4@0.99 scorer"):
        run_generation(compose([*overrides, "rerank_rows=4"], "generate"))
    with pytest.raises(ConfigError, match="gate.rerank_rows=-1"):
        run_generation(compose([*overrides, "rerank_rows=-1"], "generate"))
    with pytest.raises(ConfigError, match="rerank_rows=0: the rerank ranks prefill gates' blocks; give gates=PATH"):
        run_generation(compose(["model=tiny_llama", "decode_sparsity.estimate=quest",
                                "decode_sparsity.estimate_weight=1", "rerank_rows=0"], "generate"))
    assert not loaded  # all refused before any model loaded
    cfg = compose([*overrides, "rerank_rows=4", "sparsity=topk", "sparsity.target_density=0.5"], "generate")
    cfg.prompt = "def f(x):\n    return x + 1\n" * 8
    result = run_generation(cfg)
    assert loaded[-1].seer_context.gate_config.rerank_rows == 4
    assert loaded[-1].seer_context.scorer_name == "gate+rerank4@0.99" and result["densities"]


def _gate_and_decode_gate_folder(folder, shape_overrides=()):
    """Prefill gates and decode gates (stored budget: 32 tokens) of the tiny model in one folder."""
    from seer.gates.decode_config import DecodeGateConfig
    from seer.model.decode import attach_decode_gates, decode_gates
    from seer.model.decode_gate_io import save_decode_gates

    cfg = compose(["model=tiny_llama", *shape_overrides], "generate")
    torch.manual_seed(0)
    gated = load(OmegaConf.to_container(cfg.model), gate_config=GateConfig(block_size=16, hidden_size=16), device="cpu")
    save_gates(folder, gated, "tiny")
    attach_decode_gates(gated, DecodeGateConfig(block_size=16, hidden_size=16))
    for gate in decode_gates(gated).values():
        torch.nn.init.normal_(gate.k_weight, std=2.0)
    save_decode_gates(folder, gated, "tiny", extra={"decode_sparsity": {"token_budget": 32}})
    return folder


def test_generate_decodes_through_the_decode_gates(tmp_path, monkeypatch, capsys):
    """Both phases sparse; then decode gates alone at a budget covering every block, which gives the plain model's
    text."""
    from seer.model.loading import load_causal_lm

    folder = _gate_and_decode_gate_folder(tmp_path / "g")
    monkeypatch.setattr(seer.model.loading, "load_tokenizer", lambda _cfg: tiny_tokenizer())
    prompt = "def f(x):\n    return x + 1\n" * 8
    cfg = compose(["model=tiny_llama", f"gates={folder}", f"decode_gates={folder}", "sparsity=topk",
                   "sparsity.target_density=0.5", "max_new_tokens=6", "device=cpu"], "generate")
    cfg.prompt = prompt
    both = run_generation(cfg)
    assert set(both["densities"]) == set(both["decode_densities"]) == {0, 1}
    assert all(0 < d < 1 for d in both["decode_densities"].values())
    assert "(token_budget=32)" in capsys.readouterr().out
    cfg = compose(["model=tiny_llama", f"decode_gates={folder}", "decode_sparsity.token_budget=4096",
                   "max_new_tokens=6", "device=cpu", "compare_dense=false"], "generate")
    cfg.prompt = prompt
    torch.manual_seed(0)
    decode_only = run_generation(cfg)
    assert "densities" not in decode_only and decode_only["decode_densities"] == {0: 1.0, 1: 1.0}
    torch.manual_seed(0)
    plain = load_causal_lm(_model_config(cfg), torch.device("cpu"))
    ids = tiny_tokenizer()(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = plain.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=2)
    assert decode_only["text"] == tiny_tokenizer().decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_generate_decodes_by_quest_alone_without_decode_gates(tmp_path, monkeypatch, capsys):
    """decode_sparsity.estimate=quest with weight 1 and no decode gates: training-free sparse decode in the prefill
    gates' blocks, the same text as the decode gates' path at weight 1 (which ignores the gates)."""
    folder = _gate_and_decode_gate_folder(tmp_path / "g")
    monkeypatch.setattr(seer.model.loading, "load_tokenizer", lambda _cfg: tiny_tokenizer())
    quest = ["decode_sparsity.estimate=quest", "decode_sparsity.estimate_weight=1", "decode_sparsity.token_budget=32"]
    runs = {}
    for name, decode in (("alone", []), ("gated", [f"decode_gates={folder}"])):
        cfg = compose(["model=tiny_llama", f"gates={folder}", *decode, *quest, "max_new_tokens=6", "device=cpu",
                       "compare_dense=false"], "generate")
        cfg.prompt = "def f(x):\n    return x + 1\n" * 8
        torch.manual_seed(0)
        runs[name] = run_generation(cfg)
    assert runs["alone"]["text"] == runs["gated"]["text"]
    assert runs["alone"]["decode_densities"] == runs["gated"]["decode_densities"]
    assert all(0 < d < 1 for d in runs["alone"]["decode_densities"].values())
    assert "(token_budget=32, quest@1)" in capsys.readouterr().out


def test_graph_decoding_gives_generates_text_and_densities(tmp_path, monkeypatch, capsys):
    """graph=true (one captured step replayed; eager steps on the CPU) with both phases sparse: generate()'s text and
    decode densities, and a report naming the loop; graph=auto takes generate() on the CPU."""
    folder = _gate_and_decode_gate_folder(tmp_path / "g")
    monkeypatch.setattr(seer.model.loading, "load_tokenizer", lambda _cfg: tiny_tokenizer())
    runs = {}
    reports = {}
    for graph in ("false", "true", "auto"):
        cfg = compose(["model=tiny_llama", f"gates={folder}", f"decode_gates={folder}", "sparsity=topk",
                       "sparsity.target_density=0.5", "max_new_tokens=8", "device=cpu", "compare_dense=false",
                       f"graph={graph}"], "generate")
        cfg.prompt = "def f(x):\n    return x + 1\n" * 8
        torch.manual_seed(0)
        runs[graph] = run_generation(cfg)
        reports[graph] = capsys.readouterr().out
    assert runs["true"]["text"] == runs["false"]["text"] == runs["auto"]["text"] and runs["true"]["text"]
    assert runs["true"]["decode_densities"] == pytest.approx(runs["false"]["decode_densities"], rel=1e-6)
    assert all(0 < d < 1 for d in runs["true"]["decode_densities"].values())
    assert runs["true"]["generate_s"] > 0 and "one captured decode step replayed" in reports["true"]
    assert "included (generate())" in reports["auto"]  # auto: generate() on a CPU, the replayed step on a GPU


def _model_config(cfg):
    from seer.checks import build
    from seer.model.config import ModelConfig

    return build(ModelConfig, "model", OmegaConf.to_container(cfg.model, resolve=True))


def test_generate_refuses_bad_decode_settings_before_loading(tmp_path, monkeypatch):
    import seer.model.inference

    folder = _gate_and_decode_gate_folder(tmp_path / "g")
    other = _gate_and_decode_gate_folder(tmp_path / "g3", ["model.architecture.num_hidden_layers=3"])
    monkeypatch.setattr(seer.model.loading, "load_tokenizer", lambda _cfg: tiny_tokenizer())
    monkeypatch.setattr(seer.model.inference, "load_causal_lm", lambda *a, **k: pytest.fail("the model was loaded"))

    def refused(*overrides):
        cfg = compose(["model=tiny_llama", f"decode_gates={folder}", "device=cpu", *overrides], "generate")
        with pytest.raises(ConfigError) as info:
            run_generation(cfg)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert refused(f"decode_gates={other}") == (
        f"gate file {other / 'decode_gates.safetensors'} was made for tiny with num_layers=3, but this model has "
        f"num_layers=2")
    assert refused("graph=maybe") == ("graph='maybe': give auto (a captured decode step on a GPU, generate() on a "
                                      "CPU), true or false")
    assert refused("decode_sparsity.token_budget=8") == (
        "decode_sparsity.token_budget=8: is below one block (16 tokens); the budget is whole blocks")
    assert refused("decode_sparsity.method=threshold", "decode_sparsity.target_density=0.2").startswith(
        "decode_sparsity.target_density=0.2: no decode calibration for threshold target_density=0.2 in")
    assert refused("decode_sparsity.target_density=0.2") == (
        "decode_sparsity.target_density=0.2: calibrates the threshold method; method='token_budget' takes none "
        "(use null)")
    assert refused("decode_gates=/no/decode") == ("decode_gates='/no/decode': no decode gates there (a gates folder "
                                                  "written by stage=distill_decode, outputs/<run>/gates)")
    assert refused("decode_gates=null") == (
        "gates=null and decode_gates=null: give gates=PATH (sparse prefill), decode_gates=PATH (sparse decode), both, "
        "or a training-free decode budget (decode_sparsity.estimate=quest decode_sparsity.estimate_weight=1)")
    assert refused("sparsity.target_density=0.2") == (
        "sparsity.target_density=0.2: a prefill budget needs prefill gates (gates=PATH)")
    assert refused(f"gates={folder}", "decode_gates=null", "decode_sparsity.token_budget=2048").startswith(
        "decode_sparsity.estimate=None: sparse decode without decode gates scores the blocks by a training-free "
        "estimate: give estimate=quest and estimate_weight=1")
    assert refused(f"gates={folder}", "decode_gates=null", "decode_sparsity.estimate=quest",
                   "decode_sparsity.estimate_weight=0.5").startswith(
        "decode_sparsity.estimate_weight=0.5: without decode gates the estimate scores alone")


def test_generate_with_a_shared_gate_scores_the_prefill_with_the_decode_gates(tmp_path, monkeypatch, capsys):
    """shared_gate=true: the decode gates select the prefill's blocks too (top-k by default, sparsity.* changing it,
    a blend asked for), both phases sparse; a shared gate beside prefill gates or with a calibrated prefill budget is
    refused before loading."""
    folder = _gate_and_decode_gate_folder(tmp_path / "g")
    monkeypatch.setattr(seer.model.loading, "load_tokenizer", lambda _cfg: tiny_tokenizer())
    cfg = compose(["model=tiny_llama", f"decode_gates={folder}", "shared_gate=true", "sparsity.target_density=0.5",
                   "blend=vertical_slash", "max_new_tokens=6", "device=cpu"], "generate")
    cfg.prompt = "def f(x):\n    return x + 1\n" * 8
    result = run_generation(cfg)
    assert set(result["densities"]) == set(result["decode_densities"]) == {0, 1}
    assert all(0 < d < 1 for d in [*result["densities"].values(), *result["decode_densities"].values()])
    assert "(topk target_density=0.5" in capsys.readouterr().out
    monkeypatch.setattr(seer.model.inference, "load_causal_lm", lambda *a, **k: pytest.fail("the model was loaded"))

    def refused(*overrides):
        cfg = compose(["model=tiny_llama", "shared_gate=true", "device=cpu", *overrides], "generate")
        with pytest.raises(ConfigError) as info:
            run_generation(cfg)
        return str(info.value)

    assert refused(f"gates={folder}").startswith("shared_gate=true: the decode gates score the prefill too; give "
                                                  "decode_gates=PATH and gates=null")
    assert refused(f"decode_gates={folder}", "sparsity.method=threshold", "sparsity.target_density=0.1") == (
        "sparsity.method='threshold': shared_gate=true has no prefill calibration; give sparsity.method=topk")
