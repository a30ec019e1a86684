"""Writing pruned models and their reports."""

from llmprune.export.save import (
    atomic_dir,
    check_output_dir,
    output_lock,
    save_pruned,
    update_report,
)

__all__ = ["atomic_dir", "check_output_dir", "output_lock", "save_pruned", "update_report"]
