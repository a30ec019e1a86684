"""The ``eval`` job kind: perplexity and zero-shot tasks of a model, as a chained stage.

validate → load → evaluate → save (the directory holds only ``recipe.yaml`` and
``pruning.json``: no model) → report. ``llmprune eval`` is the same measurement on the command
line (:func:`llmprune.pipeline.evaluate`).
"""

from __future__ import annotations

import yaml

from llmprune.config import RunOptions
from llmprune.eval.sparsity import measure_sparsity
from llmprune.export.save import RECIPE_FILE, REPORT_FILE, atomic_dir, write_json
from llmprune.jobs.context import (
    Job,
    check_run,
    evaluate_stage,
    job_inputs,
    load,
    ppl_seqlen,
    report,
    run_stages,
)
from llmprune.jobs.header import header
from llmprune.jobs.kind import JobKind


class EvalConfig(RunOptions):
    """An ``eval`` stage: perplexity (``ppl``, windows of ``ppl_seqlen`` tokens, default 2048;
    WikiText-2 unless only ``tasks`` are given) and zero-shot ``tasks`` of the model."""


def _measured(config: EvalConfig) -> EvalConfig:
    return config if config.ppl or config.tasks else config.replace(ppl=["wikitext2"])  # as 'llmprune eval'


def validate(job: Job) -> None:
    job.config = _measured(job.config.validate())
    check_run(job)


def save(job: Job) -> None:
    """The report alone (no model), atomically."""
    config: EvalConfig = job.config
    job.report = {**header(job), "sparsity": measure_sparsity(job.model)["overall"]}
    if config.out:
        recipe = yaml.safe_dump({"eval": job.report["recipe"]}, sort_keys=False, allow_unicode=True)
        with atomic_dir(config.out, config.overwrite, job_inputs(job), kind="eval") as tmp:
            (tmp / RECIPE_FILE).write_text(recipe)
            write_json(tmp / REPORT_FILE, job.report)
        job.saved = config.out


EVAL = (validate, load, evaluate_stage("after"), save, report)


def run_eval(config: EvalConfig, progress: bool = True) -> Job:
    return run_stages(Job(config, kind="eval", progress=progress), EVAL)


def summary(report: dict) -> list[str]:
    return [f"sparsity of decoder linears: {report['sparsity']:.4f}"]


KIND = JobKind(
    name="eval", config=EvalConfig, run=lambda c, progress: run_eval(c, progress).report, summary=summary,
    output="report", windows=lambda c: [("ppl_seqlen", ppl_seqlen(c))] if _measured(c).ppl else [])
