"""The distill stage on a tiny random Llama: the KL loss, the loss falls, per-layer validation metrics, images."""

import lightning as L
import pytest
import torch

from seer.data.synthetic import RandomTokensDataModule
from seer.gates.config import GateConfig
from seer.model import attach_gates, freeze_base_model, gates
from seer.sparsity.config import SparsityConfig
from seer.training.callbacks import layer_metrics
from seer.training.config import DistillConfig
from seer.training.distill import GateDistillation
from seer.training.losses import gate_loss, normalize_rows
from tests.tiny import tiny_model
from tests.training.conftest import train


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


def test_log_mse_loss_against_a_float64_reference():
    """``logmse``: zero at the target, the weighted squared log error otherwise (a float64 loop), finite gradients
    everywhere, and a block under the floor counts only when the gate puts it above."""
    from seer.training.losses import LOG_FLOOR, LOG_WEIGHT_POWER

    torch.manual_seed(1)
    nb = 7
    upper = torch.ones(nb, nb, dtype=torch.bool).triu(1)
    raw = torch.rand(2, 3, nb, nb).tril() + torch.eye(nb)
    raw[..., 5, 1] = 0.0  # a causal block with no mass: at the floor
    target = normalize_rows(raw)
    assert gate_loss(target.log().masked_fill(upper, float("-inf")), target, "logmse").abs().item() < 1e-10
    logits = torch.randn(2, 3, nb, nb).masked_fill(upper, float("-inf")).requires_grad_()
    loss = gate_loss(logits, target, "logmse")
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    log_q = torch.log_softmax(logits.detach().double(), -1)
    p = target.double()
    rows = []
    for b, h, i in [(b, h, i) for b in range(2) for h in range(3) for i in range(nb)]:
        w = [max(p[b, h, i, j].item(), LOG_FLOOR) ** LOG_WEIGHT_POWER for j in range(i + 1)]
        err = []
        for j in range(i + 1):
            e = log_q[b, h, i, j].item() - torch.tensor(max(p[b, h, i, j].item(), LOG_FLOOR)).double().log().item()
            err.append(e if p[b, h, i, j] > LOG_FLOOR else max(e, 0.0))
        rows.append(sum(wj * ej ** 2 for wj, ej in zip(w, err)) / sum(w))
    torch.testing.assert_close(loss.double(), torch.tensor(rows, dtype=torch.float64).mean(), rtol=1e-5, atol=1e-7)
    # the empty block: no loss while the gate keeps it under the floor, a loss once it rises above
    low = target.log().masked_fill(upper, float("-inf"))
    low[..., 5, 1] = -30.0
    assert gate_loss(low, target, "logmse").item() < 1e-8
    high = low.clone()
    high[..., 5, 1] = low[..., 5, :6].max(-1).values
    assert gate_loss(high, target, "logmse").item() > 1e-3


@pytest.mark.parametrize("loss, target", [("kl", "maxpool"), ("logmse", "maxpool"), ("kl", "rows")])
def test_a_few_steps_lower_the_loss_and_validation_reports_each_layer(loss, target):
    torch.manual_seed(0)
    model = tiny_model("llama", num_hidden_layers=2)
    for layer in model.model.layers:  # sharpen attention so the ground truth has structure to learn
        layer.self_attn.q_proj.weight.data *= 4
    attach_gates(model, GateConfig(block_size=16, hidden_size=16))
    freeze_base_model(model)
    before = {i: g.k_weight.detach().clone() for i, g in gates(model).items()}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".seer_gate." not in n}
    module = GateDistillation(model, DistillConfig(lr=2e-2, warmup_steps=0, loss=loss, target=target,
                                                            target_rows=4),
                              SparsityConfig(method="topk", target_density=0.5), "reference")
    data = RandomTokensDataModule(vocab_size=256, seq_len=128, train_sequences=1, val_sequences=1)
    trainer = L.Trainer(max_steps=40, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=1, val_check_interval=40,
                        check_val_every_n_epoch=None, accelerator="cpu")
    trainer.fit(module, datamodule=data)
    hist = module.loss_history
    assert len(hist) == 40
    assert sum(hist[-5:]) / 5 < 0.7 * sum(hist[:5]) / 5
    assert any(not torch.equal(before[i], g.k_weight) for i, g in gates(model).items())
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(frozen[n], p), f"{n} changed"
    rows = layer_metrics(trainer.callback_metrics)  # per layer, for callbacks; the means are their average
    assert [r["layer"] for r in rows] == [0, 1] and all(set(r) == {"layer", "recall", "oracle_recall", "density", "kl"}
                                                        for r in rows)
    for name in ("recall", "oracle_recall", "density"):
        mean = sum(r[name] for r in rows) / 2
        assert abs(mean - float(trainer.callback_metrics[f"val/{name}"])) < 1e-5
    assert all(0 < r[name] <= 1 for r in rows for name in ("recall", "oracle_recall", "density"))


def test_images_written_without_wandb(tmp_path):
    train(tmp_path, "stage.image_every_n_steps=2", "trainer.max_steps=3", "stage.image_layers=[0,-1]")
    images = sorted(p.name for p in (tmp_path / "images").glob("*.png"))
    # steps 0 and 2, layers 0 and 1 (the last of the tiny model's two)
    assert images == ["layer00_step00000.png", "layer00_step00002.png", "layer01_step00000.png",
                      "layer01_step00002.png"]
