"""experiments/attention_temperature.py, an experiment wrapper: every attention layer's logits divided by a
temperature, checked against the same model with its query projections scaled instead (RoPE is linear in q)."""

import pytest
import torch

from seer.model import loading
from tests.tiny import tiny_model


@pytest.fixture
def temp(experiment, monkeypatch):
    monkeypatch.setattr(loading, "load_causal_lm", loading.load_causal_lm)  # restored after each test
    return experiment("attention_temperature")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_temperature_equals_scaled_queries(temp, family):
    t = 0.7
    ids = torch.randint(0, 300, (2, 40))
    plain, hot, scaled = (tiny_model(family, seed=3) for _ in range(3))
    assert temp.set_temperature(hot, t) == 2
    with torch.no_grad():
        for layer in scaled.model.layers:  # q / t: every logit q.k / t, the softmax at temperature t
            layer.self_attn.q_proj.weight /= t
            if layer.self_attn.q_proj.bias is not None:
                layer.self_attn.q_proj.bias /= t
        want, got, base = scaled(ids).logits, hot(ids).logits, plain(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - base).abs().max() > 1e-3


def test_temperature_reads_the_environment(temp, monkeypatch):
    monkeypatch.setenv("SEER_ATTN_TEMPERATURE", "0.85")
    assert temp.temperature() == 0.85
    for bad in ("0", "-1", "x", "inf"):
        monkeypatch.setenv("SEER_ATTN_TEMPERATURE", bad)
        with pytest.raises(ValueError, match=f"SEER_ATTN_TEMPERATURE must be a number > 0, got '{bad}'"):
            temp.temperature()


def test_logn_sharpens_each_row_by_its_length(temp):
    """One layer: the logits at position p depend on its own query alone, so the hooked model's equal those of the
    model with every query scaled by p's factor."""
    length, n = 8, 30
    ids = torch.randint(0, 300, (2, n))
    hooked = tiny_model("qwen2", seed=5, num_hidden_layers=1)
    assert temp.set_logn(hooked, length) == 1
    with torch.no_grad():
        got = hooked(ids).logits
        for p in (0, 6, 7, 8, 20, 29):
            factor = max(1.0, torch.tensor(p + 1.0).log().item() / torch.tensor(float(length)).log().item())
            scaled = tiny_model("qwen2", seed=5, num_hidden_layers=1)
            scaled.model.layers[0].self_attn.q_proj.weight *= factor
            scaled.model.layers[0].self_attn.q_proj.bias *= factor
            torch.testing.assert_close(got[:, p], scaled(ids).logits[:, p], rtol=1e-4, atol=1e-5)
            if p >= length:
                assert factor > 1 and (got[:, p] - tiny_model("qwen2", seed=5, num_hidden_layers=1)(ids).logits[:, p]
                                       ).abs().max() > 1e-4


def test_logn_reads_the_environment(temp, monkeypatch):
    monkeypatch.delenv("SEER_ATTN_LOGN", raising=False)
    assert temp.logn_length() is None
    monkeypatch.setenv("SEER_ATTN_LOGN", "4096")
    assert temp.logn_length() == 4096
    for bad in ("1", "x", "2.5"):
        monkeypatch.setenv("SEER_ATTN_LOGN", bad)
        with pytest.raises(ValueError, match=f"SEER_ATTN_LOGN must be an integer >= 2 .*got '{bad}'"):
            temp.logn_length()


def test_the_wrapper_changes_every_model_seer_loads(temp, monkeypatch):
    monkeypatch.setenv("SEER_ATTN_TEMPERATURE", "0.5")
    monkeypatch.setenv("SEER_ATTN_LOGN", "16")
    monkeypatch.setattr(loading, "load_causal_lm", lambda *a, **k: tiny_model("llama", seed=1))
    seen = {}
    monkeypatch.setattr(temp, "run_command", lambda argv: seen.update(argv=argv, model=loading.load_causal_lm(None)))
    monkeypatch.setattr("sys.argv", ["attention_temperature.py", "-m", "seer.eval", "x=1"])
    temp.main()
    plain = tiny_model("llama", seed=1)
    assert seen["argv"] == ["-m", "seer.eval", "x=1"]
    for got, base in zip(seen["model"].model.layers, plain.model.layers):
        assert got.self_attn.scaling == pytest.approx(2 * base.self_attn.scaling)
        assert len(got.self_attn.q_proj._forward_hooks) == 1 and not base.self_attn.q_proj._forward_hooks
