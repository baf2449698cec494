"""``GateConfig``: the AttnGate architecture (Hydra group ``gate``; see :mod:`seer.config`)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional, Union

from seer.checks import fail, is_int, is_number
from seer.kernels.common import BLOCK_SIZES, POOL_KINDS

# training-free estimates (seer.sparsity.selectors) a gate may be blended with: the ones computable at inference
# (not the oracle, which needs the whole attention map, nor random scores)
BLEND_SELECTORS = ("vertical_slash", "flexprefill", "block_mean", "antidiagonal", "streaming")


# fields that choose how the scores are used at inference, not what the weights are: gate files may differ in them
INFERENCE_FIELDS = ("blend", "blend_weight", "rerank_rows", "rerank_top_p", "rerank_max_share")


@dataclass
class GateConfig:
    """The AttnGate architecture.

    ``block_size``: tokens per block, one of the sizes the kernels support (:data:`seer.kernels.common.BLOCK_SIZES`).
    ``q_pool`` / ``k_pool``: the block-pooling types of Q and K (any of avg, max, min, last, concatenated on the
    channel axis). ``hidden_size``: the width of the per-head projections. ``q_linear``: ``auto`` uses no Q
    projection when Q has a single pool and ``hidden_size`` equals the model's head dim (the authors' K-only-linear
    form), ``true`` always projects Q, ``false`` never does (then ``hidden_size`` must equal
    ``len(q_pool) * head_dim``). ``block_rope``: rotate gate Q and K by the position of each block's first token.
    ``q_tokens``: score with every query token instead of the block-pooled Q (:mod:`seer.gates.attn_gate`): each
    token's pre-RoPE query is projected (input width ``head_dim``), rotated at the token's own position and scored
    against the pooled block keys; a query block's logit of a key block is the log-mean-exp of its tokens' scores.
    ``q_pool`` is then unused and must stay at its default ``[avg]`` (a list of several pools is refused);
    ``q_linear`` applies to the token queries (``auto``: no Q projection when ``hidden_size`` equals the head dim).
    ``blend``: a training-free estimate of :data:`BLEND_SELECTORS` mixed into the gate's block softmax at inference
    (None: the gate alone); ``blend_weight``: the estimate's share, in (0, 1): one float for every layer, or a list
    of one float per decoder layer (e.g. fitted per layer by :func:`seer.sparsity.blend_fit.fit_blend_weights`;
    its length is checked against the model's layers where gates are attached or the config is changed).
    ``rerank_rows``: 0 (off) or the query rows per block that rank the (blended) gate's candidates again by their
    exact attention: the top-``rerank_top_p`` blocks of each row (at most ``rerank_max_share`` of its causal blocks)
    and the diagonal
    (:func:`seer.sparsity.selectors.top_p_candidates`, :func:`~seer.sparsity.selectors.sampled_rows_mass`; the
    ``reranked`` selector does the same to a training-free estimate). The gate presets (``conf/gate/``) turn it on
    with 8 rows: on Qwen2.5-Coder-0.5B at 16k and 32k it brings the blend within 2.5% of dense perplexity and RULER
    within 2 points; it costs speed: at 32k the prefill is 1.24x dense instead of 1.68x (H100,
    docs/results/qwen/rerank.md). The Qwen and SmolLM2 recipes (``conf/experiment/``) store 16 rows: more exact
    (Qwen at 32k: +0.7% perplexity on held-out text against +1.4%), slower (1.13x dense).
    The defaults here are the lightest gate (``conf/gate/avgmax.yaml``) with neither the blend nor the rerank.
    """

    block_size: int = 64
    q_pool: list[str] = field(default_factory=lambda: ["avg"])
    k_pool: list[str] = field(default_factory=lambda: ["max"])
    hidden_size: int = 128
    q_linear: Union[str, bool] = "auto"
    block_rope: bool = True
    q_tokens: bool = False
    blend: Optional[str] = None
    blend_weight: Any = 0.5  # a float or a list of floats (Any: OmegaConf has no union of a float and a list)
    rerank_rows: int = 0
    rerank_top_p: float = 0.99
    rerank_max_share: float = 1.0

    def __post_init__(self) -> None:
        if self.block_size not in BLOCK_SIZES or not is_int(self.block_size):
            fail("gate", "block_size", self.block_size, f"the kernels support block sizes {BLOCK_SIZES}")
        for key in ("q_pool", "k_pool"):
            pools = getattr(self, key)
            pools = [pools] if isinstance(pools, str) else list(pools)
            if not pools:
                fail("gate", key, pools, f"needs at least one pooling type of {POOL_KINDS}")
            for p in pools:
                if p not in POOL_KINDS:
                    fail("gate", key, p, f"unknown pooling type; choose from {POOL_KINDS}")
            if len(set(pools)) != len(pools):
                fail("gate", key, pools, "lists a pooling type twice")
            setattr(self, key, pools)
        if not is_int(self.hidden_size) or self.hidden_size < 1:
            fail("gate", "hidden_size", self.hidden_size, "must be an integer >= 1")
        if self.block_rope and self.hidden_size % 2:
            fail("gate", "hidden_size", self.hidden_size, "must be even when block_rope is on")
        if self.q_linear not in ("auto", True, False):
            fail("gate", "q_linear", self.q_linear, "must be auto, true or false")
        if not isinstance(self.q_tokens, bool):
            fail("gate", "q_tokens", self.q_tokens, "must be true or false")
        if self.q_tokens and self.q_pool != ["avg"]:
            fail("gate", "q_pool", self.q_pool, "is unused with gate.q_tokens=true (each query token is scored, "
                 "no Q pooling); leave it at its default: gate.q_pool=[avg]")
        if self.blend is not None and self.blend not in BLEND_SELECTORS:
            fail("gate", "blend", self.blend, f"choose a training-free estimate from {BLEND_SELECTORS} (or null)")
        if isinstance(self.blend_weight, Iterable) and not isinstance(self.blend_weight, (str, bytes, dict)):
            weights = list(self.blend_weight)  # a list, a tuple, an OmegaConf ListConfig (gate.blend_weight=[...])
            if not weights:
                fail("gate", "blend_weight", weights, "needs one weight per layer (or one float for all)")
            for i, w in enumerate(weights):
                if not is_number(w) or not 0 < w < 1:
                    fail("gate", f"blend_weight[{i}]", w, "is the layer's blended estimate share; must be in (0, 1)")
            self.blend_weight = [float(w) for w in weights]
        elif not is_number(self.blend_weight) or not 0 < self.blend_weight < 1:
            fail("gate", "blend_weight", self.blend_weight, "is the blended estimate's share; must be in (0, 1)")
        if not is_int(self.rerank_rows) or self.rerank_rows < 0:
            fail("gate", "rerank_rows", self.rerank_rows, "must be an integer >= 0 (0: no rerank)")
        if not is_number(self.rerank_top_p) or not 0 < self.rerank_top_p <= 1:
            fail("gate", "rerank_top_p", self.rerank_top_p, "is the candidates' share of the row's mass; must be in "
                 "(0, 1]")
        if not is_number(self.rerank_max_share) or not 0 < self.rerank_max_share <= 1:
            fail("gate", "rerank_max_share", self.rerank_max_share, "is the most candidates as a share of the row's "
                 "causal blocks; must be in (0, 1]")

    def layer_weight(self, layer_idx: int) -> float:
        """The blend weight of layer ``layer_idx``: the float, or the list's entry."""
        if isinstance(self.blend_weight, list):
            if not 0 <= layer_idx < len(self.blend_weight):
                raise ValueError(f"gate.blend_weight has {len(self.blend_weight)} weights, none for layer {layer_idx}")
            return self.blend_weight[layer_idx]
        return self.blend_weight

    def check_layers(self, num_layers: int) -> None:
        """Refuses (ConfigError) a per-layer ``blend_weight`` whose length is not the model's ``num_layers``."""
        if isinstance(self.blend_weight, list) and len(self.blend_weight) != num_layers:
            fail("gate", "blend_weight", self.blend_weight,
                 f"has {len(self.blend_weight)} weights, but the model has {num_layers} layers (give one per layer)")

    @property
    def scorer_name(self) -> str:
        """The scorer's name in calibrations and results: ``gate``, or when blended ``gate+<blend>@<weight>`` (one
        weight, ``%g``) or ``gate+<blend>@layers-<hash>`` (a weight per layer: the first 8 hex digits of the sha256
        of the weights written ``%g`` and joined by commas), then ``+rerank<rows>@<top_p>`` when reranked (and
        ``cap<max_share>`` when capped), so a calibration of one does not fit another."""
        cap = f"cap{self.rerank_max_share:g}" if self.rerank_max_share < 1 else ""
        rerank = f"+rerank{self.rerank_rows}@{self.rerank_top_p:g}{cap}" if self.rerank_rows else ""
        if self.blend is None:
            return "gate" + rerank
        if isinstance(self.blend_weight, list):
            text = ",".join(f"{w:g}" for w in self.blend_weight)
            return f"gate+{self.blend}@layers-{hashlib.sha256(text.encode()).hexdigest()[:8]}" + rerank
        return f"gate+{self.blend}@{self.blend_weight:g}" + rerank

    def with_blend(self, blend: str | None = "own", weight: float | list[float] | None = None) -> GateConfig:
        """This config with the blend a command line asks for: ``own`` keeps this one's, ``none`` (or None) is the
        gate alone, else a name of :data:`BLEND_SELECTORS`; ``weight`` (a float or one per layer) None keeps this
        one's weight. Checked like any gate config."""
        changes: dict = {}
        if blend != "own":
            changes["blend"] = None if blend in (None, "none") else blend
        if weight is not None:
            changes["blend_weight"] = weight
        return replace(self, **changes) if changes else self

    def architecture_differences(self, other: GateConfig) -> list[str]:
        """The fields (not :data:`INFERENCE_FIELDS`) in which ``other`` builds different gate weights."""
        return [f.name for f in fields(self) if f.name not in INFERENCE_FIELDS
                and getattr(self, f.name) != getattr(other, f.name)]
