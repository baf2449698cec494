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


def test_selector_gate_blend_is_calibrated_under_its_own_scorer_name(tmp_path, monkeypatch, tokenizer, text_files):
    """``selector.blend`` switches the gates' blend for the run: a second calibration is stored beside the first
    under the blended scorer's name, the rows are labelled with it, and the blended scores differ."""
    import torch
    from omegaconf import OmegaConf

    from seer.checks import ConfigError
    from seer.gates.config import GateConfig
    from seer.model.gate_io import save_gates
    from seer.model.inference import load
    from seer.sparsity.calibration import load_calibrations

    monkeypatch.setattr(seer.model.loading, "load_tokenizer", lambda _cfg: tokenizer)
    torch.manual_seed(0)
    model = load(OmegaConf.to_container(compose(["model=tiny_llama"]).model),
                 gate_config=GateConfig(block_size=16, hidden_size=16), device="cpu")
    save_gates(tmp_path / "g", model, "tiny")
    over = BASE + ["data=text_files", text_files, "selector=gate", f"gates={tmp_path / 'g'}", "sparsity=threshold",
                   "sparsity.target_density=0.4", "eval.passkey=0", "eval.copy=0", f"paths.cache_dir={tmp_path}/c",
                   "sparsity.dense_last_rows=0"]  # 4 blocks: a dense last row leaves the two too little to differ in
    alone = run_eval(compose(over + [f"paths.output_dir={tmp_path}/r1"], "eval"))[0]
    blended = run_eval(compose(over + ["selector.blend=vertical_slash", "selector.blend_weight=0.3",
                                       f"paths.output_dir={tmp_path}/r2"], "eval"))[0]
    assert (alone["selector"], blended["selector"]) == ("gate", "gate+vertical_slash@0.3")
    assert sorted(c.selector for c in load_calibrations(tmp_path / "g")) == ["gate", "gate+vertical_slash@0.3"]
    assert blended["ppl"] != alone["ppl"]
    with pytest.raises(ConfigError, match="gate.blend_weight=2"):
        run_eval(compose(over + ["selector.blend_weight=2", f"paths.output_dir={tmp_path}/r3"], "eval"))
    with pytest.raises(ConfigError, match="selector=gate takes only blend, blend_weight, rerank_rows"):
        run_eval(compose(over + ["+selector.temperature=2", f"paths.output_dir={tmp_path}/r4"], "eval"))
    reranked = run_eval(compose(over + ["selector.blend=vertical_slash", "selector.blend_weight=0.3",
                                        "selector.rerank_rows=4", f"paths.output_dir={tmp_path}/r5"], "eval"))[0]
    assert reranked["selector"] == "gate+vertical_slash@0.3+rerank4@0.99" and reranked["ppl"] != blended["ppl"]
    with pytest.raises(ConfigError, match="gate.rerank_top_p=0"):
        run_eval(compose(over + ["selector.rerank_top_p=0", f"paths.output_dir={tmp_path}/r6"], "eval"))


def test_an_authors_release_is_evaluated_and_its_calibration_kept(tmp_path, monkeypatch, tokenizer, text_files):
    from seer.model.inference import load
    from tests.model.test_release import _base, _release

    monkeypatch.setenv("SEER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(seer.model.loading, "load_tokenizer", lambda _cfg: tokenizer)
    base, _ = _base(tmp_path, max_position_embeddings=4096)
    release = _release(tmp_path, base)
    row = run_eval(compose(BASE + ["data=text_files", text_files, "selector=gate", f"gates={release}",
                                   "sparsity=threshold", "sparsity.target_density=0.4", "eval.passkey=0", "eval.copy=0",
                                   f"paths.cache_dir={tmp_path}/c", f"paths.output_dir={tmp_path}/r"], "eval"))[0]
    assert abs(row["density"] - 0.4) < 0.1 and row["gates"].startswith(str(tmp_path / "cache" / "releases"))
    loaded = load(gates=release, sparsity={"method": "threshold", "target_density": 0.4}, device="cpu")
    assert loaded.seer_context.calibration.seq_len == 256  # stored beside the converted gates by seer.eval


@pytest.mark.parametrize("override, message", [
    ("selector=gate", "gates=None: selector=gate needs a gate checkpoint"),
    ("selector.stride=3", None),
    ("+selector.width=3", "selector: selector 'streaming' has no parameter 'width'"),
    ("eval.split=train", "eval.split='train'"),
    ("eval.seq_lens=[32]", r"eval.seq_lens=\[32\]: must be window lengths"),
    ("block_size=48", r"block_size 48 is not supported; supported: .*\(the top-level block_size"),
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


def _stored_model(folder, tokenizer) -> list[str]:
    """The tiny Llama and its tokenizer stored as a Hugging Face folder (what a subprocess can load); the overrides
    that evaluate it."""
    from tests.tiny import tiny_model

    tiny_model("llama", seed=0, max_position_embeddings=4096).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return ["model=tiny_llama", f"model.name_or_path={folder}", "model.random_init=false"]


def test_eval_sweep_reports_and_logs_like_training(tmp_path, tokenizer, text_files):
    import subprocess
    import sys

    from tests.training.conftest import cli_env
    from tests.training.wandb_offline import offline_run, offline_runs

    args = [*_stored_model(tmp_path / "m", tokenizer), *BASE[1:], "data=text_files", text_files, "selector=streaming",
            "sparsity=topk", "sparsity.target_density=0.3,1.5", "logger=wandb", "eval.passkey=0", "eval.copy=0"]
    proc = subprocess.run([sys.executable, "-m", "seer.eval", "-m", *args], cwd=tmp_path, env=cli_env(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "FAILED job 1 (" in proc.stderr and "ConfigError: sparsity.target_density=1.5" in proc.stderr
    (sweep,) = (tmp_path / "multirun" / "eval").iterdir()
    rows = json.loads((sweep / "sweep.json").read_text())
    assert [r["status"] for r in rows] == ["completed", "failed"] and rows[0]["ppl"] > 0
    summary = json.loads((sweep / "0" / "summary.json").read_text())
    assert f"metrics.json: {sweep / '0' / 'metrics.json'}" in proc.stdout
    assert summary["metrics"] == str((sweep / "0" / "metrics.json").resolve())
    assert summary["wandb_name"] == f"eval-streaming-target_density=0.3-{summary['wandb_id']}"
    assert summary["wandb_group"] == "/".join(sweep.parts[-2:]) and "W&B summary run" in proc.stderr
    (job_run,) = offline_runs(sweep / "0")
    logged = offline_run(job_run)
    assert logged["group"] == summary["wandb_group"] and logged["config"]["sparsity.target_density"] == 0.3
    assert logged["config"]["run.id"] == summary["wandb_id"] and "gates" in logged["config"]
    (summary_run,) = (sweep / "wandb").glob("offline-run-*")
    summary_run = offline_run(summary_run)
    assert summary_run["group"] == summary["wandb_group"]
    assert any(k.startswith("sweep/ppl_vs_density") for row in summary_run["history"] for k in row)


def test_bad_eval_input_is_one_line_and_leaves_no_folder(tmp_path, tokenizer, text_files):
    import subprocess
    import sys

    from tests.training.conftest import cli_env

    args = [*_stored_model(tmp_path / "m", tokenizer), *BASE[1:], "data=text_files", text_files, "selector=streaming",
            "sparsity=topk", "eval.seq_lens=[8192]"]
    proc = subprocess.run([sys.executable, "-m", "seer.eval", *args], cwd=tmp_path, env=cli_env(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert ("ConfigError: eval.seq_lens=[8192]: longer than the model's context of 4096 tokens; use at most 4096 (or "
            "extend the context with model/rope_scaling=yarn)") in proc.stderr.splitlines()
    assert not list((tmp_path / "outputs").glob("eval/*")), [str(p) for p in (tmp_path / "outputs").rglob("*")]


def test_eval_refuses_gates_and_lengths_before_loading(tmp_path, monkeypatch, tokenizer, text_files):
    from omegaconf import OmegaConf

    import seer.preflight
    from seer.gates.config import GateConfig
    from seer.model.gate_io import save_gates
    from seer.model.inference import load

    def no_loading(*a, **k):
        raise AssertionError("loaded a model before checking the arguments")

    monkeypatch.setattr(seer.model.loading, "load_tokenizer", lambda _cfg: tokenizer)
    arch = OmegaConf.to_container(compose(["model=tiny_llama", "model.architecture.num_hidden_layers=3"]).model)
    save_gates(tmp_path / "g3", load(arch, gate_config=GateConfig(block_size=16, hidden_size=16), device="cpu"),
               "tiny3")
    arch["architecture"]["num_hidden_layers"] = 2
    save_gates(tmp_path / "g", load(arch, gate_config=GateConfig(block_size=16, hidden_size=16), device="cpu"), "tiny")
    monkeypatch.setattr(seer.model.loading, "load_causal_lm", no_loading)
    base = BASE + ["data=text_files", text_files, f"paths.output_dir={tmp_path}/r"]

    def refused(*overrides):
        with pytest.raises(ConfigError) as info:
            run_eval(compose(base + list(overrides), "eval"))
        return str(info.value)

    assert refused("selector=gate", f"gates={tmp_path / 'g3'}") == (
        f"gate file {tmp_path / 'g3'} was made for tiny3 with num_layers=3, but this model has num_layers=2")
    assert refused("selector=streaming", "eval.seq_lens=[4096]", "eval.windows=50").startswith(
        "eval.seq_lens=[4096] with eval.windows=50 and eval.calibration_windows=1: the held-out text (all split")
    assert refused("selector=streaming", f"data.corpus.paths={tmp_path}/none/*.txt").startswith(
        f"data.corpus.paths: no files match the pattern '{tmp_path}/none/*.txt'")
    assert refused("selector=streaming", "sparsity.dense_layers=[2]") == (
        "sparsity.dense_layers=[2]: [2] not among the model's layers 0..1")
    monkeypatch.setattr(seer.preflight.os, "access", lambda path, mode: False)  # root writes anywhere: say it cannot
    assert refused("selector=gate", f"gates={tmp_path / 'g'}", "sparsity=threshold") == (
        f"gates='{tmp_path / 'g'}': the folder is not writable, and the calibration made here is stored there for "
        f"seer.load; make it writable or set save_calibration=false")
