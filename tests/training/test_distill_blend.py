"""Blend-aware distillation (``stage.loss_through_blend``): the loss is KL(GT || the gate blended as at inference),
checked against a float64 reference with a vertical-slash estimate computed by brute force; the metrics read the
blend; gradients reach the gates alone; the option is refused for gates without a blend."""

import dataclasses
import math

import pytest
import torch
from omegaconf import OmegaConf

from seer.checks import ConfigError
from seer.config import compose, validate
from seer.gates.config import GateConfig
from seer.model import attach_gates, freeze_base_model, gates
from seer.model.attention import blend_gate_scores
from seer.preflight import check_training
from seer.sparsity.config import SparsityConfig
from seer.training.config import DistillConfig
from seer.training.distill import GateDistillation
from seer.training.losses import gate_loss, normalize_rows
from tests.tiny import tiny_model
from tests.training.conftest import TINY, train

BLOCK, LENGTH, WEIGHT = 16, 120, 0.3  # a partial last block; 4 query heads on 2 key heads (GQA)


def vertical_slash_reference(q: torch.Tensor, k: torch.Tensor, scale: float, last: int = 64) -> torch.Tensor:
    """MInference's vertical-slash block log-scores in float64 by brute force over the token-level estimate
    ``A~[r, c] = v[c] + s[r - c]`` (v, s: column and diagonal means of the last rows' causal softmax)."""
    b, hq, n, _ = q.shape
    k = k.double().repeat_interleave(hq // k.shape[1], dim=1)
    rows, cols = torch.arange(n - min(last, n), n), torch.arange(n)
    logits = scale * q.double()[:, :, rows] @ k.transpose(-1, -2)
    attn = logits.masked_fill(cols > rows[:, None], -math.inf).softmax(-1)  # [B, H, L, N]
    v = attn.mean(2)
    offsets = (rows[:, None] - cols).clamp_min(0).flatten().expand(b, hq, -1)  # A[r, c] is 0 where c > r
    s = torch.zeros(b, hq, n, dtype=torch.float64).scatter_add_(-1, offsets, attn.flatten(-2)) / len(rows)
    causal = cols[:, None] >= cols
    est = (v[:, :, None, :] + s[:, :, (cols[:, None] - cols).clamp_min(0)]).masked_fill(~causal, 0.0)
    nb = -(-n // BLOCK)
    padded = torch.nn.functional.pad(est, (0, nb * BLOCK - n, 0, nb * BLOCK - n))
    mass = padded.unflatten(-1, (nb, BLOCK)).sum(-1).unflatten(-2, (nb, BLOCK)).sum(-2)
    mass = mass / torch.tensor([min(BLOCK, n - i * BLOCK) for i in range(nb)], dtype=torch.float64)[:, None]
    block_causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    return mass.clamp_min(1e-30).log().masked_fill(~block_causal, -math.inf).log_softmax(-1)


def _setup(loss_through_blend: bool, blend: str | None = "vertical_slash", **stage):
    model = tiny_model("llama")
    for layer in model.model.layers:  # sharper attention: a ground truth with structure
        layer.self_attn.q_proj.weight.data *= 4
    ctx = attach_gates(model, GateConfig(block_size=BLOCK, hidden_size=16, blend=blend, blend_weight=WEIGHT))
    freeze_base_model(model)
    module = GateDistillation(model, DistillConfig(loss_through_blend=loss_through_blend, **stage),
                              SparsityConfig(method="topk", target_density=0.5), "reference")
    ids = torch.randint(0, 320, (2, LENGTH), generator=torch.Generator().manual_seed(0))
    records = []
    with ctx.running("distill", consumer=records.append, gt_source="reference"), torch.no_grad():
        model.model(input_ids=ids, use_cache=False)
    return model, module, ids, records


def test_loss_is_kl_to_the_blend_of_gate_and_vertical_slash_in_float64():
    _, module, ids, records = _setup(True, skip_first_rows=0.25)
    out = module._forward(ids, with_mass=False, want_images=True)
    start = 2  # 0.25 of 8 query-block rows
    for rec in records:
        target = normalize_rows(rec.gt.double())
        gate = rec.logits.detach().double().log_softmax(-1)
        blend = (1 - WEIGHT) * gate.exp() + WEIGHT * vertical_slash_reference(rec.query, rec.key, rec.scale).exp()
        per_row = (torch.xlogy(target, target) - torch.xlogy(target, blend)).sum(-1)
        torch.testing.assert_close(out["layer_kl"][rec.layer_idx].double(), per_row[..., start:].mean(),
                                   rtol=1e-4, atol=1e-6)
        if rec.layer_idx in out["images"]:  # what the metrics read: the blend, not the gate alone
            torch.testing.assert_close(out["images"][rec.layer_idx][1].double(), blend[0, 0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["loss"], 10.0 * torch.stack(list(out["layer_kl"].values())).sum())


def test_without_the_option_the_loss_is_the_gate_alone():
    _, module, ids, records = _setup(False)
    out = module._forward(ids, with_mass=False, want_images=True)
    for rec in records:
        torch.testing.assert_close(out["layer_kl"][rec.layer_idx], gate_loss(rec.logits, normalize_rows(rec.gt)))
        if rec.layer_idx in out["images"]:
            torch.testing.assert_close(out["images"][rec.layer_idx][1], rec.logits[0, 0].detach().softmax(-1))


def test_training_blends_as_inference_does():
    model, _, ids, records = _setup(True)
    ctx = model.seer_context
    with ctx.observing() as observed, torch.no_grad():  # inference's scorer: the gate blended with its estimate
        model.model(input_ids=ids, use_cache=False)
    for rec in records:
        blended = blend_gate_scores(ctx.gate_config, rec.logits, rec.query, rec.key, BLOCK, rec.scale, rec.layer_idx)
        torch.testing.assert_close(blended.detach(), observed.scores()[rec.layer_idx])


def test_gradients_reach_the_gates_alone():
    model, module, ids, records = _setup(True)
    for p in model.parameters():
        p.requires_grad_(True)  # even trainable, the base gets no gradient through the blend's estimate
    module._forward(ids, with_mass=False, want_images=False)["loss"].backward()
    for name, p in model.named_parameters():
        if ".seer_gate." in name:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    assert all(any(p.grad.abs().sum() > 0 for p in g.parameters()) for g in gates(model).values())
    rec = records[0]
    logits = rec.logits.detach().requires_grad_(True)
    query, key = rec.query.clone().requires_grad_(True), rec.key.clone().requires_grad_(True)
    blend_gate_scores(model.seer_context.gate_config, logits, query, key, BLOCK, rec.scale, 0)[..., 3:, :4].sum() \
        .backward()
    assert query.grad is None and key.grad is None and torch.isfinite(logits.grad).all() and logits.grad.any()


def test_refused_for_gates_without_a_blend(tmp_path):
    message = r"stage\.loss_through_blend=True: .* gate\.blend=null"
    with pytest.raises(ConfigError, match=message):  # refused by the pre-flight, before anything loads
        train(tmp_path, "gate.blend=null", "stage.loss_through_blend=true")
    assert not any(tmp_path.iterdir())
    with pytest.raises(ConfigError, match=message):
        _setup(True, blend=None)
    with pytest.raises(ConfigError, match="stage.loss_through_blend='yes'"):
        DistillConfig(loss_through_blend="yes")


def test_a_rerank_is_left_out_of_the_loss_through_the_blend():
    """The rerank passes no gradient: training through the blend takes the blend alone (the gate gets its gradient),
    while a pass without gradient (inference, the validation metrics) reranks."""
    gate = GateConfig(blend="vertical_slash", rerank_rows=4, rerank_top_p=0.9)
    DistillConfig(loss_through_blend=True).check_gate(gate)  # accepted
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 2, 64, 16, generator=g), torch.randn(1, 1, 64, 16, generator=g)
    scores = torch.randn(1, 2, 4, 4, generator=g, requires_grad=True)
    trained = blend_gate_scores(gate, scores, q, k, 16, 0.25, 0)
    plain = blend_gate_scores(dataclasses.replace(gate, rerank_rows=0), scores, q, k, 16, 0.25, 0)
    torch.testing.assert_close(trained, plain)
    trained.masked_fill(trained.isinf(), 0).sum().backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0
    with torch.no_grad():
        served = blend_gate_scores(gate, scores, q, k, 16, 0.25, 0)
    assert not torch.allclose(served.masked_fill(served.isinf(), 0), plain.detach().masked_fill(plain.isinf(), 0))


def test_the_option_composes_with_the_recipes(tmp_path):
    cfg = compose([*TINY, f"paths.output_dir={tmp_path}", "stage.loss_through_blend=true"])
    run = validate(cfg)
    check_training(OmegaConf.to_container(cfg, resolve=True), run, {}, shards_model=False)
    assert run.stage.loss_through_blend and run.gate.blend == "vertical_slash"
    summary = train(tmp_path / "run", "stage.loss_through_blend=true", "trainer.max_steps=2")
    assert summary["status"] == "completed" and 0 < summary["val_recall"] <= 1
    # experiments/quality_qwen.py --train-overrides stage.loss_through_blend=true: the recipe it trains with
    run = validate(compose(["experiment=qwen05_gates", f"data.corpus.corpora.0.paths=[{tmp_path}/*.txt]",
                            f"paths.output_dir={tmp_path}", "stage.loss_through_blend=true"]))
    run.stage.check_gate(run.gate)
    assert run.stage.loss_through_blend and run.stage.target == "mass" and run.gate.blend == "vertical_slash"
    assert not validate(compose(["experiment=qwen05_gates", f"data.corpus.corpora.0.paths=[{tmp_path}/*.txt]",
                                 f"paths.output_dir={tmp_path}"])).stage.loss_through_blend  # default unchanged
