"""What the command-line entry points (``seer.train``, ``seer.eval``, ``seer.generate``) share: a bad value is printed
as its message alone, without a traceback (``HYDRA_FULL_ERROR=1`` shows the whole trace), a run that fails before
writing anything leaves no folder behind, and sweeps are reported at the end (:func:`seer.sweeps.sweep_report`)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from hydra.errors import CompactHydraException

from seer.checks import ConfigError

HYDRA_FILES = (".hydra",)  # what Hydra writes into every run folder before the job starts


class BadInput(CompactHydraException):
    """A :class:`~seer.checks.ConfigError` as Hydra prints it: the message alone."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Re-raises a :class:`~seer.checks.ConfigError` as :class:`BadInput` (the original is its ``__cause__``). When
    the Hydra job fails, its run folder is removed if it holds nothing but what Hydra wrote before the job (its
    config and an empty log; a sweep's job folders stay: they receive the job's ``status.json``)."""
    try:
        yield
    except BaseException as exc:
        _remove_unused_run_folder()
        if isinstance(exc, ConfigError):
            raise BadInput(f"{type(exc).__name__}: {exc}") from exc
        raise


def _remove_unused_run_folder() -> None:
    from hydra.types import RunMode

    from seer.tracking import hydra_runtime

    hc = hydra_runtime()
    if hc is None or hc.mode == RunMode.MULTIRUN or not hc.runtime.get("output_dir"):
        return
    folder = Path(hc.runtime.output_dir)
    if folder.resolve() == Path.cwd().resolve() or not folder.is_dir():
        return
    empty_log = f"{hc.job.name}.log"
    if all(p.name in HYDRA_FILES or (p.name == empty_log and p.is_file() and p.stat().st_size == 0)
           for p in folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)
