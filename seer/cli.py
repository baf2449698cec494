"""What the command-line entry points (``seer.train``, ``seer.generate``) share: a bad value is printed as its
message alone, without a traceback (``HYDRA_FULL_ERROR=1`` shows the whole trace), and sweeps are reported at the end
(:func:`seer.sweeps.sweep_report`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from hydra.errors import CompactHydraException

from seer.checks import ConfigError


class BadInput(CompactHydraException):
    """A :class:`~seer.checks.ConfigError` as Hydra prints it: the message alone."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Re-raises a :class:`~seer.checks.ConfigError` as :class:`BadInput` (the original is its ``__cause__``)."""
    try:
        yield
    except ConfigError as exc:
        raise BadInput(f"{type(exc).__name__}: {exc}") from exc
