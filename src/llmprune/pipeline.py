"""The public entry points: ``prune(model, config)`` and ``evaluate(...)``.

config → model → calibration windows → engine → (PPL) → save, with every check that can fail
done before the model is loaded or any weight changes.
"""

from __future__ import annotations

import contextlib
import math
import platform
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from llmprune.config import PruneConfig, RunOptions, resolve_device
from llmprune.data.calibration import calibration_windows
from llmprune.data.sources import Corpus, load_corpus
from llmprune.engine import memory
from llmprune.engine.memory import GiB, check_fits, estimate_bytes
from llmprune.engine.sequential import LayerPlan, refines, run_sequential
from llmprune.errors import LLMPruneError
from llmprune.eval.perplexity import check_eval_args, check_eval_data, eval_names
from llmprune.eval.perplexity import evaluate as evaluate_ppl
from llmprune.eval.placement import check_device
from llmprune.eval.sparsity import measure_sparsity
from llmprune.eval.zeroshot import TaskSet, evaluate_tasks, load_tasks, task_names
from llmprune.export.save import (
    ALLOCATION_PLOT,
    check_output_dir,
    output_lock,
    save_pruned,
    update_report,
)
from llmprune.masks import MaskSet
from llmprune.models.layers import context_length, decoder_layers, linear_layers
from llmprune.models.loading import check_model_exists, load_model
from llmprune.report import allocation_plot
from llmprune.sparsity.allocation import OWLAllocator, explicit_targets, weighted_mean
from llmprune.sparsity.methods import METHODS, REFINERS, SOLVERS, required_stats
from llmprune.sparsity.patterns import Target


@dataclass
class PruneResult:
    model: nn.Module
    tokenizer: object
    report: dict

    @property
    def masks(self) -> MaskSet:
        """The keep-masks of the pruned linears, to save, check or hand to the next stage."""
        return MaskSet.from_model(self.model)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _versions() -> dict:
    import transformers

    from llmprune import __version__

    return {"llmprune": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


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
class Job:
    """What the stages of one job hand to each other (see :data:`ONESHOT`).

    ``config`` is any recipe built on :class:`RunOptions` (one-shot, MaskLLM, ...): the shared
    stages (:func:`check_run`, :func:`load`, :func:`evaluate_stage`, :func:`report`) read only
    those fields; an entry point's own stages read the rest and keep their state in ``extra``.
    """

    config: RunOptions
    model: nn.Module | str | None = None
    tokenizer: object = None
    ids: torch.Tensor | None = None  # (nsamples, seqlen) calibration windows
    progress: bool = True
    device: str = "cpu"
    needs: frozenset[str] = frozenset()  # statistics the method, solver and allocator read
    allocator: OWLAllocator | None = None
    corpus: Corpus | None = None  # calibration text, read and decoded before the model loads
    eval_corpora: dict[str, Corpus] | None = None  # perplexity text, likewise
    task_set: TaskSet | None = None  # zero-shot tasks, their data loaded before the model
    targets: list[Target] | None = None
    plan: LayerPlan | None = None
    layer_report: list[dict] = field(default_factory=list)
    ppl: dict[str, dict] = field(default_factory=lambda: {"before": {}, "after": {}})
    tasks: dict[str, dict] = field(default_factory=lambda: {"before": {}, "after": {}})
    timings: dict[str, float] = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    saved: Path | None = None
    data_files: list[str] = field(default_factory=list)  # what the job reads besides the model
    needs_tokenizer: bool = True
    true_sequential: bool = False  # the mode the run uses (check_memory resolves the automatic one)
    extra: dict = field(default_factory=dict)
    cleanup: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)


# The automatic mode prunes true-sequentially when everything it holds fits in this share of the
# free memory, leaving room for the estimate's error and for whatever else runs.
AUTO_TRUE_SEQUENTIAL_SHARE = 0.5


def check_memory(model: nn.Module, config: PruneConfig, device: str, needs: frozenset[str]) -> bool:
    """Refuse calibration settings whose activations and statistics will not fit, with numbers.

    Returns whether to prune true-sequentially: as ``config.true_sequential`` says, or, when it
    is None, whether that mode's held activations fit (in ``AUTO_TRUE_SEQUENTIAL_SHARE`` of the
    free memory; otherwise the exact mode runs, and says so).
    """
    hint = f"lower --nsamples ({config.nsamples}) or --seqlen ({config.seqlen})"
    check_fits(estimate_bytes(model, config.nsamples, config.seqlen, needs), device, "pruning", hint)
    if config.true_sequential is False:
        return False
    one_pass = estimate_bytes(model, config.nsamples, config.seqlen, needs, true_sequential=True)
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


def job_inputs(job: Job) -> list[str]:
    """Paths the job reads, which its output must never replace (non-paths are ignored)."""
    model = [job.config.model] if isinstance(job.model, str | None) else []
    task_dir = [job.config.task_dir] if job.config.task_dir else []
    return [*model, *job.data_files, *job.config.ppl, *task_dir]


def ppl_seqlen(config: RunOptions) -> int:
    return config.ppl_seqlen or getattr(config, "seqlen", 2048)


def check_run(job: Job) -> None:
    """The checks every entry point shares, before the model loads: device, evaluation data
    (read once here; zero-shot tasks named and their data loaded), the output directory (locked
    until the report is final), the model."""
    config = job.config
    job.device = config.resolved_device()
    check_device(job.device)
    if config.ppl:
        check_eval_args(ppl_seqlen(config), config.max_windows)
        job.eval_corpora = check_eval_data(config.ppl)
    if config.out:
        check_output_dir(config.out, config.overwrite, job_inputs(job))
        job.cleanup.enter_context(output_lock(config.out))
    if isinstance(job.model, str | None):
        check_model_exists(config.model)
    elif job.tokenizer is None and (job.needs_tokenizer or config.ppl or config.tasks):
        raise LLMPruneError("pass tokenizer= along with a loaded model")
    if config.tasks:  # last: it may download the tasks' data
        job.task_set = load_tasks(config.tasks, config.task_dir)


def validate(job: Job) -> None:
    """Everything that can be checked before the model loads: options, data, device, output."""
    config = job.config.validate()
    job.allocator = make_allocator(config)
    job.needs = required_stats(config.method, config.solver, config.recon_error, config.refine) | (
        job.allocator.needs if job.allocator else frozenset())
    job.needs_tokenizer = bool(job.needs) and job.ids is None
    if job.ids is not None:
        if tuple(job.ids.shape) != (config.nsamples, config.seqlen):
            raise LLMPruneError(f"calib_ids has shape {tuple(job.ids.shape)}, but the config says "
                                f"nsamples={config.nsamples}, seqlen={config.seqlen}")
    elif job.needs:
        job.data_files = [config.calib]
        job.corpus = load_corpus(config.calib, "train")  # decode errors surface before any loading
    check_run(job)


def load(job: Job) -> None:
    """Load the model (unless one was given)."""
    config = job.config
    if isinstance(job.model, str | None):
        job.model, job.tokenizer = load_model(
            config.model, device=job.device, dtype=config.dtype, trust_remote_code=config.trust_remote_code,
            need_tokenizer=job.needs_tokenizer or bool(config.ppl or config.tasks))


def check_model(job: Job) -> None:
    """The recipe against the loaded model: context length, N:M divisibility, explicit ratios."""
    check_model_fits(job.model, job.config, bool(job.needs))
    job.targets = fixed_targets(job.config, len(decoder_layers(job.model)))


def calibrate(job: Job) -> None:
    """Tokenise the calibration windows and check their activations fit in memory."""
    config = job.config
    if not job.needs:
        return
    job.true_sequential = check_memory(job.model, config, job.device, job.needs)
    if job.ids is None:
        job.ids = calibration_windows(job.corpus, job.tokenizer, config.nsamples, config.seqlen, config.seed)
        job.corpus = None


def evaluate_stage(when: str) -> Callable[[Job], None]:
    """Perplexity (and zero-shot tasks) of the model as it is now: ``job.ppl[when]``
    (``job.tasks[when]``)."""
    def evaluate(job: Job) -> None:
        config = job.config
        if config.ppl:
            job.ppl[when] = evaluate_ppl(job.model, job.tokenizer, config.ppl,
                                         ppl_seqlen(config), config.max_windows,
                                         job.progress, corpora=job.eval_corpora, device=job.device)
        if job.task_set is not None:
            job.tasks[when] = evaluate_tasks(job.model, job.tokenizer, job.task_set,
                                             config.task_batch_size, config.task_limit,
                                             job.device, job.progress)
    evaluate.__name__ = f"ppl_{when}"
    return evaluate


def plan(job: Job) -> None:
    config = job.config
    method = METHODS[config.method]
    solver = SOLVERS[config.solver or method.default_solver]
    refiner = REFINERS[config.refine]
    job.plan = LayerPlan(config.method, job.targets, config.solver, refine=config.refine,
                         refine_linears=config.refine_linears,
                         options=config.options_for(method.options, refiner.options, solver.options),
                         allocator=job.allocator, recon_error=config.recon_error,
                         true_sequential=job.true_sequential)


def run(job: Job) -> None:
    job.layer_report = run_sequential(job.model, job.ids, job.plan, job.device, job.progress)


def pruning_mode(layers: list[dict]) -> str:
    """'true-sequential', 'exact', or 'mixed' (MoE layers run in the exact mode)."""
    modes = {e["true_sequential"] for e in layers}
    return "mixed" if len(modes) > 1 else "true-sequential" if modes == {True} else "exact"


def build_report(job: Job) -> dict:
    config, model = job.config, job.model
    sparsity = measure_sparsity(model)
    return {
        "versions": _versions(),
        "recipe": config.to_dict(),
        "model": {"name": config.model, "class": type(model).__name__,
                  "layers": len(decoder_layers(model)), "prunable_params": sparsity["params"]},
        "device": job.device,
        "target": str(config.target) if config.has_target else "explicit",
        "mode": pruning_mode(job.layer_report) if job.needs else None,  # magnitude reads no data
        "sparsity": sparsity["overall"],
        "allocation": allocation_report(config, job.layer_report),
        "layers": job.layer_report,
        "ppl": job.ppl,
        **({"tasks": job.tasks} if job.task_set is not None else {}),
        "timings": job.timings,
        "peak_rss_mb": peak_rss_mb(),
    }


def save(job: Job) -> None:
    """Write the pruned model (before the final evaluation, so a failure there loses nothing)."""
    config = job.config
    job.report = build_report(job)
    if not config.out:
        return
    extra = {}
    if config.allocation != "uniform":
        png = allocation_plot(job.report["allocation"], title=f"{Path(config.model).name} {config.method}")
        if png is None:
            print("matplotlib is not installed; skipping the allocation plot "
                  "(pip install matplotlib)", file=sys.stderr)
        else:
            extra[ALLOCATION_PLOT] = png
            job.report["allocation"]["plot"] = ALLOCATION_PLOT
    job.saved = save_pruned(job.model, job.tokenizer, config.out, job.report,
                            config.to_yaml(recipe_only=True), config.overwrite, extra_files=extra,
                            inputs=job_inputs(job))


def report(job: Job) -> None:
    """Final numbers into the report, and into the saved ``pruning.json``."""
    job.report.update(ppl=job.ppl, timings=job.timings, peak_rss_mb=peak_rss_mb())
    if job.task_set is not None:
        job.report["tasks"] = job.tasks
    if job.saved is not None:
        update_report(job.saved, job.report)


# validate → load → check → calibrate → evaluate → plan → run → save → evaluate → report
ONESHOT: tuple[Callable[[Job], None], ...] = (
    validate, load, check_model, calibrate, evaluate_stage("before"), plan, run, save,
    evaluate_stage("after"), report,
)


UNTIMED = ("validate", "check_model", "plan", "report")  # checks and bookkeeping: no time worth a line


def run_stages(job: Job, stages: tuple[Callable[[Job], None], ...]) -> Job:
    """Run ``stages`` in order, timing each as ``<name>_s`` in ``job.timings``."""
    with job.cleanup:
        for stage in stages:
            t0 = time.perf_counter()
            stage(job)
            if stage.__name__ not in UNTIMED:
                job.timings[f"{stage.__name__}_s"] = time.perf_counter() - t0
    return job


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
    job = run_stages(Job(config, model, tokenizer, calib_ids, progress), ONESHOT)
    return PruneResult(job.model, job.tokenizer, job.report)


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
