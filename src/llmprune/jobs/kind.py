"""A job kind as data: what the CLI, ``llmprune report`` and the chain need to know of it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Output = Literal["sparse", "dense", "report"]


@dataclass(frozen=True)
class JobKind:
    """One kind of job (prune, maskllm, recover, structured, eval, masks, chain).

    - ``config``: its typed options (flags, YAML keys and API keywords derive from it).
    - ``run(config, progress) -> report``: one job from its config (the CLI and the chain call it).
    - ``summary(report) -> lines``: its own lines of the printed summary, between the shared
      header's first line and its costs / PPL lines (:func:`llmprune.report.summary`).
    - ``output``: ``sparse`` (the input's shapes, with a mask: ``masks.npz``), ``dense`` (a smaller
      dense model: a new base), ``report`` (no model, e.g. an evaluation).
    - ``reads(config) -> {option: path or name}``: the text it reads besides the model (``train``
      split, checked before anything runs); ``files(config) -> {option: path}``: files of the
      user's it reads (mask files), which must exist; ``windows(config) -> [(option, tokens)]``:
      the token windows it runs through the model (checked against the context up front);
      ``check(config)``: any other check that needs no model (e.g. an optional package).
    - ``command``: its CLI help (``None``: no command of its own), with ``from_flags`` when the
      flags need more than ``config(**flags)`` and ``add_flags`` for flags beyond the config's.
    """

    name: str
    config: type
    run: Callable[[Any, bool], dict] | None  # None: not run from a config alone (the chain: `llmprune run`)
    summary: Callable[[dict], list[str]]
    output: Output = "sparse"
    trains: bool = False  # a training loop: checkpoints in OUT.ckpt, --resume
    chain: bool = True  # usable as a stage of a chained recipe
    reads: Callable[[Any], dict[str, str]] = field(default=lambda c: {})
    files: Callable[[Any], dict[str, str]] = field(default=lambda c: {})
    windows: Callable[[Any], list[tuple[str, int]]] = field(default=lambda c: [])
    check: Callable[[Any], None] = field(default=lambda c: None)
    layer_table: bool = False  # `llmprune report` prints a per-layer table
    command: str | None = None
    model_help: str = "bundled name (smollm2-135m), local HF dir, .gguf file or hub id"
    from_flags: Callable[[dict], Any] | None = None
    add_flags: Callable[[Any], None] | None = None
    saved_note: str = "report: {out}/pruning.json"
