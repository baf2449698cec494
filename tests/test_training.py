"""The distill stage on a tiny random Llama: the loss falls, runs resume exactly, sweeps survive a failing job."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch

from seer.gates.config import GateConfig
from seer.sparsity.config import SparsityConfig
from seer.training.config import DistillConfig
from seer.config import build
from seer.model.config import ModelConfig
from seer.data.synthetic import RandomTokensDataModule
from seer.model import attach_gates, freeze_base_model, gates
from seer.model.gate_io import load_gates
from seer.model.loading import load_causal_lm
from seer.training.distill import GateDistillation
from seer.training.losses import gate_loss, normalize_rows
from seer.config import compose
from tests.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny_llama", "data=random_tokens", "gate.block_size=16", "gate.hidden_size=16", "debug=fast"]


def test_kl_loss_is_zero_at_target_and_ignores_upper_triangle():
    nb = 6
    target = normalize_rows(torch.rand(2, 3, nb, nb).tril() + torch.eye(nb))
    logits = target.log()  # -inf above the diagonal, like the gate
    assert gate_loss(logits, target).abs().item() < 1e-6
    other = torch.randn(2, 3, nb, nb).masked_fill(torch.ones(nb, nb, dtype=torch.bool).triu(1), float("-inf"))
    assert gate_loss(other, target).item() > 0.01
    assert torch.isfinite(gate_loss(other, target, "mse"))
    # skipping rows: only the kept rows count
    log_q = torch.log_softmax(other, -1).masked_fill(torch.ones(nb, nb, dtype=torch.bool).triu(1), 0.0)
    per_row = (torch.xlogy(target, target) - target * log_q).sum(-1)  # KL of each query-block row
    torch.testing.assert_close(gate_loss(other, target), per_row.mean())
    torch.testing.assert_close(gate_loss(other, target, skip_first_rows=0.5), per_row[..., 3:].mean())


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    model = tiny_model("llama", num_hidden_layers=2)
    for layer in model.model.layers:  # sharpen attention so the ground truth has structure to learn
        layer.self_attn.q_proj.weight.data *= 4
    attach_gates(model, GateConfig(block_size=16, hidden_size=16))
    freeze_base_model(model)
    before = {i: g.k_weight.detach().clone() for i, g in gates(model).items()}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".seer_gate." not in n}
    module = GateDistillation(model, DistillConfig(lr=2e-2, warmup_steps=0), SparsityConfig(target_density=0.5), "reference")
    data = RandomTokensDataModule(vocab_size=256, seq_len=128, train_sequences=1, val_sequences=1)
    trainer = L.Trainer(max_steps=40, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    trainer.fit(module, datamodule=data)
    hist = module.loss_history
    assert len(hist) == 40
    assert sum(hist[-5:]) / 5 < 0.7 * sum(hist[:5]) / 5
    assert any(not torch.equal(before[i], g.k_weight) for i, g in gates(model).items())
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(frozen[n], p), f"{n} changed"


def test_resume_continues_at_same_step_with_same_weights(tmp_path):
    from seer.training.run import run_training

    first = compose(TINY + [f"paths.output_dir={tmp_path / 'a'}", "trainer.max_steps=4",
                         "callbacks.model_checkpoint.every_n_train_steps=2"])
    summary = run_training(first)
    assert summary["steps"] == 4
    ckpt = tmp_path / "a" / "checkpoints" / "step000002.ckpt"
    assert ckpt.exists()
    state = torch.load(ckpt, weights_only=False)
    assert state["global_step"] == 2
    assert state["state_dict"] and all(".seer_gate." in k for k in state["state_dict"])  # gates only

    resumed = compose(TINY + [f"paths.output_dir={tmp_path / 'b'}", "trainer.max_steps=4", f"ckpt_path={ckpt}"])
    summary_b = run_training(resumed)
    assert summary_b["steps"] == 4
    # build the run's model shape twice and load each run's gate file
    mc = build(ModelConfig, "model", dict(first.model))
    a, b = load_causal_lm(mc), load_causal_lm(mc)
    load_gates(a, tmp_path / "a" / "gates")
    load_gates(b, tmp_path / "b" / "gates")
    for i, g in gates(a).items():
        torch.testing.assert_close(g.k_weight, gates(b)[i].k_weight, rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["steps"] == 4


def test_multirun_sweep_keeps_results_when_a_job_fails(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "seer.train", "-m", *TINY, "sparsity=topk", "sparsity.target_density=0.5,1.5,0.1",
           f"hydra.sweep.dir={tmp_path}", "hydra.sweep.subdir=${hydra.job.num}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0  # the failed job is reported ...
    assert "sparsity.target_density=1.5" in proc.stderr + proc.stdout
    for job, density in ((0, 0.5), (2, 0.1)):  # ... and the others' results are there
        summary = json.loads((tmp_path / str(job) / "summary.json").read_text())
        assert summary["sparsity"]["target_density"] == density and summary["steps"] == 3
        assert (tmp_path / str(job) / "gates" / "gates.safetensors").exists()
    assert not (tmp_path / "1" / "summary.json").exists()


def test_multirun_with_wandb_groups_jobs(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT), "WANDB_SILENT": "true"}
    cmd = [sys.executable, "-m", "seer.train", "-m", *TINY, "logger=wandb", "sparsity.target_density=0.5,0.3",
           f"hydra.sweep.dir={tmp_path}", "hydra.sweep.subdir=${hydra.job.num}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    groups = set()
    for job in (0, 1):
        summary = json.loads((tmp_path / str(job) / "summary.json").read_text())
        assert summary["wandb_run"] and Path(summary["wandb_run"]).exists()
        meta = list(Path(summary["wandb_run"]).rglob("wandb-metadata.json")) + \
            list(Path(summary["wandb_run"]).rglob("*.wandb"))
        assert meta, "no offline W&B run files"
        groups.add(summary.get("wandb_group"))
    assert len(groups) == 1 and None not in groups


def test_images_written_without_wandb(tmp_path):
    from seer.training.run import run_training

    cfg = compose(TINY + [f"paths.output_dir={tmp_path}", "stage.image_every_n_steps=2", "trainer.max_steps=3",
                                 "stage.image_layers=[0,-1]"])
    run_training(cfg)
    images = sorted(p.name for p in (tmp_path / "images").glob("*.png"))
    # steps 0 and 2, layers 0 and 1 (the last of the tiny model's two)
    assert images == ["layer00_step00000.png", "layer00_step00002.png", "layer01_step00000.png",
                      "layer01_step00002.png"]
