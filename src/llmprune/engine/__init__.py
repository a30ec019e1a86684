"""The layer-by-layer pass: capture inputs, collect statistics, prune, propagate."""

from llmprune.engine.sequential import LayerPlan, run_sequential

__all__ = ["LayerPlan", "run_sequential"]
