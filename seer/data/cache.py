"""The token-row cache: packed rows saved on disk under a key that names everything they depend on.

The key hashes the corpus fingerprint, the tokenizer's identity and the packing settings; files are written to
a temporary name and moved into place (`seer.files.atomic_write`), so a reader never sees a half-written file
and concurrent writers of the same key leave one whole file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from seer.data.packing import PackedRows
from seer.files import atomic_write

_FORMAT_VERSION = 1  # bump when the packing rules change, so old files are not reused


def cache_key(**settings: Any) -> str:
    """A hex digest of the settings (JSON, keys sorted) and the cache format version."""
    payload = json.dumps(dict(settings, format_version=_FORMAT_VERSION), sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def cache_path(cache_dir: str | os.PathLike, key: str) -> Path:
    return Path(cache_dir) / f"rows-{key}.pt"


def load_rows(path: Path) -> PackedRows | None:
    """The rows stored at `path`, or None when there is no such file."""
    if not path.is_file():
        return None
    stored = torch.load(path, map_location="cpu", weights_only=True)
    return PackedRows(train=stored["train"], val=stored["val"], train_starts=stored.get("train_starts"),
                      val_starts=stored.get("val_starts"))


def save_rows(path: Path, rows: PackedRows, settings: dict[str, Any]) -> None:
    """Write `rows` (their document starts when kept, and the settings, for a human reading the folder) atomically
    to `path`."""
    stored = {"train": rows.train, "val": rows.val, "settings": json.dumps(settings, default=str)}
    if rows.train_starts is not None:
        stored.update(train_starts=rows.train_starts, val_starts=rows.val_starts)
    atomic_write(path, lambda tmp: torch.save(stored, tmp))
