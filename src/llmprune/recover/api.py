"""``recover(model, tokenizer, options)``: fine-tune a pruned model with its mask fixed.

validate (mode, peft, masks, targets, teacher, memory, resume) → (teacher loads) → masks →
loss terms → task → the trainer → (LoRA) merge and re-mask. Everything that can be refused is refused before training starts.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from llmprune.data.sources import Corpus
from llmprune.errors import LLMPruneError
from llmprune.jobs.header import peak_gpu_mb, peak_rss_mb
from llmprune.masks import MaskSet
from llmprune.models.adapter import decoder_layers, masked_linears
from llmprune.models.layers import context_length
from llmprune.options import validated
from llmprune.recover import distill, lora
from llmprune.recover.memory import check_recover_memory
from llmprune.recover.options import RecoverOptions
from llmprune.recover.task import LoraTask, MaskedFinetuneTask, recover_fingerprint
from llmprune.train.losses import HiddenMSE, LMLoss, LogitKL, LossTerm
from llmprune.train.stream import training_stream
from llmprune.train.teacher import Teacher
from llmprune.train.trainer import Trainer, accelerator_for, check_resume


@dataclass
class RecoverResult:
    """``model``: the recovered model (masked: in place; lora: merged and re-masked, or with
    ``keep_adapter`` / ``finish=False`` the ``peft`` model over the untouched sparse base).
    ``masks``: the fixed keep-masks; ``log``: the training log; ``report``: what was done."""

    model: nn.Module
    masks: dict[str, torch.Tensor]  # {weight name: (out, in) bool keep-mask}
    log: list[dict]
    report: dict = field(default_factory=dict)

    @property
    def is_adapter(self) -> bool:
        """True while ``model`` is a ``peft`` model (adapter not merged)."""
        return hasattr(self.model, "peft_config") and hasattr(self.model, "get_base_model")


@torch.no_grad()
def model_masks(model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The fixed keep-mask of every decoder linear: ``masks[name]`` where given (names and
    shapes checked), else the weight's nonzeros (a pruned model's zeros are its mask)."""
    lins = masked_linears(model)
    weights = {f"{n}.weight": lin.weight for n, lin in lins.items()}
    given = dict(MaskSet(masks)) if masks is not None else {}
    for name, keep in given.items():
        if name not in weights:
            raise LLMPruneError(f"mask {name} names no decoder linear weight of {type(model).__name__}")
        if tuple(keep.shape) != tuple(weights[name].shape):
            raise LLMPruneError(f"mask {name} has shape {tuple(keep.shape)}, the weight {tuple(weights[name].shape)}")
    return {n: (given[n] if n in given else (w != 0).cpu()) for n, w in weights.items()}


@torch.no_grad()
def pruned_nonzero(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> int:
    """How many pruned weights (``~mask``) of ``model`` are not exactly zero (0: pattern intact)."""
    params = dict(model.named_parameters())
    return sum(int((params[n][~m.to(params[n].device)] != 0).sum()) for n, m in masks.items())


def validate(model: nn.Module, opts: RecoverOptions, masks, resume, world: int, device: torch.device | None = None,
             teacher: distill.TeacherPlan | None = None, teacher_device=None
             ) -> tuple[dict[str, torch.Tensor], list[str] | None, Path | None]:
    """Every check that needs no data pass: context, peft, LoRA targets, masks, memory (the
    teacher's too), resume."""
    ctx = context_length(model)
    if ctx is not None and opts.seqlen > ctx:
        raise LLMPruneError(f"seqlen {opts.seqlen} is longer than the model's context ({ctx} tokens)")
    targets = None
    if opts.mode == "lora":
        lora.require_peft()
        targets = lora.lora_targets(model, opts.lora_targets)
    keep = model_masks(model, masks)
    sizer = teacher.sizer if teacher is not None else None
    check_recover_memory(model, opts, targets, sizer, teacher_device,
                         teacher_loaded=teacher is not None and teacher.model is not None, device=device)
    ckpt = None
    if resume is not None:
        ckpt = check_resume(resume, recover_fingerprint(model, keep, opts.mode), opts, world)
    return keep, targets, ckpt


def loss_terms(opts: RecoverOptions, teacher: Teacher | None, student_layers: list[nn.Module]) -> list[LossTerm]:
    """What the loss sums: the LM loss (weight 0 under ``kd``: logged only), the logit KL and
    SquareHead's hidden-state term."""
    terms: list[LossTerm] = [LMLoss(1.0 if opts.loss in ("ce", "kd+ce") else 0.0)]
    if teacher is not None:
        terms.append(LogitKL(teacher, opts.kd_temperature))
        if opts.kd_hidden_weight:
            terms.append(HiddenMSE(teacher, student_layers, opts.kd_hidden_weight))
    return terms


def recover(model: nn.Module, tokenizer, options: RecoverOptions | None = None, *,
            masks: Mapping[str, torch.Tensor] | None = None, teacher: nn.Module | str | None = None,
            teacher_tokenizer=None, layer_map: list[int] | None = None, source: str | None = None,
            trust_remote_code: bool = False, corpus: Corpus | None = None,
            work_dir: str | Path | None = None, resume: str | Path | None = None,
            until: int | None = None, finish: bool = True, progress: bool = True,
            device: str | None = None, accelerator=None, **overrides) -> RecoverResult:
    """Fine-tune ``model`` (pruned; in place) to recover quality, keeping its mask exactly.

    ``masks``: ``{weight name: bool keep-mask}`` for some or all decoder linears (others: the
    weight's zeros); the given masks are applied first. ``mode="masked"`` trains the kept
    weights; ``mode="lora"`` trains a ``peft`` LoRA adapter and, with ``finish`` and without
    ``keep_adapter``, merges it and re-applies the mask (``report["remask"]`` says how much of
    the update that dropped). ``work_dir`` receives ``train_log.jsonl`` and ``checkpoints/``;
    ``resume`` is such a directory. ``device``: where to train (``cpu``, ``cuda``; ``None``: CUDA
    when available). ``overrides`` set option fields.

    Distillation (``loss="kd"`` / ``"kd+ce"``, or ``mode="distill"``): ``teacher`` is a loaded
    model or a name ``load_model`` reads (default: ``teacher`` option, else the dense model of
    ``source``'s — default ``model.name_or_path`` — pruning.json chain); it must share the
    student's tokenizer (``teacher_tokenizer`` checks a loaded one). ``layer_map[i]``: the
    teacher layer student layer ``i`` is compared with by the hidden term (default: identity,
    or the layers a depth pruning recorded in the chain kept).
    """
    opts = validated(RecoverOptions, {**(options.model_dump() if options else {}), **overrides})
    if teacher is not None and not opts.distills:
        raise LLMPruneError(f"a teacher was given but the loss is {opts.loss}; give loss='kd' (or mode='distill')")
    acc = accelerator or accelerator_for(device)
    plan = (distill.plan_teacher(model, tokenizer, opts, teacher, teacher_tokenizer, layer_map, source,
                                 trust_remote_code) if opts.distills else None)
    teacher_device = opts.teacher_device or acc.device
    keep, targets, ckpt = validate(model, opts, masks, resume, acc.num_processes, acc.device, plan, teacher_device)
    stream, corpus = training_stream(opts.train_data, tokenizer, opts.seqlen, opts.seed, corpus)
    if masks is not None:
        MaskSet({n: keep[n] for n in masks}).apply(model)  # the given pattern, before the fingerprint
    fingerprint = recover_fingerprint(model, keep, opts.mode)
    sparsity = MaskSet(keep).sparsity
    if sparsity == 0:
        print("llmprune: note: the model has no pruned (zero) weights in its decoder linears; "
              "recovery trains it like a dense model", file=sys.stderr)
    coach = None
    if plan is not None:
        t_model = distill.load_teacher(plan, model, trust_remote_code)  # its memory: in validate's estimate
        coach = Teacher(t_model, plan.layer_map, opts.kd_topk, teacher_device, opts.batch_size, opts.seqlen)
        fingerprint["teacher"] = distill.teacher_fingerprint(t_model)
    terms = loss_terms(opts, coach, list(decoder_layers(model)))

    if opts.mode == "masked":
        trained, task = model, MaskedFinetuneTask(model, keep, fingerprint, terms, coach)
    else:
        trained = lora.wrap_lora(model, targets, opts.lora_rank, opts.lora_alpha, opts.lora_dropout, opts.seed)
        task = LoraTask(trained, opts.lora_dropout, fingerprint, terms, coach)
    try:
        trainer = Trainer(trained, task, stream, opts, work_dir, progress, acc)
        t0 = time.perf_counter()
        log = trainer.train(ckpt, until)
        train_s = time.perf_counter() - t0
    except BaseException:
        if opts.mode == "lora":  # hand the model back without the adapter (checkpoints can resume)
            lora.unwrap(trained)
        raise
    report = {"mode": opts.mode, "steps": trainer.step, "options": opts.model_dump(),
              "data": corpus.label, "world_size": acc.num_processes, "device": str(acc.device),
              "tokens": stream.state.windows * opts.seqlen, "train_seconds": train_s,
              "final": log[-1] if log else None,
              "masks": {"given": masks is not None, "sparsity": sparsity,
                        "nm": "{}:{}".format(*nm) if (nm := MaskSet(keep).nm()) else None},
              "trainable_params": sum(p.numel() for g in task.param_groups(opts.lr) for p in g["params"]),
              "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": peak_gpu_mb()}
    if plan is not None:
        report["distill"] = {"teacher": plan.name, "loss": opts.loss, "temperature": opts.kd_temperature,
                             "topk": opts.kd_topk or None, "hidden_weight": opts.kd_hidden_weight,
                             "layer_map": plan.layer_map, "teacher_device": str(teacher_device),
                             "teacher_placement": coach.placement}
    if opts.mode == "lora":
        report["lora"] = {"targets": len(targets), "rank": opts.lora_rank, "alpha": opts.lora_alpha,
                          "dropout": opts.lora_dropout}
    result = RecoverResult(trained, keep, log, report)
    if finish and opts.mode == "lora" and not opts.keep_adapter:
        merge_and_remask(result)
    if not result.is_adapter:
        report["pruned_nonzero"] = pruned_nonzero(result.model, keep)
    return result


def merge_adapter(result: RecoverResult) -> RecoverResult:
    """Merge a LoRA result's adapter into the weights (in place; dense where it was sparse).
    Records in ``report["remask"]`` the share of the update that re-masking will drop."""
    if not result.is_adapter:
        raise LLMPruneError("this recovery result has no adapter to merge")
    result.report["remask"] = {"update_outside_mask": lora.update_outside_mask(result.model, result.masks)}
    result.model = lora.merge(result.model)
    return result


def remask_result(result: RecoverResult) -> RecoverResult:
    """Re-apply the fixed mask to a merged result: its pattern is exactly the input's again."""
    lora.remask(result.model, result.masks)
    result.report["pruned_nonzero"] = pruned_nonzero(result.model, result.masks)
    return result


def merge_and_remask(result: RecoverResult) -> RecoverResult:
    """:func:`merge_adapter` then :func:`remask_result`."""
    return remask_result(merge_adapter(result))
