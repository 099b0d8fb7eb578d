"""The learning-rate schedule of the RoLI protocol: linear warmup then cosine, stepped per epoch.

factor(0) = 0 when there is warmup (the reference's epoch 0 has lr 0); after warmup the factor decays
from 1 towards 0 with a half cosine over the remaining epochs.
"""

from __future__ import annotations

import math


def warmup_cosine(epoch: int, epochs: int, warmup: int) -> float:
    if epochs < 1 or warmup < 0:
        raise ValueError(f"need epochs >= 1 and warmup >= 0; got epochs={epochs}, warmup={warmup}")
    if epoch < warmup:
        return epoch / warmup
    span = max(1, epochs - warmup)
    return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / span))
