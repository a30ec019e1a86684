"""The sequential engine: one decoder layer on the compute device at a time.

For each layer: run the calibration inputs through it with hooks that gather the statistics
the method needs (on the *dense* layer, as SparseGPT and Wanda do), prune every linear, then
run the inputs again through the *pruned* layer; those outputs are the next layer's inputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from llmprune.engine.capture import capture_layer_inputs, layer_output
from llmprune.engine.stats import LayerStats
from llmprune.models.layers import decoder_layers, linear_layers
from llmprune.sparsity.methods import prune_weight, required_stats
from llmprune.sparsity.patterns import Target
from llmprune.sparsity.recon import relative_recon_error


@dataclass
class LayerPlan:
    """What to do with each decoder layer: the method, solver and per-layer target."""

    method: str
    targets: list[Target]
    solver: str | None = None
    blocksize: int = 128
    percdamp: float = 0.01
    options: dict = field(default_factory=dict)
    recon_error: bool = False  # collect XᵀX even if the method needs none, to report the error


@torch.no_grad()
def run_layer(layer: nn.Module, inps: torch.Tensor, kwargs: dict, outs: torch.Tensor | None,
              stats: LayerStats | None = None) -> None:
    """Run every calibration row through ``layer``; write outputs into ``outs`` if given."""
    for j in range(inps.shape[0]):
        if stats is not None:
            stats.next_sample()
        y = layer_output(layer(inps[j : j + 1], **kwargs))
        if outs is not None:
            outs[j : j + 1] = y


@torch.no_grad()
def prune_layer(layer: nn.Module, plan: LayerPlan, target: Target, stats: LayerStats | None) -> dict:
    """Prune every linear of one layer in place; returns per-linear sparsity and timing, and
    the relative reconstruction error ``recon_error`` wherever XᵀX was collected."""
    linears = linear_layers(layer)
    groups = stats.groups() if stats is not None else {n: [n] for n in linears}
    missing = [n for n in linears if not any(n in g for g in groups.values())]
    if missing:
        raise RuntimeError(f"linears {missing} saw no calibration input; cannot score them")
    report = {}
    for leader, names in groups.items():
        Ws = [linears[n].weight for n in names]
        for n, W in zip(names, Ws, strict=True):
            target.check_shape(W.shape[1], n)
        group_stats = stats.get(leader) if stats else {}
        t0 = time.perf_counter()
        results = prune_weight(plan.method, Ws, group_stats, target, solver=plan.solver,
                               blocksize=plan.blocksize, percdamp=plan.percdamp, **plan.options)
        dt = time.perf_counter() - t0
        for n, W, (W_new, keep) in zip(names, Ws, results, strict=True):
            if not torch.isfinite(W_new).all():
                raise FloatingPointError(f"{n}: pruning produced non-finite weights")
            W_new = W_new.to(W.dtype)
            report[n] = {"shape": list(W.shape), "sparsity": 1 - keep.float().mean().item(),
                         "seconds": dt / len(names), "shared_input_with": leader if leader != n else None}
            if "xtx" in group_stats:  # the weights as stored, before they overwrite the dense W
                report[n]["recon_error"] = relative_recon_error(W, W_new, group_stats["xtx"])
            W.copy_(W_new)
    return report


def run_sequential(model: nn.Module, ids: torch.Tensor | None, plan: LayerPlan,
                   device: str | torch.device = "cpu", progress: bool = True) -> list[dict]:
    """Prune ``model`` in place, layer by layer; returns one report entry per decoder layer.

    ``ids`` are the ``(nsamples, seqlen)`` calibration windows; methods that need no
    statistics (magnitude) skip the data entirely.
    """
    layers = decoder_layers(model)
    if len(plan.targets) != len(layers):
        raise ValueError(f"plan has {len(plan.targets)} targets for {len(layers)} layers")
    needs = required_stats(plan.method, plan.solver, plan.recon_error)
    inps = kwargs = outs = None
    if needs:
        inps, kwargs = capture_layer_inputs(model, layers[0], ids, device)
        outs = torch.empty_like(inps)
    report = []
    bar = tqdm(list(enumerate(layers)), desc=f"prune {plan.method}", unit="layer", disable=not progress)
    for i, layer in bar:
        t0 = time.perf_counter()
        home = next(layer.parameters()).device
        layer.to(device)
        stats = None
        if needs:
            stats = LayerStats(linear_layers(layer), needs)
            run_layer(layer, inps, kwargs, None, stats)
            stats.remove()
        linears = prune_layer(layer, plan, plan.targets[i], stats)
        del stats
        if needs and i + 1 < len(layers):
            run_layer(layer, inps, kwargs, outs)
            inps, outs = outs, inps
        layer.to(home)
        dt = time.perf_counter() - t0
        report.append({"index": i, "target": str(plan.targets[i]), "seconds": dt, "linears": linears})
        bar.set_postfix(sec=f"{dt:.1f}")
    return report
