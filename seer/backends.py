"""The one choice between the Triton kernels and the PyTorch reference, for every setting that makes it
(``stage.gt``, ``stage.kernel``, ``kernel`` of ``seer.eval`` / ``seer.generate`` and ``seer.load``)."""

from __future__ import annotations

import torch

from seer.checks import ConfigError

BACKENDS = ("auto", "triton", "reference")


def resolve_backend(key: str, requested: str, device: torch.device | str) -> str:
    """``triton`` or ``reference`` for the setting ``key=requested`` on ``device`` (``auto``: Triton on CUDA, the
    reference elsewhere); refuses another name, and Triton without a CUDA device (unless Triton's CPU interpreter
    is on, ``TRITON_INTERPRET=1``), naming ``key``."""
    if requested not in BACKENDS:
        raise ConfigError(f"{key}={requested!r}: choose from {BACKENDS}")
    on_cuda = torch.device(device).type == "cuda"
    if requested == "auto":
        return "triton" if on_cuda else "reference"
    if requested == "triton" and not on_cuda and not _triton_interpreter():
        raise ConfigError(f"{key}='triton' needs a CUDA GPU; use {key}=reference (or auto) on {torch.device(device)}")
    return requested


def _triton_interpreter() -> bool:
    from seer.kernels.common import INTERPRET

    return INTERPRET
