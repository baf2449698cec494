"""The ``finetune`` stage: the model learns to work with the blocks its gates keep (SeerAttention paper v1).

Every step runs the model once in the ``train_sparse`` attention mode (:mod:`seer.model.attention`): each layer's
gate scores its blocks, the ``sparsity`` budget turns them into a mask, and attention runs through the selected
blocks with gradients (Triton backward on CUDA, the PyTorch reference elsewhere). The loss is the language-model
loss plus ``gate_loss_weight`` x the sum over layers of the gate loss against the dense block ground truth (the
``distill`` stage's target; the gates see detached Q/K, so the gate loss trains the gates only). The base weights
train in full, a subset (``stage.trainable``) or through LoRA adapters (``stage.lora_rank``, peft).

Cost: the ground truth needs one dense attention forward per layer (the fused Triton kernel, no backward) on top of
the sparse forward and backward; ``stage.gt_every_n_steps`` spaces it out. Under activation checkpointing a layer's
mask is kept from its first pass, so the recomputation costs no second gate or ground truth.

At the end of training the model is written as a Hugging Face folder (``model/``: safetensors, config with the rope
scaling, tokenizer) with its gates in ``model/gates``: ``seer.load(folder, gates=folder / "gates")`` reads it back.

Logged: ``train/loss``, ``train/lm_loss``, ``train/gate_loss``, ``train/density``, ``lr``; ``val/loss`` (the
language-model loss through the trained sparse attention), ``val/ppl``, ``val/density``.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from seer.config import RunConfig
from seer.model.attention import LayerRecord, attach_gates, attention_layers, document_spans, gate_parameters
from seer.model.gate_io import load_gates
from seer.backends import resolve_backend
from seer.model.loading import resolve_dtype
from seer.sparsity import SparsityConfig
from seer.training.config import FinetuneConfig
from seer.training.losses import documents_gate_loss, gate_loss, normalize_rows
from seer.training.parallel import tied_head
from seer.training.stage import Stage


DENSE = SparsityConfig(method="dense")
IGNORED_LABEL = -100  # a label cross_entropy leaves out


def causal_lm_loss(hidden: torch.Tensor, head, input_ids: torch.Tensor, chunk_tokens: int,
                   position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of ``head(hidden)`` ``[B, N, vocab]`` (``head``: the LM head, a module or a
    function) against ``input_ids`` shifted by one, ``chunk_tokens`` positions at a time; each chunk's logits are
    recomputed in the backward, so only one chunk's float32 logits exist at once. With ``position_ids`` restarting
    at each document, a document's first token is not a label (its last token cannot see it): the mean is over the
    documents' own next tokens."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    labels = input_ids[:, 1:].reshape(-1)
    count = labels.numel()
    if position_ids is not None:
        labels = labels.masked_fill(position_ids[:, 1:].reshape(-1) == 0, IGNORED_LABEL)
        count = max(1, int((labels != IGNORED_LABEL).sum()))
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, labels.numel(), chunk_tokens):
        stop = start + chunk_tokens
        total = total + checkpoint(_cross_entropy_sum, head, h[start:stop], labels[start:stop], use_reentrant=False)
    return total / count


def _cross_entropy_sum(head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), labels, reduction="sum", ignore_index=IGNORED_LABEL)


def add_lora(model: torch.nn.Module, stage: FinetuneConfig) -> torch.nn.Module:
    """``model`` wrapped by peft with LoRA adapters on ``stage.lora_modules`` (injected in place: the Hugging Face
    model keeps its modules, the adapted ones now adding their low-rank update); all its base weights frozen."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=stage.lora_rank, lora_alpha=stage.lora_alpha,
                                            target_modules=stage.lora_modules, lora_dropout=0.0))


def set_trainable(model: torch.nn.Module, stage: FinetuneConfig) -> list[str]:
    """Marks what trains: base parameters matching ``stage.trainable``, LoRA adapters (already trainable), and the
    gates when the gate loss is on. With ``stage.float32_master_weights``, trained parameters of a half-precision
    model become float32 (autocast runs the matmuls in half precision). Returns the trained base parameters'
    names."""
    chosen = []
    for name, p in model.named_parameters():
        if ".seer_gate." in f".{name}":
            p.requires_grad_(stage.gate_loss_weight > 0)
        elif ".lora_" not in name:
            p.requires_grad_(any(fnmatch.fnmatchcase(name, pattern) for pattern in stage.trainable))
            if p.requires_grad:
                chosen.append(name)
        if p.requires_grad and stage.float32_master_weights and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    if stage.trainable and not chosen:
        example = next(n for n, _ in model.named_parameters())
        raise ValueError(f"stage.trainable={stage.trainable} matches no parameter of the model (names look like "
                         f"{example!r})")
    return chosen


class Finetune(Stage):
    """Long-context fine-tuning of ``model`` (a Hugging Face causal LM, with gates attached; a peft model with
    LoRA) through its gates' block-sparse attention; see the module docstring. Its loss history is the
    language-model loss of each step."""

    def __init__(self, model: torch.nn.Module, stage: FinetuneConfig, sparsity: SparsityConfig, gt_source: str,
                 kernel: str, model_name: str = "unknown", export_dir: str | Path | None = None, tokenizer=None,
                 save_dtype: torch.dtype | None = None):
        super().__init__(model, stage, sparsity, gt_source, model_name)
        self.kernel, self.tokenizer, self.save_dtype = kernel, tokenizer, save_dtype
        self.export_dir = None if export_dir is None else Path(export_dir)
        self.images: dict = {}  # no gate images in this stage (GateImages reads this)

    @classmethod
    def from_run(cls, run: RunConfig, model: torch.nn.Module, *, gt_source: str, device: torch.device, tokenizer,
                 out_dir: Path, model_name: str) -> Finetune:
        """The stage's module for ``model`` (loaded with ``run.model``'s rope scaling): LoRA adapters if asked, gates
        (from ``stage.init_gates`` or fresh; their block RoPE read from the scaled config), trained parameters,
        activation checkpointing."""
        stage: FinetuneConfig = run.stage
        kernel = resolve_backend("stage.kernel", stage.kernel, device)
        if stage.lora_rank:
            model = add_lora(model, stage)
        lm = model.get_base_model() if stage.lora_rank else model
        attach_gates(lm, run.gate)
        if stage.init_gates is not None:
            meta = load_gates(lm, stage.init_gates, expected_gate=run.gate, allow_rope_change=True)
            rank_zero_info(f"gates from {stage.init_gates} (made for {meta['base_model']}; block RoPE follows this "
                           f"model's {lm.config.rope_parameters.get('rope_type')} rope)")
        chosen = set_trainable(model, stage)
        model.train()  # loaded in eval mode; transformers checkpoints layers in train mode only (Llama has no dropout)
        if stage.gradient_checkpointing:  # reentrant: the first pass runs without grad, so no gate work is repeated
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rank_zero_info(f"finetune: {trained / 1e6:.1f}M trained parameters ({len(chosen)} base tensors"
                       f"{f', LoRA rank {stage.lora_rank}' if stage.lora_rank else ''}, gates "
                       f"{'on' if stage.gate_loss_weight > 0 else 'fixed'}), sparse kernel: {kernel}, "
                       f"{len(attention_layers(lm))} gated layers")
        return cls(model, stage, run.sparsity, gt_source, kernel, model_name=model_name, export_dir=out_dir / "model",
                   tokenizer=tokenizer, save_dtype=resolve_dtype(run.model.dtype, device))

    @property
    def lm(self) -> torch.nn.Module:
        """The Hugging Face model (inside the peft wrapper with LoRA)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head's logits. A head tied to the embeddings reads the embeddings' weight at each call: under FSDP
        the decoder's group holds it (gathered during the step), not the head module."""
        if tied_head(self.lm):
            return F.linear(hidden, self.lm.get_input_embeddings().weight)
        return self.lm.get_output_embeddings()(hidden)

    @property
    def context(self):
        return self.lm.seer_context

    def on_fit_start(self) -> None:
        # for the whole fit: a recomputation under activation checkpointing runs in the backward, after the step
        self.context.update(mode="train_sparse", gt_source=self.gt_source, gt_mode=self.stage.gt_mode,
                            gt_target=self.stage.target, gt_rows=self.stage.target_rows, kernel=self.kernel)

    def _forward(self, input_ids: torch.Tensor, sparsity: SparsityConfig, with_gate_loss: bool,
                 position_ids: torch.Tensor | None = None) -> dict:
        """Language-model loss through ``sparsity``'s blocks and, ``with_gate_loss``, every layer's gate loss.
        ``position_ids`` restarting at each document (``data.packing=documents``) keep the documents apart."""
        ctx = self.context
        gate_losses: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

        def consume(rec: LayerRecord) -> None:
            target = normalize_rows(rec.gt.float()) if self.stage.row_normalize else rec.gt.float()
            with torch.enable_grad():  # under activation checkpointing the first pass runs without grad
                loss = gate_loss(rec.logits, target, self.stage.loss, self.stage.skip_first_rows)
            gate_losses.setdefault(rec.layer_idx, []).append((loss, rec.logits))

        ctx.clear_step()  # the previous step's backward is done: new masks for this step
        # until the next step: a recomputation under activation checkpointing runs in the backward, after the forward
        ctx.update(documents=None if position_ids is None else document_spans(position_ids))
        # a calibrated budget is calibrated per layer on the batch (train_sparse mode), so no calibration is given
        with ctx.running(sparsity=sparsity, calibration=None, consumer=consume if with_gate_loss else None):
            hidden = self.lm.base_model(input_ids=input_ids, position_ids=position_ids,
                                        use_cache=False).last_hidden_state
        lm_loss = causal_lm_loss(hidden, self.head, input_ids, self.stage.loss_chunk_tokens, position_ids)
        out = {"lm_loss": lm_loss, "density": ctx.mean_density()}
        if with_gate_loss:
            if not gate_losses:
                raise RuntimeError("no gated attention layer ran: are the gates attached to this model?")
            out["gate_loss"] = torch.stack([
                documents_gate_loss([loss for loss, _ in parts], [logits for _, logits in parts],
                                    self.stage.skip_first_rows) for _, parts in sorted(gate_losses.items())]).sum()
        return out

    def training_step(self, batch, batch_idx):
        step = self.global_step
        sparsity = DENSE if step < self.stage.dense_warmup_steps else self.sparsity
        with_gate = self.stage.gate_loss_weight > 0 and step % self.stage.gt_every_n_steps == 0
        out = self._forward(batch["input_ids"], sparsity, with_gate, position_ids=batch.get("position_ids"))
        loss = out["lm_loss"] + self.stage.gate_loss_weight * out["gate_loss"] if with_gate else out["lm_loss"]
        bsz = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bsz)
        self.log("train/lm_loss", out["lm_loss"], prog_bar=True, batch_size=bsz)
        if with_gate:
            self.log("train/gate_loss", out["gate_loss"], batch_size=bsz)
        self.log("train/density", out["density"], batch_size=bsz)
        self.log("lr", self.optimizers().param_groups[0]["lr"], batch_size=bsz)
        self.loss_history.append(float(out["lm_loss"].detach()))
        return loss

    def validation_step(self, batch, batch_idx):
        out = self._forward(batch["input_ids"], self.sparsity, with_gate_loss=False,
                            position_ids=batch.get("position_ids"))
        bsz = batch["input_ids"].shape[0]
        self.log("val/loss", out["lm_loss"], prog_bar=True, batch_size=bsz)
        self.log("val/ppl", torch.exp(out["lm_loss"]), batch_size=bsz)
        self.log("val/density", out["density"], batch_size=bsz)

    def param_groups(self) -> list[dict]:
        """The trained base parameters at ``stage.lr``, the gates at ``stage.gate_lr``."""
        gate_ids = {id(p) for p in gate_parameters(self.lm)}
        trained = [p for p in self.model.parameters() if p.requires_grad]
        return [{"params": [p for p in trained if id(p) not in gate_ids], "lr": self.stage.lr},
                {"params": [p for p in trained if id(p) in gate_ids], "lr": self.stage.gate_lr}]

    def configure_callbacks(self):
        return [ModelExport()] if self.export_dir is not None else []

    def export(self, folder: str | Path) -> Path | None:
        """Writes the fine-tuned model (LoRA merged; weights in ``save_dtype``) as a Hugging Face folder with its
        tokenizer, and its gates into ``folder/gates``. Leaves the model in eval mode and dense attention mode.
        Every process calls it (a sharded model is gathered, :func:`seer.training.parallel.full_state_dict`); global
        rank 0 writes and gets the folder, the others None."""
        from seer.files import apply_umask
        from seer.model.gate_io import gate_state_dict, save_gates
        from seer.training.parallel import full_state_dict

        folder = Path(folder)
        self.context.update(mode="dense")
        self.context.clear_step()
        lm = (self.model.merge_and_unload() if hasattr(self.model, "merge_and_unload") else self.lm).eval()
        full, gate_state = full_state_dict(lm), gate_state_dict(lm)
        if self.global_rank != 0:
            return None
        if tied_head(lm):  # gathered from shards, a tied weight comes as two copies: one tensor again, as in the model
            names = {module: name for name, module in lm.named_modules()}
            head = f"{names[lm.get_output_embeddings()]}.weight"
            if head in full:
                full[head] = full[f"{names[lm.get_input_embeddings()]}.weight"]
        cast: dict[tuple, torch.Tensor] = {}  # by memory, so tied weights stay one tensor
        state = {}
        for name, t in full.items():
            if ".seer_gate." in f".{name}":
                continue
            key = (t.data_ptr(), t.shape)
            if key not in cast:
                cast[key] = t.to(self.save_dtype) if self.save_dtype and t.is_floating_point() else t
            state[name] = cast[key]
        lm.save_pretrained(folder, state_dict=state)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)
        apply_umask(folder)  # safetensors writes 0600
        save_gates(folder / "gates", lm, self.model_name, state=gate_state,
                   extra={"stage": "finetune", "global_step": self.global_step, "sparsity": vars(self.sparsity)})
        return folder


class ModelExport(L.Callback):
    """Writes the fine-tuned model and its gates (:meth:`Finetune.export`) when training ends."""

    def on_train_end(self, trainer, pl_module) -> None:
        folder = pl_module.export(pl_module.export_dir)  # every process: a sharded model is gathered
        if folder is not None:
            rank_zero_info(f"fine-tuned model: {folder} (gates: {folder / 'gates'})")
