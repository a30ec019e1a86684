"""JSON from files the user gives (configs, reports, checkpoints, data): a document nested past
the parser's recursion limit is a ``ValueError`` like any other malformed JSON, which every
reader already turns into one line, instead of a ``RecursionError`` traceback."""

from __future__ import annotations

import json
from typing import Any


def loads(text: str | bytes) -> Any:
    """``json.loads``, with too-deep nesting reported as malformed JSON."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None
