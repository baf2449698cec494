"""The authors' kernels (microsoft/SeerAttention), loaded from a copy outside this repository, as baselines of the
kernel benchmarks. Nothing of the release is part of seer: a benchmark given ``--release-dir DIR`` imports
``seer_attn.kernels...`` from ``DIR`` (a checkout of the release, or the files the benchmark needs under the same
paths, e.g. ``.assets/release/``) and compares against it on the same inputs.

    git -C SeerAttention show HEAD:seer_attn/kernels/varlen/triton_sparse_gqa_decode_varlen_indice.py > ...
"""

from __future__ import annotations

import importlib
import pathlib
import sys


def load(release_dir: str, module: str):
    """The release module ``module`` (e.g. ``seer_attn.kernels.varlen.triton_sparse_gqa_decode_varlen_indice``)
    from ``release_dir``, which holds ``seer_attn/``; a one-line SystemExit when it is not there."""
    root = pathlib.Path(release_dir)
    path = root / (module.replace(".", "/") + ".py")
    if not path.is_file():
        sys.exit(f"--release-dir {release_dir!r} has no {path.relative_to(root)}")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(module)


def commit(release_dir: str) -> str:
    """The release commit the copy came from (the file ``COMMIT`` beside ``seer_attn/``), or ``unknown``."""
    f = pathlib.Path(release_dir) / "COMMIT"
    return f.read_text().strip()[:12] if f.is_file() else "unknown"
