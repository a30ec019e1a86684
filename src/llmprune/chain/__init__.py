"""Chained recipes: one YAML recipe lists stages (prune → maskllm → recover → eval ...), run by
``llmprune run RECIPE --out DIR`` with each stage's output kept and restartable (docs/recipes.md)."""

from llmprune.chain.recipe import ChainRecipe, load_recipe, plan_stages, stage_kinds
from llmprune.chain.run import ChainResult, run_chain

__all__ = ["ChainRecipe", "ChainResult", "load_recipe", "plan_stages", "run_chain", "stage_kinds"]
