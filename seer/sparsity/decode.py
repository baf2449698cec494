"""Decode budgets (SeerAttention-R): which key blocks a decoding token's KV head attends to.

A decoding token at position ``p`` (``seqlen = p + 1`` valid keys) scores the blocks ``0..(p // block_size)``;
per KV head (its query heads share the choice) the budget keeps:

* ``token_budget``: the top-scoring blocks up to ``token_budget`` tokens (``token_budget // block_size`` blocks,
  the forced blocks counted among them, and kept even when they alone exceed it);
* ``threshold``: the blocks whose softmax share of the token's scores reaches ``threshold``; with
  ``target_density`` the threshold is calibrated (:func:`calibrate_decode_threshold`) so that the kept share of
  valid blocks, averaged over tokens and heads, reaches it;
* ``dense``: every valid block.

With ``estimate="quest"`` the scores are not the gate's logits alone but the log of a mixture of two block
distributions over the token's valid blocks, ``(1 - w) * softmax(gate) + w * softmax(quest)``, ``w =
estimate_weight`` (:func:`mix_estimate`): Quest's bounds (Tang et al., 2024: per block the elementwise min and max of
its post-RoPE keys bound ``q.k`` from above, :func:`~seer.model.decode_cache.key_bound_scores`) as a training-free,
query-aware estimate, the largest bound over a KV head's query heads; ``w = 1`` is Quest alone (the gate not
consulted). ``estimate="quest_mass"`` pools the group's heads differently: each head's bounds become a softmax over
the blocks first, and the group's estimate is their mean (a head with larger logits no longer decides alone).
``estimate="moments"`` scores by the first two moments of each block's post-RoPE keys instead (their per-channel
mean and variance, kept instead of the bounds as float32 sums of the keys and of their squares: two vectors per
block, twice the bf16 bounds' bytes): each head's block mass as if the block's
logits were Gaussian, ``log n + s q.mu + s^2/2 sum_d q_d^2 var_d``, pooled over the group as ``quest_mass``
(:func:`~seer.model.decode_cache.key_moment_scores`). ``estimate="oracle"`` is the yardstick: each block's true share
of the token's attention, averaged over the group's heads, from every key in the KV cache
(:func:`~seer.model.decode_cache.true_block_scores`): what a perfect ranking keeps at a budget, at dense decode's
cost. With ``rerank_blocks`` C > 0 the top C blocks by those scores are ranked again by their true share of the
token's attention over their own keys (the prefill's rerank, for one token:
:func:`~seer.model.decode_cache.reranked_block_scores`), the others below them: C x block_size keys read per KV head
and step, no more. The budgets then read those log-probabilities as they read gate logits
(a top-k is order-only; the threshold's softmax of them is the mixture itself).

The newest (partial) block is always kept; the first block too when ``first_block``; with ``recent_blocks`` R > 0 the
R full blocks before the newest (a local window of the last ``R x block_size`` to ``(R + 1) x block_size`` tokens,
which prose continuation leans on most); and with ``prompt_blocks`` P > 0,
per KV head the P blocks of the prompt that its last block of queries attended most in the prefill (SnapKV's
observation window: the question at the end of a prompt points at what the answer will need; the first block is left
out of the choice when it is kept anyway). They are pinned for the whole generation
(:func:`~seer.model.decode_cache.prompt_block_pins`), counted in a token budget like the other kept blocks.
:func:`decode_block_index` lists the kept blocks as the decode kernel reads them: ``[B, Hkv, S]`` int32, ascending,
padded with -1, ``S`` a width fixed on the host (:meth:`DecodeSparsityConfig.max_kept_blocks`), so that a decode step
reads nothing back from the device. A decode step gets that list and its density at once from
:func:`decode_step_blocks` (a token budget's list straight from ``topk``, in few device operations). With ``compile``
(default false) the tensor work of a one-token sparse decode step of a layer (compressed-K cache update, gate scores,
this block list and density, the density sums: :func:`seer.model.decode.sparse_decode_step`) runs through
``torch.compile`` (inductor, static shapes, one graph; compiled at the first step, which must run eagerly before a
CUDA-graph capture): fewer, fused kernels instead of some 70 small ones a layer. It changes how a step runs, not which
blocks it keeps.

A calibrated threshold is stored beside the decode gates (``decode_calibration.json``, written at the end of
``stage=distill_decode``) as a :class:`DecodeCalibration`; :func:`find_decode_calibration` finds it again for
``seer.load(..., decode_sparsity={"method": "threshold", "target_density": ...})``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from seer.checks import ConfigError, build, fail, is_int, is_number
from seer.files import atomic_write_text, read_json_records

DECODE_METHODS = ("token_budget", "threshold", "dense")
# training-free block scores a decode step can mix into the gate's: Quest's bounds, each pooled over a KV head's query
# heads as named here (seer.model.decode_cache.key_bound_scores), the keys' moments, and the oracle (the yardstick)
ESTIMATE_GROUPS = {"quest": "max", "quest_mass": "mass"}
DECODE_ESTIMATES = (*ESTIMATE_GROUPS, "moments", "oracle")
CALIBRATION_FILE = "decode_calibration.json"


@dataclass
class DecodeSparsityConfig:
    """A decode budget (see the module docstring)."""

    method: str = "token_budget"
    token_budget: int = 2048
    threshold: float = 0.01
    target_density: Optional[float] = None
    first_block: bool = True
    estimate: Optional[str] = None
    estimate_weight: float = 0.5
    prompt_blocks: int = 0
    recent_blocks: int = 0
    rerank_blocks: int = 0
    compile: bool = False

    def __post_init__(self) -> None:
        if self.method not in DECODE_METHODS:
            fail("decode_sparsity", "method", self.method, f"choose from {DECODE_METHODS}")
        if not is_int(self.token_budget) or self.token_budget < 1:
            fail("decode_sparsity", "token_budget", self.token_budget, "is a number of tokens; must be an integer >= 1")
        if not is_number(self.threshold) or not 0 <= self.threshold <= 1:
            fail("decode_sparsity", "threshold", self.threshold, "is a softmax share; must be in [0, 1]")
        if self.target_density is not None and (not is_number(self.target_density)
                                                or not 0 < self.target_density <= 1):
            fail("decode_sparsity", "target_density", self.target_density,
                 "is the kept share of valid blocks; must be in (0, 1]")
        if self.target_density is not None and self.method != "threshold":
            fail("decode_sparsity", "target_density", self.target_density,
                 f"calibrates the threshold method; method={self.method!r} takes none (use null)")
        if self.estimate is not None and self.estimate not in DECODE_ESTIMATES:
            fail("decode_sparsity", "estimate", self.estimate,
                 f"choose a training-free estimate from {DECODE_ESTIMATES} (or null: the gate alone)")
        if not is_number(self.estimate_weight) or not 0 < self.estimate_weight <= 1:
            fail("decode_sparsity", "estimate_weight", self.estimate_weight,
                 "is the estimate's share of the mixed block probabilities; must be in (0, 1] (1: the estimate alone)")
        if not is_int(self.prompt_blocks) or self.prompt_blocks < 0:
            fail("decode_sparsity", "prompt_blocks", self.prompt_blocks,
                 "is a number of key blocks kept from the prompt's end (0: none); must be an integer >= 0")
        if not is_int(self.recent_blocks) or self.recent_blocks < 0:
            fail("decode_sparsity", "recent_blocks", self.recent_blocks,
                 "is a number of key blocks kept before the newest (0: none); must be an integer >= 0")
        if not is_int(self.rerank_blocks) or self.rerank_blocks < 0:
            fail("decode_sparsity", "rerank_blocks", self.rerank_blocks,
                 "is a number of candidate blocks scored again exactly (0: none); must be an integer >= 0")
        if self.prompt_blocks and self.target_density is not None:
            fail("decode_sparsity", "prompt_blocks", self.prompt_blocks,
                 "a calibrated threshold (target_density) is fitted without prompt blocks; give 0, or a threshold "
                 "or token budget")
        if not isinstance(self.compile, bool):
            fail("decode_sparsity", "compile", self.compile,
                 "is true or false (run each decode step's gate and block selection through torch.compile)")

    @property
    def reads_keys(self) -> bool:
        """Whether a decode step reads keys of the KV cache to score blocks (the oracle, or a rerank)."""
        return self.estimate == "oracle" or self.rerank_blocks > 0

    @property
    def calibrated(self) -> bool:
        return self.method == "threshold" and self.target_density is not None

    def stored(self) -> dict:
        """The budget's fields as files keep them (gates, calibrations): without ``compile``, how a run executes
        it, which a file must not switch on for its readers."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "compile"}

    def describe(self) -> str:
        """The budget in a few words (what messages and result tables name)."""
        first = "" if self.first_block else ", no first block"
        if self.recent_blocks:
            first += f", {self.recent_blocks} recent blocks"
        if self.prompt_blocks:
            first += f", {self.prompt_blocks} prompt blocks"
        if self.estimate is not None:
            first += f", {self.estimate}@{self.estimate_weight:g}"
        if self.rerank_blocks:
            first += f", reranked over {self.rerank_blocks} blocks"
        if self.method == "token_budget":
            return f"token_budget={self.token_budget}{first}"
        if self.method == "threshold":
            knob = f"target_density={self.target_density}" if self.calibrated else f"threshold={self.threshold}"
            return f"threshold {knob}{first}"
        return "dense"

    def max_kept_blocks(self, num_blocks: int, block_size: int) -> int:
        """The most blocks a head keeps when the longest sequence has ``num_blocks`` blocks: a bound known on the
        host, the width of :func:`decode_block_index` (``token_budget // block_size``, or the forced blocks when
        they are more, at most ``num_blocks``; every valid block for the other methods)."""
        if self.method != "token_budget":
            return num_blocks
        forced = 1 + self.first_block + self.recent_blocks + self.prompt_blocks
        return min(num_blocks, max(self.token_budget // block_size, forced))

    def check_training_free(self) -> None:
        """Refuses a budget that needs decode gates, for decode without them (:func:`seer.model.decode.
        attach_quest_decode`): the blocks are scored by the estimate alone (``estimate="quest"``,
        ``estimate_weight=1``), and a calibrated threshold is stored only beside decode gates."""
        if self.estimate is None:
            fail("decode_sparsity", "estimate", None, "sparse decode without decode gates scores the blocks by a "
                 "training-free estimate: give estimate=quest and estimate_weight=1, or decode gates")
        if self.estimate_weight != 1:
            fail("decode_sparsity", "estimate_weight", self.estimate_weight, "without decode gates the estimate scores "
                 "alone: give 1 (a mixture needs decode gates)")
        if self.calibrated:
            fail("decode_sparsity", "target_density", self.target_density, "a calibrated threshold is stored beside "
                 "decode gates; without them give a threshold or a token budget")

    def check_block_size(self, block_size: int) -> None:
        """Refuses a token budget below one block of ``block_size`` tokens, or fewer rerank candidates than it holds."""
        if self.method == "token_budget" and self.token_budget < block_size:
            fail("decode_sparsity", "token_budget", self.token_budget,
                 f"is below one block ({block_size} tokens); the budget is whole blocks")
        if self.method == "token_budget" and 0 < self.rerank_blocks < self.token_budget // block_size:
            fail("decode_sparsity", "rerank_blocks", self.rerank_blocks,
                 f"candidates are fewer than the {self.token_budget}-token budget's {self.token_budget // block_size} "
                 f"blocks of {block_size} tokens; give at least that many (or 0: no rerank)")


def mix_estimate(gate_scores: torch.Tensor | None, estimate_scores: torch.Tensor, weight: float) -> torch.Tensor:
    """Block log-probabilities ``[R, Hkv, nb]`` (float32) of the mixture ``(1 - weight) * softmax(gate_scores) +
    weight * softmax(estimate_scores)`` over each token's valid blocks (both ``-inf`` after its newest, which stay
    ``-inf``), as ``logaddexp(log(1 - w) + log_softmax(gate), log(w) + log_softmax(estimate))`` (no probability
    underflows to ``log 0``). ``weight`` 1: ``log_softmax(estimate_scores)``, ``gate_scores`` unused (None)."""
    estimate = torch.log_softmax(estimate_scores.float(), dim=-1)
    if weight == 1:
        return estimate
    gate = torch.log_softmax(gate_scores.float(), dim=-1)
    return torch.logaddexp(gate + math.log(1 - weight), estimate + math.log(weight))


def decode_block_mask(scores: torch.Tensor, seqlens: torch.Tensor, sparsity: DecodeSparsityConfig, block_size: int,
                      threshold: float | None = None, validate: bool = True) -> torch.Tensor:
    """Kept blocks ``[R, Hkv, nb]`` (bool) of ``R`` decoding tokens from their scores ``[R, Hkv, nb]`` and valid key
    counts ``seqlens [R]`` (the token included). ``threshold``: the calibrated knob of a calibrated budget.
    ``validate``: check that ``seqlens`` are in ``[1, nb * block_size]``, which reads them on the host (a
    synchronisation when they are on the device); decode steps, whose lengths the cache keeps, skip it."""
    _check_scores(scores, seqlens, sparsity, block_size, threshold, validate)
    newest = _newest_block(seqlens.to(scores.device), block_size)
    if sparsity.method == "token_budget":
        listed = _top_blocks(scores, newest, sparsity, block_size)
        nb = scores.shape[-1]
        return torch.zeros(*scores.shape[:2], nb + 1, dtype=torch.bool, device=scores.device).scatter_(
            -1, listed.masked_fill(listed < 0, nb), True)[..., :nb]
    return _mask_blocks(scores, newest, sparsity, threshold)


def decode_step_blocks(scores: torch.Tensor, newest: torch.Tensor, sparsity: DecodeSparsityConfig, block_size: int,
                       threshold: float | None = None,
                       pinned: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What one decode step needs, in few device operations and no host read: the block list of
    :func:`decode_block_index` (width :meth:`DecodeSparsityConfig.max_kept_blocks`) of the blocks
    :func:`decode_block_mask` keeps (its input checks but ``validate``), and their :func:`decode_density` (0-dim). It
    takes each token's own block ``newest [R]`` (int64, on the scores' device; ``(seqlen - 1) // block_size``), which
    the step already has (:func:`~seer.model.decode_cache.step_keys`), instead of the lengths. A token budget lists
    its top-scoring blocks straight from ``topk``, with no ``[R, Hkv, nb]`` mask. ``pinned [R, Hkv, nb]`` (bool): the
    prompt blocks kept at every step (``prompt_blocks``), or None."""
    _check_scores(scores, newest, sparsity, block_size, threshold, validate=False)
    newest = newest[:, None, None]
    if sparsity.method == "token_budget":
        listed = _top_blocks(scores, newest, sparsity, block_size, pinned)
        kept = listed.shape[-1] - (listed < 0).sum(-1)
    else:
        mask = _mask_blocks(scores, newest, sparsity, threshold, pinned)
        listed = decode_block_index(mask, sparsity.max_kept_blocks(scores.shape[-1], block_size))
        kept = mask.sum(-1)
    return listed, (kept / (newest[..., 0] + 1)).mean()


def _check_scores(scores: torch.Tensor, per_token: torch.Tensor, sparsity: DecodeSparsityConfig, block_size: int,
                  threshold: float | None, validate: bool) -> None:
    """Input checks; ``per_token [R]``: the tokens' lengths (with ``validate``: checked to be in ``[1, nb *
    block_size]``, read on the host) or their newest blocks."""
    sparsity.check_block_size(block_size)
    if scores.dim() != 3 or per_token.shape != scores.shape[:1]:
        raise ValueError(f"scores must be [R, Hkv, nb] with one length or block per token [R]; got "
                         f"{tuple(scores.shape)} and {tuple(per_token.shape)}")
    nb = scores.shape[-1]
    if validate and per_token.numel() and (int(per_token.min()) < 1 or int(per_token.max()) > nb * block_size):
        raise ValueError(f"seqlens must be in [1, {nb * block_size}] for {nb} blocks of {block_size}; got "
                         f"{per_token.min().item()}..{per_token.max().item()}")
    if sparsity.calibrated and threshold is None:
        raise ValueError(f"decode_sparsity.target_density={sparsity.target_density} needs its calibrated threshold "
                         "(calibrate_decode_threshold)")


def _newest_block(seqlens: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[R, 1, 1]``: each token's own (newest) block."""
    return ((seqlens - 1) // block_size)[:, None, None]


def _forced_blocks(blocks: torch.Tensor, newest: torch.Tensor, sparsity: DecodeSparsityConfig,
                   pinned: torch.Tensor | None = None) -> torch.Tensor:
    """``[R, 1, nb]`` (``[R, Hkv, nb]`` with ``pinned``): the blocks kept whatever their score (the newest, the first
    with ``first_block``, the ``recent_blocks`` before the newest, and the ``pinned [R, Hkv, nb]`` prompt blocks)."""
    forced = (blocks <= newest) & (blocks >= newest - sparsity.recent_blocks)
    if sparsity.first_block:
        forced[..., 0] = True
    return forced if pinned is None else forced | pinned


def _top_blocks(scores: torch.Tensor, newest: torch.Tensor, sparsity: DecodeSparsityConfig, block_size: int,
                pinned: torch.Tensor | None = None) -> torch.Tensor:
    """A token budget's kept blocks as an ascending int32 list ``[R, Hkv, width]`` padded with -1: the forced
    blocks and the best-scoring valid ones, ``width`` (:meth:`DecodeSparsityConfig.max_kept_blocks`) in all."""
    nb = scores.shape[-1]
    blocks = torch.arange(nb, device=scores.device)
    ranked = scores.float().masked_fill(blocks > newest, float("-inf")).masked_fill(
        _forced_blocks(blocks, newest, sparsity, pinned), float("inf"))
    top = ranked.topk(sparsity.max_kept_blocks(nb, block_size), dim=-1).indices.sort(dim=-1).values
    return top.masked_fill(top > newest, -1).to(torch.int32)  # fewer valid blocks than the width: -1 after them


def _mask_blocks(scores: torch.Tensor, newest: torch.Tensor, sparsity: DecodeSparsityConfig,
                 threshold: float | None, pinned: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`decode_block_mask` of the ``dense`` and ``threshold`` methods."""
    blocks = torch.arange(scores.shape[-1], device=scores.device)
    after = blocks > newest
    if sparsity.method == "dense":
        return (~after).expand(scores.shape).clone()
    tau = sparsity.threshold if threshold is None else threshold
    probs = torch.softmax(scores.float().masked_fill(after, float("-inf")), dim=-1)
    return (probs >= tau).masked_fill_(after, False) | _forced_blocks(blocks, newest, sparsity, pinned)


def decode_block_index(mask: torch.Tensor, width: int) -> torch.Tensor:
    """The kept blocks of ``mask [B, Hkv, nb]`` as the decode kernel's ``block_index [B, Hkv, width]`` int32:
    ascending block ids, then -1 (which the kernel skips). ``width`` (>= 1) is fixed by the caller on the host, at
    least the most blocks any head keeps (:meth:`DecodeSparsityConfig.max_kept_blocks`; blocks past it are dropped,
    unchecked), so nothing is read back from the device."""
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an int >= 1 (list entries per head), got {width!r}")
    nb = mask.shape[-1]
    blocks = torch.arange(nb, device=mask.device, dtype=torch.int32)
    ordered = torch.where(mask, blocks, nb).sort(dim=-1).values[..., :width]
    if width > nb:
        ordered = torch.nn.functional.pad(ordered, (0, width - nb), value=nb)
    return ordered.masked_fill(ordered == nb, -1)


def decode_density(mask: torch.Tensor, seqlens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Kept share of valid blocks, averaged over tokens and heads."""
    valid = ((seqlens.to(mask.device) - 1) // block_size + 1).float()[:, None]
    return (mask.sum(-1) / valid).mean()


def calibrate_decode_threshold(scores: torch.Tensor, seqlens: torch.Tensor, sparsity: DecodeSparsityConfig,
                               block_size: int, steps: int = 40) -> float:
    """The threshold at which :func:`decode_block_mask` keeps ``sparsity.target_density`` of the valid blocks of
    these tokens (bisection; the density falls as the threshold rises)."""
    if not sparsity.calibrated:
        raise ValueError(f"decode sparsity {sparsity} has no target_density to calibrate for")
    low, high = 0.0, 1.0
    for _ in range(steps):
        mid = (low + high) / 2
        density = decode_density(decode_block_mask(scores, seqlens, sparsity, block_size, mid), seqlens, block_size)
        low, high = (mid, high) if density > sparsity.target_density else (low, mid)
    return high


@dataclass
class DecodeCalibration:
    """The ``threshold`` at which the calibrated budget ``sparsity`` keeps its target density, found on ``tokens``
    decoding positions of rows of ``seq_len`` tokens, where it reached ``density``."""

    sparsity: DecodeSparsityConfig
    threshold: float
    density: float
    tokens: int = 0
    seq_len: int = 0

    def matches(self, sparsity: DecodeSparsityConfig) -> bool:
        """Whether this threshold serves ``sparsity``: a calibrated threshold budget with the same target density,
        first-block rule and estimate mixed into the scores (its other fields do not enter the selection)."""
        return sparsity.calibrated and _calibrated_fields(sparsity) == _calibrated_fields(self.sparsity)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "sparsity": self.sparsity.stored()}

    @classmethod
    def from_dict(cls, values: Mapping) -> DecodeCalibration:
        return cls(**{**values, "sparsity": build(DecodeSparsityConfig, "decode_sparsity", values["sparsity"])})


def _calibrated_fields(sparsity: DecodeSparsityConfig) -> tuple:
    """What a calibrated threshold depends on: the target density, the first-block rule and the scores' mixture."""
    return (sparsity.target_density, sparsity.first_block, sparsity.estimate,
            sparsity.estimate_weight if sparsity.estimate is not None else None)


def fit_decode_calibration(scores: torch.Tensor, seqlens: torch.Tensor, sparsity: DecodeSparsityConfig,
                           block_size: int, seq_len: int = 0) -> DecodeCalibration:
    """The :class:`DecodeCalibration` of ``sparsity`` on the scores ``[R, Hkv, nb]`` of ``R`` decoding tokens with
    ``seqlens [R]`` valid keys (:func:`calibrate_decode_threshold`), with the density it reaches there."""
    threshold = calibrate_decode_threshold(scores, seqlens, sparsity, block_size)
    mask = decode_block_mask(scores, seqlens, sparsity, block_size, threshold)
    return DecodeCalibration(sparsity, threshold, float(decode_density(mask, seqlens, block_size)),
                             tokens=scores.shape[0], seq_len=seq_len)


def load_decode_calibrations(folder: str | Path) -> list[DecodeCalibration]:
    """The calibrations in ``folder/decode_calibration.json`` (none without the file); a
    :class:`~seer.checks.ConfigError` names a file that is not one."""
    return read_json_records(Path(folder) / CALIBRATION_FILE, DecodeCalibration.from_dict, "seer decode calibration")


def save_decode_calibration(folder: str | Path, calibration: DecodeCalibration) -> Path:
    """Adds ``calibration`` to ``folder/decode_calibration.json``, replacing one for the same budget and length."""
    kept = [c for c in load_decode_calibrations(folder)
            if not (c.matches(calibration.sparsity) and c.seq_len == calibration.seq_len)]
    return atomic_write_text(Path(folder) / CALIBRATION_FILE,
                             json.dumps([c.to_dict() for c in [*kept, calibration]], indent=1))


def find_decode_calibration(folder: str | Path, sparsity: DecodeSparsityConfig) -> DecodeCalibration:
    """The calibration stored in ``folder`` for ``sparsity`` (the one made on the longest rows); a
    :class:`~seer.checks.ConfigError` listing what is stored otherwise."""
    stored = load_decode_calibrations(folder)
    found = [c for c in stored if c.matches(sparsity)]
    if found:
        return max(found, key=lambda c: c.seq_len)
    have = "; ".join(f"{c.sparsity.describe()} at {c.seq_len} tokens" for c in stored) or "none"
    raise ConfigError(f"decode_sparsity.target_density={sparsity.target_density}: no decode calibration for "
                      f"{sparsity.describe()} in {Path(folder) / CALIBRATION_FILE} (stored: {have}); train the decode "
                      f"gates with stage.decode_sparsity.target_density={sparsity.target_density} or give the "
                      f"threshold itself (target_density=null)")
