"""The method slot: what a pruning method, a mask refiner and a solver each provide.

For one group of weight matrices that read the same input, the engine calls, in order:

1. a **method** — ``score(W, stats, options)`` turned into a keep-mask by the target pattern,
   or ``select(W, stats, target, row_groups, options)`` that chooses the mask while it updates
   the weights (SparseGPT, ADMM-Grad);
2. an optional **refiner** — ``refine(W, keep, stats, target, options)``: a better mask of the
   same pattern for the *original* weights (DSnoT);
3. a **solver** — ``update(W, keep, stats, options)``: the weights for that mask.

Each declares by name the calibration statistics it reads (``needs``: ``col_sq`` Σx² per input
column, ``col_mean`` E[x] per input column, ``xtx`` XᵀX, ``tokens`` the count behind them; see
:mod:`llmprune.engine.stats`) and the :class:`~llmprune.options.Options` type of its settings.
None of them sees the model. A new method is its own module defining one of these entries,
plus one line in the registry (:mod:`llmprune.sparsity.methods`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmprune.options import Options
from llmprune.sparsity.patterns import Target

Stats = dict[str, torch.Tensor]
# (W, stats, options) -> score (higher = keep)
ScoreFn = Callable[[torch.Tensor, Stats, Options | None], torch.Tensor]
# (W, stats, target, row_groups, options) -> (W_new, keep)
SelectFn = Callable[[torch.Tensor, Stats, Target, list[slice], Options | None], tuple[torch.Tensor, torch.Tensor]]
# (W, keep, stats, target, options) -> keep, same pattern
RefineFn = Callable[[torch.Tensor, torch.Tensor, Stats, Target, Options | None], torch.Tensor]
# (W, keep, stats, options) -> W_new
UpdateFn = Callable[[torch.Tensor, torch.Tensor, Stats, Options | None], torch.Tensor]


@dataclass(frozen=True)
class Method:
    """Which weights stay: a score and the pattern, or a select pass (exclusive)."""

    name: str
    needs: frozenset[str]
    score: ScoreFn | None = None
    select: SelectFn | None = None  # chooses the mask while updating (exclusive with score)
    per: str = "row"  # where an unstructured ratio is enforced: each output row, or the matrix
    default_solver: str = "none"
    options: type[Options] | None = None  # the settings ``select`` / ``score`` read
    check: Callable[[Options], None] | None = None  # cross-option rules, run on the recipe


@dataclass(frozen=True)
class Refiner:
    """A better keep-mask of the same pattern (same count per row, or per N:M group)."""

    name: str
    needs: frozenset[str]
    refine: RefineFn
    options: type[Options] | None = None


@dataclass(frozen=True)
class Solver:
    """How the kept weights compensate for the pruned ones."""

    name: str
    needs: frozenset[str]
    update: UpdateFn
    options: type[Options] | None = None
