"""``llmprune maskllm``: the MaskLLM entry point as stages, sharing the one-shot job's.

validate → load → ppl → learn (prior + training) → save → ppl → report. The output directory
holds the model with the hard masks applied (plain ``transformers`` loads it), ``masks.npz``
in MaskLLM's layout, ``train_log.jsonl`` and ``pruning.json``. Checkpoints live beside it in
``OUT.ckpt/`` while training (``--resume OUT.ckpt`` continues an interrupted run) and are
removed once the output is saved.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from llmprune.config import RunOptions
from llmprune.data.sources import load_corpus
from llmprune.errors import LLMPruneError
from llmprune.eval.sparsity import measure_sparsity
from llmprune.export.save import save_pruned
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
from llmprune.maskllm.api import ONESHOT_PRIORS, maskllm
from llmprune.maskllm.options import MaskLLMOptions
from llmprune.masks import MaskSet
from llmprune.masks.files import MASK_FILE, read_packed
from llmprune.options import PositiveInt
from llmprune.train.trainer import check_resume_dir, checkpoint_dir

LOG_FILE = "train_log.jsonl"


class MaskLLMConfig(RunOptions, MaskLLMOptions):
    """One MaskLLM job: the shared run options, MaskLLM's own, the prior and resume."""

    prior: str | None = Field("sparsegpt", description=f"initial mask: {' | '.join(ONESHOT_PRIORS)} "
                                                       "(mask-only one-shot), none, or a MASKS.npz file")
    prior_nsamples: PositiveInt = Field(128, description="calibration windows of a one-shot prior "
                                                         "(drawn from --train-data, --seqlen tokens)")
    resume: str | None = Field(None, description="continue an interrupted run from its checkpoint "
                                                 "directory (OUT.ckpt)")


def validate(job: Job) -> None:
    config: MaskLLMConfig = job.config.validate()
    prior = config.prior
    if prior not in (None, "none", *ONESHOT_PRIORS):
        if not Path(prior).expanduser().is_file():
            raise LLMPruneError(f"prior {prior!r} is neither one of {', '.join(ONESHOT_PRIORS)}, none, "
                                "nor an existing mask file")
        read_packed(prior)  # a damaged file: one line now; names and shapes once the model is loaded
    if config.resume is not None:
        check_resume_dir(config.resume)
    job.data_files = [config.train_data, *([prior] if prior and Path(prior).is_file() else [])]
    job.extra["corpus"] = load_corpus(config.train_data, "train")  # decoded before the model loads
    check_run(job)


def learn(job: Job) -> None:
    """The prior (a one-shot mask or a mask file), then training; the model gets the hard masks."""
    config: MaskLLMConfig = job.config
    prior: Any = None if config.prior in (None, "none") else config.prior
    if prior not in (None, *ONESHOT_PRIORS):
        prior = dict(MaskSet.load(prior, job.model))  # names and shapes checked against the model
    work = Path(config.resume).expanduser().resolve() if config.resume else checkpoint_dir(config.out)
    result = maskllm(job.model, job.tokenizer, MaskLLMOptions.pick(config), prior=prior,
                     prior_options={"nsamples": config.prior_nsamples}, corpus=job.extra["corpus"],
                     work_dir=work, resume=config.resume, progress=job.progress, device=job.device)
    job.device = result.report["device"]  # where it trained (the accelerator's device)
    job.extra.update(result=result, work=work)


def save(job: Job) -> None:
    config: MaskLLMConfig = job.config
    result = job.extra["result"]
    masks = MaskSet(result.masks)
    sparsity = measure_sparsity(job.model)
    job.report = {**header(job), "target": config.pattern, "sparsity": sparsity["overall"],
                  "maskllm": result.report, "masks": {"file": MASK_FILE, "nm": masks.nm()}}
    job.report["model"]["prunable_params"] = sparsity["params"]
    if not config.out:
        return
    log = "".join(json.dumps(r) + "\n" for r in result.log).encode()
    recipe = yaml.safe_dump({"maskllm": job.report["recipe"]}, sort_keys=False, allow_unicode=True)
    job.saved = save_pruned(job.model, job.tokenizer, config.out, job.report, recipe, config.overwrite,
                            extra_files={MASK_FILE: masks.save, LOG_FILE: log}, inputs=job_inputs(job))
    work = job.extra["work"]
    if work is not None and work.is_dir() and work == checkpoint_dir(config.out):
        shutil.rmtree(work)  # the run finished and its result is saved: the checkpoints are spent
        print(f"removed the checkpoints in {work} (the result is saved in {config.out})", file=sys.stderr)


MASKLLM = (validate, load, evaluate_stage("before"), learn, save, evaluate_stage("after"), report)


def run_maskllm(config: MaskLLMConfig, model=None, tokenizer=None, progress: bool = True) -> Job:
    """Run a MaskLLM job (``model`` may be given loaded, with its ``tokenizer``)."""
    return run_stages(Job(config, model, kind="maskllm", tokenizer=tokenizer, progress=progress), MASKLLM)


def summary(report: dict) -> list[str]:
    m = report["maskllm"]
    final = m.get("final") or {}
    return [f"maskllm {report['target']}, prior {m['prior']}, {m['steps']} steps, {m['tokens']} tokens of {m['data']}"
            + (f", final loss {final['ce']:.4f}" if "ce" in final else ""),
            f"sparsity of decoder linears: {report['sparsity']:.4f}"]


def _windows(c: MaskLLMConfig) -> list[tuple[str, int]]:
    return [("seqlen", c.seqlen)] + ([("ppl_seqlen", ppl_seqlen(c))] if c.ppl else [])


KIND = JobKind(
    name="maskllm", config=MaskLLMConfig, run=lambda c, progress: run_maskllm(c, progress=progress).report,
    summary=summary, output="sparse", trains=True, reads=lambda c: {"train_data": c.train_data},
    files=lambda c: {} if c.prior in (None, "none", *ONESHOT_PRIORS) else {"prior": c.prior},
    windows=_windows, command="learn N:M masks end to end (MaskLLM) and apply them",
    saved_note="masks: {out}/masks.npz, report: {out}/pruning.json")
