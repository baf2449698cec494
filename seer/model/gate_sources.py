"""Where gates come from: ``gates=`` of ``seer.load``, ``seer.eval`` and ``seer.generate`` resolved to a seer gate
folder (``gates.safetensors`` + ``gates.json``).

Accepted: a seer gate folder or its ``gates.safetensors`` (as written by ``seer.train`` or :mod:`seer.export`), a
SeerAttention release folder (converted once by :func:`seer.model.release.convert_release`), or a Hugging Face hub
id ``user/repo`` holding either, fetched with ``huggingface_hub`` (its cache only when ``HF_HUB_OFFLINE=1``); only
the gate files of a repo are fetched, never a model's weights.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from seer.checks import ConfigError
from seer.model.gate_io import META, WEIGHTS
from seer.model.release import CONFIG, WEIGHT_FILES, convert_release, is_release

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
HUB_FILES = [WEIGHTS, META, "calibration.json", CONFIG, "README.md", *WEIGHT_FILES]


def resolve_gates(value: str | os.PathLike, key: str = "gates") -> Path:
    """The seer gate folder (or ``gates.safetensors``) ``value`` stands for; ``key`` names the setting in errors."""
    path = Path(value).expanduser()
    if not path.exists() and isinstance(value, str) and HUB_ID.fullmatch(value):
        path = _from_hub(value, key)
    if path.is_dir() and not (path / WEIGHTS).is_file() and is_release(path):
        return convert_release(path)
    if path.is_dir() and not (path / WEIGHTS).is_file() and (path / CONFIG).is_file():
        raise ConfigError(f"{key}={str(value)!r}: holds a config.json but neither seer gates ({WEIGHTS}) nor a "
                          f"SeerAttention release (seerattn_* fields)")
    return path


def _from_hub(repo_id: str, key: str) -> Path:
    """The snapshot folder of ``repo_id``'s gate files (downloaded, or from the cache when offline)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=HUB_FILES))
    except Exception as exc:  # offline and not cached, no such repo, no network: one line naming the value
        offline = " (HF_HUB_OFFLINE is set: only the Hugging Face cache was searched)" \
            if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False") else ""
        raise ConfigError(f"{key}={repo_id!r}: no such folder here, and not available from the Hugging Face hub"
                          f"{offline}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
