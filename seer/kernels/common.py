"""What every seer kernel shares: supported sizes and dtypes, pooling names, log constants.

Configs outside this package (``seer.gates.GateConfig`` and friends) validate against these constants, so a
value the kernels cannot run is refused when the config is built, not at the first launch.
"""

from __future__ import annotations

import math

import torch

BLOCK_SIZES = (16, 32, 64, 128)  # token block sizes every kernel (ground truth, block-sparse, pooling) supports
HEAD_DIMS = (16, 32, 64, 128, 256)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
POOL_KINDS = ("avg", "max", "min", "last")  # the gate's block-pooling types

LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)
