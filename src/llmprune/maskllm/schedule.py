"""Step schedules: τ, κ and λ linear in the step; the learning rate a cosine to a floor."""

from __future__ import annotations

import math
from dataclasses import dataclass


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


@dataclass(frozen=True)
class MaskSchedule:
    """τ (temperature), κ (logit scale) and λ (regulariser weight) at a step."""

    steps: int
    tau: tuple[float, float] = (4.0, 0.05)
    kappa: tuple[float, float] = (1e2, 5e2)
    reg_lambda: tuple[float, float] = (1e-5, 0.0)

    def at(self, step: int) -> dict[str, float]:
        return {"tau": linear(*self.tau, step, self.steps),
                "kappa": linear(*self.kappa, step, self.steps),
                "lambda": linear(*self.reg_lambda, step, self.steps)}
