"""``structured(model, tokenizer, config)``: OSSCAR on MLP channels or attention heads
(:mod:`~llmprune.structured.attention`), hidden size (:mod:`~llmprune.structured.hidden`), depth,
MoE expert removal (:mod:`~llmprune.structured.experts`) or a budget search
(:mod:`~llmprune.structured.search`) of a loaded model, in place, with a report.

Every check that needs only the options and the model (ratios, the MLP modules, the width
after rounding, k against the layer count, the context length) runs before any calibration
text is read or any weight changes (:func:`plan_structured`).

OSSCAR runs in the sequential engine's :class:`~llmprune.engine.sequential.LayerWalk`: one
layer on the device, XᵀX of its down_proj inputs collected from the outputs of the layers
already pruned, the MLP shrunk, and the shrunk layer's outputs fed to the next one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llmprune.data.calibration import calibration_windows
from llmprune.data.sources import load_corpus
from llmprune.engine.blockwise import BlockTuner, BlockwiseOptions, summarize
from llmprune.engine.capture import layer_output
from llmprune.engine.memory import check_fits, estimate_bytes, rows_per_call
from llmprune.engine.sequential import LayerWalk
from llmprune.engine.stats import NO_STATS, XTX
from llmprune.errors import LLMPruneError
from llmprune.models.adapter import MLPTriplet, decoder_layers, mlp_triplet, text_config
from llmprune.models.layers import context_length
from llmprune.structured import depth as D
from llmprune.structured.attention import HeadPlan, plan_heads, run_attention
from llmprune.structured.experts import ExpertsPlan, plan_experts, run_experts
from llmprune.structured.hidden import HiddenPlan, plan_hidden, run_hidden
from llmprune.structured.options import StructuredOptions
from llmprune.structured.osscar import mlp_width, osscar_prune
from llmprune.structured.search import SearchPlan, plan_search, run_search
from llmprune.structured.shrink import (
    config_changes,
    drop_layers,
    set_intermediate_size,
    shrink_mlp,
)


@dataclass
class StructuredPlan:
    """What will be removed, known before any data is read."""

    method: str
    width: int | None = None  # osscar: kept MLP channels in every layer
    intermediate: int | None = None
    k: int | None = None  # depth: layers removed
    n_layers: int = 0
    heads: HeadPlan | None = None  # osscar --target attention: kept heads in every layer
    hidden: HiddenPlan | None = None  # hidden: the kept hidden size and the residual layout
    search: SearchPlan | None = None  # search: every target's levels within the budget
    experts: ExpertsPlan | None = None  # experts: the count removed per MoE layer


@dataclass
class StructuredResult:
    model: nn.Module
    report: dict


def count_params(model: nn.Module) -> int:
    """Every parameter of the model, tied ones once (Quark's convention for --param-ratio)."""
    return sum(p.numel() for p in model.parameters())


def _channel_params(layer: nn.Module, trip: MLPTriplet) -> int:
    """Parameters one intermediate channel owns: its gate/up rows (and biases), its down column."""
    n = 0
    for name in trip.rows:
        lin = layer.get_submodule(name)
        per_row = lin.in_features + (lin.bias is not None)
        n += per_row * (2 if trip.fused_gate_up else 1)
    return n + layer.get_submodule(trip.down).out_features


def _osscar_width(model: nn.Module, layers: nn.ModuleList, options: StructuredOptions) -> tuple[int, int]:
    """``(width, intermediate)``: the same width for every layer, or a clear error."""
    trips = [mlp_triplet(layer) for layer in layers]  # names the expected modules if not gated
    inters = sorted({t.intermediate for t in trips})
    if len(inters) != 1:
        raise LLMPruneError(f"the MLPs have different widths {inters}; OSSCAR keeps one width for every "
                            "layer so the config stays standard")
    inter = inters[0]
    if not isinstance(getattr(text_config(model), "intermediate_size", None), int):
        raise LLMPruneError(f"{type(model).__name__}'s config has no intermediate_size to shrink")
    ratio = options.ratio
    if ratio is None:  # a share of all parameters: channels per layer from what one channel owns
        per_channel = _channel_params(layers[0], trips[0])
        channels = options.param_ratio * count_params(model) / (len(layers) * per_channel)
        ratio = channels / inter
        if ratio >= 1:
            raise LLMPruneError(f"param_ratio {options.param_ratio:g} needs more than all {inter} MLP channels "
                                f"of every layer (at most {len(layers) * per_channel * inter / count_params(model):.3f})")
    return mlp_width(inter, ratio, options.round_to), inter


def _depth_k(model: nn.Module, layers: nn.ModuleList, options: StructuredOptions) -> int:
    n = len(layers)
    k = options.layers
    if k is None:
        per_layer = sum(p.numel() for p in layers[0].parameters())
        k = round(options.param_ratio * count_params(model) / per_layer)
        if k < 1:
            raise LLMPruneError(f"param_ratio {options.param_ratio:g} is less than one layer "
                                f"({per_layer / count_params(model):.3f} of the parameters each)")
    if k >= n:
        raise LLMPruneError(f"cannot remove {k} of the model's {n} layers: k must be below {n}")
    config_changes(text_config(model), n, list(range(n - k)))  # per-layer config lists it can slice
    return k


def plan_structured(model: nn.Module, options: StructuredOptions) -> StructuredPlan:
    """Every model-dependent check, before any data: the width or k, or an LLMPruneError."""
    layers = decoder_layers(model)
    ctx = context_length(model)
    if ctx is not None and options.seqlen > ctx:
        raise LLMPruneError(f"seqlen {options.seqlen} is longer than the model's context ({ctx} tokens); "
                            f"use --seqlen ≤ {ctx}")
    attention = options.method == "osscar" and options.target == "attention"
    if BlockwiseOptions.pick(options).enabled and (attention or options.method not in ("osscar", "depth")):
        what = "--target attention" if attention else f"--method {options.method}"
        raise LLMPruneError(f"--reconstruct blockwise runs with --method osscar (MLP) and --method depth, not "
                            f"{what}; tune the output afterwards with 'llmprune blockwise' or 'recover --mode distill'")
    if attention:
        heads = plan_heads(model, layers, options.ratio, options.param_ratio, options.attention_unit,
                           count_params(model))
        return StructuredPlan("osscar", heads=heads, n_layers=len(layers))
    if options.method == "search":
        search = plan_search(model, options.param_ratio, options.targets, options.round_to)
        return StructuredPlan("search", search=search, n_layers=len(layers))
    if options.method == "hidden":
        hidden = plan_hidden(model, options.ratio, options.param_ratio, options.round_to, count_params(model))
        return StructuredPlan("hidden", hidden=hidden, n_layers=len(layers))
    if options.method == "osscar":
        width, inter = _osscar_width(model, layers, options)
        return StructuredPlan("osscar", width=width, intermediate=inter, n_layers=len(layers))
    if options.method == "experts":
        experts = plan_experts(model, options.ratio, options.param_ratio, count_params(model),
                               options.expert_mlp_ratio, options.round_to)
        return StructuredPlan("experts", n_layers=len(layers), experts=experts)
    return StructuredPlan("depth", k=_depth_k(model, layers, options), n_layers=len(layers))


def _options(config: StructuredOptions | dict | None, overrides: dict) -> StructuredOptions:
    if isinstance(config, StructuredOptions):
        return config.replace(**overrides) if overrides else config
    if config is not None and not isinstance(config, dict):
        raise LLMPruneError(f"config must be StructuredOptions or a dict, not {type(config).__name__}")
    return StructuredOptions(**{**(config or {}), **overrides})


def calibration_ids(tokenizer, options: StructuredOptions) -> torch.Tensor:
    """``(windows, seqlen)`` windows of ``options.calib``, as ``prune`` draws them (the search's
    held-out windows after the ``nsamples``)."""
    if tokenizer is None:
        raise LLMPruneError("calibration needs the model's tokenizer: pass tokenizer= (or ids=)")
    corpus = load_corpus(options.calib, "train")
    return calibration_windows(corpus, tokenizer, options.windows, options.seqlen, options.seed)


def structured(model: nn.Module, tokenizer=None, config: StructuredOptions | dict | None = None, *,
               ids: torch.Tensor | None = None, device: str | torch.device = "cpu",
               progress: bool = True, **overrides: Any) -> StructuredResult:
    """Prune ``model`` in place as ``config`` (options, or a dict, plus keyword ``overrides``)
    says; returns the model and the report.

    ``ids``: ready ``(windows, seqlen)`` calibration windows — ``nsamples``, plus ``holdout`` for
    the search — e.g. shared by a benchmark's runs; without them they are drawn from
    ``config.calib`` with ``tokenizer``.
    ``device``: where each layer (OSSCAR) or the forward passes (depth) run.
    """
    options = _options(config, overrides)
    plan = plan_structured(model, options)
    blockwise = BlockwiseOptions.pick(options)
    if blockwise.enabled:  # its dense stream and tuning state, before any data is read
        needs = XTX if plan.method == "osscar" else NO_STATS
        check_fits(estimate_bytes(model, options.nsamples, options.seqlen, needs, blockwise=blockwise), device,
                   "structured pruning with block-wise reconstruction",
                   f"lower --nsamples ({options.nsamples}), --seqlen ({options.seqlen}) or --recon-batch "
                   f"({options.recon_batch})")
    if ids is not None and tuple(ids.shape) != (options.windows, options.seqlen):
        held = f" + holdout={options.holdout}" if options.method == "search" else ""
        raise LLMPruneError(f"ids has shape {tuple(ids.shape)}, but the options say "
                            f"nsamples={options.nsamples}{held}, seqlen={options.seqlen}")
    t0 = time.perf_counter()
    if ids is None:
        ids = calibration_ids(tokenizer, options)
    calib_s = time.perf_counter() - t0
    params_before = count_params(model)
    t0 = time.perf_counter()
    key = plan.method
    if plan.heads is not None:
        key, section = "attention", run_attention(model, ids, plan.heads, options, device, progress)
    elif plan.search is not None:
        section = run_search(model, ids, plan.search, options, device, progress)
    elif plan.hidden is not None:
        section = run_hidden(model, ids, plan.hidden, options, device, progress)
    elif plan.method == "osscar":
        section = run_osscar(model, ids, plan, options, device, progress)
    elif plan.method == "experts":
        section = run_experts(model, ids, plan.experts, options.expert_score, options.seed, device, progress,
                              options.expert_candidates, options.osscar_kwargs())
    else:
        section = run_depth(model, ids, plan, options, device, progress)
    params_after = count_params(model)
    report = {
        "method": plan.method,
        "options": options.model_dump(),
        "params": {"before": params_before, "after": params_after,
                   "removed_share": 1 - params_after / params_before},
        key: section,
        "timings": {"calibrate_s": calib_s, "prune_s": time.perf_counter() - t0},
    }
    return StructuredResult(model, report)


@torch.no_grad()
def run_osscar(model: nn.Module, ids: torch.Tensor, plan: StructuredPlan, options: StructuredOptions,
               device: str | torch.device = "cpu", progress: bool = True) -> dict:
    """Shrink every MLP to ``plan.width`` channels, layer by layer; the report's ``osscar`` part."""
    walk = LayerWalk(model, ids, device, "osscar", progress)
    blockwise = BlockwiseOptions.pick(options)
    tuner = BlockTuner(blockwise, walk.inps) if blockwise.enabled else None
    local = tuner is not None and blockwise.recon_target == "local"
    # dense_target: a second stream, the dense model's hidden states, gives each down_proj's
    # target; block-wise reconstruction's dense stream is the same stream (one buffer for both).
    dense_in = None
    if options.dense_target:
        dense_in = tuner.target if tuner is not None and not local else walk.inps.clone()
    entries = []
    for i, layer in walk:
        t0 = time.perf_counter()
        trip = mlp_triplet(layer)
        down = layer.get_submodule(trip.down)
        target, target_s = {}, 0.0
        # The tuner's targets come free from a forward this layer gets anyway where that one
        # runs the dense layer on the right stream; otherwise from one more forward.
        if tuner is not None and options.dense_target == local:
            target_s = walk.set_target(layer, tuner)
        if options.dense_target:  # the dense stream advances in place (rows are read before written)
            H, target["XtY"], target["YtY"] = paired_stats(layer, down, walk.inps, dense_in,
                                                           walk.layer_kwargs[i], dense_in)
        else:
            stats = walk.collect(layer, XTX, each=tuner.write if local else None)
            H = stats.get(trip.down)["xtx"]
            del stats  # the other linears' XᵀX: only down_proj's is needed
        res = osscar_prune(down.weight, H, plan.width, **options.osscar_kwargs(**target))
        del H, target
        removed = sorted(set(range(plan.intermediate)) - set(res.keep.tolist()))
        shrink_mlp(layer, trip, res.keep, res.down)
        entries.append({"index": i, "width": plan.width, "removed": removed,
                        "recon_error": res.recon_error, "objective": res.errors,
                        "swaps": res.swaps, "damping": res.damping,
                        "seconds": time.perf_counter() - t0})
        if tuner is not None:  # the shrunk layer is dense: every weight of it may change
            entries[-1]["blockwise"] = walk.reconstruct(layer, tuner, {}, None, target_s)
    for entry, sec in zip(entries, walk.seconds, strict=True):
        entry["seconds_with_propagation"] = sec
    set_intermediate_size(model, plan.width)
    extra = {"blockwise": summarize([e["blockwise"] for e in entries], blockwise)} if tuner else {}
    return {**extra, "intermediate_size": {"before": plan.intermediate, "after": plan.width},
            "removed_ratio": 1 - plan.width / plan.intermediate,
            "selection": "greedy (OBS costs)" if options.greedy else "channel score ‖W‖·‖X‖",
            "target": "dense model's down_proj outputs" if options.dense_target else "this layer's own outputs",
            "mean_recon_error": sum(e["recon_error"] for e in entries) / len(entries),
            "layers": entries}


@torch.no_grad()
def paired_stats(layer: nn.Module, down: nn.Linear, inps: torch.Tensor, dense_inps: torch.Tensor,
                 kwargs: dict, dense_outs: torch.Tensor,
                 batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(XᵀX, XᵀY, ‖Y‖²)`` of ``down``: X its inputs on the pruned stream ``inps``, Y its
    output (bias left out: it is kept) on the dense stream ``dense_inps``, row by row paired.
    The dense layer's outputs go to ``dense_outs``, the next layer's dense inputs."""
    seen: list[torch.Tensor] = []
    hook = down.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).float()))
    W = down.weight.float()
    H = torch.zeros(W.shape[1], W.shape[1], device=W.device)
    XtY = torch.zeros(W.shape[1], W.shape[0], device=W.device)
    YtY = 0.0
    batch_size = batch_size or rows_per_call(layer, inps.shape[1], inps.device)
    try:
        for j in range(0, inps.shape[0], batch_size):
            seen.clear()
            layer(inps[j : j + batch_size], **kwargs)
            dense_outs[j : j + batch_size] = layer_output(layer(dense_inps[j : j + batch_size], **kwargs))
            X, Y = seen[0], seen[1] @ W.T
            H.addmm_(X.T, X)
            XtY.addmm_(X.T, Y)
            YtY += float((Y * Y).sum())
    finally:
        hook.remove()
    return H, XtY, YtY


def reconstruct_gap(model: nn.Module, ids: torch.Tensor, start: int, k: int, options: BlockwiseOptions,
                    device: str | torch.device = "cpu", progress: bool = True) -> list[dict]:
    """Block-wise reconstruction around the window ``[start, start + k)`` that depth pruning
    will delete (call it before the layers go); returns one entry per tuned layer.

    The blocks are the two layers beside the gap, each fit on the pruned stream (the model
    without the window) to the dense model's hidden states: the layer before the gap,
    ``start − 1``, to the dense output of the *whole window* (it absorbs the deleted layers),
    then the layer after it, ``start + k``, to its own dense output (it corrects what the first
    could not). At either end of the model only the layer on the inner side exists. Layers
    before the gap are unchanged and see dense inputs; layers after the second block are not
    tuned.
    """
    end = start + k
    n = len(decoder_layers(model))
    tune = [i for i in (start - 1, end) if 0 <= i < n]
    walk = LayerWalk(model, ids, device, f"blockwise around layers {start}-{end - 1}", progress, last=max(tune))
    first = max(start - 1, 0)  # where the dense and the pruned streams part
    tuner, entries = None, []
    for i, layer in walk:
        if i == first:
            tuner = BlockTuner(options, walk.inps)
        if start <= i < end:  # deleted: the pruned stream skips it; the dense one runs it, if
            if start == 0:    # the layer before the gap has not already taken it along
                walk.advance(layer, tuner)
            walk.skip()
        elif i in tune:
            target_s = walk.set_target(layer, tuner, then=range(start, end) if i == start - 1 else ())
            entries.append({"index": i, **walk.reconstruct(layer, tuner, {}, None, target_s)})
    return entries


@torch.no_grad()
def run_depth(model: nn.Module, ids: torch.Tensor, plan: StructuredPlan, options: StructuredOptions,
              device: str | torch.device = "cpu", progress: bool = True) -> dict:
    """Score every window of ``plan.k`` layers, delete the best; the report's ``depth`` part."""
    k = plan.k
    t0 = time.perf_counter()
    sim = D.similarity_matrices(model, ids, device=device, progress=progress)
    scores = D.window_scores_from_similarity(sim, k)
    timings = {"similarity_s": time.perf_counter() - t0}
    if options.score == "ppl" or options.compare_scores:
        t0 = time.perf_counter()
        scores["ppl"] = D.ppl_window_scores(model, ids, k, device=device, progress=progress)
        timings["ppl_s"] = time.perf_counter() - t0
    start = D.best_window(scores[options.score])
    removed = list(range(start, start + k))
    blockwise = BlockwiseOptions.pick(options)
    extra = {}
    if blockwise.enabled:
        t0 = time.perf_counter()
        entries = reconstruct_gap(model, ids, start, k, blockwise, device, progress)
        timings["blockwise_s"] = time.perf_counter() - t0
        extra["blockwise"] = {**summarize(entries, blockwise), "tuned_layers": entries}
    drop_layers(model, removed)
    return {**extra, "k": k, "score": options.score, "removed_layers": removed,
            "num_hidden_layers": {"before": plan.n_layers, "after": plan.n_layers - k},
            "window_scores": scores,
            "chosen_by_each": {name: D.best_window(v) for name, v in scores.items()},
            "rank_agreement": D.rank_agreement(scores),
            "similarity": {name: m.tolist() for name, m in sim.items()},
            "timings": timings}
