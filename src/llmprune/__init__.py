"""llmprune: prune large language models layer by layer, and measure what it did.

The public names load on first use (PEP 562), so ``import llmprune`` and the ``llmprune``
command start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC = {"LLMPruneError": "llmprune.errors", "PruneConfig": "llmprune.config", "load_model": "llmprune.models.loading",
           "PruneResult": "llmprune.pipeline", "evaluate": "llmprune.pipeline", "prune": "llmprune.pipeline"}

if TYPE_CHECKING:
    from llmprune import masks
    from llmprune.config import PruneConfig
    from llmprune.errors import LLMPruneError
    from llmprune.models.loading import load_model
    from llmprune.pipeline import PruneResult, evaluate, prune


def __getattr__(name: str) -> Any:
    if name == "masks":
        return importlib.import_module("llmprune.masks")
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'llmprune' has no attribute {name!r}")


__all__ = ["LLMPruneError", "PruneConfig", "PruneResult", "__version__", "evaluate", "load_model", "masks", "prune"]
