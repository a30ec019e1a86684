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
from dataclasses import replace
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field

from llmprune.config import RunOptions
from llmprune.data.sources import load_corpus
from llmprune.eval.sparsity import measure_sparsity
from llmprune.export.save import report_kind, save_pruned
from llmprune.jobs.context import (
    Job,
    check_run,
    evaluate_stage,
    job_inputs,
    load,
    ppl_seqlen,
    run_stages,
)
from llmprune.jobs.context import report as final_report
from llmprune.jobs.header import header
from llmprune.jobs.kind import JobKind
from llmprune.masks import MaskSet
from llmprune.masks.files import MASK_FILE, read_packed
from llmprune.models.loading import input_paths
from llmprune.recover import distill, lora
from llmprune.recover.api import merge_adapter, pruned_nonzero, recover, remask_result
from llmprune.recover.memory import check_recover_memory
from llmprune.recover.options import RecoverOptions
from llmprune.report import optional_report
from llmprune.train.trainer import check_resume_dir, checkpoint_dir

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
    r = optional_report(model)
    if r is None:
        return None
    recipe = r.get("recipe") or {}
    kind = report_kind(r)
    structured = kind == "structured"
    masks = (r.get("recover") or {}).get("masks") if kind == "recover" else None
    return {"kind": kind, "target": r.get("target"), "sparsity": r.get("sparsity"),
            "method": recipe.get("method") if isinstance(recipe, dict) and "method" in recipe else r.get("method"),
            "dense": structured or (isinstance(masks, dict) and masks.get("sparsity") == 0)}


def check_teacher(job: Job) -> None:
    """Distillation: the teacher (given, or the input's dense model) exists and fits the
    student (tokenizer, logits, hidden size and layers), read from files before anything loads."""
    from llmprune.models.loading import load_tokenizer, model_source

    config: RecoverConfig = job.config
    from_files = isinstance(job.model, str | None)
    student_shape = tokenizer = None
    if from_files and not Path(model_source(config.model)).expanduser().is_file():
        student_shape = distill.config_shape(config.model, config.trust_remote_code)
        tokenizer = load_tokenizer(model_source(config.model), config.model, False, config.trust_remote_code)
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
    if config.masks is not None:
        read_packed(config.masks)  # a damaged file: one line now; names and shapes once the model is loaded
    if config.resume is not None:
        check_resume_dir(config.resume)
    job.data_files = [config.train_data, *([config.masks] if config.masks else [])]
    job.extra["corpus"] = load_corpus(config.train_data, "train")  # decoded before the model loads
    job.extra["input"] = input_report(config.model) if isinstance(job.model, str | None) else None
    if config.distills:
        check_teacher(job)
        job.data_files += input_paths(job.extra["teacher"])  # an input too: never under --out
    check_run(job)


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
    check_recover_memory(job.model, opts, targets, sizer, config.teacher_device or job.device, teacher_loaded=False,
                         device=job.device)


def train(job: Job) -> None:
    """Masked fine-tuning or LoRA training; a LoRA adapter stays unmerged for the next stages."""
    config: RecoverConfig = job.config
    masks = dict(MaskSet.to_keep(job.model, config.model, config.masks, bool((job.extra.get("input") or {}).get("dense"))))
    work = Path(config.resume).expanduser().resolve() if config.resume else checkpoint_dir(config.out)
    result = recover(job.model, job.tokenizer, RecoverOptions.pick(config), masks=masks,
                     teacher=job.extra.get("teacher"),
                     source=config.model if isinstance(config.model, str) else None,
                     trust_remote_code=config.trust_remote_code,
                     corpus=job.extra["corpus"], work_dir=work, resume=config.resume, finish=False,
                     progress=job.progress, device=job.device)
    job.device = result.report["device"]  # where it trained (the accelerator's device)
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
            extra = {LOG_FILE: log, MASK_FILE: MaskSet(result.masks).save}
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
    out = header(job)
    out["model"]["prunable_params"] = sparsity["params"]
    return {**out, "input": job.extra.get("input"), "mode": config.mode,
            "target": masks["nm"] or f"sparsity {masks['sparsity']:.4f}",
            "sparsity": sparsity["overall"], "recover": result.report,
            "masks": {"file": MASK_FILE, "nm": masks["nm"]},
            "adapter": ADAPTER_DIR if adapter and config.out else None}


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


def run_recover(config: RecoverConfig, model=None, tokenizer=None, progress: bool = True,
                kind: str = "recover") -> Job:
    """Run a recovery job (``model`` may be given loaded, with its ``tokenizer``); ``kind`` is
    what its report records (``distill`` for the chain's distillation stage)."""
    return run_stages(Job(config, model, kind=kind, tokenizer=tokenizer, progress=progress), recover_stages(config))


def summary(report: dict) -> list[str]:
    """Recovery: mode, steps, the pattern kept, what re-masking cost."""
    r = report["recover"]
    final = r.get("final") or {}
    mode = r["mode"] + (f" r={r['lora']['rank']}" if "lora" in r else "")
    kept = r.get("pruned_nonzero")
    lines = [f"recover {mode}, {r['steps']} steps, {r['tokens']} tokens of {r['data']}"
             + (f", final loss {final['ce']:.4f}" if "ce" in final else ""),
             f"sparsity of decoder linears: {report['sparsity']:.4f} (mask {report['target']}"
             + ("" if kept is None else ", kept exactly" if kept == 0 else f", {kept} pruned weights nonzero") + ")"]
    if report.get("adapter"):
        lines.append(f"adapter saved in {report['adapter']}/ beside the untouched sparse base")
    if "remask" in r:
        lines.append(f"re-masking dropped {r['remask']['update_outside_mask']:.1%} of the LoRA update (‖ΔW‖²)")
    if "distill" in r:
        d = r["distill"]
        lines.append(f"distilled from {d['teacher']}: logit KL at T={d['temperature']:g} "
                     + (f"on its top-{d['topk']} tokens" if d["topk"] else "on the full vocabulary")
                     + (f" + {d['hidden_weight']:g} × hidden-state MSE over {len(d['layer_map'])} layers"
                        if d["hidden_weight"] else "") + (" + cross-entropy" if d["loss"] == "kd+ce" else "")
                     + (f", final KL {final['kd']:.4f}" if "kd" in final else ""))
    for name, cost in (report.get("remask_cost") or {}).items():
        lines.append(f"  PPL {name} merged, not re-masked: {cost['merged_ppl']:.3f}")
    return lines


def _windows(c: RecoverConfig) -> list[tuple[str, int]]:
    return [("seqlen", c.seqlen)] + ([("ppl_seqlen", ppl_seqlen(c))] if c.ppl else [])


KIND = JobKind(
    name="recover", config=RecoverConfig, run=lambda c, progress: run_recover(c, progress=progress).report,
    summary=summary, output="sparse", trains=True, reads=lambda c: {"train_data": c.train_data},
    files=lambda c: {"masks": c.masks} if c.masks else {},
    check=lambda c: lora.require_peft() if c.mode == "lora" else None,
    windows=_windows, command="fine-tune a pruned model with its mask fixed (masked, LoRA, or distillation from the dense model)",
    model_help="pruned directory (its recorded mask is kept), local HF dir, .gguf file or hub id")


class DistillConfig(RecoverConfig):
    """A ``distill`` stage: recovery by distillation from the dense teacher (``mode: distill``)."""

    mode: Literal["masked", "lora", "distill"] = Field("distill", description="distill (default here): masked "
                                                       "weights on the teacher's logit KL; lora: an adapter on it")
    loss: Literal["ce", "kd", "kd+ce"] | None = Field("kd", description="kd (default here): the teacher's logit "
                                                      "KL (plus hidden states with kd_hidden_weight) | kd+ce | ce")


# The chain's `distill` stage: `recover` with distillation by default, and its own kind in reports.
DISTILL = replace(KIND, name="distill", config=DistillConfig, command=None,
                  run=lambda c, progress: run_recover(c, progress=progress, kind="distill").report)
