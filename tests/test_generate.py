"""The generation entry point composes and runs end to end on a tiny model (tokenizer built in code)."""

import pytest
import torch
from omegaconf import OmegaConf

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
