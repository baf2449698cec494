"""The generation entry point composes and runs end to end on a tiny model (tokenizer built in code)."""

import torch
from omegaconf import OmegaConf

import seer.model.loading
from seer.config import compose
from seer.gates.config import GateConfig
from seer.generate import run_generation
from seer.model.gate_io import save_gates
from seer.model.inference import load
from tests.tiny import tiny_tokenizer


def test_generate_runs_sparse_prefill_and_reports(tmp_path, monkeypatch, capsys):
    cfg = compose(["model=tiny_llama", f"gates={tmp_path / 'g'}", "sparsity.target_density=0.5", "max_new_tokens=5",
                   "device=cpu"], "generate")
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
