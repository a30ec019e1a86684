"""The registry of job kinds: one line per kind, naming the module that defines its ``KIND``
(``module:NAME`` when a module defines more than one kind).

Adding a kind = its module (config, stages, ``KIND = JobKind(...)``) + one line here; the CLI,
``llmprune report`` and chained recipes iterate this registry. Modules load on first use.
"""

from __future__ import annotations

import importlib

from llmprune.errors import LLMPruneError
from llmprune.jobs.kind import JobKind

MODULES = {
    "prune": "llmprune.pipeline",
    "maskllm": "llmprune.maskllm.job",
    "structured": "llmprune.structured.job",
    "recover": "llmprune.recover.job",
    "distill": "llmprune.recover.job:DISTILL",
    "blockwise": "llmprune.recover.blockwise",
    "eval": "llmprune.eval.job",
    "masks": "llmprune.masks.commands",
    "chain": "llmprune.chain.run",
}


def get(name: str) -> JobKind:
    """The kind called ``name`` (a report's ``kind``, a recipe's stage)."""
    if name not in MODULES:
        raise LLMPruneError(f"unknown job kind {name!r}; known: {', '.join(MODULES)}")
    module, _, attr = MODULES[name].partition(":")
    kind = getattr(importlib.import_module(module), attr or "KIND")
    assert kind.name == name, f"{MODULES[name]} is kind {kind.name!r}, registered as {name!r}"
    return kind


def kinds() -> dict[str, JobKind]:
    """Every kind, in registry order."""
    return {name: get(name) for name in MODULES}
