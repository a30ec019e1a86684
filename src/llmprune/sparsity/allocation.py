"""Layer-wise allocation: how the global target is split between decoder layers.

Pure tensor / number code, no model knowledge. Three kinds:

* ``uniform`` — every layer gets the global target (no allocator needed);
* ``explicit`` — the user lists one sparsity per layer (:func:`explicit_targets`);
* ``owl`` — Outlier-Weighted Layerwise sparsity (Yin et al., 2024). Each layer's *outlier ratio*
  (LOD, the share of its Wanda scores |W|·‖X‖ above ``M`` × the layer's mean score) decides its
  sparsity: layers with more outliers are pruned less (:class:`OWLAllocator`).

An allocator is what the engine's allocation slot takes: it declares which statistics it needs
(``needs``), reduces one *dense* layer to a number (``measure``), and turns the numbers of all
layers into one :class:`Target` per layer (``allocate``). See ``docs/owl.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Protocol

import torch
from pydantic import BeforeValidator, Field

from llmprune.errors import LLMPruneError
from llmprune.options import NonNegativeFloat, Options, PositiveFloat
from llmprune.sparsity.patterns import Target
from llmprune.sparsity.scores import wanda_score

Stats = dict[str, torch.Tensor]

# Above this many partial sums the exact-N:M rounding falls back to rounding within groups of
# equally sized layers (always exact, a little less free); see :func:`round_nm`.
MAX_DP_STATES = 200_000


class Allocator(Protocol):
    """The engine's allocation slot: a dense statistics pass, then one target per layer."""

    needs: frozenset[str]  # statistics for the dense pass, e.g. {"col_sq"}
    measure_name: str  # what ``measure`` returns, as it appears in reports

    def measure(self, weights: dict[str, torch.Tensor], stats: dict[str, Stats]) -> float:
        """Reduce one dense decoder layer (its linears' weights and per-linear stats) to a number."""
        ...

    def allocate(self, measures: Sequence[float], params: Sequence[int]) -> list[Target]:
        """One target per layer from every layer's measure and prunable parameter count."""
        ...


class OWLOptions(Options):
    """OWL's settings (``--allocation owl``); defaults from the M x λ sweep in docs/owl.md."""

    owl_m: PositiveFloat = Field(7.0, description="OWL outlier threshold M: scores above M x the layer mean")
    owl_lambda: NonNegativeFloat = Field(0.12, description="OWL spread lambda: layer sparsities stay within S ± lambda")


def _ratio_list(v: Any) -> Any:
    # "0.4,0.6" from the command line is the list [0.4, 0.6]; the rest is checked by
    # check_layer_ratios, whose messages name the bad layer
    if isinstance(v, str):
        try:
            return [float(x) for x in v.split(",")]
        except ValueError:
            raise ValueError(f"layer_ratios must be comma-separated numbers, got {v!r}") from None
    return v


class ExplicitOptions(Options):
    """``--allocation explicit``: the user's own sparsity per layer."""

    layer_ratios: Annotated[Any, BeforeValidator(_ratio_list)] = Field(
        None, description="explicit per-layer sparsity: a list (one per layer) or a map {layer: ratio}")


# The allocation kinds and the options each reads (uniform has none).
ALLOCATIONS: dict[str, type[Options] | None] = {"uniform": None, "owl": OWLOptions, "explicit": ExplicitOptions}


# --- OWL: outlier ratios ----------------------------------------------------------------------
def outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """Layer-wise outlier distribution (LOD): the share of ``scores`` above ``m`` × their mean.

    ``scores`` are the Wanda score matrices of *all* linears of one decoder layer, pooled: the
    mean is taken over every score of the layer, not per linear, as the OWL reference does
    (it concatenates the flattened scores of the layer before ``check_outlier_mean``).
    Returns a fraction in [0, 1] (the reference reports percent; min-max normalisation later
    makes the unit irrelevant).
    """
    if m <= 0:
        raise LLMPruneError(f"OWL threshold M must be > 0, got {m}")
    total = sum(s.numel() for s in scores)
    if total == 0:
        return 0.0
    # fp64 accumulation: a layer has millions of scores and the mean must not drift with order
    mean = sum(float(s.sum(dtype=torch.float64)) for s in scores) / total
    thresh = m * mean
    count = sum(int((s > thresh).sum()) for s in scores)
    return count / total


def layer_outlier_ratio(weights: Mapping[str, torch.Tensor], stats: Mapping[str, Stats], m: float) -> float:
    """LOD of one layer from its linears' weights and their ``col_sq`` (Σx² per input channel)."""
    return outlier_ratio([wanda_score(W, stats[name]["col_sq"]) for name, W in weights.items()], m)


# --- OWL: ratios with an exact parameter-weighted mean ---------------------------------------
def check_owl_bounds(target_sparsity: float, lam: float) -> None:
    """OWL keeps every layer in [S − λ, S + λ]; that interval must lie inside [0, 1).

    We raise rather than clip: a silent clip would move the weighted mean away from S or
    squeeze the spread the user asked for; a smaller λ is the honest fix.
    """
    if lam < 0:
        raise LLMPruneError(f"owl_lambda must be ≥ 0, got {lam}")
    lo, hi = target_sparsity - lam, target_sparsity + lam
    if lo < 0 or hi >= 1:
        limit = min(target_sparsity, 1 - target_sparsity)
        raise LLMPruneError(
            f"owl_lambda {lam} puts layer sparsities in [{lo:g}, {hi:g}], outside [0, 1) for target "
            f"{target_sparsity:g}; use --owl-lambda < {limit:g}")


def _weighted_clip_shift(a: Sequence[float], w: Sequence[float], mean: float, lo: float,
                         hi: float) -> list[float]:
    """``clip(a_l + c, lo, hi)`` with the shift ``c`` chosen so the ``w``-weighted mean is ``mean``.

    f(c) = Σ w_l clip(a_l + c, lo, hi) is continuous, piecewise linear and non-decreasing, going
    from lo·Σw to hi·Σw, so for lo ≤ mean ≤ hi a solution exists. We find the linear piece that
    holds it from the sorted breakpoints and solve that piece exactly (no bisection tolerance).
    """
    W = float(sum(w))
    goal = mean * W
    # breakpoints: where a layer enters (c = lo − a) or leaves (c = hi − a) the free range
    cuts = sorted({lo - x for x in a} | {hi - x for x in a})

    def f(c: float) -> float:
        return sum(wi * min(hi, max(lo, x + c)) for x, wi in zip(a, w, strict=True))

    # the first piece [c0, c1] with f(c1) ≥ goal; f(cuts[0]) = lo·Σw < goal < hi·Σw = f(cuts[-1])
    c0, c1 = cuts[0], cuts[-1]
    for left, right in zip(cuts, cuts[1:], strict=False):
        if f(right) >= goal:
            c0, c1 = left, right
            break
    # on the piece, f is linear with slope = total weight of the layers strictly inside (lo, hi)
    mid = (c0 + c1) / 2
    slope = sum(wi for x, wi in zip(a, w, strict=True) if lo < x + mid < hi)
    c = c0 if slope == 0 else c0 + (goal - f(c0)) / slope
    return [min(hi, max(lo, x + c)) for x in a]


def owl_ratios(outlier_ratios: Sequence[float], params_per_layer: Sequence[int],
               target_sparsity: float, lam: float) -> list[float]:
    """Per-layer sparsities from per-layer outlier ratios (OWL).

    As in the reference: the LODs are min-max normalised to [0, 2λ] and subtracted from the
    target, so the layer with most outliers is pruned least; then everything is shifted so that
    the mean is the target. Two differences make it exact in general:

    * the mean is *parameter-weighted* (Σ p_l·s_l / Σ p_l = S), which equals the reference's
      plain mean when layers have equal size;
    * the ratios stay within [S − λ, S + λ], the bound the paper states. The reference's shift
      can leave it by up to λ when the LODs are skewed; we clip and re-solve the shift (a water
      filling), so the result equals the reference whenever the reference is within the bound.

    Equal LODs (or λ = 0) give the uniform allocation.
    """
    n = len(outlier_ratios)
    if n != len(params_per_layer):
        raise ValueError(f"{n} outlier ratios for {len(params_per_layer)} layer sizes")
    if n == 0:
        return []
    if any(p <= 0 for p in params_per_layer):
        raise ValueError(f"layer sizes must be positive, got {list(params_per_layer)}")
    check_owl_bounds(target_sparsity, lam)
    lod = [float(x) for x in outlier_ratios]
    spread = max(lod) - min(lod)
    if lam == 0 or spread == 0:
        return [float(target_sparsity)] * n
    # s_l = S − 2λ·norm_l (+ shift): more outliers → lower sparsity
    a = [target_sparsity - 2 * lam * (x - min(lod)) / spread for x in lod]
    return _weighted_clip_shift(a, [float(p) for p in params_per_layer], target_sparsity,
                                target_sparsity - lam, target_sparsity + lam)


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    return sum(v * w for v, w in zip(values, weights, strict=True)) / sum(weights)


# --- mixed N:M: integer N per layer, exact weighted mean -------------------------------------
def _round_dp(x: Sequence[float], w: Sequence[int], n: int, m: int,
              max_states: int | None = None) -> list[int] | None:
    """Exact rounding by dynamic programming over partial sums Σ w_l (N_l − n).

    Each N_l may be floor(x_l), ceil(x_l) or anything between those and n (so uniform n is
    always reachable and a solution always exists), within [1, m − 1]. Minimises the weighted
    squared distance Σ w_l (N_l − x_l)² subject to Σ w_l (N_l − n) = 0. Returns None if the
    number of partial sums would exceed ``max_states``.
    """
    g = math.gcd(*w)
    w = [wi // g for wi in w]  # only the ratio of sizes matters for the constraint
    choices = []
    for xl in x:
        lo = max(1, min(math.floor(xl), n))
        hi = min(m - 1, max(math.ceil(xl), n))
        choices.append(range(lo, hi + 1))
    L = len(x)
    # reachable range of the remaining layers' deviation, to drop states that cannot end at 0
    rem_lo = [0] * (L + 1)
    rem_hi = [0] * (L + 1)
    for i in range(L - 1, -1, -1):
        rem_lo[i] = rem_lo[i + 1] + w[i] * (choices[i][0] - n)
        rem_hi[i] = rem_hi[i + 1] + w[i] * (choices[i][-1] - n)
    states: dict[int, float] = {0: 0.0}
    back: list[dict[int, tuple[int, int]]] = []
    for i in range(L):
        nxt: dict[int, float] = {}
        ptr: dict[int, tuple[int, int]] = {}
        for s, cost in states.items():
            for N in choices[i]:
                t = s + w[i] * (N - n)
                if not (rem_lo[i + 1] <= -t <= rem_hi[i + 1]):
                    continue
                c = cost + w[i] * (N - x[i]) ** 2
                if t not in nxt or c < nxt[t]:  # strict: ties keep the first, deterministically
                    nxt[t] = c
                    ptr[t] = (s, N)
        if max_states is not None and len(nxt) > max_states:
            return None
        states = nxt
        back.append(ptr)
    # uniform n is always feasible, so state 0 is reached
    out, s = [], 0
    for i in range(L - 1, -1, -1):
        s, N = back[i][s]
        out.append(N)
    return out[::-1]


def round_nm(x: Sequence[float], params_per_layer: Sequence[int], n: int, m: int) -> list[int]:
    """Integers N_l ∈ [1, m − 1], near the continuous ``x`` (kept per M), with Σ p_l N_l = n Σ p_l.

    The parameter-weighted mean of N_l is exactly ``n``, so the model keeps exactly n/m of its
    prunable weights while every group of ``m`` in layer l keeps exactly N_l. With equal layer
    sizes this is largest-remainder rounding (each layer gets floor or ceil of x_l). With
    unequal sizes an exact solution may need a step further; the DP finds the closest one. If
    the sizes make the DP too big, layers are rounded within groups of equal size, each group
    keeping mean ``n`` (still exact; a layer whose size no other layer shares stays at ``n``).
    """
    if len(x) != len(params_per_layer):
        raise ValueError(f"{len(x)} values for {len(params_per_layer)} layer sizes")
    if not x:
        return []
    sizes = [int(p) for p in params_per_layer]
    out = _round_dp(x, sizes, n, m, MAX_DP_STATES)
    if out is not None:
        return out
    out = [n] * len(x)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(sizes):
        groups.setdefault(p, []).append(i)
    for idx in groups.values():
        xs = [x[i] for i in idx]
        shift = n - sum(xs) / len(xs)  # the group's continuous mean becomes n
        sub = _round_dp([v + shift for v in xs], [1] * len(idx), n, m)
        for i, N in zip(idx, sub, strict=True):  # unit weights: at most L·m states, no limit needed
            out[i] = N
    return out


def owl_nm(outlier_ratios: Sequence[float], params_per_layer: Sequence[int], n: int, m: int,
           lam: float) -> list[int]:
    """Mixed N:M for OWL: the continuous OWL allocation around sparsity 1 − n/m, rounded to N_l.

    λ is in sparsity units as for unstructured OWL: λ = 1/m lets layers move one N either way
    (e.g. 4:8..6:8 around 5:8). Each N_l is the floor or ceil of the layer's continuous value
    (which lies in [S − λ, S + λ]), except where unequal layer sizes force more for exactness.
    """
    ratios = owl_ratios(outlier_ratios, params_per_layer, 1 - n / m, lam)
    return round_nm([m * (1 - r) for r in ratios], params_per_layer, n, m)


@dataclass(frozen=True)
class OWLAllocator:
    """OWL in the engine's allocation slot: dense ``col_sq`` pass → LODs → per-layer targets."""

    target: Target
    m: float = 7.0
    lam: float = 0.12
    needs: ClassVar[frozenset[str]] = frozenset({"col_sq"})
    measure_name: ClassVar[str] = "outlier_ratio"

    def __post_init__(self) -> None:
        if not self.m > 0:
            raise LLMPruneError(f"owl_m must be > 0, got {self.m}")
        check_owl_bounds(self.target.sparsity, self.lam)

    def measure(self, weights: dict[str, torch.Tensor], stats: dict[str, Stats]) -> float:
        return layer_outlier_ratio(weights, stats, self.m)

    def allocate(self, measures: Sequence[float], params: Sequence[int]) -> list[Target]:
        if self.target.is_nm:
            ns = owl_nm(measures, params, self.target.n, self.target.m, self.lam)
            return [Target.nm(k, self.target.m) for k in ns]
        return [Target.unstructured(r) for r in owl_ratios(measures, params, self.target.sparsity, self.lam)]


# --- explicit ---------------------------------------------------------------------------------
def check_layer_ratios(ratios, n_layers: int | None = None, m: int | None = None) -> None:
    """Validate an explicit list (one per layer) or map {layer index: sparsity}.

    Values must be numbers in [0, 1); with ``n_layers`` a list must have exactly that many
    entries and map keys must be layer indices; with an N:M ``m`` every value must be a
    multiple of 1/m strictly between 0 and 1 (it becomes N_l = m·(1 − value) kept of m).
    """
    if isinstance(ratios, Mapping):
        items = list(ratios.items())
        for k, _ in items:
            if isinstance(k, bool) or not isinstance(k, int):
                raise LLMPruneError(f"layer_ratios keys must be layer indices (integers), got {k!r}")
            if k < 0 or (n_layers is not None and k >= n_layers):
                where = f"0..{n_layers - 1}" if n_layers is not None else "≥ 0"
                raise LLMPruneError(f"layer_ratios has layer {k}; layer indices are {where}")
    elif isinstance(ratios, Sequence) and not isinstance(ratios, str):
        items = list(enumerate(ratios))
        if not items:
            raise LLMPruneError("layer_ratios is empty; give one sparsity per decoder layer")
        if n_layers is not None and len(items) != n_layers:
            raise LLMPruneError(f"layer_ratios has {len(items)} values but the model has {n_layers} "
                                "decoder layers; give exactly one per layer (or a map {index: ratio})")
    else:
        raise LLMPruneError(f"layer_ratios must be a list or a map {{layer: ratio}}, got {ratios!r}")
    for k, v in items:
        if isinstance(v, bool) or not isinstance(v, int | float) or not (0 <= v < 1):
            raise LLMPruneError(f"layer_ratios[{k}] = {v!r}; every sparsity must be a number in [0, 1)")
        if m is not None:
            keep = m * (1 - v)
            if abs(keep - round(keep)) > 1e-9 or not (1 <= round(keep) <= m - 1):
                raise LLMPruneError(f"layer_ratios[{k}] = {v} is not an N:{m} sparsity "
                                    f"(1 − N/{m} with 0 < N < {m}), e.g. {1 - (m // 2) / m:g}")


def explicit_targets(ratios, n_layers: int, default: Target | None) -> list[Target]:
    """One target per layer from an explicit list or map; a map's missing layers get ``default``.

    With an N:M ``default`` the ratios are read as N:M sparsities of the same M.
    """
    m = default.m if default is not None and default.is_nm else None
    check_layer_ratios(ratios, n_layers, m)
    if isinstance(ratios, Mapping):
        missing = [i for i in range(n_layers) if i not in ratios]
        if missing and default is None:
            raise LLMPruneError(f"layer_ratios has no entry for layers {missing}; give --sparsity "
                                "for them or list every layer")
        values = {i: ratios.get(i) for i in range(n_layers)}
    else:
        values = dict(enumerate(ratios))

    def to_target(v: float | None) -> Target:
        if v is None:
            return default
        return Target.nm(round(m * (1 - v)), m) if m is not None else Target.unstructured(v)

    return [to_target(values[i]) for i in range(n_layers)]
