"""One-shot pruning, the ``prune`` job kind: ``prune(model, config)``, and ``evaluate(...)``.

config → model → calibration windows → engine → (PPL) → save, with every check that can fail
done before the model is loaded or any weight changes. The stages every kind shares (checks,
loading, evaluation, the report) live in :mod:`llmprune.jobs.context`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llmprune.config import (
    NOT_IN_RECIPE,
    PruneConfig,
    add_prune_flags,
    prune_config_from_flags,
    resolve_device,
)
from llmprune.data.calibration import calibration_windows
from llmprune.data.sources import load_corpus
from llmprune.engine import memory
from llmprune.engine.blockwise import BlockwiseOptions, summarize
from llmprune.engine.memory import GiB, check_fits, estimate_bytes
from llmprune.engine.sequential import LayerPlan, refines, run_sequential
from llmprune.errors import LLMPruneError
from llmprune.eval.perplexity import check_eval_args, check_eval_data, eval_names
from llmprune.eval.perplexity import evaluate as evaluate_ppl
from llmprune.eval.placement import check_device
from llmprune.eval.sparsity import measure_sparsity
from llmprune.eval.zeroshot import evaluate_tasks, load_tasks, task_names
from llmprune.export.save import ALLOCATION_PLOT, save_pruned
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
from llmprune.jobs.header import header, resolved_recipe
from llmprune.jobs.kind import JobKind
from llmprune.masks import MaskSet
from llmprune.masks.files import MASK_FILE, pack, write_bits
from llmprune.masks.maskset import prunable_names, recorded_nm
from llmprune.models.layers import context_length, decoder_layers, linear_layers
from llmprune.models.loading import load_model
from llmprune.report import allocation_plot, format_allocation, format_blockwise, format_recon
from llmprune.sparsity.allocation import OWLAllocator, explicit_targets, weighted_mean
from llmprune.sparsity.methods import METHODS, REFINERS, SOLVERS, required_stats
from llmprune.sparsity.patterns import Target


@dataclass
class PruneResult:
    model: nn.Module
    tokenizer: object
    report: dict
    keep: dict[str, np.ndarray] = field(default_factory=dict)  # packed keep-masks, as pruned

    @property
    def masks(self) -> MaskSet:
        """The keep-masks of the pruned linears as the method chose them (a kept weight that is
        exactly 0 is still kept), to save, check or hand to the next stage."""
        return MaskSet.from_bits(self.keep, self.model)


def check_model_fits(model: nn.Module, config: PruneConfig, needs_data: bool) -> None:
    """Checks that need the model but no data: context length, N:M divisibility, the linears
    --refine-linears names."""
    ctx = context_length(model)
    lengths = [("seqlen", config.seqlen)] if needs_data else []
    if config.ppl:
        lengths.append(("ppl_seqlen", config.ppl_seqlen or config.seqlen))
    for name, n in lengths:
        if n is not None and ctx is not None and n > ctx:
            raise LLMPruneError(f"{name} {n} is longer than the model's context ({ctx} tokens); use --{name.replace('_', '-')} ≤ {ctx}")
    refined = config.refine_linears
    if refined is not None:
        names = {n for layer in decoder_layers(model) for n in linear_layers(layer)}
        if not any(refines(refined, [n]) for n in names):
            example = sorted(names)[0] if names else "self_attn.q_proj"
            raise LLMPruneError(f"--refine-linears {refined!r} matches no linear of the model; their names "
                                f"within a decoder layer look like {example!r}")
    if not config.has_target:  # explicit unstructured ratios for every layer: no shape rule
        return
    target = config.target
    for i, layer in enumerate(decoder_layers(model)):
        for name, lin in linear_layers(layer).items():
            target.check_shape(lin.in_features, f"layer {i} {name}")


def make_allocator(config: PruneConfig) -> OWLAllocator | None:
    """The engine's allocator for ``config.allocation`` (None: targets are fixed up front)."""
    if config.allocation == "owl":
        return OWLAllocator(config.target, config.owl_m, config.owl_lambda)
    return None


def fixed_targets(config: PruneConfig, n_layers: int) -> list[Target] | None:
    """Per-layer targets known before any data is seen: uniform or explicit (None for OWL).

    Raises :class:`LLMPruneError` when an explicit list does not match the model's layers.
    """
    if config.allocation == "explicit":
        return explicit_targets(config.layer_ratios, n_layers, config.target if config.has_target else None)
    if config.allocation == "uniform":
        return [config.target] * n_layers
    return None


def allocation_report(config: PruneConfig, layer_report: list[dict]) -> dict:
    """``report["allocation"]``: the kind, OWL's settings, and per-layer ratios / outlier ratios."""
    params = [sum(math.prod(lin["shape"]) for lin in L["linears"].values()) for L in layer_report]
    ratios = [L["target_sparsity"] for L in layer_report]
    out = {"kind": config.allocation, "targets": [L["target"] for L in layer_report],
           "ratios": ratios, "params": params,
           "weighted_mean": weighted_mean(ratios, params) if params and sum(params) else None}
    if config.allocation == "owl":
        out.update(owl_m=config.owl_m, owl_lambda=config.owl_lambda,
                   outlier_ratios=[L["outlier_ratio"] for L in layer_report],
                   statistics="dense model, one statistics-only pass before pruning (docs/owl.md)",
                   dense_pass_seconds=sum(L["allocation_seconds"] for L in layer_report))
    return out


# --- the stages of a one-shot job -------------------------------------------------------------
@dataclass
class PruneJob(Job):
    """A one-shot job's state beside the shared :class:`~llmprune.jobs.context.Job`."""

    needs: frozenset[str] = frozenset()  # statistics the method, solver and allocator read
    allocator: OWLAllocator | None = None
    targets: list[Target] | None = None
    plan: LayerPlan | None = None
    layer_report: list[dict] = field(default_factory=list)
    true_sequential: bool = False  # the mode the run uses (check_memory resolves the automatic one)


# The automatic mode prunes true-sequentially when everything it holds fits in this share of the
# free memory, leaving room for the estimate's error and for whatever else runs.
AUTO_TRUE_SEQUENTIAL_SHARE = 0.5


def check_memory(model: nn.Module, config: PruneConfig, device: str, needs: frozenset[str]) -> bool:
    """Refuse calibration settings whose activations and statistics (and block-wise
    reconstruction's dense stream and tuning state) will not fit, with numbers.

    Returns whether to prune true-sequentially: as ``config.true_sequential`` says, or, when it
    is None, whether that mode's held activations fit (in ``AUTO_TRUE_SEQUENTIAL_SHARE`` of the
    free memory; otherwise the exact mode runs, and says so).
    """
    hint = f"lower --nsamples ({config.nsamples}) or --seqlen ({config.seqlen})"
    blockwise = BlockwiseOptions.pick(config)
    if blockwise.enabled:
        hint += f" or --recon-batch ({config.recon_batch})"
    check_fits(estimate_bytes(model, config.nsamples, config.seqlen, needs, blockwise=blockwise), device,
               "pruning", hint)
    if config.true_sequential is False:
        return False
    one_pass = estimate_bytes(model, config.nsamples, config.seqlen, needs, true_sequential=True,
                              blockwise=blockwise)
    if config.true_sequential:
        check_fits(one_pass, device, "true-sequential pruning", f"{hint}, or pass --no-true-sequential")
        return True
    free, need = memory.available_bytes(device), sum(one_pass.values())
    if free is None or need <= AUTO_TRUE_SEQUENTIAL_SHARE * free:
        return True
    print(f"note: true-sequential pruning would need about {need / GiB:.2f} GiB, more than "
          f"{AUTO_TRUE_SEQUENTIAL_SHARE:.0%} of the {free / GiB:.2f} GiB free on {device}; "
          "pruning in the exact two-pass mode (--true-sequential insists)", file=sys.stderr)
    return False


def statistics_needed(config: PruneConfig, allocator=None) -> frozenset[str]:
    """The calibration statistics the method, solver, refiner and layer allocation read."""
    allocator = allocator if allocator is not None else make_allocator(config)
    return required_stats(config.method, config.solver, config.recon_error, config.refine) | (
        allocator.needs if allocator else frozenset())


def _calibrates(config: PruneConfig, needs: frozenset[str]) -> bool:
    """Whether a run reads calibration data: for statistics, or for block-wise reconstruction."""
    return bool(needs) or BlockwiseOptions.pick(config).enabled


def reads_data(job: PruneJob) -> bool:
    return _calibrates(job.config, job.needs)


def validate(job: PruneJob) -> None:
    """Everything that can be checked before the model loads: options, data, device, output."""
    config = job.config.validate()
    job.allocator = make_allocator(config)
    job.needs = statistics_needed(config, job.allocator)
    job.needs_tokenizer = reads_data(job) and job.ids is None
    if job.ids is not None:
        if tuple(job.ids.shape) != (config.nsamples, config.seqlen):
            raise LLMPruneError(f"calib_ids has shape {tuple(job.ids.shape)}, but the config says "
                                f"nsamples={config.nsamples}, seqlen={config.seqlen}")
    elif reads_data(job):
        job.data_files = [config.calib]
        job.corpus = load_corpus(config.calib, "train")  # decode errors surface before any loading
    check_run(job)


def check_model(job: PruneJob) -> None:
    """The recipe against the loaded model: context length, N:M divisibility, explicit ratios."""
    check_model_fits(job.model, job.config, reads_data(job))
    job.targets = fixed_targets(job.config, len(decoder_layers(job.model)))


def calibrate(job: PruneJob) -> str | None:
    """Tokenise the calibration windows and check their activations fit in memory."""
    config = job.config
    if not reads_data(job):
        return SKIPPED
    job.true_sequential = check_memory(job.model, config, job.device, job.needs)
    if job.ids is None:
        job.ids = calibration_windows(job.corpus, job.tokenizer, config.nsamples, config.seqlen, config.seed)
        job.corpus = None


def plan(job: PruneJob) -> None:
    config = job.config
    method = METHODS[config.method]
    solver = SOLVERS[config.solver or method.default_solver]
    refiner = REFINERS[config.refine]
    job.plan = LayerPlan(config.method, job.targets, config.solver, refine=config.refine,
                         refine_linears=config.refine_linears,
                         options=config.options_for(method.options, refiner.options, solver.options),
                         allocator=job.allocator, recon_error=config.recon_error,
                         true_sequential=job.true_sequential, blockwise=BlockwiseOptions.pick(config))


def run(job: PruneJob) -> None:
    job.layer_report = run_sequential(job.model, job.ids, job.plan, job.device, job.progress)


def pruning_mode(layers: list[dict]) -> str:
    """'true-sequential', 'exact', or 'mixed' (MoE layers run in the exact mode)."""
    modes = {e["true_sequential"] for e in layers}
    return "mixed" if len(modes) > 1 else "true-sequential" if modes == {True} else "exact"


def resolved_config(job: PruneJob) -> PruneConfig:
    """The config as it ran: every value the run decided (the automatic true-sequential mode, the
    dtype and device of ``auto``) written in, so ``recipe.yaml`` reproduces the run anywhere."""
    decided = {"true_sequential": job.true_sequential} if reads_data(job) else {}
    return PruneConfig.from_dict({**resolved_recipe(job, **decided), "out": job.config.out,
                                  "overwrite": job.config.overwrite})


def blockwise_section(job: PruneJob) -> dict:
    """``{"blockwise": summary}`` when block-wise reconstruction ran, else nothing."""
    entries = [L["blockwise"] for L in job.layer_report if "blockwise" in L]
    return {"blockwise": summarize(entries, BlockwiseOptions.pick(job.config))} if entries else {}


def build_report(job: PruneJob) -> dict:
    config, model = job.config, job.model
    sparsity = measure_sparsity(model)
    out = header(job, recipe=resolved_config(job).model_dump(exclude=set(NOT_IN_RECIPE)))
    out["model"]["prunable_params"] = sparsity["params"]
    return {
        **out,
        "target": str(config.target) if config.has_target else "explicit",
        "mode": pruning_mode(job.layer_report) if reads_data(job) else None,  # magnitude reads no data
        "sparsity": sparsity["overall"],
        "allocation": allocation_report(config, job.layer_report),
        "masks": {"file": MASK_FILE, "recorded": "by the engine, as pruned"},
        **blockwise_section(job),
        "layers": job.layer_report,
    }


def save(job: PruneJob) -> None:
    """Write the pruned model and its masks (before the final evaluation, so a failure there
    loses nothing)."""
    config = job.config
    job.report = build_report(job)
    if not config.out:
        return
    job.extra["keep"] = keep_bits(job)
    extra = {MASK_FILE: lambda path: write_bits(path, job.extra["keep"])}
    if config.allocation != "uniform":
        png = allocation_plot(job.report["allocation"], title=f"{Path(config.model).name} {config.method}")
        if png is None:
            print("matplotlib is not installed; skipping the allocation plot "
                  "(pip install matplotlib)", file=sys.stderr)
        else:
            extra[ALLOCATION_PLOT] = png
            job.report["allocation"]["plot"] = ALLOCATION_PLOT
    job.saved = save_pruned(job.model, job.tokenizer, config.out, job.report,
                            resolved_config(job).to_yaml(), config.overwrite, extra_files=extra,
                            inputs=job_inputs(job))


def keep_bits(job: PruneJob) -> dict[str, np.ndarray]:
    """Every prunable weight's keep-mask as packed bits: as the engine recorded it; fused MoE
    experts (pruned through views) from their weights, completed to each layer's N:M pattern."""
    bits = dict(job.plan.keep) if job.plan is not None else {}
    names = prunable_names(job.model)
    missing = [n for n in names if n not in bits]
    if missing:
        targets = [recorded_nm(L["target"]) for L in job.layer_report]
        read = MaskSet.from_model(job.model, targets or None)
        bits.update({n: pack(read[n].numpy()) for n in missing})
    return {n: bits[n] for n in names}


# validate → load → check → calibrate → evaluate → plan → run → save → evaluate → report
ONESHOT: tuple[Callable[[Job], None], ...] = (
    validate, load, check_model, calibrate, evaluate_stage("before"), plan, run, save,
    evaluate_stage("after"), report,
)


def prune(model: str | nn.Module | None = None, config: PruneConfig | None = None,
          tokenizer=None, progress: bool = True, calib_ids: torch.Tensor | None = None,
          **overrides) -> PruneResult:
    """Prune ``model`` (a name/path, or a loaded HF model plus ``tokenizer``) as ``config`` says.

    Keyword ``overrides`` set config fields, e.g. ``prune("smollm2-135m", method="wanda",
    sparsity=0.5)``. The model is pruned in place; with ``config.out`` it is also saved.
    ``calib_ids`` are precomputed ``(nsamples, seqlen)`` calibration windows (e.g. shared by
    the runs of a benchmark); without them they are drawn from ``config.calib``.
    """
    config = config or PruneConfig()
    if isinstance(model, str):
        overrides["model"] = model
    config = config.replace(**overrides)
    job = run_stages(PruneJob(config, model, tokenizer, calib_ids, progress), ONESHOT)
    return PruneResult(job.model, job.tokenizer, job.report, job.extra.get("keep") or keep_bits(job))


def evaluate(model: str | nn.Module, tokenizer=None, ppl: list[str] | str | None = ("wikitext2",),
             seqlen: int = 2048, max_windows: int | None = None, device: str = "auto",
             dtype: str = "auto", progress: bool = True, trust_remote_code: bool = False,
             tasks: list[str] | str | None = None, task_dir: str | None = None,
             task_limit: int | None = None, task_batch_size: int = 8) -> dict:
    """Perplexity of a model (a name/path or a loaded model + tokenizer) on each dataset, and
    its scores on zero-shot ``tasks`` (lm-eval; ``task_dir``: a folder of your own task YAMLs).

    Returns ``{dataset: ppl result, ..., "_sparsity": float}``, plus ``"_tasks": {task: ...}``
    when tasks were asked for (see :func:`llmprune.eval.zeroshot.evaluate_tasks`); ``ppl`` may
    be empty when there are tasks. Every argument, evaluation file and task (with its data) is
    checked before the model loads. The forward runs on ``device`` (``auto``: CUDA when there
    is one); a loaded model is back where it was afterwards.
    """
    names = eval_names(ppl) if ppl or not task_names(tasks) else []
    check_eval_args(seqlen, max_windows)
    dev = check_device(resolve_device(device))
    corpora = check_eval_data(names)
    task_set = load_tasks(tasks, task_dir) if task_names(tasks) else None
    if isinstance(model, str):
        model, tokenizer = load_model(model, device=dev, dtype=dtype, trust_remote_code=trust_remote_code)
    ctx = context_length(model)
    if names and ctx is not None and seqlen > ctx:
        raise LLMPruneError(f"seqlen {seqlen} is longer than the model's context ({ctx} tokens)")
    result = evaluate_ppl(model, tokenizer, names, seqlen, max_windows, progress, corpora=corpora,
                          device=dev) if names else {}
    if task_set is not None:
        result["_tasks"] = evaluate_tasks(model, tokenizer, task_set, task_batch_size, task_limit, dev, progress)
    result["_sparsity"] = measure_sparsity(model)["overall"]
    return result


def summary(report: dict) -> list[str]:
    """The one-shot lines of ``llmprune report`` / the end-of-run summary."""
    r = report["recipe"]
    lines = [f"method {r['method']}" + (f" + refine {r['refine']}" if r.get("refine", "none") != "none" else "")
             + (f" + solver {r['solver']}" if r.get("solver") else "")
             + f", target {report['target']}"
             + (f", calib {r['calib']} {r['nsamples']}x{r['seqlen']} seed {r['seed']}" if report.get("mode") else "")
             + (f", {report['mode']} mode" if report.get("mode") else ""),
             f"sparsity of decoder linears: {report['sparsity']:.4f}"]
    alloc = format_allocation(report.get("allocation"))
    if alloc:
        lines.append(alloc)
    return lines + format_recon(report.get("layers", [])) + format_blockwise(report.get("blockwise"))


def _reads(c: PruneConfig) -> dict[str, str]:
    return {"calib": c.calib} if _calibrates(c, statistics_needed(c)) else {}


def _windows(c: PruneConfig) -> list[tuple[str, int]]:
    return ([("seqlen", c.seqlen)] if _reads(c) else []) + ([("ppl_seqlen", ppl_seqlen(c))] if c.ppl else [])


KIND = JobKind(
    name="prune", config=PruneConfig, run=lambda c, progress: prune(config=c, progress=progress).report,
    summary=summary, output="sparse", reads=_reads, windows=_windows, layer_table=True,
    command="prune a model layer by layer with calibration data", from_flags=prune_config_from_flags,
    add_flags=add_prune_flags, saved_note="report: {out}/pruning.json; per-layer table: llmprune report {out}")
