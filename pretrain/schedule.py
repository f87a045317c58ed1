"""The cosine schedule the trainer's weight decay and DINO's teacher momentum follow (the lr uses timm's)."""

from __future__ import annotations

import math


def cosine_value(start: float, end: float, step: int, total: int) -> float:
    """`start` at step 0 to `end` at step `total` along half a cosine; `end` from `total` on (and when total <= 0)."""
    if total <= 0:
        return end
    t = min(max(step / total, 0.0), 1.0)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * t))
