"""Chained recipes: one YAML recipe lists stages (prune → maskllm → recover → eval ...), run by
``llmprune run RECIPE --out DIR`` with each stage's output kept and restartable (docs/recipes.md)."""

from llmprune.chain.recipe import KINDS, ChainRecipe, load_recipe, plan_stages
from llmprune.chain.run import ChainResult, run_chain

__all__ = ["KINDS", "ChainRecipe", "ChainResult", "load_recipe", "plan_stages", "run_chain"]
