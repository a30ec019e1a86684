"""Moved to :mod:`llmprune.speed.measure`; this import path stays for existing callers."""

from llmprune.speed.measure import measure_speed

__all__ = ["measure_speed"]
