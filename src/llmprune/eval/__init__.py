"""Measurements: perplexity and sparsity."""

from llmprune.eval.perplexity import evaluate, perplexity
from llmprune.eval.sparsity import measure_sparsity

__all__ = ["evaluate", "measure_sparsity", "perplexity"]
