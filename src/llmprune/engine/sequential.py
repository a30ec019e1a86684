"""The sequential engine: one decoder layer on the compute device at a time.

For each layer: run the calibration inputs through it with hooks that gather the statistics
the method needs (on the *dense* layer, as SparseGPT and Wanda do), prune every linear, then
run the inputs again through the *pruned* layer; those outputs are the next layer's inputs.
With ``true_sequential`` the two forwards become one (:mod:`~llmprune.engine.onepass`): each
linear is pruned as soon as every row reached it, so later linears see earlier pruned ones.

Allocation slot: when the per-layer targets depend on every layer (OWL), the plan carries an
*allocator* instead of fixed targets. Before the first layer is pruned the engine makes one
statistics-only pass over the *dense* model (one forward per layer, the same hooks and
accumulators as the pruning pass, nothing pruned, dense outputs propagated), lets the allocator
reduce each layer to a number, and asks it for the targets. Why dense: the targets of layer 0
must be known before anything is pruned, so statistics of the progressively pruned model would
need the very allocation they are meant to produce; the OWL paper also measures the outlier
distribution of the pretrained model (see docs/owl.md).
"""

from __future__ import annotations

import fnmatch
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from llmprune.engine.blockwise import BlockTuner, BlockwiseOptions
from llmprune.engine.capture import capture_inputs, layer_output
from llmprune.engine.memory import (
    MAX_ROWS_PER_CALL,
    return_big_frees_to_os,
    reuse_one_call_blocks,
    rows_per_call,
)
from llmprune.engine.onepass import prune_in_one_pass
from llmprune.engine.stats import LayerStats
from llmprune.models.adapter import per_expert_linears, routed_linears
from llmprune.models.layers import decoder_layers, linear_layers
from llmprune.sparsity.allocation import Allocator
from llmprune.sparsity.methods import OptionSet, prune_weight, required_stats
from llmprune.sparsity.numerics import NumericalWarning
from llmprune.sparsity.patterns import Target
from llmprune.sparsity.recon import relative_recon_error


@dataclass
class LayerPlan:
    """What to do with each decoder layer: the method, refiner, solver and per-layer targets.

    Give ``targets`` (one per layer, fixed up front: uniform, explicit) or an ``allocator``
    that computes them from a dense statistics pass (OWL); not both.
    """

    method: str
    targets: list[Target] | None = None
    solver: str | None = None
    refine: str = "none"  # a refiner of the method's masks (REFINERS), before the solver
    refine_linears: str | None = None  # refine only linears whose name matches one of these globs
    options: OptionSet = field(default_factory=dict)  # typed options by owner; missing = defaults
    allocator: Allocator | None = None
    recon_error: bool = False  # collect XᵀX even if the method needs none, to report the error
    true_sequential: bool = False  # one forward per layer, later linears see pruned earlier ones
    # out: the keep-mask the method chose for each pruned nn.Linear weight, by parameter name, as
    # packed bits (numpy.packbits of the flat mask): what was pruned, not what happens to be zero
    keep: dict[str, np.ndarray] = field(default_factory=dict)
    blockwise: BlockwiseOptions | None = None  # tune each pruned layer towards the dense outputs


@torch.no_grad()
def run_layer(layer: nn.Module, inps: torch.Tensor, kwargs: dict, outs: torch.Tensor | None,
              stats: LayerStats | None = None, batch_size: int | None = None,
              each: Callable[[int, torch.Tensor], None] | None = None) -> None:
    """Run every calibration row through ``layer``; write outputs into ``outs`` if given, and
    hand each batch's outputs to ``each(first row, outputs)`` first if given.

    ``batch_size`` rows per call; None: as many as the activation budget allows
    (:func:`~llmprune.engine.memory.rows_per_call`).

    ``outs`` may be ``inps`` itself: a row's output depends only on that row, and each batch
    of rows is written after its forward, so the outputs replace the inputs in place.
    ``kwargs`` are the layer's own captured arguments (rotary embeddings, masks); they have
    batch size 1 and broadcast.
    """
    batch_size = batch_size or rows_per_call(layer, inps.shape[1], inps.device)
    if inps.device.type == "cpu":
        reuse_one_call_blocks(layer, batch_size, inps.shape[1])
    for j in range(0, inps.shape[0], batch_size):
        if stats is not None:
            stats.next_sample()
        y = layer_output(layer(inps[j : j + batch_size], **kwargs))
        if each is not None:
            each(j, y)
        if outs is not None:
            outs[j : j + batch_size] = y


UNROUTED = "magnitude (no calibration token routed here)"


def unreached(names: set[str]) -> RuntimeError:
    """The error for linears that no calibration row reached (and that are not MoE experts)."""
    return RuntimeError(f"linears {sorted(names)} saw no calibration input; cannot score them")


@torch.no_grad()
def prune_layer(layer: nn.Module, plan: LayerPlan, target: Target, stats: LayerStats | None,
                masks: dict[str, torch.Tensor] | None = None) -> dict:
    """Prune every linear of one layer in place; returns per-linear sparsity and timing, and
    the relative reconstruction error ``recon_error`` wherever XᵀX was collected. With
    ``masks``, each linear's keep-mask is stored there by name.

    MoE experts the router sent no calibration token have no statistics: they are pruned to
    the same target by the data-free magnitude score, and their entries say so
    (``calibration_tokens`` 0, ``scored_by``). Any other linear without input is an error.
    """
    linears = linear_layers(layer)
    routed = routed_linears(layer)
    groups = stats.groups() if stats is not None else {n: [n] for n in linears}
    missing = [n for n in linears if not any(n in g for g in groups.values())]
    if set(missing) - routed:
        raise unreached(set(missing) - routed)
    report = {}
    for n in missing:  # unrouted experts
        W = linears[n].weight
        target.check_shape(W.shape[1], n)
        t0 = time.perf_counter()
        [(W_new, keep_mask)] = prune_weight("magnitude", [W], {}, target)
        report[n] = {"shape": list(W.shape), "sparsity": 1 - keep_mask.float().mean().item(),
                     "seconds": time.perf_counter() - t0, "shared_input_with": None,
                     "calibration_tokens": 0, "scored_by": UNROUTED}
        W.copy_(W_new.to(W.dtype))
        if masks is not None:
            masks[n] = keep_mask
    for leader, names in groups.items():
        report.update(prune_group(linears, names, leader, plan, target, stats, routed, masks))
    return report


def refines(patterns: str | None, names: list[str]) -> bool:
    """Whether a group of linears is refined: always without ``patterns`` (comma-separated globs
    on the names within the layer, e.g. ``self_attn.*``), else when every name matches one."""
    if not patterns:
        return True
    globs = [g.strip() for g in patterns.split(",") if g.strip()]
    return all(any(fnmatch.fnmatchcase(n, g) for g in globs) for n in names)


@torch.no_grad()
def prune_group(linears: dict[str, nn.Linear], names: list[str], leader: str, plan: LayerPlan, target: Target,
                stats: LayerStats | None, routed: set[str] = frozenset(),
                masks: dict[str, torch.Tensor] | None = None) -> dict:
    """Prune the linears ``names`` that read the input of ``leader``, in place, with that
    input's statistics; returns their report entries (and stores the keep-masks in ``masks``)."""
    Ws = [linears[n].weight for n in names]
    for n, W in zip(names, Ws, strict=True):
        target.check_shape(W.shape[1], n)
    group_stats = stats.get(leader) if stats else {}
    t0 = time.perf_counter()
    record: dict = {}
    refine = plan.refine if refines(plan.refine_linears, names) else "none"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NumericalWarning)
        results = prune_weight(plan.method, Ws, group_stats, target, solver=plan.solver, options=plan.options,
                               refine=refine, record=record)
    dt = time.perf_counter() - t0
    notes = [w.message for w in caught if isinstance(w.message, NumericalWarning)]
    for note in notes:  # e.g. a singular XᵀX solved with more damping: say so, and record it
        tqdm.write(f"warning: {', '.join(names)}: {note}", file=sys.stderr)
    report = {}
    for k, (n, W, (W_new, keep_mask)) in enumerate(zip(names, Ws, results, strict=True)):
        if not torch.isfinite(W_new).all():
            raise FloatingPointError(f"{n}: pruning produced non-finite weights")
        W_new = W_new.to(W.dtype)
        report[n] = {"shape": list(W.shape), "sparsity": 1 - keep_mask.float().mean().item(),
                     "seconds": dt / len(names), "shared_input_with": leader if leader != n else None}
        if "refine_swaps" in record:  # pairs of weights the refiner swapped in this matrix
            report[n]["refine_swaps"] = record["refine_swaps"][k]
        for note in notes:
            report[n].update(note.record)
        if n in routed and stats is not None:  # how much of the calibration data this expert saw
            report[n]["calibration_tokens"] = stats.tokens[leader]
        if "xtx" in group_stats:  # the weights as stored, before they overwrite the dense W
            report[n]["recon_error"] = relative_recon_error(W, W_new, group_stats["xtx"])
        W.copy_(W_new)
        if masks is not None:
            masks[n] = keep_mask
    return report


def layer_params(layer: nn.Module) -> int:
    """Prunable parameters of one decoder layer: the weights of its linears (experts included)."""
    return sum(lin.weight.numel() for lin in linear_layers(layer).values())


class LayerWalk:
    """The decoder layers one at a time on ``device``, each fed the previous layer's outputs.

    Iterating yields ``(index, layer)`` with the layer on ``device``; the body may gather
    statistics (:meth:`collect`) and change the weights. After the body the walk runs the
    calibration rows through the layer *as the body left it* (pruned outputs feed the next
    layer) — unless :meth:`collect` already produced them in the same forward — and moves the
    layer back. Without ``ids`` there is no data: the walk only moves layers. ``seconds[i]``
    is the wall time spent on layer ``i``, propagation included.

    Each layer runs with its own captured arguments (``layer_kwargs[i]``): layers of different
    attention kinds get different masks. While a layer is yielded its fused MoE experts are
    per-expert linears (:func:`per_expert_linears`), so hooks and pruning reach every expert.
    """

    def __init__(self, model: nn.Module, ids: torch.Tensor | None, device: str | torch.device,
                 desc: str, progress: bool = True, last: int | None = None):
        self.layers = decoder_layers(model)
        self.last = len(self.layers) - 1 if last is None else last  # the walk stops after this layer
        self.device = device
        self.desc, self.progress = desc, progress
        # One buffer of activations: the current layer's inputs, replaced by its outputs in
        # place when the layer is done (see run_layer), so one layer's worth is ever alive.
        self.inps = None
        self.layer_kwargs: list[dict] = [{} for _ in self.layers]
        if ids is not None:
            self.inps, self.layer_kwargs = capture_inputs(model, self.layers, ids, device)
        self.seconds: list[float] = []
        self._propagated = False
        self._index = 0

    def __iter__(self):
        bar = tqdm(list(enumerate(self.layers))[: self.last + 1], desc=self.desc, unit="layer",
                   disable=not self.progress)
        for i, layer in bar:
            t0 = time.perf_counter()
            home = next(layer.parameters()).device
            layer.to(self.device)
            self._propagated, self._index = False, i
            with per_expert_linears(layer):  # after the move: the experts alias its parameters
                yield i, layer
                if self.inps is not None and i < self.last:
                    if not self._propagated:
                        run_layer(layer, self.inps, self.layer_kwargs[i], self.inps)
            layer.to(home)
            self.seconds.append(time.perf_counter() - t0)
            bar.set_postfix(sec=f"{self.seconds[-1]:.1f}")

    def collect(self, layer: nn.Module, needs: frozenset[str], propagate: bool = False,
                each: Callable[[int, torch.Tensor], None] | None = None) -> LayerStats:
        """Run the rows through ``layer`` with hooks gathering ``needs``; with ``propagate`` the
        same forward's outputs feed the next layer (only right if the body leaves ``layer`` as is);
        ``each(first row, outputs)`` sees every batch's outputs."""
        if self.inps is None:
            raise ValueError("statistics need calibration ids")
        stats = LayerStats(linear_layers(layer), needs)
        out = self.inps if propagate else None
        run_layer(layer, self.inps, self.layer_kwargs[self._index], out, stats, each=each)
        stats.remove()
        self._propagated = propagate
        return stats

    def one_pass(self, layer: nn.Module, linears: dict[str, nn.Linear], needs: frozenset[str],
                 prune: Callable[[str, LayerStats], None],
                 each: Callable[[int, torch.Tensor], None] | None = None) -> None:
        """Gather ``needs`` and prune each of ``linears`` (``prune(name, stats)``) as soon as every
        row reached it, in the forward that also feeds the next layer (see :mod:`~llmprune.engine.onepass`)
        — or, with ``each``, hands the pruned layer's outputs to ``each(first row, outputs)``
        and leaves the inputs in place (the walk then propagates after the body).

        Batches of the most rows per call: every row's activations at the current linear are
        held anyway, so smaller calls save little memory here (4 rows: −7 MiB of ≈ 570; 1 row:
        +280, each worker thread keeping its own GEMM buffers), and fewer workers were faster
        (6 SmolLM2 layers, ADMM-Grad 50 %: 38.0 s at 8 rows, 41.0 s at 2)."""
        if self.inps is None:
            raise ValueError("statistics need calibration ids")
        stats = LayerStats(linears, needs)
        return_big_frees_to_os()  # see reuse_one_call_blocks: not with many waiting threads
        try:
            prune_in_one_pass(layer, linears, self.inps, self.layer_kwargs[self._index], stats,
                              lambda name: prune(name, stats), MAX_ROWS_PER_CALL, each)
        finally:
            stats.remove()
        self._propagated = each is None

    def skip(self) -> None:
        """The current layer is not in the pruned model: its inputs go on to the next layer
        unchanged."""
        self._propagated = True

    # --- block-wise reconstruction (engine/blockwise.py) -------------------------------------
    def set_target(self, layer: nn.Module, tuner: BlockTuner, then: Sequence[int] = ()) -> float:
        """Before ``layer`` is pruned: its dense outputs become the tuner's targets (see
        :meth:`BlockTuner.source`), run on through the dense layers ``then`` (indices of layers
        after it that the pruned model will not have, moved here one at a time). Returns the
        seconds it took."""
        t0 = time.perf_counter()
        run_layer(layer, tuner.source(self.inps), self.layer_kwargs[self._index], None, each=tuner.write)
        for j in then:
            self.advance(self.layers[j], tuner, j)
        return time.perf_counter() - t0

    def advance(self, layer: nn.Module, tuner: BlockTuner, index: int | None = None) -> None:
        """Run the tuner's dense stream through the dense ``layer`` (layer ``index``, default the
        current one), in place; nothing is tuned."""
        index = self._index if index is None else index
        home = next(layer.parameters()).device
        layer.to(self.device)
        run_layer(layer, tuner.target, self.layer_kwargs[index], tuner.target)
        layer.to(home)

    def reconstruct(self, layer: nn.Module, tuner: BlockTuner, masks: dict[str, torch.Tensor],
                    before: float | None = None, seconds: float = 0.0) -> dict:
        """Tune the pruned ``layer`` towards the targets (measuring its error first unless
        ``before`` is given), then propagate through the tuned layer, measuring the error
        after. Returns the layer's ``blockwise`` report entry; its ``seconds`` are what the
        stage added (``seconds`` already spent, e.g. on the targets, plus the error before and
        the tuning; not the propagation, which the walk does anyway)."""
        if self.inps is None:
            raise ValueError("block-wise reconstruction needs calibration ids")
        kwargs = self.layer_kwargs[self._index]
        t0 = time.perf_counter()
        if before is None:
            meter = tuner.meter()
            run_layer(layer, self.inps, kwargs, None, each=meter)
            before = meter.error
        entry = tuner.tune(layer, self.inps, kwargs, masks, before, seed=self._index)
        entry["seconds"] = seconds + time.perf_counter() - t0
        meter = tuner.meter()
        run_layer(layer, self.inps, kwargs, self.inps, each=meter)
        self._propagated = True
        entry["error_after"] = meter.error
        return entry


@torch.no_grad()
def measure_layers(model: nn.Module, ids: torch.Tensor, allocator: Allocator,
                   device: str | torch.device = "cpu", progress: bool = True) -> tuple[list[float], list[float]]:
    """The allocator's dense pass: ``allocator.measure`` of every layer, nothing pruned.

    One forward per layer: the hooks collect ``allocator.needs`` while the same forward
    produces the dense outputs that feed the next layer. Returns the measures and the seconds
    spent per layer. MoE experts that no calibration token reached do not enter the measure.
    """
    walk = LayerWalk(model, ids, device, "allocation (dense pass)", progress)
    measures = []
    for i, layer in walk:
        linears = linear_layers(layer)
        stats = walk.collect(layer, allocator.needs, propagate=True)
        missing = sorted(set(linears) - set(stats.owner) - routed_linears(layer))
        if missing:
            raise RuntimeError(f"layer {i}: linears {missing} saw no calibration input")
        seen = {n: lin.weight for n, lin in linears.items() if n in stats.owner}
        measures.append(float(allocator.measure(seen, stats.per_linear())))
    return measures, walk.seconds


def run_sequential(model: nn.Module, ids: torch.Tensor | None, plan: LayerPlan,
                   device: str | torch.device = "cpu", progress: bool = True) -> list[dict]:
    """Prune ``model`` in place, layer by layer; returns one report entry per decoder layer.

    ``ids`` are the ``(nsamples, seqlen)`` calibration windows; methods that need no
    statistics (magnitude) skip the data entirely unless the plan's allocator needs it.
    Each entry has the layer's ``target`` and ``target_sparsity``; with an allocator also its
    measure (e.g. ``outlier_ratio``) and the dense pass's ``allocation_seconds``.
    """
    return_big_frees_to_os()  # freed blocks leave the RSS; run_layer lets one call's be reused
    layers = decoder_layers(model)
    targets, measures, measure_s = plan.targets, None, None
    if plan.allocator is not None:
        if targets is not None:
            raise ValueError("give the plan fixed targets or an allocator, not both")
        if ids is None:
            raise ValueError("the allocator needs calibration ids")
        measures, measure_s = measure_layers(model, ids, plan.allocator, device, progress)
        targets = plan.allocator.allocate(measures, [layer_params(layer) for layer in layers])
    if targets is None:
        raise ValueError("plan has neither targets nor an allocator")
    if len(targets) != len(layers):
        raise ValueError(f"plan has {len(targets)} targets for {len(layers)} layers")
    needs = required_stats(plan.method, plan.solver, plan.recon_error, plan.refine)
    blockwise = plan.blockwise if plan.blockwise is not None and plan.blockwise.enabled else None
    if blockwise is not None and ids is None:
        raise ValueError("block-wise reconstruction needs calibration ids")
    walk = LayerWalk(model, ids if needs or blockwise else None, device, f"prune {plan.method}", progress)
    tuner = BlockTuner(blockwise, walk.inps) if blockwise else None
    prefix = {id(m): name for name, m in model.named_modules()}
    params = {name for name, _ in model.named_parameters()}  # before the walk swaps in expert views
    report = []
    for i, layer in walk:
        one_pass = plan.true_sequential and bool(needs) and not routed_linears(layer)
        masks: dict[str, torch.Tensor] = {}  # the layer's keep-masks, as the method chose them
        meter = tuner.meter() if tuner else None  # the pruned layer's error, where a pass runs it
        # The targets come from the dense layer: before pruning (exact mode + local target: from
        # the statistics forward itself, which runs the dense layer on the same inputs).
        fused_target = tuner is not None and not one_pass and bool(needs) and blockwise.recon_target == "local"
        target_s = walk.set_target(layer, tuner) if tuner and not fused_target else 0.0
        if one_pass:
            linears, pruned = linear_layers(layer), {}

            def prune(name: str, stats: LayerStats, linears=linears, pruned=pruned, target=targets[i],
                      masks=masks) -> None:
                pruned.update(prune_group(linears, [name], stats.owner[name], plan, target, stats, masks=masks))

            walk.one_pass(layer, linears, needs, prune, each=meter)
            if set(linears) - set(pruned):
                raise unreached(set(linears) - set(pruned))
        else:  # exact: dense statistics of every linear, then prune; the walk propagates after
            stats = walk.collect(layer, needs, each=tuner.write if fused_target else None) if needs else None
            pruned = prune_layer(layer, plan, targets[i], stats, masks)
            del stats  # XᵀX can be large: free it before the walk propagates through the layer
        # fused MoE experts are pruned through views that are no parameters: not recorded here
        plan.keep.update({name: np.packbits(m.cpu().numpy().reshape(-1)) for n, m in masks.items()
                          if (name := f"{prefix[id(layer)]}.{n}.weight") in params})
        entry = {"index": i, "target": str(targets[i]), "target_sparsity": targets[i].sparsity,
                 "true_sequential": one_pass, "linears": pruned}
        if tuner is not None:
            entry["blockwise"] = walk.reconstruct(layer, tuner, masks, meter.error if one_pass else None,
                                                  target_s)
        if measures is not None:
            entry[plan.allocator.measure_name] = measures[i]
            entry["allocation_seconds"] = measure_s[i]
        report.append(entry)
    for entry, sec in zip(report, walk.seconds, strict=True):
        entry["seconds"] = sec
    return report
