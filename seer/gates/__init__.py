"""Attention gates: block pooling, per-head projections and block-level RoPE (:class:`AttnGate`)."""

from seer.gates.attn_gate import AttnGate
from seer.gates.config import GateConfig
from seer.gates.pooling import pool_blocks
from seer.gates.rope import rope_frequencies

__all__ = ["AttnGate", "GateConfig", "pool_blocks", "rope_frequencies"]
