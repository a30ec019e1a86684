"""The ``blockwise`` job kind: block-wise reconstruction of a model pruned before (by another
stage, run or tool), against its dense teacher, one decoder layer at a time.

It is the engine's block-wise stage (:mod:`llmprune.engine.blockwise`) on its own: where
``prune --reconstruct blockwise`` tunes each layer right after pruning it, this walks an
already pruned model. Each layer's targets come from the *teacher's* layer of the same index on
the dense stream (``recon_target: dense``: the dense model's own hidden states, so a layer also
corrects the error of the layers before it) or on the pruned stream (``local``); its kept weights
are tuned with the mask fixed — the recorded mask (``masks.npz``, or the weights completed to the
N:M pattern ``pruning.json`` records), or ``--masks FILE``. Only the student and one teacher layer
at a time are on the compute device.

validate → load → teacher → calibrate → ppl → tune → save → ppl → report.
"""

from __future__ import annotations

import time
from typing import Literal

import yaml
from pydantic import Field

from llmprune.config import RunOptions
from llmprune.data.calibration import calibration_windows
from llmprune.data.sources import load_corpus
from llmprune.engine.blockwise import BlockTuner, BlockwiseOptions, summarize
from llmprune.engine.memory import check_fits, estimate_bytes
from llmprune.engine.sequential import LayerWalk
from llmprune.errors import LLMPruneError
from llmprune.eval.placement import module_bytes
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
from llmprune.masks import MaskSet
from llmprune.masks.files import MASK_FILE, read_packed
from llmprune.models.layers import decoder_layers, linear_layers
from llmprune.models.loading import check_model_exists, input_paths, load_model
from llmprune.options import NonNegativeInt, PositiveInt
from llmprune.recover import distill
from llmprune.recover.job import input_report
from llmprune.report import format_blockwise


class BlockwiseConfig(RunOptions, BlockwiseOptions):
    """One block-wise reconstruction job: the shared run options, the stage's own, calibration
    data, the dense teacher and the mask."""

    reconstruct: Literal["blockwise"] = Field("blockwise", description="always blockwise in this job")
    teacher: str | None = Field(None, description="the dense model whose layers give the targets (default: the "
                                                  "model the input's pruning.json chain started from)")
    masks: str | None = Field(None, description="MASKS.npz to keep (default: the input's recorded mask)")
    calib: str = Field("c4", description="calibration data: c4 | wikitext2 | FILE (.txt/.jsonl)")
    nsamples: PositiveInt = Field(32, description="calibration windows")
    seqlen: PositiveInt = Field(1024, description="tokens per calibration window")
    seed: NonNegativeInt = Field(0, description="calibration sampling seed")


def validate(job: Job) -> None:
    """The teacher (named, or the input's dense model) exists and has the student's hidden size
    and layers; the mask file and the calibration text read; then the shared checks."""
    config: BlockwiseConfig = job.config.validate()
    teacher = config.teacher or distill.default_teacher(config.model)
    try:
        check_model_exists(teacher)
    except LLMPruneError as e:
        raise LLMPruneError(f"teacher: {e}") from None
    student_shape = distill.config_shape(config.model, config.trust_remote_code)
    teacher_shape = distill.config_shape(teacher, config.trust_remote_code)
    if student_shape and teacher_shape and (student_shape["hidden"], student_shape["layers"]) != (
            teacher_shape["hidden"], teacher_shape["layers"]):
        raise LLMPruneError(f"the teacher {teacher} has hidden size {teacher_shape['hidden']} and "
                            f"{teacher_shape['layers']} layers, the model {student_shape['hidden']} and "
                            f"{student_shape['layers']}: block-wise reconstruction pairs layer i with layer i. For "
                            "a structured output, tune it while it is made (structured --reconstruct blockwise)")
    if config.masks is not None:
        read_packed(config.masks)  # a damaged file: one line now; names and shapes once the model is loaded
    job.extra["teacher"] = teacher
    job.data_files = [config.calib, *([config.masks] if config.masks else []), *input_paths(teacher)]
    job.corpus = load_corpus(config.calib, "train")  # decoded before the model loads
    check_run(job)


def load_teacher(job: Job) -> None:
    """The teacher, on the CPU beside the student (its layers visit the device one at a time)."""
    config: BlockwiseConfig = job.config
    dtype = next(job.model.parameters()).dtype
    sizer = distill.teacher_skeleton(job.extra["teacher"], dtype, config.trust_remote_code)
    if sizer is not None:
        check_fits({"teacher weights": module_bytes(sizer)}, "cpu", "the teacher", "give a smaller --teacher")
    job.extra["teacher_model"], _ = load_model(job.extra["teacher"], dtype=dtype, need_tokenizer=False,
                                               trust_remote_code=config.trust_remote_code)


def calibrate(job: Job) -> None:
    """Calibration windows, and the two activation buffers and tuning state against free memory."""
    config: BlockwiseConfig = job.config
    check_fits(estimate_bytes(job.model, config.nsamples, config.seqlen, frozenset(),
                              blockwise=BlockwiseOptions.pick(config)), job.device, "block-wise reconstruction",
               f"lower --nsamples ({config.nsamples}), --seqlen ({config.seqlen}) or --recon-batch ({config.recon_batch})")
    job.ids = calibration_windows(job.corpus, job.tokenizer, config.nsamples, config.seqlen, config.seed)
    job.corpus = None


def mask_of(job: Job) -> MaskSet:
    """The mask kept exact (:meth:`MaskSet.to_keep`)."""
    config: BlockwiseConfig = job.config
    return MaskSet.to_keep(job.model, config.model, config.masks, bool((input_report(config.model) or {}).get("dense")))


def tune(job: Job) -> None:
    """Walk the student; at each layer the teacher's layer gives the targets, then the student's
    layer is tuned (its mask fixed) and the walk propagates through it."""
    config: BlockwiseConfig = job.config
    options = BlockwiseOptions.pick(config)
    masks = mask_of(job)
    masks.apply(job.model)  # the given pattern, exactly, before any tuning
    names = {id(m): n for n, m in job.model.named_modules()}
    teacher_layers = decoder_layers(job.extra["teacher_model"])
    walk = LayerWalk(job.model, job.ids, job.device, "blockwise", job.progress)
    tuner = BlockTuner(options, walk.inps)
    entries = []
    for i, layer in walk:
        t0 = time.perf_counter()
        dense = teacher_layers[i]
        dense.to(job.device)
        walk.set_target(dense, tuner)
        dense.to("cpu")
        prefix = names[id(layer)] + "."
        own = {n.removeprefix(prefix).removesuffix(".weight"): m for n, m in masks.items() if n.startswith(prefix)}
        unmasked = set(linear_layers(layer)) - set(own)
        if unmasked and masks.sparsity > 0:  # e.g. fused MoE experts: no per-expert mask to keep exact
            raise LLMPruneError(f"layer {i}: {sorted(unmasked)[0]} has no mask of its own, so tuning would make "
                                "it dense; prune with --reconstruct blockwise instead")
        entry = walk.reconstruct(layer, tuner, own, None, time.perf_counter() - t0)
        entries.append({"index": i, **entry})
    job.extra["blockwise"] = {**summarize(entries, options), "teacher": job.extra["teacher"], "layers_detail": entries}
    job.extra["masks"] = masks
    del job.extra["teacher_model"]


def save(job: Job) -> None:
    config: BlockwiseConfig = job.config
    masks: MaskSet = job.extra["masks"]
    sparsity = measure_sparsity(job.model)
    job.report = {**header(job), "target": f"{nm[0]}:{nm[1]}" if (nm := masks.nm()) else f"sparsity {masks.sparsity:.4f}",
                  "sparsity": sparsity["overall"], "blockwise": job.extra["blockwise"],
                  "masks": {"file": MASK_FILE, "nm": f"{nm[0]}:{nm[1]}" if nm else None}}
    job.report["model"]["prunable_params"] = sparsity["params"]
    if config.out:
        recipe = yaml.safe_dump({"blockwise": job.report["recipe"]}, sort_keys=False, allow_unicode=True)
        job.saved = save_pruned(job.model, job.tokenizer, config.out, job.report, recipe, config.overwrite,
                                extra_files={MASK_FILE: masks.save}, inputs=job_inputs(job))


BLOCKWISE = (validate, load, load_teacher, calibrate, evaluate_stage("before"), tune, save, evaluate_stage("after"),
             report)


def run_blockwise(config: BlockwiseConfig, progress: bool = True) -> Job:
    return run_stages(Job(config, kind="blockwise", progress=progress), BLOCKWISE)


def summary(report: dict) -> list[str]:
    b = report["blockwise"]
    return [f"block-wise reconstruction against {b['teacher']}, mask {report['target']} kept",
            f"sparsity of decoder linears: {report['sparsity']:.4f}", *format_blockwise(b)]


KIND = JobKind(
    name="blockwise", config=BlockwiseConfig, run=lambda c, progress: run_blockwise(c, progress).report,
    summary=summary, output="sparse", reads=lambda c: {"calib": c.calib},
    files=lambda c: {"masks": c.masks} if c.masks else {},
    windows=lambda c: [("seqlen", c.seqlen)] + ([("ppl_seqlen", ppl_seqlen(c))] if c.ppl else []),
    command="tune an already pruned model block by block towards its dense teacher (mask fixed)",
    model_help="pruned directory (its recorded mask is kept), local HF dir, .gguf file or hub id")
