"""The registries of the method slot: which weights stay, how the mask is refined, and how the
kept ones compensate (the slot itself is described in :mod:`llmprune.sparsity.slots`).

A *method* picks the keep-mask of a weight matrix, either from a *score* and the target pattern
(magnitude, Wanda, RIA) or by a *select* pass that chooses the mask while it updates the weights
(SparseGPT's OBS sweep, ADMM-Grad's gradual ADMM). An optional *refiner* (DSnoT) then swaps
pruned and kept weights within the same pattern. A *solver* finally sets the kept weights to
reconstruct the dense layer's output. A select method's own update is its default solver;
naming another solver re-solves its mask (``solver="none"`` gives SparseGPT's mask on the
original weights, the mask-only prior MaskLLM starts from); after a refiner the mask is new, so
the solver (the method's own by default) always runs on the refined mask.

Each entry says which calibration statistics it needs (``col_sq``: Σx² per input channel,
``col_mean``: E[x], ``xtx``: XᵀX, ``tokens``); the engine accumulates each once per layer input
and hands them over.

Matrices that read the same input (q/k/v, gate/up) come in together as one *group*, so
solvers can factor XᵀX once for all of them.

Adding a method: its own module defining a :class:`~llmprune.sparsity.slots.Method` (or a
``Refiner`` / ``Solver``) with its ``Options``, plus one line in the registry below.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from llmprune.options import Options
from llmprune.sparsity.admm import ADMMOptions, admm_gradual, admm_update
from llmprune.sparsity.dsnot import DSNOT
from llmprune.sparsity.patterns import Target, apply_target
from llmprune.sparsity.ria import RIA
from llmprune.sparsity.scores import magnitude_score, wanda_score
from llmprune.sparsity.slots import Method, Refiner, Solver, Stats
from llmprune.sparsity.sparsegpt import SparseGPTOptions, sparsegpt

# Options of each owner type, as a plan carries them; a missing owner gets its defaults.
OptionSet = Mapping[type[Options], Options]


def _sparsegpt_select(W, stats, target, row_groups, o: SparseGPTOptions):
    return sparsegpt(W, stats["xtx"], target=target, blocksize=o.blocksize, percdamp=o.percdamp,
                     row_groups=row_groups)


def _admm_select(W, stats, target, row_groups, o: ADMMOptions):
    # Per matrix, as the reference code ranks the Wanda scores of the whole matrix.
    return admm_gradual(W, stats["xtx"], target, iters=o.admm_iters, ks=o.admm_ks, rho=o.admm_rho,
                        damp=o.admm_damp, per="matrix", row_groups=row_groups)


def _admm_grad_check(o: ADMMOptions) -> None:
    if o.admm_ks > o.admm_iters:
        raise ValueError(f"admm_ks ({o.admm_ks}) must be ≤ admm_iters ({o.admm_iters}): "
                         "the mask has to be final before the last ADMM iteration")


def _sparsegpt_update(W, keep, stats, o: SparseGPTOptions):
    return sparsegpt(W, stats["xtx"], mask=keep, blocksize=o.blocksize, percdamp=o.percdamp)[0]


def _admm_update(W, keep, stats, o: ADMMOptions):
    return admm_update(W, stats["xtx"], keep, iters=o.admm_iters, rho=o.admm_rho, damp=o.admm_damp)


def _registry(*entries):
    return {e.name: e for e in entries}


METHODS: dict[str, Method] = _registry(
    # Magnitude ranks all weights of the matrix together, as in the Wanda paper's baseline.
    Method("magnitude", frozenset(), lambda W, s, o: magnitude_score(W), per="matrix"),
    # Wanda compares weights within each output row (its "per-output" comparison group).
    Method("wanda", frozenset({"col_sq"}), lambda W, s, o: wanda_score(W, s["col_sq"])),
    Method("sparsegpt", frozenset({"xtx"}), select=_sparsegpt_select, default_solver="sparsegpt",
           options=SparseGPTOptions),
    Method("admm-grad", frozenset({"xtx"}), select=_admm_select, per="matrix", default_solver="admm",
           options=ADMMOptions, check=_admm_grad_check),
    RIA,
)

REFINERS: dict[str, Refiner] = _registry(
    Refiner("none", frozenset(), lambda W, keep, stats, target, o: keep),
    DSNOT,
)

SOLVERS: dict[str, Solver] = _registry(
    Solver("none", frozenset(), lambda W, keep, stats, o: W * keep),
    Solver("sparsegpt", frozenset({"xtx"}), _sparsegpt_update, SparseGPTOptions),
    Solver("admm", frozenset({"xtx"}), _admm_update, ADMMOptions),
)


def option_classes() -> list[type[Options]]:
    """Every distinct options type a method, refiner or solver declares, in registry order."""
    seen: list[type[Options]] = []
    for entry in [*METHODS.values(), *REFINERS.values(), *SOLVERS.values()]:
        if entry.options is not None and entry.options not in seen:
            seen.append(entry.options)
    return seen


def _options(cls: type[Options] | None, options: OptionSet | None) -> Options | None:
    if cls is None:
        return None
    return (options or {}).get(cls) or cls()


def required_stats(method: str, solver: str | None, recon_error: bool = False,
                   refine: str = "none") -> frozenset[str]:
    """Statistics the engine must collect for this method, refiner and solver (plus XᵀX to
    measure the reconstruction error when ``recon_error``)."""
    m = METHODS[method]
    needs = m.needs | REFINERS[refine].needs | SOLVERS[solver or m.default_solver].needs
    return needs | {"xtx"} if recon_error else needs


def prune_weight(
    method: str,
    Ws: list[torch.Tensor],
    stats: Stats,
    target: Target,
    solver: str | None = None,
    options: OptionSet | None = None,
    refine: str = "none",
    record: dict | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Prune a group of weight matrices that share one input; returns ``[(W_new, keep), ...]``.

    ``W_new`` is fp32 and exactly zero where ``keep`` is False. ``options`` maps an options type
    (e.g. :class:`SparseGPTOptions`) to its values; owners not in it run with their defaults.
    ``refine`` names a refiner run on each matrix's mask before the solver; with one, ``record``
    (if given) receives ``refine_swaps``: per matrix, how many pruned/kept pairs it swapped.
    """
    m = METHODS[method]
    solver = solver or m.default_solver
    rows = [W.shape[0] for W in Ws]
    slices, start = [], 0
    for r in rows:
        slices.append(slice(start, start + r))
        start += r
    W = torch.cat([w.detach().float() for w in Ws]) if len(Ws) > 1 else Ws[0].detach().float()

    W_new = None
    if m.select is not None:  # mask and update in one pass; its update is the default solver
        W_new, keep = m.select(W, stats, target, slices, _options(m.options, options))
    else:
        o = _options(m.options, options)
        keep = torch.cat([apply_target(m.score(W[s], stats, o), target, per=m.per) for s in slices])
    if refine != "none":  # a new mask of the same pattern, for the original weights
        f = REFINERS[refine]
        o = _options(f.options, options)
        refined = torch.cat([f.refine(W[s], keep[s], stats, target, o) for s in slices])
        if record is not None:
            record["refine_swaps"] = [int((refined[s] & ~keep[s]).sum()) for s in slices]
        keep, W_new = refined, None
    if W_new is None or solver != m.default_solver:
        W_new = solve(solver, W, keep, stats, options)
    return [(W_new[s], keep[s]) for s in slices]


def solve(solver: str, W: torch.Tensor, keep: torch.Tensor, stats: Stats,
          options: OptionSet | None = None) -> torch.Tensor:
    """Weights for a fixed keep-mask: unchanged (``none``) or reconstructed by a solver."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose from {', '.join(SOLVERS)}")
    s = SOLVERS[solver]
    return s.update(W, keep, stats, _options(s.options, options))
