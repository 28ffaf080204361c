"""Scalar schedules over training steps (Gumbel temperature, KL weight, loss warm-ups)."""

from __future__ import annotations

import math


def cosine_anneal(step: float, start: float, end: float, steps: int) -> float:
    """`start` at step 0, `end` at `steps` and after, following half a cosine."""
    if steps <= 0 or step >= steps:
        return end
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * step / steps))


def linear_warmup(step: int, value: float, steps: int) -> float:
    """0 at step 0 rising linearly to `value` at `steps`, then constant."""
    if steps <= 0 or step >= steps:
        return value
    return value * step / steps
