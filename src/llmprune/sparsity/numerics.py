"""Warnings that solvers raise when they had to change the numbers to get an answer."""

from __future__ import annotations


class NumericalWarning(UserWarning):
    """A solver deviated from its settings (e.g. raised the damping of a singular XᵀX).

    ``record`` holds what the engine writes into the linear's entry of ``pruning.json``.
    """

    def __init__(self, message: str, **record: float) -> None:
        super().__init__(message)
        self.record = record
