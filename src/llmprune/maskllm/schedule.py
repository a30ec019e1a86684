"""MaskLLM's step schedule: τ, κ and λ linear in the step."""

from __future__ import annotations

from dataclasses import dataclass

from llmprune.train.schedule import linear


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
