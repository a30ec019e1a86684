"""The public entry points: ``prune(model, config)`` and ``evaluate(...)``.

config → model → calibration windows → engine → (PPL) → save, with every check that can fail
done before the model is loaded or any weight changes.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmprune.config import PruneConfig
from llmprune.data.calibration import calibration_windows
from llmprune.data.sources import check_available, load_corpus
from llmprune.engine.sequential import LayerPlan, run_sequential
from llmprune.errors import LLMPruneError
from llmprune.eval.perplexity import check_eval_args, check_eval_data, eval_names
from llmprune.eval.perplexity import evaluate as evaluate_ppl
from llmprune.eval.placement import check_device
from llmprune.eval.sparsity import measure_sparsity
from llmprune.export.save import ALLOCATION_PLOT, save_pruned
from llmprune.models.layers import context_length, decoder_layers, linear_layers
from llmprune.models.loading import check_model_exists, load_model
from llmprune.report import allocation_plot
from llmprune.sparsity.allocation import OWLAllocator, explicit_targets, weighted_mean
from llmprune.sparsity.methods import required_stats
from llmprune.sparsity.patterns import Target


@dataclass
class PruneResult:
    model: nn.Module
    tokenizer: object
    report: dict


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _versions() -> dict:
    import transformers

    from llmprune import __version__

    return {"llmprune": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def method_options(config: PruneConfig) -> dict:
    """Settings only some methods / solvers read, passed through the engine untouched."""
    return {k: getattr(config, k) for k in ("admm_iters", "admm_ks", "admm_rho", "admm_damp")}


def check_model_fits(model: nn.Module, config: PruneConfig, needs_data: bool) -> None:
    """Shape checks that need the model but no data: context length and N:M divisibility."""
    ctx = context_length(model)
    lengths = [("seqlen", config.seqlen)] if needs_data else []
    if config.ppl:
        lengths.append(("ppl_seqlen", config.ppl_seqlen or config.seqlen))
    for name, n in lengths:
        if n is not None and ctx is not None and n > ctx:
            raise LLMPruneError(f"{name} {n} is longer than the model's context ({ctx} tokens); use --{name.replace('_', '-')} ≤ {ctx}")
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


def prune(model: str | nn.Module | None = None, config: PruneConfig | None = None,
          tokenizer=None, progress: bool = True, calib_ids: torch.Tensor | None = None,
          **overrides) -> PruneResult:
    """Prune ``model`` (a name/path, or a loaded HF model plus ``tokenizer``) as ``config`` says.

    Keyword ``overrides`` set config fields, e.g. ``prune("smollm2-135m", method="wanda",
    sparsity=0.5)``. The model is pruned in place; with ``config.out`` it is also saved.
    ``calib_ids`` are precomputed ``(nsamples, seqlen)`` calibration windows (e.g. shared by
    the runs of a benchmark); without them they are drawn from ``config.calib``.
    """
    config = dataclasses.replace(config or PruneConfig())
    for k, v in overrides.items():
        if not hasattr(config, k):
            raise LLMPruneError(f"unknown prune option {k!r}")
        setattr(config, k, v)
    if isinstance(model, str):
        config.model = model
    config.validate()
    allocator = make_allocator(config)
    needs_data = bool(required_stats(config.method, config.solver, config.recon_error) or (allocator and allocator.needs))
    if calib_ids is not None:
        if tuple(calib_ids.shape) != (config.nsamples, config.seqlen):
            raise LLMPruneError(f"calib_ids has shape {tuple(calib_ids.shape)}, but the config says "
                                f"nsamples={config.nsamples}, seqlen={config.seqlen}")
    elif needs_data:
        check_available(config.calib, "train")
    check_eval_data(config.ppl)
    device = config.resolved_device()
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    if model is None or isinstance(model, str):
        check_model_exists(config.model)
        model, tokenizer = load_model(config.model, device=device, dtype=config.dtype)
    elif tokenizer is None and ((needs_data and calib_ids is None) or config.ppl):
        raise LLMPruneError("pass tokenizer= along with a loaded model")
    timings["load_s"] = time.perf_counter() - t0
    check_model_fits(model, config, needs_data)
    ppl_seqlen = config.ppl_seqlen or config.seqlen
    layers = decoder_layers(model)
    targets = fixed_targets(config, len(layers))  # explicit: the list must match the layers

    ppl_before = {}
    if config.ppl:
        t0 = time.perf_counter()
        ppl_before = evaluate_ppl(model, tokenizer, config.ppl, ppl_seqlen, config.max_windows, progress)
        timings["ppl_before_s"] = time.perf_counter() - t0

    ids = calib_ids
    if needs_data and ids is None:
        t0 = time.perf_counter()
        corpus = load_corpus(config.calib, "train")
        ids = calibration_windows(corpus, tokenizer, config.nsamples, config.seqlen, config.seed)
        timings["calib_s"] = time.perf_counter() - t0

    plan = LayerPlan(config.method, targets, config.solver, config.blocksize, config.percdamp,
                     options=method_options(config), allocator=allocator,
                     recon_error=config.recon_error)
    t0 = time.perf_counter()
    layer_report = run_sequential(model, ids, plan, device, progress)
    timings["prune_s"] = time.perf_counter() - t0

    ppl_after = {}
    if config.ppl:
        t0 = time.perf_counter()
        ppl_after = evaluate_ppl(model, tokenizer, config.ppl, ppl_seqlen, config.max_windows, progress)
        timings["ppl_after_s"] = time.perf_counter() - t0

    sparsity = measure_sparsity(model)
    report = {
        "versions": _versions(),
        "recipe": config.to_dict(),
        "model": {"name": config.model, "class": type(model).__name__, "layers": len(layers),
                  "prunable_params": sparsity["params"]},
        "device": device,
        "target": str(config.target) if config.has_target else "explicit",
        "sparsity": sparsity["overall"],
        "allocation": allocation_report(config, layer_report),
        "layers": layer_report,
        "ppl": {"before": ppl_before, "after": ppl_after},
        "timings": timings,
        "peak_rss_mb": peak_rss_mb(),
    }
    if config.out:
        t0 = time.perf_counter()
        extra = {}
        if config.allocation != "uniform":
            png = allocation_plot(report["allocation"], title=f"{Path(config.model).name} {config.method}")
            if png is None:
                print("matplotlib is not installed; skipping the allocation plot "
                      "(pip install matplotlib)", file=sys.stderr)
            else:
                extra[ALLOCATION_PLOT] = png
                report["allocation"]["plot"] = ALLOCATION_PLOT
        save_pruned(model, tokenizer, config.out, report, config.to_yaml(), config.overwrite,
                    extra_files=extra)
        report["timings"]["save_s"] = time.perf_counter() - t0
    return PruneResult(model, tokenizer, report)


def evaluate(model: str | nn.Module, tokenizer=None, ppl: list[str] | str = ("wikitext2",),
             seqlen: int = 2048, max_windows: int | None = None, device: str = "auto",
             dtype: str = "auto", progress: bool = True, trust_remote_code: bool = False) -> dict:
    """Perplexity of a model (a name/path or a loaded model + tokenizer) on each dataset.

    Every argument and every evaluation file is checked before the model loads. The forward
    runs on ``device`` (``auto``: CUDA when there is one); a loaded model is back where it was
    afterwards.
    """
    names = eval_names(ppl)
    check_eval_args(seqlen, max_windows)
    dev = check_device(PruneConfig(device=device).resolved_device())
    corpora = check_eval_data(names)
    if isinstance(model, str):
        model, tokenizer = load_model(model, device=dev, dtype=dtype, trust_remote_code=trust_remote_code)
    ctx = context_length(model)
    if ctx is not None and seqlen > ctx:
        raise LLMPruneError(f"seqlen {seqlen} is longer than the model's context ({ctx} tokens)")
    result = evaluate_ppl(model, tokenizer, names, seqlen, max_windows, progress, corpora=corpora, device=dev)
    result["_sparsity"] = measure_sparsity(model)["overall"]
    return result
