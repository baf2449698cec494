"""Callbacks of a training run. They talk to each other only through what Lightning already carries (logged metrics, a
step's outputs, the trainer's state) and the files the run writes.

From ``conf/callbacks``: checkpoints, gate export, images of gate scores beside ground truth, the per-layer validation
table, a progress bar that counts steps (and progress lines when the output is piped). Added by
:func:`seer.training.run.run_training` to every run: validation at the last step, a stop at a step boundary on Ctrl-C,
the run's record in each checkpoint, calibration of the sparsity, the run summary; and atomic Lightning checkpoints (a
checkpoint IO plugin).
"""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import sys
import threading
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar

from seer.files import atomic_write, atomic_write_text

LAYER_METRIC = re.compile(r"val/layer_(\d+)/(\w+)")
LAYER_COLUMNS = ("recall", "oracle_recall", "density", "kl")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each Lightning checkpoint with ``torch.save`` through :func:`seer.files.atomic_write` (a temporary file,
    then a rename), so a crash mid-write never leaves a truncated checkpoint, and the file gets the umask's mode like
    every other file seer writes. (Lightning's own atomic save goes through an fsspec transaction, whose file mode
    comes from the umask fsspec saw first in the process.)"""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


class GateExport(L.Callback):
    """Writes ``gates.safetensors`` + ``gates.json`` (what ``seer.load`` reads) into ``dirpath`` whenever Lightning
    saves a checkpoint and when training ends."""

    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def _export(self, trainer, pl_module) -> None:
        state = pl_module.gate_state()  # on every rank: sharded gates (FSDP) are gathered collectively
        if trainer.is_global_zero:
            pl_module.save_gate_files(self.dirpath, state, {"global_step": trainer.global_step,
                                                            "sparsity": vars(pl_module.sparsity)})

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._export(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._export(trainer, pl_module)


class GateImages(L.Callback):
    """Renders the images a training step returns (``outputs["images"]``: per layer the row-normalised ground truth,
    the gate's softmax and the selected mask of head 0 of the first row) side by side, each with a colour bar and
    block indices on its axes; logs them to W&B, or saves PNGs under ``dirpath`` when no logger takes images."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        images = outputs.get("images") if isinstance(outputs, dict) else None
        if not images or not trainer.is_global_zero:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        step = images["step"]
        for layer, (target, probs, mask) in sorted(images["layers"].items()):
            fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
            panels = ((target, "ground truth (row share)"), (probs, "gate softmax"), (mask.float(), "mask (1 = kept)"))
            for ax, (img, title) in zip(axes, panels):
                shown = ax.imshow(img.float().numpy(), cmap="viridis", interpolation="nearest")
                fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
                ax.set_title(title)
                ax.set_xlabel("key block")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            axes[0].set_ylabel("query block")
            fig.suptitle(f"layer {layer}, head 0, step {step}")
            fig.tight_layout()
            logged = False
            for logger in trainer.loggers:
                if hasattr(type(logger), "log_image"):  # not DummyLogger, which answers every name
                    logger.log_image(key=f"gates/layer_{layer:02d}", images=[fig], step=step)
                    logged = True
            if not logged:
                self.dirpath.mkdir(parents=True, exist_ok=True)
                fig.savefig(self.dirpath / f"layer{layer:02d}_step{step:05d}.png", dpi=80)
            plt.close(fig)


def layer_metrics(metrics: dict) -> list[dict]:
    """Rows ``{"layer": i, "recall": ..., ...}`` of the per-layer validation metrics (``val/layer_XX/<name>``) in
    ``metrics`` (e.g. ``trainer.callback_metrics``), by layer."""
    rows: dict[int, dict] = {}
    for key, value in metrics.items():
        match = LAYER_METRIC.fullmatch(key)
        if match:
            rows.setdefault(int(match[1]), {"layer": int(match[1])})[match[2]] = float(value)
    return [rows[i] for i in sorted(rows)]


class LayerTable(L.Callback):
    """After each validation, a W&B table ``val/layers`` with one row per layer: recall, oracle recall, density, KL
    (from the per-layer metrics the module logs for callbacks)."""

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        rows = layer_metrics(trainer.callback_metrics)
        if not rows:
            return
        columns = ["layer", *LAYER_COLUMNS]
        data = [[row.get(c) for c in columns] for row in rows]
        for logger in trainer.loggers:
            if hasattr(type(logger), "log_table"):
                logger.log_table(key="val/layers", columns=columns, data=data, step=trainer.global_step)


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar for step-bounded training: ``epoch 2`` rather than ``Epoch 2/-2``, and the
    global step out of ``max_steps`` among the metrics."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is not None and self.trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        return f"epoch {current_epoch}"

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        if trainer.max_steps > 0:
            items = {"step": f"{trainer.global_step}/{trainer.max_steps}", **items}
        return items


class ProgressLines(L.Callback):
    """When the output is not a terminal (piped into a file or a job's log), where the progress bar shows nothing
    until the end: a line every ``every_n_steps`` optimizer steps and at the last (step, loss, tokens/s) and one
    after each validation (recall beside the oracle's, density). Silent on a terminal and on other ranks."""

    def __init__(self, every_n_steps: int = 10):
        self.every_n_steps = every_n_steps
        self._step = -1

    @staticmethod
    def _piped(trainer) -> bool:
        return trainer.is_global_zero and not sys.stdout.isatty()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._step or not self._piped(trainer):
            return
        self._step = step
        if step % self.every_n_steps and step != trainer.max_steps:
            return
        metrics = trainer.callback_metrics
        loss, speed = metrics.get("train/loss"), metrics.get("train/items_per_sec")
        print(f"[seer] step {step}/{trainer.max_steps}: loss {_fmt(_item(loss))}"
              + (f", {float(speed):.0f} tokens/s" if speed is not None else ""), flush=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not self._piped(trainer):
            return
        m = trainer.callback_metrics
        print(f"[seer] validation at step {trainer.global_step}: recall {_fmt(_item(m.get('val/recall')), '.3f')} "
              f"(oracle {_fmt(_item(m.get('val/oracle_recall')), '.3f')}), density "
              f"{_fmt(_item(m.get('val/density')), '.3f')}", flush=True)


def _item(value) -> float | None:
    return None if value is None else float(value)


class ValidateAtEnd(L.Callback):
    """Validates after the last step too (when validation is on), so the summary's recall and density describe the
    gates the run ends with, whatever ``trainer.val_check_interval`` is: it asks the trainer to stop after the last
    step, and Lightning validates before stopping."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


class Checkpoints(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (periodic checkpoints, ``last.ckpt``: with ``save_last="link"`` a link to the
    newest, no second copy of it), which also saves the step a run stops at: its last step, a Ctrl-C
    (:class:`StopOnInterrupt`), anything that sets ``trainer.should_stop``. It saves there as it saves periodic
    checkpoints, right after the optimizer step, so ``last.ckpt`` is always the newest checkpoint and resumes exactly
    (Lightning's own end-of-training save comes after validation, from a loop state that does not)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        stopping = trainer.should_stop or 0 < trainer.max_steps <= trainer.global_step
        if stopping and not self._should_skip_saving_checkpoint(trainer):  # skipped when this step is saved
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

    def on_train_end(self, trainer, pl_module) -> None:
        """Nothing: the last step was saved when it ended (the end of fit is not a point to resume from)."""


class StopOnInterrupt(L.Callback):
    """Ctrl-C (SIGINT) finishes the current optimizer step and stops the run there (``trainer.should_stop``, any
    process's Ctrl-C stopping all): :class:`Checkpoints` saves that step, validation, gate export and the summary still
    run. A second Ctrl-C raises ``KeyboardInterrupt`` at once, which Lightning handles as any interruption (its
    ``on_exception`` hooks, no checkpoint of the half-done step). ``stopped_at`` is the step stopped at, if any.
    (Lightning's ``OnExceptionCheckpoint`` saves wherever the interruption lands, mid-step: not a point to resume
    exactly from.)"""

    def __init__(self):
        self.requested = False
        self.stopped_at: int | None = None
        self._previous_handler = None
        self._step = -1

    def _on_sigint(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\n[seer] Ctrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again: stop now)",
              flush=True)

    def on_fit_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def _restore_handler(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def on_fit_end(self, trainer, pl_module) -> None:
        self._restore_handler()
        checkpoints = trainer.checkpoint_callback
        if self.stopped_at is not None and trainer.is_global_zero and checkpoints is not None:
            print(f"[seer] stopped at step {self.stopped_at}; resume with "
                  f"ckpt_path={Path(checkpoints.dirpath) / (checkpoints.CHECKPOINT_NAME_LAST + '.ckpt')}", flush=True)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore_handler()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step:  # still accumulating gradients: no whole step yet
            return
        self._step = trainer.global_step
        if self.stopped_at is None and trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            self.stopped_at = trainer.global_step
            trainer.should_stop = True


class RunRecord(L.Callback):
    """Stores ``record`` (the run's flat config and W&B identity) in every checkpoint as ``checkpoint["seer"]``, which
    :func:`seer.training.resume.read_resume` checks a resumed run against."""

    def __init__(self, record: dict):
        self.record = record

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        from seer.training.resume import CHECKPOINT_KEY

        checkpoint[CHECKPOINT_KEY] = self.record


class GateCalibration(L.Callback):
    """At the end of training, calibrates the knob of a calibrated budget (``sparsity.calibrated``: threshold or
    top-p with a ``target_density``) on the gate scores of the validation rows (the batches validation uses; all
    validation rows when validation is off; re-fitted on the gates' scores with the model running sparse
    ``sparsity.calibration_rounds`` times) and writes it beside the gates (``calibration.json``), where
    ``seer.load`` finds it: in ``gates_dir`` and, for a stage that exports a model folder (``pl_module.export_dir``),
    beside the exported gates too. Every process runs the model (sharded models need all); rank 0 writes."""

    def __init__(self, gates_dir: str, sparsity):
        self.gates_dir, self.sparsity = gates_dir, sparsity

    @torch.no_grad()
    def on_train_end(self, trainer, pl_module) -> None:
        from seer.sparsity.calibration import calibrate_in_rounds, save_calibration

        limit = trainer.num_val_batches[0] if trainer.num_val_batches and trainer.num_val_batches[0] else None
        model = getattr(pl_module, "lm", pl_module.model)  # the Hugging Face model, inside a peft wrapper if any
        seq_len = 0

        def observe(under):  # the validation rows, dense (under None) or sparse under a calibration
            nonlocal seq_len
            sparse = {} if under is None else dict(sparse=True, sparsity=self.sparsity, calibration=under)
            with model.seer_context.observing(want_mass=self.sparsity.allocation == "oracle", **sparse) as observed:
                for i, batch in enumerate(trainer.datamodule.val_dataloader()):
                    if limit is not None and i >= limit:
                        break
                    ids = batch["input_ids"].to(pl_module.device)
                    seq_len = ids.shape[1]
                    # under the training precision (autocast for bf16-mixed): the scores training saw, and dense
                    # attention in bfloat16 (float32 master weights would give float32 Q/K/V, which SDPA's flash
                    # kernel does not take)
                    with trainer.precision_plugin.forward_context():
                        model.base_model(input_ids=ids, use_cache=False)
            return observed.scores(), observed.masses()

        calibration = calibrate_in_rounds(observe, self.sparsity, model.seer_context.scorer_name)
        calibration = dataclasses.replace(calibration, seq_len=seq_len)  # the rows' length, known once observed
        if trainer.is_global_zero:
            export = getattr(pl_module, "export_dir", None)
            for folder in [self.gates_dir] + ([Path(export) / "gates"] if export is not None else []):
                save_calibration(folder, calibration)


class DecodeGateCalibration(L.Callback):
    """At the end of decode-gate distillation with a calibrated budget (``stage.decode_sparsity.target_density``):
    fits its threshold on the decode gates' scores of the validation rows (the batches validation uses; all of them
    when validation is off; :meth:`~seer.training.distill_decode.DecodeGateDistillation.decode_scores`) and writes it
    beside the decode gates (``decode_calibration.json``), where ``seer.load`` finds it. Every process runs the
    model; rank 0 writes."""

    def __init__(self, gates_dir: str, budget, block_size: int):
        self.gates_dir, self.budget, self.block_size = gates_dir, budget, block_size

    @torch.no_grad()
    def on_train_end(self, trainer, pl_module) -> None:
        from seer.sparsity.decode import fit_decode_calibration, save_decode_calibration

        limit = trainer.num_val_batches[0] if trainer.num_val_batches and trainer.num_val_batches[0] else None
        scores, seqlens, seq_len = [], [], 0
        for i, batch in enumerate(trainer.datamodule.val_dataloader()):
            if limit is not None and i >= limit:
                break
            ids = batch["input_ids"].to(pl_module.device)
            seq_len = max(seq_len, ids.shape[1])
            with trainer.precision_plugin.forward_context():
                batch_scores, batch_lengths = pl_module.decode_scores(ids)
            scores.append(batch_scores)
            seqlens.append(batch_lengths)
        width = max(s.shape[-1] for s in scores)  # rows of other lengths: no blocks past their end
        scores = torch.cat([torch.nn.functional.pad(s, (0, width - s.shape[-1]), value=float("-inf")) for s in scores])
        calibration = fit_decode_calibration(scores, torch.cat(seqlens), self.budget, self.block_size, seq_len)
        if trainer.is_global_zero:
            save_decode_calibration(self.gates_dir, calibration)


class RunSummary(L.Callback):
    """At the end of fit: loss at start and end, the last validation (its step, recall beside the oracle's, density,
    and per layer), the calibrated knob, throughput (from the logged ``train/items_per_sec``) and peak GPU memory,
    where the gates, checkpoints and W&B run are. Printed, written to ``summary.json`` in ``dirpath`` and, on W&B,
    put in the run's summary with the gates folder and ``summary.json`` as an artifact."""

    def __init__(self, dirpath: str, gates_dir: str, window: int = 5):
        self.dirpath, self.gates_dir, self.window = Path(dirpath), gates_dir, window
        self.val_step: int | None = None
        self.summary: dict = {}

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.val_step = trainer.global_step

    def _calibration(self, sparsity, scorer: str) -> dict | None:
        from seer.sparsity.calibration import find_calibration

        if not sparsity.calibrated:
            return None
        try:
            cal = find_calibration(self.gates_dir, sparsity, scorer)
        except ValueError:
            return None
        knobs = sorted({v for layer in cal.knobs.values() for v in layer})
        return {"density": cal.density, "rows": cal.rows, "seq_len": cal.seq_len,
                "knob": knobs[0] if len(knobs) == 1 else None, "knob_range": [knobs[0], knobs[-1]]}

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        hist = getattr(pl_module, "loss_history", [])
        w = max(1, min(self.window, len(hist) // 2 or 1))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if isinstance(v, torch.Tensor)
                   and v.numel() == 1}
        logged = trainer.logged_metrics
        tokens_per_s = logged.get("train/items_per_sec", logged.get("train/device/items_per_sec"))
        device = trainer.strategy.root_device  # this process's device (a stage's module may report "cpu")
        wandb_runs = [lg.experiment for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]
        run = wandb_runs[0] if wandb_runs else None
        self.summary = {
            "status": "stopped early" if 0 < trainer.max_steps and trainer.global_step < trainer.max_steps
            else "completed",
            "steps": trainer.global_step,
            "max_steps": trainer.max_steps,
            "loss_start": sum(hist[:w]) / w if hist else None,
            "loss_end": sum(hist[-w:]) / w if hist else None,
            "sparsity": vars(pl_module.sparsity),
            "sparsity_policy": pl_module.sparsity.describe(),
            "val_step": self.val_step,
            "val_density": metrics.get("val/density"),
            "val_recall": metrics.get("val/recall"),
            "val_oracle_recall": metrics.get("val/oracle_recall"),
            "val_loss": metrics.get("val/loss"),
            "val_layers": layer_metrics(metrics),
            "calibration": self._calibration(pl_module.sparsity, getattr(pl_module, "lm", pl_module.model)
                                             .seer_context.scorer_name),
            "gates": str(Path(self.gates_dir).resolve()),
            "checkpoints": str(Path(trainer.checkpoint_callback.dirpath).resolve())
            if trainer.checkpoint_callback is not None else None,
            "wandb_run": str(Path(run.dir).parent) if run is not None else None,
            "wandb_project": run.project if run is not None else None,
            "wandb_id": run.id if run is not None else None,
            "wandb_name": run.name if run is not None else None,
            "wandb_group": (run.group or None) if run is not None else None,
            "gt_source": getattr(pl_module, "gt_source", None),
            "tokens_per_s": float(tokens_per_s) if tokens_per_s is not None else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        }
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = atomic_write_text(self.dirpath / "summary.json", json.dumps(self.summary, indent=2))
        if run is not None:
            self._to_wandb(run, path)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        """Prints the summary once the progress bar has closed (it tears down before this callback)."""
        if self.summary and trainer.is_global_zero and stage == "fit":
            print(format_summary(self.summary), flush=True)

    def _to_wandb(self, run, summary_path: Path) -> None:
        import wandb

        scalars = {k: v for k, v in self.summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        run.summary.update({f"summary/{k}": v for k, v in scalars.items()})
        run.config.update({"achieved.density": self.summary["val_density"],
                           "achieved.calibrated_density": (self.summary["calibration"] or {}).get("density")},
                          allow_val_change=True)
        artifact = wandb.Artifact(f"gates-{run.id}", type="gates",
                                  metadata={k: v for k, v in self.summary.items() if k != "val_layers"})
        artifact.add_dir(self.gates_dir, name="gates")
        artifact.add_file(str(summary_path), name="summary.json")
        run.log_artifact(artifact, aliases=["latest", f"step{self.summary['steps']}"])


def _fmt(x, spec=".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def format_summary(s: dict) -> str:
    if s["val_step"] is None:
        validation = "held-out recall    n/a (no validation ran: trainer.limit_val_batches=0 or no validation rows)"
    else:
        validation = (f"recall of attention mass on held-out data at step {s['val_step']}: gate "
                      f"{_fmt(s['val_recall'], '.3f')}, oracle at the same density "
                      f"{_fmt(s['val_oracle_recall'], '.3f')}")
    cal = s.get("calibration")
    calibrated = "" if not cal else (
        f"\ncalibrated         knob {_fmt(cal['knob'], '.3g') if cal['knob'] is not None else 'per head'} -> "
        f"density {cal['density']:.3f} on {cal['rows']} validation rows (calibration.json beside the gates)")
    return "\n".join([
        "",
        "=== seer: gate distillation " + ("finished ===" if s["status"] == "completed" else
                                          f"stopped at step {s['steps']} of {s['max_steps']} ==="),
        f"steps              {s['steps']}",
        f"loss (KL x scale)  {_fmt(s['loss_start'])} at start -> {_fmt(s['loss_end'])} at end",
        f"sparsity           {s['sparsity_policy']} (achieved density {_fmt(s['val_density'], '.3f')})" + calibrated,
        validation,
        f"gate checkpoint    {s['gates']}",
        f"W&B run            {s['wandb_name'] + ' in ' + s['wandb_run'] if s['wandb_run'] else 'not logged to W&B'}",
        "throughput         "
        + (f"{s['tokens_per_s']:.0f} tokens/s" if s.get("tokens_per_s") else "n/a (too few steps to measure)")
        + (f", peak GPU memory {s['peak_mem_gib']:.1f} GiB" if s.get("peak_mem_gib") else ""),
        "",
    ])


def batch_rows(batch: dict) -> int:
    """Rows in a batch (``ThroughputMonitor``'s ``batch_size_fn``)."""
    return int(batch["input_ids"].shape[0])


def batch_tokens(batch: dict) -> int:
    """Tokens in a batch (``ThroughputMonitor``'s ``length_fn``: its items per second are tokens per second)."""
    return int(batch["input_ids"].numel())
