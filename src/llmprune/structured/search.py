"""Budget search (``--method search --param-ratio P --targets mlp,attention,hidden,depth``):
how much to take from each target so that the model loses ``P`` of its parameters with the
least calibration loss.

The loss is the KL divergence from the dense model's next-token distribution on ``holdout``
calibration windows drawn *after* the ``nsamples`` ones (the same seed: the first ``nsamples``
windows are exactly those every other method calibrates on, and no statistic sees the held-out
ones), over the dense model's top-256 tokens plus one bucket for the rest (a coarsened KL: ≤
the full one, exact when the rest is empty; it needs no vocab-sized teacher logits in memory).

1. **One dense pass** (the engine's layer walk, the statistics rows): XᵀX of every linear's
   input (down_proj for MLP channels, o_proj for heads; q/k/v's and gate/up's are the hidden
   readers' ``H``), the hidden norms' energy shares, then the final norm; plus one forward
   for the depth similarities.
2. **Fast builds from those dense statistics** — one-shot, no propagation: MLP and heads by
   greedy + re-fit on the dense XᵀX (one greedy order per layer serves every MLP width: its
   prefixes; 8 channels per greedy step), hidden by the summed OSSCAR objective (one greedy
   order) with the RMS scale only, depth by the window of least angular distance (Gromov et al.). Every level of every
   target within the budget is built alone and scored: the **sensitivity curves**.
3. **Allocations**: for every combination of the other targets' levels, the *filler* (the
   target with the finest levels, the MLP width where it is a target) takes the level that
   brings the exact parameter count (shapes of the pruned model, computed, not built) nearest
   the budget — the rule ``--param-ratio`` follows for a single target, so every allocation,
   single targets alone included, removes about the same share. Allocations within 1 % of the
   budget are ranked by the sum of their targets' KL increases; the ``search_candidates`` best
   and every single target alone are built (all targets together, still fast) and scored.
4. **Final**: the best single target alone and the best mix (by the fast KL) are each applied
   with the full methods in order — depth, hidden (with its re-fit), OSSCAR heads, OSSCAR MLP
   — on the ``nsamples`` windows through the model as pruned so far; the lower held-out KL
   wins. The search therefore never ends worse, on held-out calibration data, than the best
   single target it tried at the same budget.

What stays uniform: a standard config has one ``intermediate_size``, one head count and one
``hidden_size`` for every layer, so each target's amount is the same in every layer (which
heads / channels go is chosen per layer); depth chooses *which* layers.
"""

from __future__ import annotations

import copy
import functools
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from llmprune.engine.sequential import LayerWalk
from llmprune.engine.stats import XTX
from llmprune.errors import LLMPruneError
from llmprune.models.adapter import attention_heads, decoder_layers, mlp_triplet, text_config
from llmprune.models.residual import ResidualLayout, residual_layout
from llmprune.structured import depth as D
from llmprune.structured.attention import HeadPlan, run_attention, set_head_counts, shrink_attention
from llmprune.structured.hidden import (
    HiddenPlan,
    HiddenStats,
    NormStats,
    choose_channels,
    reader_problem,
    run_final_norm,
    run_hidden,
    shrink_scaled,
)
from llmprune.structured.osscar import DTYPE, damped, greedy_remove, osscar_prune, refit, shrunk
from llmprune.structured.shrink import (
    config_rejects,
    drop_layers,
    set_intermediate_size,
    shrink_mlp,
)

TOPK = 256
TOLERANCE = 0.01  # an allocation's removed share may differ from the budget by up to this much
MAX_LEVELS = 6  # levels scored alone per target (evenly spread; the others interpolated)
FAST_BLOCK = 8  # channels per greedy step in the fast orders (the final pruning uses --greedy-block)


# --- the loss ---------------------------------------------------------------------------------
class Teacher:
    """The dense model's top-k next-token log-probabilities on the held-out windows."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, k: int = TOPK):
        self.ids = ids
        self.values, self.index, self.tail = [], [], []
        with torch.no_grad():
            for row in ids:
                logp = _log_probs(model, row)
                v, i = torch.topk(logp, min(k, logp.shape[-1]), dim=-1)
                self.values.append(v)
                self.index.append(i)
                self.tail.append(torch.log1p(-v.exp().sum(-1).clamp(max=1 - 1e-7)))

    @torch.no_grad()
    def kl(self, model: nn.Module) -> float:
        """Mean over the held-out tokens of KL(dense ‖ model) on the top-k + rest buckets."""
        total, n = 0.0, 0
        for row, v, i, tail in zip(self.ids, self.values, self.index, self.tail, strict=True):
            q = _log_probs(model, row).gather(-1, i)
            q_tail = torch.log1p(-q.exp().sum(-1).clamp(max=1 - 1e-7))
            p = v.exp()
            kl = (p * (v - q)).sum(-1) + tail.exp() * (tail - q_tail)
            total += float(kl.sum())
            n += kl.numel()
        return total / n


def _log_probs(model: nn.Module, row: torch.Tensor) -> torch.Tensor:
    dev = next(model.parameters()).device
    logits = model(row[None].to(dev), use_cache=False).logits[0].float()
    return torch.log_softmax(logits, -1).cpu()


# --- parameter counts of a pruned shape ---------------------------------------------------------
@dataclass(frozen=True)
class Allocation:
    """How much each target removes: MLP channels per layer, (unit, count) of heads, hidden
    channels, consecutive layers."""

    mlp: int = 0
    attention: tuple[str, int] = ("heads", 0)
    hidden: int = 0
    depth: int = 0

    def label(self) -> str:
        parts = []
        if self.mlp:
            parts.append(f"mlp −{self.mlp} ch")
        if self.attention[1]:
            parts.append(f"attention −{self.attention[1]} {'per KV group' if self.attention[0] == 'heads' else 'KV groups'}")
        if self.hidden:
            parts.append(f"hidden −{self.hidden}")
        if self.depth:
            parts.append(f"depth −{self.depth} layers")
        return ", ".join(parts) or "dense"


@dataclass
class Shapes:
    """What the parameter count of a pruned model depends on: per decoder layer, tensors by
    the dimensions that shrink (``d`` hidden, ``inter`` MLP, ``q`` / ``kv`` heads); outside
    the layers, tensors that scale with ``d``."""

    d: int
    inter: int
    heads: int
    kv: int
    head_dim: int
    layers: int
    per_layer: dict[tuple[str | None, str | None], int] = field(default_factory=dict)
    outside_d: int = 0
    outside_fixed: int = 0

    def count(self, a: Allocation) -> int:
        hp = HeadPlan.removing(a.attention[0], self.heads, self.kv, self.head_dim, a.attention[1])
        frac = {"d": (self.d - a.hidden) / self.d, "inter": (self.inter - a.mlp) / max(self.inter, 1),
                "q": hp.heads_after / self.heads, "kv": hp.kv_after / self.kv, None: 1.0}
        layer = sum(n * frac[x] * frac[y] for (x, y), n in self.per_layer.items())
        return round((self.layers - a.depth) * layer + self.outside_d * frac["d"] + self.outside_fixed)


def shapes(model: nn.Module, targets: tuple[str, ...] | list[str]) -> Shapes:
    """Classify every parameter by the dimensions ``targets`` shrink (MLP rows / columns, head
    rows / columns, the residual stream's channels); what no target shrinks counts as fixed, so a
    model needs only the modules of the targets asked for."""
    layers = decoder_layers(model)
    layer = layers[0]
    trip = mlp_triplet(layer) if "mlp" in targets else None
    att = attention_heads(layer) if "attention" in targets else None
    lay = residual_layout(model) if "hidden" in targets else None
    d = lay.hidden if lay else int(text_config(model).hidden_size)
    dims: dict[str, tuple[str | None, str | None]] = {}  # parameter name → (out dim kind, in dim kind)

    def linear(name: str, out: str | None, inp: str | None) -> None:
        dims[f"{name}.weight"] = (out, inp)
        dims[f"{name}.bias"] = (out, None)

    if trip:
        for name in trip.rows:
            linear(name, "inter", "d")
        linear(trip.down, "d", "inter")
    if att:
        linear(att.q, "q", "d")
        linear(att.k, "kv", "d")
        linear(att.v, "kv", "d")
        linear(att.o, "d", "q")
    if lay:
        for r in lay.reads:
            dims[f"{r.norm}.weight"] = ("d", None)
        for w in lay.writers:
            if w.norm:
                dims[f"{w.norm}.weight"] = ("d", None)
    sh = Shapes(d, trip.intermediate if trip else 0, att.heads if att else 1, att.kv_heads if att else 1,
                att.head_dim if att else 0, len(layers))
    for name, p in layer.named_parameters():
        key = dims.get(name, (None, None))
        if not lay:  # hidden is not a target: the stream's channels stay
            key = tuple(None if x == "d" else x for x in key)
        sh.per_layer[key] = sh.per_layer.get(key, 0) + p.numel()
    inside = {id(p) for p in layers.parameters()}
    for p in model.parameters():
        if id(p) in inside:
            continue
        if d in p.shape:
            sh.outside_d += p.numel()
        else:
            sh.outside_fixed += p.numel()
    return sh


# --- the plan -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchPlan:
    budget: float
    targets: tuple[str, ...]
    shapes: Shapes
    levels: dict[str, list[Allocation]]  # per target, its levels alone (dense excluded)
    allocations: list[Allocation]  # the combinations near the budget (see allocations())


def allocations(sh: Shapes, levels: dict[str, list[Allocation]], budget: float,
                accepts: Callable[[Allocation], bool] = lambda a: True) -> list[Allocation]:
    """For every combination of the other targets' levels, the filler target's level (the
    target with the most levels) that brings the removed share nearest ``budget``; kept when the
    config ``accepts`` it and it is within :data:`TOLERANCE` of the budget (or, where the levels
    are too coarse for that, as near as the nearest allocation)."""
    total = sh.count(Allocation())
    filler = max(levels, key=lambda t: len(levels[t]))
    others = [t for t in levels if t != filler]

    def gap(a: Allocation) -> float:
        return abs(1 - sh.count(a) / total - budget)

    found: dict[Allocation, float] = {}
    for choice in itertools.product(*[[None, *levels[t]] for t in others]):
        base = {t: getattr(c, t) for t, c in zip(others, choice, strict=True) if c is not None}
        fills = [Allocation(**base)] + [Allocation(**base, **{filler: getattr(f, filler)}) for f in levels[filler]]
        fills = [a for a in fills if accepts(a) and a != Allocation()]
        if fills:
            a = min(fills, key=gap)
            found[a] = gap(a)
    if not found:
        return []
    near = max(TOLERANCE, min(found.values()))
    return [a for a, g in found.items() if g <= near]


def targets_of(a: Allocation) -> list[str]:
    """The targets ``a`` takes something from."""
    return [t for t in ("mlp", "attention", "hidden", "depth") if getattr(a, t) not in (0, ("heads", 0))]


def _alone(target: str, amount) -> Allocation:
    return Allocation(**{target: amount})


def plan_search(model: nn.Module, budget: float, targets: list[str], round_to: int) -> SearchPlan:
    """The levels of every target that fit the budget, or one clear error (a target the model
    does not have, a budget beyond them all)."""
    sh = shapes(model, targets)  # errors name a target's missing MLP / attention / residual layout
    total = sh.count(Allocation())

    @functools.cache
    def config_ok(hidden: int, heads: int, kv: int) -> bool:  # e.g. Llama: hidden_size % heads == 0
        changes = {"hidden_size": sh.d - hidden} if "hidden" in targets else {}
        if "attention" in targets:
            changes.update(num_attention_heads=heads, num_key_value_heads=kv)
        return not changes or config_rejects(model, **changes) is None

    def accepts(a: Allocation) -> bool:
        hp = HeadPlan.removing(a.attention[0], sh.heads, sh.kv, sh.head_dim, a.attention[1])
        return config_ok(a.hidden, hp.heads_after, hp.kv_after)

    levels: dict[str, list[Allocation]] = {}
    for t in targets:
        if t == "mlp":
            cands = [_alone(t, k) for k in range(round_to, sh.inter, round_to)]
        elif t == "hidden":
            cands = [_alone(t, k) for k in range(round_to, sh.d, round_to)]
        elif t == "depth":
            cands = [_alone(t, k) for k in range(1, sh.layers)]
        else:
            per = sh.heads // sh.kv
            cands = [_alone(t, ("heads", r)) for r in range(1, per)] if per > 1 else []
            cands += [_alone(t, ("groups", r)) for r in range(1, sh.kv)]
        # a level alone may go past the budget by the tolerance; beyond, no allocation can use it
        cands = [a for a in cands if accepts(a)]
        fits = [a for a in cands if 1 - sh.count(a) / total <= budget + TOLERANCE]
        levels[t] = fits + [a for a in cands if a not in fits][:1]  # and the first past it
    best = Allocation(**{t: getattr(lv[-1], t) for t, lv in levels.items() if lv})
    most = 1 - sh.count(best) / total
    found = allocations(sh, levels, budget, accepts)
    if not found or most < budget - TOLERANCE:
        raise LLMPruneError(f"param_ratio {budget:g} is more than --targets {','.join(targets)} can remove "
                            f"together within the search's levels (at most {most:.3f}); "
                            "add targets or lower --param-ratio")
    return SearchPlan(budget, tuple(targets), sh, levels, found)


# --- dense statistics and fast builds ------------------------------------------------------------
@dataclass
class DenseStats:
    down: list[torch.Tensor] = field(default_factory=list)  # XᵀX of down_proj, then H′ (shrunk, damped)
    o: list[torch.Tensor] = field(default_factory=list)  # XᵀX of o_proj, per layer
    mlp_order: list[list[int]] = field(default_factory=list)  # greedy removal order per layer
    hidden: HiddenStats | None = None
    hidden_order: list[int] = field(default_factory=list)
    windows: dict[int, int] = field(default_factory=dict)  # depth k → first layer of the window
    seconds: dict[str, float] = field(default_factory=dict)
    layout: ResidualLayout | None = None  # the dense model's residual stream (hidden only)


@torch.no_grad()
def dense_stats(model: nn.Module, ids: torch.Tensor, plan: SearchPlan, options, device, progress) -> DenseStats:
    """Pass 1 over the dense model: what every fast build needs."""
    t0 = time.perf_counter()
    st = DenseStats()
    want = set(plan.targets)
    lay = st.layout = residual_layout(model) if "hidden" in want else None
    if lay:
        reads_ = [r.norm for r in lay.reads]
        st.hidden = HiddenStats(minitron=torch.zeros(lay.hidden, dtype=DTYPE))
    walk = LayerWalk(model, ids, device, "search: dense statistics", progress)
    for _i, layer in walk:
        shares = {}
        if "hidden" in want:
            shares = {n: NormStats(layer.get_submodule(n), select=n in reads_, gram=False) for n in
                      [*reads_, *[w.norm for w in lay.writers if w.norm]]}
        try:
            stats = walk.collect(layer, XTX, propagate=True)
        finally:
            for s in shares.values():
                s.remove()
        xtx = {n: s["xtx"] for n, s in stats.per_linear().items()}
        st.down.append(xtx[mlp_triplet(layer).down] if "mlp" in want else None)
        st.o.append(xtx[attention_heads(layer).o] if "attention" in want else None)
        if "hidden" in want:
            reads = []
            for r in lay.reads:
                s = shares[r.norm]
                s.H = xtx[r.consumers[0]]  # the norm's output is this consumer's input
                st.hidden.minitron += s.minitron.sqrt().to(DTYPE).cpu()
                s.minitron = None
                reads.append(s)
                if options.greedy:
                    W = torch.cat([layer.get_submodule(c).weight.detach().float() for c in r.consumers])
                    st.hidden.problems.append(reader_problem(W, s.H, options.percdamp, options.shrink))
            st.hidden.reads.append(reads)
            st.hidden.writers.append({w.norm: shares[w.norm] for w in lay.writers if w.norm})
        del stats
    if "hidden" in want:
        st.hidden.final = NormStats(model.get_submodule(lay.final.norm), select=True)
        try:
            run_final_norm(model, lay, walk.inps)
        finally:
            st.hidden.final.remove()
        if options.greedy:
            head = model.get_submodule(lay.final.consumers[0]).weight.detach().float()
            st.hidden.problems.append(reader_problem(head, st.hidden.final.H, options.percdamp, options.shrink))
    del walk
    st.seconds["statistics_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if "mlp" in want and plan.levels["mlp"]:
        most = max(a.mlp for a in plan.levels["mlp"])
        for i, layer in enumerate(tqdm(decoder_layers(model), desc="search: MLP greedy orders", disable=not progress)):
            W = layer.get_submodule(mlp_triplet(layer).down).weight.detach().to(DTYPE).T
            Hd, P, _ = damped(shrunk(st.down[i].to(DTYPE), options.shrink), options.percdamp)
            order: list[int] = []
            greedy_remove(W, P, most, max(options.greedy_block, FAST_BLOCK), order=order)
            st.mlp_order.append(order)
            st.down[i] = Hd.float()  # what the builds' re-fits need: H′, not H (float32 is plenty there)
            del P
    if "hidden" in want and plan.levels["hidden"]:
        most = max(a.hidden for a in plan.levels["hidden"])
        if options.greedy:  # the summed OSSCAR objective: one greedy order, every prefix a level
            choose_channels(st.hidden, plan.shapes.d, plan.shapes.d - most,
                            options.replace(local_search=False, greedy_block=max(options.greedy_block, FAST_BLOCK)),
                            order=st.hidden_order)
            st.hidden.problems.clear()
        else:  # Minitron's importance, least important first
            st.hidden_order = torch.argsort(st.hidden.minitron).tolist()
    st.seconds["orders_s"] = time.perf_counter() - t0
    if "depth" in want and plan.levels["depth"]:
        t0 = time.perf_counter()
        sim = D.similarity_matrices(model, ids, device=device, progress=progress)
        for a in plan.levels["depth"]:
            st.windows[a.depth] = D.best_window(D.window_scores_from_similarity(sim, a.depth)["angular"])
        st.seconds["similarity_s"] = time.perf_counter() - t0
    return st


@torch.no_grad()
def build_fast(dense: nn.Module, a: Allocation, st: DenseStats, plan: SearchPlan, options) -> nn.Module:
    """A copy of ``dense`` pruned to ``a`` from the dense statistics alone (no propagation)."""
    model = copy.deepcopy(dense)
    layers = decoder_layers(model)
    kept = list(range(len(layers)))
    if a.depth:
        start = st.windows[a.depth]
        drop_layers(model, range(start, start + a.depth))
        kept = [i for i in kept if not start <= i < start + a.depth]
    sh = plan.shapes
    for new, old in enumerate(kept):
        layer = layers[new]
        if a.mlp:
            trip = mlp_triplet(layer)
            removed = torch.zeros(sh.inter, dtype=torch.bool)
            removed[st.mlp_order[old][: a.mlp]] = True
            keep = (~removed).nonzero().squeeze(1)
            W = layer.get_submodule(trip.down).weight.detach().float().T
            shrink_mlp(layer, trip, keep, refit(W, st.down[old], keep).T.float())
        unit, r = a.attention
        if r:
            hp = HeadPlan.removing(unit, sh.heads, sh.kv, sh.head_dim, r)
            info = attention_heads(layer)
            per = sh.heads // sh.kv
            buckets = torch.arange(sh.heads) // per if unit == "heads" and per > 1 else None
            res = osscar_prune(layer.get_submodule(info.o).weight, st.o[old], hp.heads_after * hp.head_dim,
                               local_search_swaps=0, percdamp=options.percdamp, shrink=options.shrink,
                               group=hp.structure, buckets=buckets)
            shrink_attention(layer, info, res.keep[:: hp.head_dim] // hp.head_dim, res.down)
    if a.mlp:
        set_intermediate_size(model, sh.inter - a.mlp)
    if a.attention[1]:
        hp = HeadPlan.removing(a.attention[0], sh.heads, sh.kv, sh.head_dim, a.attention[1])
        set_head_counts(model, hp.heads_after, hp.kv_after, hp.head_dim)
    if a.hidden:
        removed = torch.zeros(sh.d, dtype=torch.bool)
        removed[st.hidden_order[: a.hidden]] = True
        sub = HiddenStats(reads=[st.hidden.reads[i] for i in kept], writers=[st.hidden.writers[i] for i in kept],
                          final=st.hidden.final)
        shrink_scaled(model, st.layout, (~removed).nonzero().squeeze(1), sub)
    return model


# --- the search ---------------------------------------------------------------------------------
def _spread(levels: list[Allocation], n: int) -> list[Allocation]:
    """At most ``n`` levels, evenly spread, always with the largest."""
    if len(levels) <= n:
        return levels
    idx = sorted({round(i * (len(levels) - 1) / (n - 1)) for i in range(n)})
    return [levels[i] for i in idx]


def _interpolate(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear through (0, 0) and the measured points; flat beyond the last."""
    pts = sorted(zip([0.0, *xs], [0.0, *ys], strict=True))
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return pts[-1][1]


@torch.no_grad()
def run_search(model: nn.Module, ids: torch.Tensor, plan: SearchPlan, options,
               device: str | torch.device = "cpu", progress: bool = True) -> dict:
    """Search and apply; the report's ``search`` part (see the module doc)."""
    t_start = time.perf_counter()
    sh = plan.shapes
    total = sh.count(Allocation())
    calib, held = ids[: -options.holdout], ids[-options.holdout:]
    teacher = Teacher(model, held)
    st = dense_stats(model, calib, plan, options, device, progress)

    def removed(a: Allocation) -> float:
        return 1 - sh.count(a) / total

    # sensitivity curves
    t0 = time.perf_counter()
    curves: dict[str, list[dict]] = {}
    scored = [(t, a) for t in plan.targets for a in _spread(plan.levels[t], MAX_LEVELS)]
    for t, a in tqdm(scored, desc="search: sensitivity", disable=not progress):
        kl = teacher.kl(build_fast(model, a, st, plan, options))
        curves.setdefault(t, []).append({"level": a.label(), "removed_share": removed(a), "kl": kl,
                                         "amount": getattr(a, t)})
    sens_s = time.perf_counter() - t0

    def predicted(t: str, a: Allocation) -> float:
        pts = curves.get(t, [])
        return _interpolate([p["removed_share"] for p in pts], [p["kl"] for p in pts], removed(_alone(t, getattr(a, t))))

    # allocations within the budget, ranked by the summed KL; every single target alone as well
    combos = [(sum(predicted(t, a) for t in targets_of(a)), a) for a in plan.allocations]
    combos.sort(key=lambda c: (c[0], -sh.count(c[1])))
    to_score = combos[: options.search_candidates] + [c for c in combos[options.search_candidates:]
                                                      if len(targets_of(c[1])) == 1]
    t0 = time.perf_counter()
    candidates = []
    for pred, a in tqdm(to_score, desc="search: allocations", disable=not progress):
        candidates.append({"allocation": a.label(), "removed_share": removed(a), "predicted_kl": pred,
                           "kl": teacher.kl(build_fast(model, a, st, plan, options)), "_a": a})
    cand_s = time.perf_counter() - t0
    # final: the best single target and the best mix, each with the full methods; the lower held-out KL wins
    t0 = time.perf_counter()
    finals = [min(group, key=lambda c: c["kl"]) for group in
              ([c for c in candidates if len(targets_of(c["_a"])) == 1],
               [c for c in candidates if len(targets_of(c["_a"])) > 1]) if group]
    finals.sort(key=lambda c: c["kl"], reverse=True)  # the likely winner last: it is applied in place
    best = None  # (held-out KL, model, steps, candidate)
    for n, c in enumerate(finals):
        pruned = model if n == len(finals) - 1 else copy.deepcopy(model)
        c_steps = apply_allocation(pruned, calib, c["_a"], st, plan, options, device, progress)
        c["final_kl"] = teacher.kl(pruned)
        if best is None or c["final_kl"] < best[0]:
            best = (c["final_kl"], pruned, c_steps, c)
    _, pruned, steps, winner = best
    if pruned is not model:  # an earlier final won: the caller's model object becomes it
        _adopt(model, pruned)
    final_s = time.perf_counter() - t0
    chosen: Allocation = winner["_a"]
    for c in candidates:
        del c["_a"]
    return {"budget": plan.budget, "targets": list(plan.targets), "chosen": chosen.label(),
            "allocation": {"mlp_channels_removed": chosen.mlp, "attention": list(chosen.attention),
                           "hidden_channels_removed": chosen.hidden, "layers_removed": chosen.depth,
                           "removed_layers": (list(range(st.windows[chosen.depth], st.windows[chosen.depth]
                                                         + chosen.depth)) if chosen.depth else [])},
            "predicted_removed_share": removed(chosen),
            "kl": {"fast_estimate": winner["kl"], "final": winner["final_kl"]},
            "finals": [{"allocation": c["allocation"], "kl_fast": c["kl"], "kl_final": c["final_kl"]}
                       for c in finals],
            "holdout_windows": int(held.shape[0]), "statistics_windows": int(calib.shape[0]),
            "sensitivity": curves, "allocations_in_budget": len(combos), "candidates": candidates,
            "uniform": "every layer keeps the same MLP width, head counts and hidden size (a standard config "
                       "has one of each); depth removes a block of consecutive layers",
            "steps": steps,
            "timings": {**st.seconds, "sensitivity_s": sens_s, "candidates_s": cand_s, "final_s": final_s,
                        "builds_scored": len(scored) + len(candidates), "finals": len(finals),
                        "total_s": time.perf_counter() - t_start}}


def _adopt(model: nn.Module, other: nn.Module) -> None:
    """Make ``model`` the pruned copy ``other``: its modules and config (the caller holds ``model``)."""
    for name, child in other.named_children():
        setattr(model, name, child)
    model.config = other.config


def apply_allocation(model: nn.Module, ids: torch.Tensor, a: Allocation, st: DenseStats, plan: SearchPlan,
                     options, device, progress) -> dict:
    """Apply ``a`` with the full methods: depth, hidden (re-fit), OSSCAR heads, OSSCAR MLP."""
    from llmprune.structured.api import StructuredPlan, run_osscar

    sh = plan.shapes
    steps = {}
    if a.depth:
        start = st.windows[a.depth]
        drop_layers(model, range(start, start + a.depth))
        steps["depth"] = {"removed_layers": list(range(start, start + a.depth))}
    if a.hidden:
        hp = HiddenPlan(residual_layout(model), sh.d, sh.d - a.hidden)
        steps["hidden"] = _brief(run_hidden(model, ids, hp, options, device, progress))
    if a.attention[1]:
        steps["attention"] = _brief(run_attention(model, ids, HeadPlan.removing(a.attention[0], sh.heads, sh.kv, sh.head_dim, a.attention[1]), options, device, progress))
    if a.mlp:
        n = len(decoder_layers(model))
        sp = StructuredPlan("osscar", width=sh.inter - a.mlp, intermediate=sh.inter, n_layers=n)
        steps["mlp"] = _brief(run_osscar(model, ids, sp, options, device, progress))
    return steps


def _brief(section: dict) -> dict:
    """A target's report without its per-layer entries' bulk (kept: what was removed)."""
    out = {k: v for k, v in section.items() if k != "layers"}
    out["layers"] = [{k: v for k, v in e.items() if k in ("index", "removed", "removed_heads", "removed_kv_heads")}
                     for e in section.get("layers", [])]
    return out

