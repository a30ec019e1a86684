"""Step schedules the trainer and its tasks share: linear ramps and a cosine decay."""

from __future__ import annotations

import math


def linear(start: float, end: float, step: int, total: int) -> float:
    """``start`` at step 0, ``end`` at the last step ``total − 1``, linear in between.

    (The reference divides by ``total``, so it stops one step short of ``end``.)
    """
    if total <= 1:
        return end if step > 0 else start
    t = min(max(step, 0), total - 1) / (total - 1)
    return start + (end - start) * t


def cosine(start: float, end: float, step: int, total: int) -> float:
    """Cosine decay from ``start`` (step 0) to ``end`` (step ``total``)."""
    t = min(max(step, 0), total) / max(total, 1)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))
