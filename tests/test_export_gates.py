"""seer.export: a gates folder as a Hub-ready folder (files, config, model card), loaded back from the folder and
from a Hub-cache layout offline; the push, the CLI and the refusals."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

import seer
from seer.checks import ConfigError
from seer.export_gates import main
from seer.model import gates
from seer.model.gate_io import save_gates
from seer.model.inference import load
from seer.model.release import convert_release
from seer.sparsity.calibration import Calibration, save_calibration
from seer.sparsity.config import SparsityConfig
from tests.model.test_inference import GATE, TINY
from tests.model.test_release import ROOT, _base, _hub_cache, _release

BUDGET = SparsityConfig(method="threshold", target_density=0.5)


@pytest.fixture
def run(tmp_path):
    """A training run's folder as seer.train leaves it: gates with a calibration, summary.json and .hydra/."""
    torch.manual_seed(0)
    model = load(TINY, gate_config=GATE, device="cpu")
    for g in gates(model).values():
        torch.nn.init.normal_(g.k_weight)
    folder = tmp_path / "run"
    save_gates(folder / "gates", model, "tiny-llama", extra={"global_step": 30, "sparsity": vars(BUDGET)})
    save_calibration(folder / "gates", Calibration(BUDGET, {0: [0.02] * 4, 1: [0.03] * 4}, 0.5,
                                                   selector="gate", rows=2, seq_len=128))
    (folder / "summary.json").write_text(json.dumps({"steps": 30, "loss_end": 1.5, "sparsity_policy": "threshold",
                                                     "val_density": 0.31, "val_recall": 0.76,
                                                     "val_oracle_recall": 0.86}))
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump({
        "data": {"seq_len": 1024, "train_sequences": 64, "corpus": {"_target_": "seer.data.StdlibCorpus"}},
        "stage": {"name": "distill"}}))
    (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
        {"hydra": {"runtime": {"choices": {"model": "smollm2", "gate": "avgmax", "data": "stdlib"}}}}))
    (folder / "metrics.json").write_text(json.dumps([{
        "selector": "gate", "sparsity": "threshold", "target_density": 0.1, "density": 0.102, "seq_len": 2048,
        "ppl": 11.5, "ppl_dense": 10.9, "recall": 0.9, "oracle_recall": 0.95, "ruler": 81.0, "ruler_dense": 90.5}]))
    return folder


def test_exported_folder_holds_files_config_and_card_and_loads_back(run, tmp_path):
    out = seer.export(run / "gates", tmp_path / "hub", repo_id="me/tiny-gates", license="apache-2.0",
                      metrics=[run / "metrics.json"])
    for name in ("gates.safetensors", "gates.json", "calibration.json"):
        assert (out / name).read_bytes() == (run / "gates" / name).read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["base_model"] == "tiny-llama" and config["gate"]["hidden_size"] == 16
    assert config["sparsity"]["target_density"] == 0.5 and config["training"]["steps"] == 30
    assert config["calibrations"][0]["seq_len"] == 128 and config["results"][0]["ruler"] == 81.0
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: seer\nlicense: apache-2.0\n")
    for text in ("# MODEL: the base model tiny-llama", "model = seer.load(MODEL, gates='me/tiny-gates')",
                 "steps: 30", "seer.data.StdlibCorpus, 1024-token",
                 "recall of attention mass 0.760 (oracle at that density 0.860)",
                 "| 2048 | gate | threshold 0.1 | 0.102 | 0.900 (0.950) | 11.500 (10.900) | 81.0 (90.5) |",
                 "reached density 0.500 on 2 rows of 128 tokens"):
        assert text in card, text
    model = load(TINY, gates=out, device="cpu")  # the stored calibrated budget finds its calibration
    assert model.seer_context.calibration.knobs[1] == [0.03] * 4


def test_exported_folder_loads_from_the_hub_cache_offline(run, tmp_path):
    out = seer.export(run / "gates", tmp_path / "hub-folder")
    _hub_cache(tmp_path / "hub", "me/tiny-gates", out)
    code = ("import seer; from tests.model.test_inference import TINY; "
            "m = seer.load(TINY, gates='me/tiny-gates', device='cpu'); print(m.seer_context.sparsity.describe())")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "PYTHONPATH": str(ROOT),
           "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("threshold target_density=0.5 (global) [dense_last_rows=1]")


def test_a_converted_release_exports_with_its_source(tmp_path, monkeypatch):
    monkeypatch.setenv("SEER_CACHE_DIR", str(tmp_path / "cache"))
    base, _ = _base(tmp_path)
    out = seer.export(convert_release(_release(tmp_path, base)), tmp_path / "out")
    card = (out / "README.md").read_text()
    assert "converted from a seerattention-release (attn_gate_weights.pth" in card
    assert "Not recorded with these gates" in card and "threshold threshold=0.002 [dense_last_rows=2]" in card


def test_push_to_hub_uploads_the_folder(run, tmp_path, monkeypatch):
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, exist_ok):
            calls.append(("create", repo_id, exist_ok))

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload", sorted(p.name for p in (tmp_path / "out").iterdir()), repo_id))

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    seer.export(run / "gates", tmp_path / "out", push_to_hub=True, repo_id="me/g")
    assert calls == [("create", "me/g", True), ("upload", ["README.md", "calibration.json", "config.json",
                                                           "gates.json", "gates.safetensors"], "me/g")]


def test_bad_exports_are_refused_in_one_line(run, tmp_path):
    cases = [(dict(push_to_hub=True), "push_to_hub=True: needs repo_id"),
             (dict(repo_id="not a repo"), "repo_id='not a repo': a Hub repository id has the form user/name")]
    for kwargs, match in cases:
        with pytest.raises(ConfigError, match=match):
            seer.export(run / "gates", tmp_path / "out", **kwargs)
    with pytest.raises(ConfigError, match="is the gates folder itself"):
        seer.export(run / "gates", run / "gates")
    with pytest.raises(ConfigError, match="no gates.safetensors there"):
        seer.export(tmp_path, tmp_path / "out")
    with pytest.raises(ConfigError, match="not a metrics.json"):
        seer.export(run / "gates", tmp_path / "out", metrics=[run / "summary.json"])
    with open(run / "gates" / "gates.safetensors", "ab") as f:
        f.write(b"x")
    with pytest.raises(ConfigError, match="sha256 differs"):
        seer.export(run / "gates", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli(run, tmp_path, capsys):
    assert main([str(run / "gates"), str(tmp_path / "out"), "--metrics", str(run / "metrics.json")]) == 0
    assert capsys.readouterr().out.strip() == f"exported to {tmp_path / 'out'}"
    assert main([str(run / "gates"), str(tmp_path / "out"), "--push-to-hub"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ConfigError: push_to_hub=True: needs repo_id") and err.count("\n") == 1
