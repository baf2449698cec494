"""python -m seer.eval end to end on a tiny model in seconds: validation first, metrics.json, calibration stored."""

import json

import pytest

import seer.model.loading
from seer.checks import ConfigError
from seer.config import compose
from seer.eval import run_eval

BASE = ["model=tiny_llama", "block_size=16", "logger=none", "eval=cpu", "eval.seq_lens=[256]", "eval.copy_span=8",
        "eval.passkey=2", "eval.copy=2", "eval.split=all", "device=cpu", "eval.ruler=[]"]


@pytest.fixture
def text_files(tmp_path, corpus):
    for i, doc in enumerate(corpus.docs):
        (tmp_path / f"doc{i}.txt").write_text(doc)
    return f"data.corpus.paths={tmp_path}/*.txt"


def test_eval_runs_and_writes_metrics(tmp_path, monkeypatch, tokenizer, text_files):
    monkeypatch.setattr(seer.model.loading, "load_tokenizer", lambda _cfg: tokenizer)
    out = tmp_path / "run"
    cfg = compose(BASE + ["data=text_files", text_files, "selector=streaming", "sparsity=topk",
                          "sparsity.target_density=0.3", f"paths.output_dir={out}", f"paths.cache_dir={tmp_path}/c"],
                  "eval")
    rows = run_eval(cfg)
    stored = json.loads((out / "metrics.json").read_text())
    assert stored == json.loads(json.dumps(rows)) and len(rows) == 1
    row = rows[0]
    for key in ("selector", "sparsity", "target_density", "density", "ppl", "ppl_dense", "recall", "oracle_recall",
                "passkey", "passkey_dense", "copy", "copy_dense", "seq_len", "tokens"):
        assert row[key] is not None, key
    assert row["selector"] == "streaming" and row["seq_len"] == 256 and row["tokens"] == 2 * 255
    assert list((tmp_path / "c" / "eval").glob("dense-*.json"))  # dense measured once, cached


def test_gate_selector_calibrates_once_and_stores_it(tmp_path, monkeypatch, tokenizer, text_files):
    import torch

    from seer.gates.config import GateConfig
    from seer.model.gate_io import save_gates
    from seer.model.inference import load
    from seer.sparsity.calibration import load_calibrations

    monkeypatch.setattr(seer.model.loading, "load_tokenizer", lambda _cfg: tokenizer)
    arch = compose(["model=tiny_llama"]).model
    from omegaconf import OmegaConf

    torch.manual_seed(0)
    model = load(OmegaConf.to_container(arch), gate_config=GateConfig(block_size=16, hidden_size=16), device="cpu")
    save_gates(tmp_path / "g", model, "tiny")
    over = BASE + ["data=text_files", text_files, "selector=gate", f"gates={tmp_path / 'g'}", "sparsity=threshold",
                   "sparsity.target_density=0.4", "eval.passkey=0", "eval.copy=0", f"paths.cache_dir={tmp_path}/c"]
    first = run_eval(compose(over + [f"paths.output_dir={tmp_path}/r1"], "eval"))[0]
    (cal,) = load_calibrations(tmp_path / "g")
    assert abs(cal.density - 0.4) < 0.01 and cal.seq_len == 256
    second = run_eval(compose(over + [f"paths.output_dir={tmp_path}/r2"], "eval"))[0]
    assert second["knob"] == first["knob"] and second["ppl"] == pytest.approx(first["ppl"], rel=1e-6)
    # and seer.load finds it without calibrating
    loaded = load(OmegaConf.to_container(arch), gates=tmp_path / "g",
                  sparsity={"method": "threshold", "target_density": 0.4}, device="cpu")
    assert loaded.seer_context.calibration == cal


@pytest.mark.parametrize("override, message", [
    ("selector=gate", "gates=None: selector=gate needs a gate checkpoint"),
    ("selector.stride=3", None),
    ("+selector.width=3", "selector: selector 'streaming' has no parameter 'width'"),
    ("eval.split=train", "eval.split='train'"),
    ("eval.seq_lens=[32]", r"eval.seq_lens=\[32\]: must be window lengths"),
])
def test_bad_arguments_fail_before_loading(tmp_path, monkeypatch, override, message, text_files):
    def no_loading(*a, **k):
        raise AssertionError("loaded a model before checking the arguments")

    monkeypatch.setattr(seer.model.loading, "load_causal_lm", no_loading)
    selector = "selector=antidiagonal" if "stride" in override else "selector=streaming"
    over = [o for o in BASE if not o.startswith("eval.seq_lens")] + ["data=text_files", text_files, selector, override,
                                                                    f"paths.output_dir={tmp_path}"]
    with pytest.raises((ConfigError, ValueError), match=message or "stride"):
        run_eval(compose(over, "eval"))
