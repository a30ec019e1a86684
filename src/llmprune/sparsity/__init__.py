"""Pure tensor code for pruning one weight matrix: patterns, scores, solvers. No model knowledge."""

from llmprune.sparsity.methods import METHODS, SOLVERS, prune_weight
from llmprune.sparsity.patterns import Target, nm_mask, unstructured_mask

__all__ = ["METHODS", "SOLVERS", "Target", "nm_mask", "prune_weight", "unstructured_mask"]
