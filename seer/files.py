"""Writing files so that a crash never leaves half of one: the one atomic-write helper of seer.

Gate checkpoints, calibrations, token caches, run summaries and Lightning checkpoints are all written through
:func:`atomic_write`: the content goes to a temporary file beside the target, which is then renamed over it
(``os.replace``, atomic on POSIX). The temporary file is created with mode ``0o666`` filtered by the process umask,
like any file a user creates, so colleagues sharing a cluster folder can read results when the umask allows it.
Files written by other libraries with a fixed mode (safetensors writes ``0o600``) get the same mode afterwards
(:func:`apply_umask`). A temporary file left by a writer that was killed mid-write (on this machine: its name holds
the host and the process id) is removed by the next write of the same file.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from seer.checks import ConfigError

T = TypeVar("T")


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Calls ``write(tmp)`` to fill a temporary file beside ``path``, then moves it to ``path``; on any error the
    temporary file is removed and ``path`` is left as it was. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_temporaries(path)
    tmp = path.parent / f"{_temporary_prefix(path)}{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # mode from the umask
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.{socket.gethostname()}."


def _remove_abandoned_temporaries(path: Path) -> None:
    """Removes the temporary files of ``path`` whose writer, a process of this machine, no longer runs."""
    prefix = _temporary_prefix(path)
    for tmp in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid = tmp.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            tmp.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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


def read_json_records(path: str | os.PathLike, parse: Callable[[dict], T], kind: str) -> list[T]:
    """The records of the JSON list in ``path``, each made by ``parse`` (none when there is no such file); a
    :class:`~seer.checks.ConfigError` names a file that is not a ``kind`` file."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        return [parse(record) for record in json.loads(path.read_text())]
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not a {kind} file ({type(exc).__name__}: {exc}); move it away to calibrate "
                          f"again") from exc
