"""``DecodeGateConfig``: the DecodeGate architecture (``stage.decode_gate`` of ``stage=distill_decode``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from seer.checks import fail, is_int
from seer.kernels.common import BLOCK_SIZES, POOL_KINDS


@dataclass
class DecodeGateConfig:
    """The decode gate (SeerAttention-R): ``block_size`` tokens per key block (a size the kernels support),
    ``k_pool`` the block-pooling types of K (concatenated on the channel axis), ``hidden_size`` the width of the
    per-KV-head projections of the group's queries and of the pooled keys, ``block_rope`` rotating gate queries at
    the token's position and gate keys at their block's first token. Defaults: the release's K max+min+avg."""

    block_size: int = 64
    k_pool: list[str] = field(default_factory=lambda: ["max", "min", "avg"])
    hidden_size: int = 128
    block_rope: bool = True

    def __post_init__(self) -> None:
        if not is_int(self.block_size) or self.block_size not in BLOCK_SIZES:
            fail("decode_gate", "block_size", self.block_size, f"the kernels support block sizes {BLOCK_SIZES}")
        pools = [self.k_pool] if isinstance(self.k_pool, str) else list(self.k_pool)
        if not pools or any(p not in POOL_KINDS for p in pools) or len(set(pools)) != len(pools):
            fail("decode_gate", "k_pool", pools, f"needs distinct pooling types from {POOL_KINDS}")
        self.k_pool = pools
        if not is_int(self.hidden_size) or self.hidden_size < 1:
            fail("decode_gate", "hidden_size", self.hidden_size, "must be an integer >= 1")
        if self.block_rope and self.hidden_size % 2:
            fail("decode_gate", "hidden_size", self.hidden_size, "must be even when block_rope is on")
