"""``llmprune recover``: recovery fine-tuning as stages, sharing the one-shot job's.

validate → load → ppl → train → merge (lora) → ppl of the merged model → re-mask (lora) →
save → ppl → report. The input is any model ``load_model`` reads; its decoder linears' zeros are
the mask (a pruned directory written by llmprune, or ``--masks FILE``). The output holds the
recovered model (masked, or LoRA merged and re-masked: a plain HF directory with exactly the
input's pattern), or with ``--keep-adapter`` the untouched sparse base plus ``adapter/`` (peft's
``save_pretrained``); ``train_log.jsonl`` and ``pruning.json`` (kind ``recover``) beside it.
Checkpoints live in ``OUT.ckpt/`` while training (``--resume OUT.ckpt`` continues) and are
removed once the output is saved.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from pydantic import Field

from llmprune.config import RunOptions
from llmprune.data.sources import load_corpus
from llmprune.errors import LLMPruneError
from llmprune.eval.sparsity import measure_sparsity
from llmprune.export.save import REPORT_FILE, save_pruned
from llmprune.masks import MaskSet
from llmprune.pipeline import (
    Job,
    _versions,
    check_run,
    evaluate_stage,
    job_inputs,
    load,
    peak_rss_mb,
    run_stages,
)
from llmprune.pipeline import report as final_report
from llmprune.recover import distill, lora
from llmprune.recover.api import merge_adapter, model_masks, pruned_nonzero, recover, remask_result
from llmprune.recover.memory import check_recover_memory
from llmprune.recover.options import RecoverOptions
from llmprune.train.trainer import checkpoint_dir

LOG_FILE = "train_log.jsonl"
ADAPTER_DIR = "adapter"


class RecoverConfig(RunOptions, RecoverOptions):
    """One recovery job: the shared run options, recovery's own, a mask file and resume."""

    masks: str | None = Field(None, description="MASKS.npz (MaskLLM layout) to keep instead of the "
                                                "model's zeros; applied before training")
    resume: str | None = Field(None, description="continue an interrupted run from its checkpoint "
                                                 "directory (OUT.ckpt)")


def input_report(model: str) -> dict | None:
    """What the input directory's ``pruning.json`` says it is (kind, target, sparsity, and
    whether its decoder linears are dense: structured outputs have no mask), if any."""
    path = Path(model).expanduser() / REPORT_FILE
    if not path.is_file():
        return None
    try:
        r = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"file": str(path), "readable": False}
    recipe = r.get("recipe") or {}
    structured = r.get("kind") == "structured" or (r.get("method") in ("osscar", "depth") and "params" in r)
    kind = r.get("kind") or ("structured" if structured else "prune")
    masks = (r.get("recover") or {}).get("masks") if kind == "recover" else None
    return {"kind": kind, "target": r.get("target"), "sparsity": r.get("sparsity"),
            "method": recipe.get("method") if isinstance(recipe, dict) and "method" in recipe else r.get("method"),
            "dense": structured or (isinstance(masks, dict) and masks.get("sparsity") == 0)}


def check_teacher(job: Job) -> None:
    """Distillation: the teacher (given, or the input's dense model) exists and fits the
    student (tokenizer, logits, hidden size and layers), read from files before anything loads."""
    from llmprune.models.loading import _load_tokenizer, model_source

    config: RecoverConfig = job.config
    from_files = isinstance(job.model, str | None)
    student_shape = tokenizer = None
    if from_files and not Path(model_source(config.model)).expanduser().is_file():
        student_shape = distill.config_shape(config.model, config.trust_remote_code)
        tokenizer = _load_tokenizer(model_source(config.model), config.model, False, config.trust_remote_code)
    elif not from_files:
        student_shape, tokenizer = distill.shape_of(job.model), job.tokenizer
    plan = distill.plan_teacher(student_shape, tokenizer, RecoverOptions.pick(config), None,
                                source=config.model if from_files else getattr(job.model, "name_or_path", None),
                                trust_remote_code=config.trust_remote_code)
    job.extra["teacher"] = plan.name


def validate(job: Job) -> None:
    config: RecoverConfig = job.config.validate()
    if config.mode == "lora":
        lora.require_peft()
    if config.masks is not None and not Path(config.masks).expanduser().is_file():
        raise LLMPruneError(f"mask file {config.masks} does not exist")
    if config.resume is not None and not Path(config.resume).expanduser().is_dir():
        raise LLMPruneError(f"resume directory {config.resume} does not exist")
    job.data_files = [config.train_data, *([config.masks] if config.masks else [])]
    job.extra["corpus"] = load_corpus(config.train_data, "train")  # decoded before the model loads
    job.extra["input"] = input_report(config.model) if isinstance(job.model, str | None) else None
    check_run(job)
    if config.distills:
        check_teacher(job)


def check_model(job: Job) -> None:
    """The training state's memory against what is free, the teacher's (not loaded yet) included,
    before the first perplexity or any weight of the teacher is read."""
    config: RecoverConfig = job.config
    opts = RecoverOptions.pick(config)
    targets = lora.lora_targets(job.model, opts.lora_targets) if opts.mode == "lora" else None
    sizer = None
    if opts.distills:
        dtype = next(job.model.parameters()).dtype
        sizer = distill.teacher_skeleton(job.extra["teacher"], dtype, config.trust_remote_code)
    check_recover_memory(job.model, opts, targets, sizer, config.teacher_device or job.device, teacher_loaded=False)


def train(job: Job) -> None:
    """Masked fine-tuning or LoRA training; a LoRA adapter stays unmerged for the next stages."""
    config: RecoverConfig = job.config
    masks = dict(MaskSet.load(config.masks, job.model)) if config.masks else None
    if masks is None and (job.extra.get("input") or {}).get("dense"):
        # a structured output is dense and smaller: its exact zeros (dequantised weights have
        # some) are no mask, so every weight trains
        masks = {n: torch.ones_like(m) for n, m in model_masks(job.model).items()}
    work = Path(config.resume) if config.resume else checkpoint_dir(config.out)
    result = recover(job.model, job.tokenizer, RecoverOptions.pick(config), masks=masks,
                     teacher=job.extra.get("teacher"),
                     source=config.model if isinstance(config.model, str) else None,
                     trust_remote_code=config.trust_remote_code,
                     corpus=job.extra["corpus"], work_dir=work, resume=config.resume, finish=False,
                     progress=job.progress)
    job.model = result.model
    job.extra.update(result=result, work=work)


def _merging(job: Job) -> bool:
    return job.config.mode == "lora" and not job.config.keep_adapter


def merge(job: Job) -> None:
    """LoRA: merge the adapter into the weights (not yet re-masked)."""
    if _merging(job):
        job.model = merge_adapter(job.extra["result"]).model


def ppl_merged(job: Job) -> None:
    """Perplexity of the merged model before re-masking: what re-masking costs is the difference."""
    if _merging(job):
        evaluate_stage("merged")(job)


def remask(job: Job) -> None:
    if _merging(job):
        remask_result(job.extra["result"])


def save(job: Job) -> None:
    """Write the result (before the final evaluation, so a failure there loses nothing).

    With an adapter, peft writes it (its own format) and the base is saved without the adapter
    layers; the adapter read back from what was written is what the final perplexity measures.
    """
    config: RecoverConfig = job.config
    result = job.extra["result"]
    with tempfile.TemporaryDirectory(prefix="llmprune-adapter-") as tmp:
        adapter = result.is_adapter
        if adapter:
            result.model.save_pretrained(tmp)
            job.model = lora.unwrap(result.model)  # the sparse base, untouched
            result.report["pruned_nonzero"] = pruned_nonzero(job.model, result.masks)
        job.report = build_report(job, adapter)
        if config.out:
            log = "".join(json.dumps(r) + "\n" for r in result.log).encode()
            recipe = yaml.safe_dump({"recover": job.report["recipe"]}, sort_keys=False, allow_unicode=True)
            extra = {LOG_FILE: log}
            if adapter:
                extra[ADAPTER_DIR] = lambda path: shutil.copytree(tmp, path)
            job.saved = save_pruned(job.model, job.tokenizer, config.out, job.report, recipe,
                                    config.overwrite, extra_files=extra, inputs=job_inputs(job))
        if adapter:
            from peft import PeftModel

            where = job.saved / ADAPTER_DIR if job.saved else tmp
            job.model = result.model = PeftModel.from_pretrained(job.model, str(where))
    work = job.extra["work"]
    if job.saved and work is not None and work.is_dir() and work == checkpoint_dir(config.out):
        shutil.rmtree(work)  # the run finished and its result is saved: the checkpoints are spent
        print(f"removed the checkpoints in {work} (the result is saved in {config.out})", file=sys.stderr)


def build_report(job: Job, adapter: bool) -> dict:
    config: RecoverConfig = job.config
    result = job.extra["result"]
    sparsity = measure_sparsity(job.model)  # the (base) model as saved
    masks = result.report["masks"]
    return {
        "kind": "recover", "versions": _versions(),
        "recipe": config.model_dump(exclude={"out", "overwrite"}),
        "model": {"name": config.model, "class": type(job.model).__name__,
                  "prunable_params": sparsity["params"]},
        "input": job.extra.get("input"), "device": job.device, "mode": config.mode,
        "target": masks["nm"] or f"sparsity {masks['sparsity']:.4f}",
        "sparsity": sparsity["overall"], "recover": result.report,
        "adapter": ADAPTER_DIR if adapter and config.out else None,
        "ppl": job.ppl, "timings": job.timings, "peak_rss_mb": peak_rss_mb(),
    }


def report(job: Job) -> None:
    """What re-masking cost (merged vs merged + re-masked PPL), then the shared final report."""
    merged, after = job.ppl.get("merged") or {}, job.ppl.get("after") or {}
    if merged and after:
        job.report["remask_cost"] = {
            name: {"merged_ppl": merged[name]["ppl"], "remasked_ppl": after[name]["ppl"],
                   "delta": after[name]["ppl"] - merged[name]["ppl"]}
            for name in merged if name in after}
    final_report(job)


RECOVER = (validate, load, check_model, evaluate_stage("before"), train, merge, ppl_merged, remask, save,
           evaluate_stage("after"), report)
LORA_MERGE_ONLY = (merge, ppl_merged, remask)  # no-ops unless LoRA is merged (left out, so untimed)


def recover_stages(config: RecoverConfig) -> tuple:
    """The stages of ``config``'s job: :data:`RECOVER`, without the merge stages when no
    adapter is merged (masked fine-tuning, ``keep_adapter``)."""
    if config.mode == "lora" and not config.keep_adapter:
        return RECOVER
    return tuple(s for s in RECOVER if s not in LORA_MERGE_ONLY)


def run_recover(config: RecoverConfig, model=None, tokenizer=None, progress: bool = True) -> Job:
    """Run a recovery job (``model`` may be given loaded, with its ``tokenizer``)."""
    return run_stages(Job(config, model, tokenizer, progress=progress), recover_stages(config))
