"""Callbacks of the distill stage: gate export, images of gate scores beside ground truth, throughput, the run
summary, and atomic Lightning checkpoints."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from seer.files import atomic_write, atomic_write_text
from seer.model.gate_io import save_gates


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each Lightning checkpoint through :func:`seer.files.atomic_write` (a temporary file, then a rename), so
    a crash mid-write never leaves a truncated checkpoint. Lightning's own save is atomic too, through an fsspec
    transaction, but its temporary file is made by ``mkstemp`` and keeps mode 0600 after the rename; this one respects
    the umask, like every other file seer writes."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        atomic_write(path, lambda tmp: super(AtomicCheckpointIO, self).save_checkpoint(checkpoint, tmp,
                                                                                       storage_options))


class GateExport(L.Callback):
    """Writes ``gates.safetensors`` + ``gates.json`` (what ``seer.load`` reads) into ``dirpath`` whenever Lightning
    saves a checkpoint and when training ends."""

    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def _export(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            save_gates(self.dirpath, pl_module.model, pl_module.model_name,
                       extra={"global_step": trainer.global_step, "sparsity": vars(pl_module.sparsity)})

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._export(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._export(trainer, pl_module)


class GateImages(L.Callback):
    """Renders, for a few layers (head 0 of the first sequence), the row-normalised ground truth, the gate's
    softmax and the selected mask side by side; logs them to W&B, or saves PNGs under ``dirpath`` otherwise."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not pl_module.images or not trainer.is_global_zero:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        step = pl_module.images_step
        for layer, (target, probs, mask) in sorted(pl_module.images.items()):
            fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
            for ax, img, title in zip(axes, (target, probs, mask.float()), ("ground truth", "gate", "mask")):
                ax.imshow(img.float().numpy(), cmap="viridis", interpolation="nearest")
                ax.set_title(title)
                ax.set_xlabel("key block")
            axes[0].set_ylabel("query block")
            fig.suptitle(f"layer {layer}, head 0, step {step}")
            fig.tight_layout()
            logged = False
            for logger in trainer.loggers:
                if hasattr(logger, "log_image"):
                    logger.log_image(key=f"gates/layer_{layer:02d}", images=[fig], step=step)
                    logged = True
            if not logged:
                self.dirpath.mkdir(parents=True, exist_ok=True)
                fig.savefig(self.dirpath / f"layer{layer:02d}_step{step:05d}.png", dpi=80)
            plt.close(fig)
        pl_module.images = {}


class SpeedMonitor(L.Callback):
    """Training throughput: tokens per second after ``skip`` warm-up batches (logged as ``speed/tokens_per_s``) and
    peak GPU memory, both kept for the run summary."""

    def __init__(self, skip: int = 2):
        self.skip = skip
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.peak_bytes = 0
        self._start = 0.0

    def _sync(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        self.times.append(time.perf_counter() - self._start)
        self.tokens.append(int(batch["input_ids"].numel()))
        if pl_module.device.type == "cuda":
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(pl_module.device))
        if len(self.times) > self.skip:
            pl_module.log("speed/tokens_per_s", self.tokens[-1] / self.times[-1], batch_size=1)

    @property
    def tokens_per_s(self) -> float | None:
        t, n = self.times[self.skip:], self.tokens[self.skip:]
        return sum(n) / sum(t) if t and sum(t) > 0 else None

    @property
    def peak_mem_gib(self) -> float | None:
        return self.peak_bytes / 2**30 if self.peak_bytes else None


class RunSummary(L.Callback):
    """At the end of fit: loss at start and end, the last validation recall beside the oracle's, where the gates
    and the W&B run are. Printed and written to ``summary.json`` in ``dirpath``."""

    def __init__(self, dirpath: str, gates_dir: str, window: int = 5):
        self.dirpath, self.gates_dir, self.window = Path(dirpath), gates_dir, window
        self.summary: dict = {}

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        hist = pl_module.loss_history
        w = max(1, min(self.window, len(hist) // 2 or 1))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if isinstance(v, torch.Tensor)
                   and v.numel() == 1}
        wandb_dir = wandb_group = None
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                wandb_dir = str(Path(logger.experiment.dir).parent)
                wandb_group = logger.experiment.group
        self.summary = {
            "steps": trainer.global_step,
            "loss_start": sum(hist[:w]) / w if hist else None,
            "loss_end": sum(hist[-w:]) / w if hist else None,
            "sparsity": vars(pl_module.sparsity),
            "sparsity_policy": pl_module.sparsity.describe(),
            "val_density": metrics.get("val/density"),
            "val_recall": metrics.get("val/recall"),
            "val_oracle_recall": metrics.get("val/oracle_recall"),
            "gates": str(Path(self.gates_dir).resolve()),
            "wandb_run": wandb_dir,
            "wandb_group": wandb_group,
            "gt_source": pl_module.gt_source,
        }
        for cb in trainer.callbacks:
            if isinstance(cb, SpeedMonitor):
                self.summary.update(tokens_per_s=cb.tokens_per_s, peak_mem_gib=cb.peak_mem_gib)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.dirpath / "summary.json", json.dumps(self.summary, indent=2))
        print(format_summary(self.summary), flush=True)


def _fmt(x, spec=".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def format_summary(s: dict) -> str:
    return "\n".join([
        "",
        "=== seer: gate distillation finished ===",
        f"steps              {s['steps']}",
        f"loss (KL x scale)  {_fmt(s['loss_start'])} at start -> {_fmt(s['loss_end'])} at end",
        f"sparsity           {s['sparsity_policy']} (achieved density {_fmt(s['val_density'], '.3f')})",
        f"recall of attention mass on held-out data: gate {_fmt(s['val_recall'], '.3f')}, "
        f"oracle at the same density {_fmt(s['val_oracle_recall'], '.3f')}",
        f"gate checkpoint    {s['gates']}",
        f"W&B run            {s['wandb_run'] or 'not logged to W&B'}",
        f"throughput         {_fmt(s.get('tokens_per_s'), '.0f')} tokens/s"
        + (f", peak GPU memory {s['peak_mem_gib']:.1f} GiB" if s.get("peak_mem_gib") else ""),
        "",
    ])
