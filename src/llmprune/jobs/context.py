"""What every job kind shares: the :class:`Job` its stages hand to each other, the stages every
kind runs (checks before loading, loading, evaluation, the final report) and :func:`run_stages`.

A kind's own stages live in its module (one-shot pruning in :mod:`llmprune.pipeline`, MaskLLM in
:mod:`llmprune.maskllm.job`, ...); they read their config and keep their state in ``extra``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmprune.config import RunOptions
from llmprune.data.sources import Corpus
from llmprune.errors import LLMPruneError
from llmprune.eval.perplexity import check_eval_args, check_eval_data
from llmprune.eval.perplexity import evaluate as evaluate_ppl
from llmprune.eval.placement import check_device
from llmprune.eval.zeroshot import TaskSet, evaluate_tasks, load_tasks
from llmprune.export.save import check_output_dir, output_lock, update_report
from llmprune.models.loading import check_model_exists, input_paths, load_model


@dataclass
class Job:
    """What the stages of one job hand to each other.

    ``config`` is the kind's config, built on :class:`RunOptions`: the shared stages below read
    only those fields. ``device`` is where the job runs (resolved from ``config.device``; a
    training job replaces it by the accelerator's device), and so what its report records.
    """

    config: RunOptions
    model: nn.Module | str | None = None
    tokenizer: object = None
    ids: torch.Tensor | None = None  # (nsamples, seqlen) calibration windows, when given ready
    progress: bool = True
    kind: str = "prune"  # the report's kind: an output of another kind is never replaced
    device: str = "cpu"
    corpus: Corpus | None = None  # calibration / training text, read and decoded before the model loads
    eval_corpora: dict[str, Corpus] | None = None  # perplexity text, likewise
    task_set: TaskSet | None = None  # zero-shot tasks, their data loaded before the model
    ppl: dict[str, dict] = field(default_factory=lambda: {"before": {}, "after": {}})
    tasks: dict[str, dict] = field(default_factory=lambda: {"before": {}, "after": {}})
    timings: dict[str, float] = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    saved: Path | None = None
    data_files: list[str] = field(default_factory=list)  # what the job reads besides the model
    needs_tokenizer: bool = True
    extra: dict = field(default_factory=dict)
    input_model: dict | None = None  # the report's `model`: the input as loaded, before any change
    cleanup: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)


def job_inputs(job: Job) -> list[str]:
    """Paths the job reads, which its output must never replace (non-paths are ignored)."""
    model = input_paths(job.config.model) if isinstance(job.model, str | None) else []
    task_dir = [job.config.task_dir] if job.config.task_dir else []
    return [*model, *job.data_files, *job.config.ppl, *task_dir]


def ppl_seqlen(config: RunOptions) -> int:
    return config.ppl_seqlen or getattr(config, "seqlen", 2048)


def check_run(job: Job) -> None:
    """The checks every entry point shares, before the model loads: device, evaluation data
    (read once here; zero-shot tasks named and their data loaded), the output directory (locked
    until the report is final), the model."""
    config = job.config
    job.device = config.resolved_device()
    check_device(job.device)
    if config.ppl:
        check_eval_args(ppl_seqlen(config), config.max_windows)
        job.eval_corpora = check_eval_data(config.ppl)
    if config.out:
        check_output_dir(config.out, config.overwrite, job_inputs(job), job.kind)
        job.cleanup.enter_context(output_lock(config.out))
    if isinstance(job.model, str | None):
        check_model_exists(config.model)
    elif job.tokenizer is None and (job.needs_tokenizer or config.ppl or config.tasks):
        raise LLMPruneError("pass tokenizer= along with a loaded model")
    if config.tasks:  # last: it may download the tasks' data
        job.task_set = load_tasks(config.tasks, config.task_dir)


def load(job: Job) -> None:
    """Load the model (unless one was given)."""
    config = job.config
    if isinstance(job.model, str | None):
        job.model, job.tokenizer = load_model(
            config.model, device=job.device, dtype=config.dtype, trust_remote_code=config.trust_remote_code,
            need_tokenizer=job.needs_tokenizer or bool(config.ppl or config.tasks))
    job.input_model = model_info(config.model, job.model)


def model_info(name: str, model: nn.Module) -> dict[str, Any]:
    """What the header says of the model: the name it was given by, its class, layers, parameters."""
    from llmprune.models.layers import decoder_layers

    try:
        layers = len(decoder_layers(model))
    except Exception:  # noqa: BLE001 -- a model the adapter does not know still gets a header
        layers = None
    return {"name": name, "class": type(model).__name__, "layers": layers,
            "params": sum(p.numel() for p in model.parameters())}


def evaluate_stage(when: str) -> Callable[[Job], None]:
    """Perplexity (and zero-shot tasks) of the model as it is now: ``job.ppl[when]``
    (``job.tasks[when]``)."""
    def evaluate(job: Job) -> str | None:
        config = job.config
        if not config.ppl and job.task_set is None:
            return SKIPPED
        if config.ppl:
            job.ppl[when] = evaluate_ppl(job.model, job.tokenizer, config.ppl,
                                         ppl_seqlen(config), config.max_windows,
                                         job.progress, corpora=job.eval_corpora, device=job.device)
        if job.task_set is not None:
            job.tasks[when] = evaluate_tasks(job.model, job.tokenizer, job.task_set,
                                             config.task_batch_size, config.task_limit,
                                             job.device, job.progress)
    evaluate.__name__ = f"ppl_{when}"
    return evaluate


def report(job: Job) -> None:
    """Final numbers into the report (the shared header's measured fields), and into the saved
    ``pruning.json``."""
    from llmprune.jobs.header import finish_header

    finish_header(job)
    if job.saved is not None:
        update_report(job.saved, job.report)


UNTIMED = ("validate", "check_model", "plan", "report")  # checks and bookkeeping: no time worth a line
SKIPPED = "skipped"  # what a stage returns when this job gives it nothing to do: no timing is recorded


def run_stages(job: Job, stages: tuple[Callable[[Job], str | None], ...]) -> Job:
    """Run ``stages`` in order, timing each as ``<name>_s`` in ``job.timings`` (unless it
    returns :data:`SKIPPED`)."""
    with job.cleanup:
        for stage in stages:
            t0 = time.perf_counter()
            if stage(job) != SKIPPED and stage.__name__ not in UNTIMED:
                job.timings[f"{stage.__name__}_s"] = time.perf_counter() - t0
    return job
