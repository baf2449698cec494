"""``EvalConfig``: what ``python -m seer.eval`` measures and on what (Hydra group ``eval``; see :mod:`seer.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from seer.checks import fail, is_int

SPLITS = ("val", "all")


@dataclass
class EvalConfig:
    """Measures of a block selection, each at every length of ``seq_lens`` (tokens per window, start token
    included).

    Text: the documents of the ``data`` group's corpus, only its held-out share (``split=val``: the documents the
    training split by hash leaves out) or all of them (``split=all``: a corpus kept apart for evaluation, e.g. a
    novel never trained on). ``calibration_windows`` windows per length calibrate adaptive budgets; the next
    ``windows`` are evaluated (the two never overlap). ``batch_size``: windows (and RULER samples, left-padded)
    per forward.

    * ``perplexity``: exp of the mean next-token NLL over the windows (and of their second halves alone).
    * ``recall``: per layer, the share of true attention mass the selection keeps, and the oracle's at the same
      achieved density (costs a dense attention map per layer).
    * ``passkey``: cases (0: off) of a number hidden at ``passkey_depths`` of filler text and asked for at the end,
      spread over the lengths and depths; greedy answer checked. ``copy``: cases of a random ``copy_span``-token span
      placed early and repeated at the end; top-1 accuracy and NLL on the repeat.
    * ``timing`` (CUDA only): prefill time of selection (scoring + budget + index) and of attention, beside dense.
    * ``ruler``: RULER tasks (its names, or ``all`` for its 13; :mod:`seer.evaluation.ruler`), ``ruler_samples``
      samples of each at every length, generated with the model's tokenizer and answered greedily (sparse prefill,
      decode dense or through decode gates); scores 0-100. Needs ``pip install 'seer[ruler]'``.

    Dense is measured once per model, text and settings and cached (``dense_cache``).
    """

    seq_lens: list[int] = field(default_factory=lambda: [2048, 4096, 8192])
    windows: int = 8
    calibration_windows: int = 2
    split: str = "val"
    batch_size: int = 1
    perplexity: bool = True
    recall: bool = True
    passkey: int = 60
    passkey_depths: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    copy: int = 30
    copy_span: int = 32
    timing: bool = True
    dense_cache: bool = True
    seed: int = 0
    ruler: Any = field(default_factory=list)
    ruler_samples: int = 10

    def __post_init__(self) -> None:
        self.seq_lens = sorted(set(self.seq_lens))
        if not self.seq_lens or not all(is_int(n) and n >= 64 for n in self.seq_lens):
            fail("eval", "seq_lens", self.seq_lens, "must be window lengths of at least 64 tokens")
        for key, low in (("windows", 1), ("calibration_windows", 0), ("batch_size", 1), ("passkey", 0), ("copy", 0),
                         ("copy_span", 4)):
            if not is_int(getattr(self, key)) or getattr(self, key) < low:
                fail("eval", key, getattr(self, key), f"must be an integer >= {low}")
        if self.split not in SPLITS:
            fail("eval", "split", self.split, f"choose from {SPLITS}")
        self.passkey_depths = [float(d) for d in self.passkey_depths]
        if not self.passkey_depths or not all(0 <= d <= 1 for d in self.passkey_depths):
            fail("eval", "passkey_depths", self.passkey_depths, "must be depths in [0, 1] (share of the filler)")
        self._check_ruler()
        if self.copy and 4 * self.copy_span > min(self.seq_lens):
            fail("eval", "copy_span", self.copy_span, f"needs windows of at least 4 spans ({4 * self.copy_span} "
                 f"tokens); the shortest is {min(self.seq_lens)}")

    def _check_ruler(self) -> None:
        """``ruler`` as a list of RULER's task names (``all`` expanded); the extra that provides them installed."""
        from seer.evaluation.ruler import INSTALL_HINT, missing_extra, resolve_tasks

        if not is_int(self.ruler_samples) or self.ruler_samples < 1:
            fail("eval", "ruler_samples", self.ruler_samples, "must be an integer >= 1")
        try:
            self.ruler = resolve_tasks(self.ruler)
        except (TypeError, ValueError) as exc:
            fail("eval", "ruler", self.ruler, str(exc))
        if self.ruler and missing_extra():
            fail("eval", "ruler", self.ruler, f"RULER needs {' and '.join(missing_extra())}: {INSTALL_HINT}")
