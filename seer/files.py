"""Writing files so that a crash never leaves half of one: the one atomic-write helper of seer.

Gate checkpoints, calibrations, token caches, run summaries and Lightning checkpoints are all written through
:func:`atomic_write`: the content goes to a temporary file beside the target, which is then renamed over it
(``os.replace``, atomic on POSIX). The temporary file is created with mode ``0o666`` filtered by the process umask,
like any file a user creates, so colleagues sharing a cluster folder can read results when the umask allows it.
Files written by other libraries with a fixed mode (safetensors writes ``0o600``) get the same mode afterwards
(:func:`apply_umask`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Calls ``write(tmp)`` to fill a temporary file beside ``path``, then moves it to ``path``; on any error the
    temporary file is removed and ``path`` is left as it was. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # mode from the umask
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of a UTF-8 text."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def apply_umask(folder: str | os.PathLike) -> None:
    """Gives every file under ``folder`` the mode a new file gets from the process umask (``0o666`` filtered)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(folder).rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)
