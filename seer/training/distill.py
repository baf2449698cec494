"""The ``distill`` stage: train the gates of a frozen model against its own block attention map.

Each step runs the base model's decoder once, dense and without grad; every attention layer hands its gate logits
(with grad) and its ground truth (:class:`~seer.model.attention.LayerRecord`) to this module, which sums
``loss_scale * KL(GT || softmax(gate))`` over layers. Only gate parameters train (AdamW, warmup + cosine). With
``stage.loss_through_blend`` the gate's logits are first blended with ``gate.blend``'s estimate as at inference
(:func:`~seer.model.attention.blend_gate_scores`): the loss is ``KL(GT || blend)`` and the metrics and images below
read the blended scores.

Logged: ``train/loss``, ``train/kl/layer_XX``, ``train/gt_recall`` (share of the row-normalised ground truth the
gate's mask keeps at the configured sparsity), ``train/density``, ``lr``; in validation ``val/loss``,
``val/recall`` (share of true attention mass the gate's mask keeps), ``val/oracle_recall`` (the best any mask
of the same density can keep) and ``val/density``, and per layer ``val/layer_XX/{recall,oracle_recall,density,kl}``
for callbacks only (not sent to the loggers; :class:`~seer.training.callbacks.LayerTable` makes a table of them).
A training step that takes images returns them beside the loss (``images``: the step and, per layer, ground truth,
gate softmax and mask of head 0 of the first row) for :class:`~seer.training.callbacks.GateImages`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from seer.config import RunConfig
from seer.model.attention import (LayerRecord, attach_gates, blend_gate_scores, document_spans, freeze_base_model,
                                  gate_parameters, layer_count)
from seer.sparsity import SparsityConfig, attention_mass, block_density, mass_recall, oracle_recall, selection_masks
from seer.training.config import DistillConfig
from seer.training.losses import documents_gate_loss, first_kept_row, gate_loss, normalize_rows
from seer.training.stage import Stage


class GateDistillation(Stage):
    """Gate distillation for ``model`` (a Hugging Face causal LM with gates attached and its base frozen)."""

    def __init__(self, model: torch.nn.Module, stage: DistillConfig, sparsity: SparsityConfig, gt_source: str,
                 model_name: str = "unknown"):
        super().__init__(model, stage, sparsity, gt_source, model_name)
        stage.check_gate(model.seer_context.gate_config)
        self.num_layers = layer_count(model)

    @classmethod
    def from_run(cls, run: RunConfig, model: torch.nn.Module, *, gt_source: str, device: torch.device, tokenizer,
                 out_dir: Path, model_name: str) -> GateDistillation:
        """Gates attached to ``model``, its base frozen."""
        attach_gates(model, run.gate)
        freeze_base_model(model)
        return cls(model, run.stage, run.sparsity, gt_source, model_name=model_name)

    @property
    def context(self):
        return self.model.seer_context

    def _forward(self, input_ids: torch.Tensor, with_mass: bool, want_images: bool,
                 position_ids: torch.Tensor | None = None) -> dict:
        """One dense forward of the frozen model; every layer's gate loss (with grad), then the selection metrics.
        ``position_ids`` restarting at each document (``data.packing=documents``) keep the documents apart: each
        layer hands over one record per document, its loss weighted by the document's query-block rows and its
        metrics by its causal blocks."""
        ctx = self.context
        records: dict[int, list[tuple]] = {}

        def consume(rec: LayerRecord) -> None:
            target = normalize_rows(rec.gt.float()) if self.stage.row_normalize else rec.gt.float()
            with torch.enable_grad():  # the consumer runs inside the base model's no-grad forward
                scores = blend_gate_scores(ctx.gate_config, rec.logits, rec.query, rec.key, ctx.block_size,
                                           rec.scale, rec.layer_idx) if self.stage.loss_through_blend else rec.logits
                loss = gate_loss(scores, target, self.stage.loss, self.stage.skip_first_rows)
            mass = attention_mass(rec.query, rec.key, ctx.block_size, rec.scale) if with_mass else None
            records.setdefault(rec.layer_idx, []).append((loss, scores.detach(), target, mass))

        documents = None if position_ids is None else document_spans(position_ids)
        with ctx.running("distill", consumer=consume, gt_source=self.gt_source, gt_mode=self.stage.gt_mode,
                         gt_target=self.stage.target, gt_rows=self.stage.target_rows, documents=documents), \
                torch.no_grad():
            self.model.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        if not records:
            raise RuntimeError("no gated attention layer ran: are the gates attached to this model?")
        layers = sorted(records)
        losses = {i: documents_gate_loss([r[0] for r in records[i]], [r[1] for r in records[i]],
                                         self.stage.skip_first_rows) for i in layers}
        total = self.stage.loss_scale * torch.stack([losses[i] for i in layers]).sum()
        out = {"loss": total, "layer_kl": {i: losses[i].detach() for i in layers}}
        pieces = [self._metrics({i: records[i][p][1] for i in layers}, {i: records[i][p][2] for i in layers},
                                {i: records[i][p][3] for i in layers} if with_mass else {}, want_images and p == 0)
                  for p in range(len(records[layers[0]]))]
        if len(pieces) == 1:
            out.update(pieces[0])
        else:  # documents: their metrics weighted by their causal blocks
            blocks = [nb * (nb + 1) // 2 for nb in (records[layers[0]][p][1].shape[-1] for p in range(len(pieces)))]
            out.update(_weighted_mean(pieces, blocks))
        return out

    @torch.no_grad()
    def _metrics(self, logits: dict, targets: dict, masses: dict, want_images: bool) -> dict:
        """Density and recall of the configured selection on this batch (a calibrated budget is calibrated on the
        batch itself): of the row-normalised ground truth (``gt_recall``), and with ``masses`` of the true attention
        mass beside the oracle's at the same density."""
        masks = selection_masks(logits, self.sparsity, masses or None)
        start = first_kept_row(next(iter(logits.values())).shape[-1], self.stage.skip_first_rows)
        density = {i: block_density(m) for i, m in masks.items()}
        out = {"gt_recall": _mean([mass_recall(masks[i][..., start:, :], targets[i][..., start:, :]) for i in masks]),
               "density": _mean(list(density.values())), "layer_density": density}
        if masses:
            out["layer_recall"] = {i: mass_recall(masks[i], masses[i]) for i in masks}
            out["layer_oracle_recall"] = {i: oracle_recall(masses[i], float(density[i]), self.sparsity.sink_blocks,
                                                           self.sparsity.local_blocks) for i in masks}
            out["recall"] = _mean(list(out["layer_recall"].values()))
            out["oracle_recall"] = _mean(list(out["layer_oracle_recall"].values()))
        if want_images:
            layers = sorted({i % self.num_layers for i in self.stage.image_layers} & set(logits))
            out["images"] = {i: (targets[i][0, 0].cpu(), torch.softmax(logits[i][0, 0], -1).cpu(),
                                 masks[i][0, 0].cpu()) for i in layers}
        return out

    def training_step(self, batch, batch_idx):
        every = self.stage.image_every_n_steps
        last = self.global_step + 1 == self.trainer.max_steps  # the final gates are drawn too
        want_images = bool(every) and (self.global_step % every == 0 or last) and self.trainer.is_global_zero
        out = self._forward(batch["input_ids"], with_mass=False, want_images=want_images,
                            position_ids=batch.get("position_ids"))
        bsz = batch["input_ids"].shape[0]
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=bsz)
        self.log("train/gt_recall", out["gt_recall"], prog_bar=True, batch_size=bsz)
        self.log("train/density", out["density"], batch_size=bsz)
        self.log_dict({f"train/kl/layer_{i:02d}": v for i, v in out["layer_kl"].items()}, batch_size=bsz)
        self.log("lr", self.optimizers().param_groups[0]["lr"], batch_size=bsz)
        self.loss_history.append(float(out["loss"].detach()))
        if out.get("images"):
            return {"loss": out["loss"], "images": {"step": self.global_step, "layers": out["images"]}}
        return out["loss"]

    def validation_step(self, batch, batch_idx):
        out = self._forward(batch["input_ids"], with_mass=True, want_images=False,
                            position_ids=batch.get("position_ids"))
        bsz = batch["input_ids"].shape[0]
        for key in ("recall", "oracle_recall", "density", "gt_recall"):
            self.log(f"val/{key}", out[key], batch_size=bsz, sync_dist=True)
        self.log("val/loss", out["loss"], prog_bar=True, batch_size=bsz, sync_dist=True)
        per_layer = {"recall": out["layer_recall"], "oracle_recall": out["layer_oracle_recall"],
                     "density": out["layer_density"], "kl": out["layer_kl"]}
        self.log_dict({f"val/layer_{i:02d}/{name}": v for name, values in per_layer.items() for i, v in values.items()},
                      batch_size=bsz, logger=False, sync_dist=True)

    def param_groups(self) -> list[dict]:
        """The gates, at ``stage.lr``."""
        return [{"params": gate_parameters(self.model)}]

    def train(self, mode: bool = True):
        """Lightning flips modules to train mode; the base model stays in eval mode (no dropout) regardless."""
        super().train(mode)
        self.model.eval()
        return self


def _mean(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(values).mean()


def _weighted_mean(metrics: list[dict], weights: list[int]) -> dict:
    """The documents' ``_metrics`` averaged with ``weights``: each scalar, and each layer of the per-layer ones; the
    images are the first document's."""
    w = [x / sum(weights) for x in weights]
    out = {"images": metrics[0]["images"]} if "images" in metrics[0] else {}
    for key, first in metrics[0].items():
        if isinstance(first, dict) and key != "images":
            out[key] = {i: sum(m[key][i] * x for m, x in zip(metrics, w)) for i in first}
        elif key != "images":
            out[key] = sum(m[key] * x for m, x in zip(metrics, w))
    return out
