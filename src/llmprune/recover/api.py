"""``recover(model, tokenizer, options)``: fine-tune a pruned model with its mask fixed.

validate (mode, peft, masks, targets, memory, resume) → masks → task → MaskLLM's trainer →
(LoRA) merge and re-mask. Everything that can be refused is refused before training starts.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from llmprune.data.sources import Corpus
from llmprune.errors import LLMPruneError
from llmprune.masks import MaskSet
from llmprune.models.adapter import masked_linears
from llmprune.models.layers import context_length
from llmprune.options import validated
from llmprune.recover import lora
from llmprune.recover.memory import check_recover_memory
from llmprune.recover.options import RecoverOptions
from llmprune.recover.task import LoraTask, MaskedFinetuneTask, recover_fingerprint
from llmprune.train.stream import training_stream
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


def validate(model: nn.Module, opts: RecoverOptions, masks, resume, world: int, device: torch.device | None = None
             ) -> tuple[dict[str, torch.Tensor], list[str] | None, Path | None]:
    """Every check that needs no data pass: context, peft, LoRA targets, masks, memory, resume."""
    ctx = context_length(model)
    if ctx is not None and opts.seqlen > ctx:
        raise LLMPruneError(f"seqlen {opts.seqlen} is longer than the model's context ({ctx} tokens)")
    targets = None
    if opts.mode == "lora":
        lora.require_peft()
        targets = lora.lora_targets(model, opts.lora_targets)
    keep = model_masks(model, masks)
    check_recover_memory(model, opts, targets, device)
    ckpt = None
    if resume is not None:
        ckpt = check_resume(resume, recover_fingerprint(model, keep, opts.mode), opts, world)
    return keep, targets, ckpt


def recover(model: nn.Module, tokenizer, options: RecoverOptions | None = None, *,
            masks: Mapping[str, torch.Tensor] | None = None, corpus: Corpus | None = None,
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
    """
    opts = validated(RecoverOptions, {**(options.model_dump() if options else {}), **overrides})
    acc = accelerator or accelerator_for(device)
    keep, targets, ckpt = validate(model, opts, masks, resume, acc.num_processes, acc.device)
    stream, corpus = training_stream(opts.train_data, tokenizer, opts.seqlen, opts.seed, corpus)
    if masks is not None:
        MaskSet({n: keep[n] for n in masks}).apply(model)  # the given pattern, before the fingerprint
    fingerprint = recover_fingerprint(model, keep, opts.mode)
    sparsity = MaskSet(keep).sparsity
    if sparsity == 0:
        print("llmprune: note: the model has no pruned (zero) weights in its decoder linears; "
              "recovery trains it like a dense model", file=sys.stderr)

    if opts.mode == "masked":
        trained, task = model, MaskedFinetuneTask(model, keep, fingerprint)
    else:
        trained = lora.wrap_lora(model, targets, opts.lora_rank, opts.lora_alpha, opts.lora_dropout, opts.seed)
        task = LoraTask(trained, opts.lora_dropout, fingerprint)
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
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None}
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
