"""Masks as values: build, save/load (MaskLLM's npz layout), check, compare, apply."""

from llmprune.masks.maskset import MaskSet, param_shapes, prunable_names

__all__ = ["MaskSet", "param_shapes", "prunable_names"]
