"""The report header every kind's ``pruning.json`` shares, built and printed in one place.

``kind``, library ``versions``, the ``recipe`` (the job's resolved config, without where it
wrote), the ``model``, the ``device`` the job ran on, stage ``timings``, ``ppl`` (and ``tasks``)
before / after, and peak memory. A kind adds its own section beside these keys.
"""

from __future__ import annotations

import platform
import resource
from typing import Any

import torch
from torch import nn

from llmprune.config import NOT_IN_RECIPE
from llmprune.jobs.context import Job, model_info

HEADER_KEYS = ("kind", "versions", "recipe", "model", "device", "timings", "ppl", "peak_rss_mb", "peak_gpu_mb")


def versions() -> dict[str, str]:
    """The versions that decide a run's numbers."""
    import accelerate
    import transformers

    from llmprune import __version__

    return {"llmprune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "python": platform.python_version()}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def resolved_recipe(job: Job, **decided: Any) -> dict[str, Any]:
    """The job's config as it ran, without where it wrote: what ``auto`` chose (``device``, the
    model's ``dtype``) and whatever else the run ``decided`` written in, so a saved recipe
    reproduces the run wherever it is re-run."""
    recipe = job.config.model_dump(exclude=set(NOT_IN_RECIPE))
    if "device" in recipe:
        recipe["device"] = str(job.device)
    if "dtype" in recipe and isinstance(job.model, nn.Module):
        recipe["dtype"] = str(next(job.model.parameters()).dtype).removeprefix("torch.")
    return {**recipe, **decided}


def header(job: Job, recipe: dict | None = None) -> dict[str, Any]:
    """The shared header of ``job``'s report (measured fields as of now; :func:`finish_header`
    brings them up to date at the end). ``recipe``: default :func:`resolved_recipe`."""
    config = job.config
    out = {"kind": job.kind, "versions": versions(),
           "recipe": recipe if recipe is not None else resolved_recipe(job),
           "model": job.input_model or model_info(config.model, job.model), "device": str(job.device)}
    finish_header(job, out)
    return out


def finish_header(job: Job, report: dict | None = None) -> None:
    """The measured fields of the header, final: device, timings, PPL (and tasks), peak memory."""
    report = job.report if report is None else report
    report.update(device=str(job.device), ppl=job.ppl, timings=job.timings, peak_rss_mb=peak_rss_mb(),
                  peak_gpu_mb=peak_gpu_mb())
    if job.task_set is not None:
        report["tasks"] = job.tasks


def head_line(report: dict) -> str:
    """The header's first line: kind, model, where it ran."""
    m = report.get("model") or {}
    layers = f", {m['layers']} layers" if m.get("layers") else ""
    cls = f" ({m['class']}{layers})" if m.get("class") else ""
    where = f" on {report['device']}" if report.get("device") else ""
    return f"{report.get('kind', 'prune')}: model {m.get('name', '?')}{cls}{where}"


def cost_lines(report: dict) -> list[str]:
    """Timings and peak memory."""
    lines = []
    if report.get("timings"):
        lines.append("timings: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in report["timings"].items()))
    if report.get("peak_rss_mb") is not None:
        gpu = f", GPU {report['peak_gpu_mb']:.0f} MiB" if report.get("peak_gpu_mb") else ""
        lines.append(f"peak RSS {report['peak_rss_mb']:.0f} MiB{gpu}")
    return lines
