"""Writing pruned models and their reports."""

from llmprune.export.save import atomic_dir, save_pruned

__all__ = ["atomic_dir", "save_pruned"]
