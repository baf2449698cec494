"""The ``distill_decode`` stage: train SeerAttention-R decode gates of a frozen model against, for every token of a
teacher-forced text row, its attention max-pooled per key block and over its GQA group (normalised).

Each step runs the base model's decoder once, dense and without grad; every layer hands its decode-gate logits (with
grad) and ground truth (:class:`~seer.model.decode.DecodeRecord`) to this module, which sums ``loss_scale *
KL(GT || softmax(gate))`` over layers. Only the decode gates train (AdamW, warmup + cosine).

Logged: ``train/loss``, ``train/kl/layer_XX``, ``lr``; in validation ``val/loss`` and ``val/recall``, the share of
the ground truth's mass the blocks the gate selects keep at the decode budget ``stage.decode_sparsity`` (a
:class:`~seer.sparsity.decode.DecodeSparsityConfig`; a calibrated threshold is fitted on the batch itself). A
calibrated budget (``target_density``) is calibrated once more at the end of training on the validation rows
(:meth:`DecodeGateDistillation.decode_scores`, :class:`seer.training.callbacks.DecodeGateCalibration`) and stored
beside the decode gates for ``seer.load``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from seer.config import RunConfig
from seer.model.attention import prepare_model
from seer.model.decode import DecodeRecord, attach_decode_gates, decode_gates, freeze_all_but_decode_gates
from seer.model.decode_gate_io import decode_gate_state_dict, save_decode_gates
from seer.sparsity import SparsityConfig
from seer.sparsity.decode import calibrate_decode_threshold, decode_block_mask
from seer.training.config import DistillDecodeConfig
from seer.training.losses import decode_gate_loss
from seer.training.stage import Stage


class DecodeGateDistillation(Stage):
    """Decode-gate distillation for ``model`` (a Hugging Face causal LM with decode gates attached, base frozen);
    the prefill stays dense (``sparsity`` dense)."""

    def __init__(self, model: torch.nn.Module, stage: DistillDecodeConfig, gt_source: str = "reference",
                 model_name: str = "unknown"):
        super().__init__(model, stage, SparsityConfig(method="dense"), gt_source, model_name)
        self.budget = stage.decode_sparsity

    @classmethod
    def from_run(cls, run: RunConfig, model: torch.nn.Module, *, gt_source: str, device: torch.device, tokenizer,
                 out_dir: Path, model_name: str) -> DecodeGateDistillation:
        """Decode gates attached to ``model``, its base frozen (the prefill stays dense)."""
        prepare_model(model, run.stage.decode_gate.block_size)
        attach_decode_gates(model, run.stage.decode_gate)
        freeze_all_but_decode_gates(model)
        return cls(model, run.stage, gt_source, model_name=model_name)

    def _forward(self, input_ids: torch.Tensor) -> dict:
        losses, records = {}, {}

        def consume(rec: DecodeRecord) -> None:
            with torch.enable_grad():  # the consumer runs inside the base model's no-grad forward
                losses[rec.layer_idx] = decode_gate_loss(rec.logits, rec.gt, self.stage.skip_first_tokens)
            records[rec.layer_idx] = (rec.logits.detach(), rec.gt)

        with self.model.seer_decode.distilling(self.model, consume, self.gt_source), torch.no_grad():
            self.model.base_model(input_ids=input_ids, use_cache=False)
        if not losses:
            raise RuntimeError("no decode-gated attention layer ran: are the decode gates attached to this model?")
        total = self.stage.loss_scale * torch.stack([losses[i] for i in sorted(losses)]).sum()
        return {"loss": total, "layer_kl": {i: losses[i].detach() for i in sorted(losses)}, "records": records}

    @torch.no_grad()
    def decode_scores(self, input_ids: torch.Tensor, max_tokens: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode gates' scores of ``input_ids``'s tokens as decoding tokens, every layer's as more tokens
        (``[R, Hkv, nb]``, float32), with their valid key counts ``[R]``: at most ``max_tokens`` a layer, spread
        evenly over the rows' positions (what a calibrated threshold is fitted on)."""
        scores, seqlens = [], []
        for logits, _ in self._forward(input_ids)["records"].values():
            b, h, n, nb = logits.shape
            pick = torch.linspace(0, b * n - 1, min(b * n, max_tokens), device=logits.device).long()
            scores.append(logits.float().permute(0, 2, 1, 3).reshape(b * n, h, nb)[pick])
            seqlens.append(torch.arange(1, n + 1, device=logits.device).repeat(b)[pick])
        return torch.cat(scores), torch.cat(seqlens)

    @torch.no_grad()
    def _recall(self, records: dict) -> torch.Tensor:
        """Share of the ground truth's mass in the blocks the budget keeps, over tokens, heads and layers."""
        bs = self.stage.decode_gate.block_size
        recalls = []
        for logits, gt in records.values():
            b, h, n, nb = logits.shape
            scores = logits.permute(0, 2, 1, 3).reshape(b * n, h, nb)
            seqlens = torch.arange(1, n + 1, device=logits.device).repeat(b)
            knob = calibrate_decode_threshold(scores, seqlens, self.budget, bs) if self.budget.calibrated else None
            mask = decode_block_mask(scores, seqlens, self.budget, bs, knob)
            recalls.append((gt.permute(0, 2, 1, 3).reshape(b * n, h, nb) * mask).sum(-1).mean())
        return torch.stack(recalls).mean()

    def training_step(self, batch, batch_idx):
        out = self._forward(batch["input_ids"])
        bsz = batch["input_ids"].shape[0]
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=bsz)
        self.log_dict({f"train/kl/layer_{i:02d}": v for i, v in out["layer_kl"].items()}, batch_size=bsz)
        self.log("lr", self.optimizers().param_groups[0]["lr"], batch_size=bsz)
        self.loss_history.append(float(out["loss"].detach()))
        return out["loss"]

    def validation_step(self, batch, batch_idx):
        out = self._forward(batch["input_ids"])
        bsz = batch["input_ids"].shape[0]
        self.log("val/loss", out["loss"], prog_bar=True, batch_size=bsz, sync_dist=True)
        self.log("val/recall", self._recall(out["records"]), batch_size=bsz, sync_dist=True)
        self.log_dict({f"val/layer_{i:02d}/kl": v for i, v in out["layer_kl"].items()}, batch_size=bsz,
                      logger=False, sync_dist=True)

    def param_groups(self) -> list[dict]:
        """The decode gates, at ``stage.lr``."""
        return [{"params": [p for g in decode_gates(self.model).values() for p in g.parameters()]}]

    def gate_state(self) -> dict[str, torch.Tensor]:
        return decode_gate_state_dict(self.model)

    def save_gate_files(self, folder: str, state: dict[str, torch.Tensor], extra: dict) -> None:
        """``decode_gates.*`` with the decode budget in place of the (dense) prefill one."""
        extra = {**{k: v for k, v in extra.items() if k != "sparsity"}, "decode_sparsity": self.budget.stored()}
        save_decode_gates(folder, self.model, self.model_name, extra=extra, state=state)

    def train(self, mode: bool = True):
        """Lightning flips modules to train mode; the base model stays in eval mode (no dropout) regardless."""
        super().train(mode)
        self.model.eval()
        return self
