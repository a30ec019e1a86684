"""Structured pruning that makes the model physically smaller: OSSCAR MLP-width pruning and
depth pruning (see docs/structured.md)."""

from llmprune.structured.api import StructuredResult, plan_structured, structured
from llmprune.structured.options import StructuredOptions

__all__ = ["StructuredOptions", "StructuredResult", "plan_structured", "structured"]
