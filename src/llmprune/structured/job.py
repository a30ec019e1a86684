"""``llmprune structured``: structured pruning as stages, sharing the one-shot job's.

validate → load → plan (the model's own checks) → calibrate → measure → prune → save → measure
→ report. "measure" is perplexity and, with ``speed``, CPU prefill / decode tokens/s in this
process. The saved directory is written atomically before the final measurements; the final
numbers then replace its ``pruning.json``.
"""

from __future__ import annotations

from typing import Any

import torch
import yaml
from pydantic import Field
from torch import nn

from llmprune.config import RunOptions
from llmprune.data.calibration import calibration_windows
from llmprune.data.sources import load_corpus
from llmprune.export.save import save_pruned
from llmprune.jobs.context import (
    SKIPPED,
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
from llmprune.report import format_blockwise
from llmprune.structured import experts
from llmprune.structured.api import StructuredResult, plan_structured, structured
from llmprune.structured.options import StructuredOptions
from llmprune.structured.speed import measure_speed


class StructuredConfig(RunOptions, StructuredOptions):
    """One structured-pruning job: the shared run options plus the method's own."""

    speed: bool = Field(False, strict=True, description="measure CPU prefill / decode tokens/s before "
                                                        "and after, in this process")


def validate(job: Job) -> None:
    config: StructuredConfig = job.config.validate()
    job.needs_tokenizer = job.ids is None
    if job.ids is None:
        job.data_files = [config.calib]
        job.corpus = load_corpus(config.calib, "train")  # decoded before the model loads
    check_run(job)
    if config.method == "experts" and isinstance(job.model, str):  # a dense model: before it loads
        experts.check_source(config.model, config.ratio, config.trust_remote_code)


def plan(job: Job) -> None:
    plan_structured(job.model, job.config)  # widths, k, gated MLPs: before any calibration


def calibrate(job: Job) -> None:
    config = job.config
    if job.ids is None:
        job.ids = calibration_windows(job.corpus, job.tokenizer, config.windows, config.seqlen, config.seed)
        job.corpus = None


def measure_stage(when: str):
    """Perplexity (the shared stage) and, with ``speed``, tokens/s of the model as it is now;
    after pruning also the decode and prefill speed-ups."""
    ppl = evaluate_stage(when)

    def measure(job: Job) -> str | None:
        if ppl(job) == SKIPPED and not job.config.speed:
            return SKIPPED
        if job.config.speed:
            speed = job.extra.setdefault("speed", {})
            speed[when] = measure_speed(job.model)
            if when == "after":
                for k in ("decode", "prefill"):
                    speed[f"{k}_speedup"] = speed["after"][f"{k}_tok_s"] / speed["before"][f"{k}_tok_s"]
    measure.__name__ = f"measure_{when}"
    return measure


def prune(job: Job) -> None:
    config: StructuredConfig = job.config
    result = structured(job.model, job.tokenizer, StructuredOptions.pick(config), ids=job.ids,
                        device=job.device, progress=job.progress)
    result.report.pop("timings")  # the job's own stage timings stand for these
    job.report = {**header(job), **result.report, "speed": job.extra.setdefault("speed", {})}


def save(job: Job) -> None:
    config: StructuredConfig = job.config
    if config.out:
        recipe = yaml.safe_dump({"structured": job.report["recipe"]}, sort_keys=False, allow_unicode=True)
        job.saved = save_pruned(job.model, job.tokenizer, config.out, job.report, recipe, config.overwrite,
                                inputs=job_inputs(job))


STRUCTURED = (validate, load, plan, calibrate, measure_stage("before"), prune, save, measure_stage("after"),
              report)


def structured_job(model: str | nn.Module, config: StructuredConfig | dict | None = None, *, tokenizer=None,
                   ids: torch.Tensor | None = None, progress: bool = True, **overrides: Any) -> StructuredResult:
    """Run a structured job on ``model`` (a name/path, or a loaded model plus ``tokenizer``):
    ``config`` (a :class:`StructuredConfig` or a dict) plus keyword ``overrides``, e.g.
    ``structured_job("smollm2-135m", method="osscar", ratio=0.2, ppl="wikitext2", speed=True)``.
    """
    data = config.model_dump() if isinstance(config, StructuredConfig) else dict(config or {})
    if isinstance(model, str):
        overrides["model"] = model
    cfg = StructuredConfig(**{**data, **overrides})
    job = run_stages(Job(cfg, model, kind="structured", tokenizer=tokenizer, ids=ids, progress=progress), STRUCTURED)
    return StructuredResult(job.model, job.report)


def summary(report: dict) -> list[str]:
    """Structured pruning: what was removed, parameters before / after, measured speed."""
    params = report["params"]
    lines = [f"{report['method']}: parameters {params['before']:,} -> {params['after']:,} "
             f"({100 * params['removed_share']:.2f}% removed)"]
    if report["method"] == "osscar" and "osscar" in report:
        w = report["osscar"]["intermediate_size"]
        lines.append(f"MLP width {w['before']} -> {w['after']} in every layer ({report['osscar']['selection']})")
    if report["method"] == "depth" and "depth" in report:
        d = report["depth"]
        lines.append(f"removed layers {d['removed_layers']} (score {d['score']})")
    lines += format_blockwise((report.get(report["method"]) or {}).get("blockwise"))
    speed = report.get("speed") or {}
    if "decode_speedup" in speed:
        lines.append(f"CPU decode x{speed['decode_speedup']:.2f}, prefill x{speed['prefill_speedup']:.2f}")
    return lines


def _windows(c: StructuredConfig) -> list[tuple[str, int]]:
    return [("seqlen", c.seqlen)] + ([("ppl_seqlen", ppl_seqlen(c))] if c.ppl else [])


KIND = JobKind(
    name="structured", config=StructuredConfig,
    run=lambda c, progress: structured_job(c.model, c, progress=progress).report,
    summary=summary, output="dense", reads=lambda c: {"calib": c.calib}, windows=_windows,
    command="make the model physically smaller: MLP width or attention heads (OSSCAR), hidden size, depth, MoE experts, or a search to a parameter budget")
