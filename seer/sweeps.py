"""Sweeps (``-m``): what each job leaves in its folder and the report once every job has run.

* :class:`JobRecorder`, a Hydra callback (``conf/hydra/default.yaml``), writes ``status.json`` into every job's
  folder (``completed`` or ``failed`` with the error, and the job's overrides) and remembers the sweep folder.
* :func:`sweep_report`, a context manager around an entry point's ``@hydra.main``: after a sweep it lists every
  failed job (Hydra stops at the first), writes ``sweep.json`` (one row per job: overrides, status, results) into
  the sweep folder and, when the jobs logged to W&B, adds to their group a summary run whose table and scatter plots
  compare the jobs: every result whose name holds ``recall``, ``ppl`` or ``perplexity`` against the achieved
  ``density`` (a job's ``metrics.json`` key ``density``, else its training summary's ``val_density``).

Job results are read from the files the entry points write: ``summary.json`` (``seer.train``, one object) and
``metrics.json`` (``seer.eval``, a list of rows: one table row each).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from seer.files import atomic_write_text

STATUS = "status.json"
REPORT = "sweep.json"
RESULT_FILES = ("summary.json", "metrics.json")
PLOTTED = ("recall", "ppl", "perplexity")

_sweep_dirs: list[str] = []  # sweeps started in this process, set by JobRecorder.on_multirun_start


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # seer.load needs no Hydra
    _HydraCallback = object


class JobRecorder(_HydraCallback):
    """Writes ``status.json`` into each job's folder and remembers each sweep's folder (see the module docstring)."""

    def on_multirun_start(self, config, **kwargs) -> None:
        _sweep_dirs.append(str(Path(config.hydra.sweep.dir).resolve()))

    def on_job_end(self, config, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        if rank_zero_only.rank != 0:  # the other processes of a multi-GPU job
            return

        failed = job_return.status == JobStatus.FAILED
        error = job_return._return_value if failed else None  # .return_value re-raises a failure
        status = {"job": config.hydra.job.get("num"), "status": "failed" if failed else "completed",
                  "error": None if error is None else _describe(error),
                  "overrides": list(config.hydra.overrides.task)}
        folder = Path(config.hydra.runtime.output_dir)
        if not folder.is_dir():  # a failed single run whose unused folder was removed (seer.cli.user_errors)
            return
        atomic_write_text(folder / STATUS, json.dumps(status, indent=2))


def _describe(error: BaseException) -> str:
    """``Type: message`` of a job's error (a message already in that form, as :mod:`seer.cli` raises, as is)."""
    from hydra.errors import CompactHydraException

    return str(error) if isinstance(error, CompactHydraException) else f"{type(error).__name__}: {error}"


def _flat(prefix: str, node: Any, out: dict) -> dict:
    if isinstance(node, dict):
        for key, value in node.items():
            _flat(f"{prefix}.{key}" if prefix else key, value, out)
    else:
        out[prefix] = node
    return out


def _job_rows(sweep_dir: Path) -> list[dict]:
    """One row per job, or per row of its ``metrics.json`` when that holds several (``seer.eval``: one per length)."""
    rows = []
    for status_file in sorted(sweep_dir.glob(f"*/{STATUS}"), key=lambda p: (len(p.parent.name), p.parent.name)):
        job = json.loads(status_file.read_text())
        job["folder"] = str(status_file.parent)
        results = [{}]
        for name in RESULT_FILES:
            path = status_file.parent / name
            if path.is_file():
                loaded = json.loads(path.read_text())
                parts = [_flat("", part, {}) for part in (loaded if isinstance(loaded, list) else [loaded])]
                results = [{**r, **p} for r in results for p in parts]
        for result in results:
            row = {**result, **job}
            density = row.get("density", row.get("val_density"))
            if density is not None:
                row["density"] = density
            rows.append(row)
    return rows


def _log_group_run(rows: list[dict]) -> str | None:
    """A W&B run in the jobs' group with one table row per job and scatter plots against density."""
    logged = [r for r in rows if r.get("wandb_group") and r.get("wandb_project")]
    if not logged:
        return None
    import wandb

    from seer.tracking import start_wandb_run

    columns = ["job", "name", "status", "overrides", "density"]
    plotted = sorted({k for r in rows for k, v in r.items() if any(p in k for p in PLOTTED)
                      and isinstance(v, (int, float)) and not isinstance(v, bool)})
    table = wandb.Table(columns=columns + plotted)
    for r in rows:
        table.add_data(r.get("job"), r.get("wandb_name"), r["status"], " ".join(r.get("overrides", [])),
                       r.get("density"), *[r.get(k) for k in plotted])
    first = logged[0]
    sweep_dir = str(Path(first["folder"]).parent)
    run = start_wandb_run(project=first["wandb_project"], save_dir=sweep_dir, group=first["wandb_group"],
                          name=f"{first['wandb_group'].replace('/', '-')}-summary", job_type="sweep-summary",
                          config={"sweep.folder": sweep_dir, "sweep.jobs": len(rows),
                                  "sweep.failed": sum(r["status"] == "failed" for r in rows)})
    plots = {f"sweep/{y}_vs_density": wandb.plot.scatter(table, "density", y, title=f"{y} against achieved density")
             for y in plotted}
    run.log({"sweep/jobs": table, **plots})
    run.finish()
    return run.id


def report(sweep_dir: str | Path) -> list[dict]:
    """Lists the sweep's jobs (failed ones with their error) on stderr, writes ``sweep.json`` and the W&B summary
    run; returns the rows."""
    sweep_dir = Path(sweep_dir)
    rows = _job_rows(sweep_dir)
    if not rows:
        return rows
    atomic_write_text(sweep_dir / REPORT, json.dumps(rows, indent=2, default=str))
    failed = [r for r in rows if r["status"] == "failed"]
    lines = [f"=== sweep {sweep_dir}: {len(rows) - len(failed)} of {len(rows)} jobs completed ==="]
    lines += [f"FAILED job {r['job']} ({' '.join(r['overrides'])}): {r['error']}" for r in failed]
    try:
        run_id = _log_group_run(rows)
        if run_id:
            lines.append(f"W&B summary run {run_id} in group {rows[0].get('wandb_group')}")
    except Exception as exc:  # the report must not hide the sweep's own outcome
        lines.append(f"(no W&B summary run: {type(exc).__name__}: {exc})")
    print("\n".join(lines), file=sys.stderr, flush=True)
    return rows


@contextlib.contextmanager
def sweep_report() -> Iterator[None]:
    """Around an entry point: after each sweep it started (even one that ended with a failed job), :func:`report`."""
    before = len(_sweep_dirs)
    try:
        yield
    finally:
        for sweep_dir in _sweep_dirs[before:]:
            report(sweep_dir)
