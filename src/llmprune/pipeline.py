"""The public entry points: ``prune(model, config)`` and ``evaluate(...)``.

config → model → calibration windows → engine → (PPL) → save, with every check that can fail
done before the model is loaded or any weight changes.
"""

from __future__ import annotations

import dataclasses
import platform
import resource
import time
from dataclasses import dataclass

import torch
from torch import nn

from llmprune.config import PruneConfig
from llmprune.data.calibration import calibration_windows
from llmprune.data.sources import check_available, load_corpus
from llmprune.engine.sequential import LayerPlan, run_sequential
from llmprune.errors import LLMPruneError
from llmprune.eval.perplexity import check_eval_data
from llmprune.eval.perplexity import evaluate as evaluate_ppl
from llmprune.eval.sparsity import measure_sparsity
from llmprune.export.save import save_pruned
from llmprune.models.layers import context_length, decoder_layers, linear_layers
from llmprune.models.loading import check_model_exists, load_model
from llmprune.sparsity.methods import required_stats


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


def check_model_fits(model: nn.Module, config: PruneConfig) -> None:
    """Shape checks that need the model but no data: context length and N:M divisibility."""
    ctx = context_length(model)
    for name, n in (("seqlen", config.seqlen), ("ppl_seqlen", config.ppl_seqlen)):
        if n is not None and ctx is not None and n > ctx:
            raise LLMPruneError(f"{name} {n} is longer than the model's context ({ctx} tokens); use --{name.replace('_', '-')} ≤ {ctx}")
    target = config.target
    for i, layer in enumerate(decoder_layers(model)):
        for name, lin in linear_layers(layer).items():
            target.check_shape(lin.in_features, f"layer {i} {name}")


def prune(model: str | nn.Module | None = None, config: PruneConfig | None = None,
          tokenizer=None, progress: bool = True, **overrides) -> PruneResult:
    """Prune ``model`` (a name/path, or a loaded HF model plus ``tokenizer``) as ``config`` says.

    Keyword ``overrides`` set config fields, e.g. ``prune("smollm2-135m", method="wanda",
    sparsity=0.5)``. The model is pruned in place; with ``config.out`` it is also saved.
    """
    config = dataclasses.replace(config or PruneConfig())
    for k, v in overrides.items():
        if not hasattr(config, k):
            raise LLMPruneError(f"unknown prune option {k!r}")
        setattr(config, k, v)
    if isinstance(model, str):
        config.model = model
    config.validate()
    needs_data = bool(required_stats(config.method, config.solver, config.recon_error))
    if needs_data:
        check_available(config.calib, "train")
    check_eval_data(config.ppl)
    device = config.resolved_device()
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    if model is None or isinstance(model, str):
        check_model_exists(config.model)
        model, tokenizer = load_model(config.model, device=device, dtype=config.dtype)
    elif tokenizer is None and (needs_data or config.ppl):
        raise LLMPruneError("pass tokenizer= along with a loaded model")
    timings["load_s"] = time.perf_counter() - t0
    check_model_fits(model, config)
    ppl_seqlen = config.ppl_seqlen or config.seqlen

    ppl_before = {}
    if config.ppl:
        t0 = time.perf_counter()
        ppl_before = evaluate_ppl(model, tokenizer, config.ppl, ppl_seqlen, config.max_windows, progress)
        timings["ppl_before_s"] = time.perf_counter() - t0

    ids = None
    if needs_data:
        t0 = time.perf_counter()
        corpus = load_corpus(config.calib, "train")
        ids = calibration_windows(corpus, tokenizer, config.nsamples, config.seqlen, config.seed)
        timings["calib_s"] = time.perf_counter() - t0

    layers = decoder_layers(model)
    plan = LayerPlan(config.method, [config.target] * len(layers), config.solver,
                     config.blocksize, config.percdamp, options=method_options(config),
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
        "target": str(config.target),
        "sparsity": sparsity["overall"],
        "layers": layer_report,
        "ppl": {"before": ppl_before, "after": ppl_after},
        "timings": timings,
        "peak_rss_mb": peak_rss_mb(),
    }
    if config.out:
        t0 = time.perf_counter()
        save_pruned(model, tokenizer, config.out, report, config.to_yaml(), config.overwrite)
        report["timings"]["save_s"] = time.perf_counter() - t0
    return PruneResult(model, tokenizer, report)


def evaluate(model: str | nn.Module, tokenizer=None, ppl: list[str] | str = ("wikitext2",),
             seqlen: int = 2048, max_windows: int | None = None, device: str = "auto",
             dtype: str = "auto", progress: bool = True) -> dict:
    """Perplexity of a model (a name/path or a loaded model + tokenizer) on each dataset."""
    names = [d for d in ppl.split(",") if d] if isinstance(ppl, str) else list(ppl)
    check_eval_data(names)
    if isinstance(model, str):
        dev = PruneConfig(device=device).resolved_device()
        model, tokenizer = load_model(model, device=dev, dtype=dtype)
        model.to(dev)
    ctx = context_length(model)
    if ctx is not None and seqlen > ctx:
        raise LLMPruneError(f"seqlen {seqlen} is longer than the model's context ({ctx} tokens)")
    result = evaluate_ppl(model, tokenizer, names, seqlen, max_windows, progress)
    result["_sparsity"] = measure_sparsity(model)["overall"]
    return result
