"""``maskllm(model, tokenizer, options)``: learn an N:M mask end to end and apply it.

validate (pattern, shapes, data, prior, resume) → attach masks → prior → train → hard masks.
Everything that can be refused is refused before the prior or the training starts.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from llmprune.data.sources import Corpus
from llmprune.errors import LLMPruneError
from llmprune.jobs.header import peak_gpu_mb, peak_rss_mb
from llmprune.maskllm.candidates import parse_nm
from llmprune.maskllm.gumbel import NoiseSource, attach_masks, check_divisible, detach_masks
from llmprune.maskllm.memory import check_train_memory
from llmprune.maskllm.options import MaskLLMOptions
from llmprune.maskllm.prior import apply_prior, check_prior, masked_shapes, oneshot_prior
from llmprune.maskllm.task import MaskLLMTask, model_fingerprint, prior_fingerprint
from llmprune.models.layers import context_length
from llmprune.options import validated
from llmprune.sparsity.methods import METHODS
from llmprune.train.stream import training_stream
from llmprune.train.trainer import Trainer, accelerator_for, check_resume

# Every one-shot method gives a prior: its mask without a weight update (SparseGPT's is the
# reference's default); the names come from the one registry.
ONESHOT_PRIORS = tuple(sorted(METHODS, key=lambda name: name != "sparsegpt"))


@dataclass
class MaskLLMResult:
    """The model with the hard masks applied, the masks, the training log and a report."""

    model: nn.Module
    masks: dict[str, torch.Tensor]  # {weight name: (out, in) bool keep-mask}
    log: list[dict]
    report: dict = field(default_factory=dict)


def validate(model: nn.Module, opts: MaskLLMOptions, prior, resume, world: int,
             fingerprint: dict, device: torch.device) -> tuple[int, int, Path | None]:
    """Every check that needs no data pass: pattern, shapes, context, prior, resume directory."""
    n, m = parse_nm(opts.pattern)
    check_divisible(model, m, n)
    ctx = context_length(model)
    if ctx is not None and opts.seqlen > ctx:
        raise LLMPruneError(f"seqlen {opts.seqlen} is longer than the model's context ({ctx} tokens)")
    if isinstance(prior, str):
        if prior not in ONESHOT_PRIORS:
            raise LLMPruneError(f"prior {prior!r} is not one of {', '.join(ONESHOT_PRIORS)} (or a mask dict)")
    elif prior is not None:
        check_prior(prior, masked_shapes(model))
    check_train_memory(model, opts, n, m, device)
    ckpt = None
    if resume is not None:
        ckpt = check_resume(resume, fingerprint, opts, world)
    return n, m, ckpt


def maskllm(model: nn.Module, tokenizer, options: MaskLLMOptions | None = None, *,
            prior: str | Mapping[str, torch.Tensor] | None = None, prior_options: dict | None = None,
            corpus: Corpus | None = None, work_dir: str | Path | None = None,
            resume: str | Path | None = None, until: int | None = None, progress: bool = True,
            device: str | None = None, accelerator=None, **overrides) -> MaskLLMResult:
    """Learn an N:M mask for every decoder linear of ``model`` and apply it (in place).

    ``prior``: ``None`` (random init), a one-shot method name (``sparsegpt`` mask-only, the
    reference's default; any of :data:`ONESHOT_PRIORS`, e.g. ``wanda``, ``ria``) whose ``prune`` options are
    ``prior_options``, or a ``{weight name: bool keep-mask}`` dict (e.g. a mask file, or a
    previous run's masks: transfer). ``work_dir`` receives ``train_log.jsonl`` and
    ``checkpoints/``; ``resume`` is such a directory. ``device``: where to train (``cpu``,
    ``cuda``; ``None``: CUDA when available); the prior runs there too. ``overrides`` set option
    fields.
    """
    opts = validated(MaskLLMOptions, {**(options.model_dump() if options else {}), **overrides})
    acc = accelerator or accelerator_for(device)
    fingerprint = model_fingerprint(model, opts.pattern, prior_fingerprint(prior, prior_options))
    n, m, ckpt = validate(model, opts, prior, resume, acc.num_processes, fingerprint, acc.device)
    stream, corpus = training_stream(opts.train_data, tokenizer, opts.seqlen, opts.seed, corpus)

    prior_name = prior if isinstance(prior, str) or prior is None else "masks"
    t0 = time.perf_counter()
    if isinstance(prior, str) and ckpt is None:  # a resumed run takes its logits from the checkpoint
        # calibrate on the training text by default, in windows as long as the training ones
        calib = {"calib": opts.train_data, "seqlen": opts.seqlen, "seed": opts.seed, "device": str(acc.device),
                 **(prior_options or {})}
        prior = oneshot_prior(model, tokenizer, opts.pattern, prior, progress=progress, **calib)
    prior_s = time.perf_counter() - t0
    noise = NoiseSource(opts.seed)
    masks = attach_masks(model, n, m, opts.init_std, opts.seed, noise, opts.train_weights,
                         getattr(torch, opts.logits_dtype))
    try:
        if prior is not None and ckpt is None:
            apply_prior(masks, prior, opts.prior_strength)
        task = MaskLLMTask(model, masks, opts, noise, fingerprint)
        trainer = Trainer(model, task, stream, opts, work_dir, progress, acc)
        t1 = time.perf_counter()
        log = trainer.train(ckpt, until)
        train_s = time.perf_counter() - t1
    except BaseException:
        # Failed or interrupted (the checkpoints can resume it): hand the model back dense.
        detach_masks(model, apply=False)
        raise
    keep = detach_masks(model, apply=True)
    report = {"pattern": opts.pattern, "steps": trainer.step, "options": opts.model_dump(),
              "prior": prior_name,
              "data": corpus.label, "world_size": acc.num_processes, "device": str(acc.device),
              "tokens": stream.state.windows * opts.seqlen, "prior_seconds": prior_s,
              "train_seconds": train_s, "final": log[-1] if log else None,
              "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": peak_gpu_mb()}
    return MaskLLMResult(model, keep, log, report)
