"""The method and solver registries: which weights stay, and how the kept ones compensate.

A *method* picks the keep-mask of a weight matrix, either from a *score* and the target pattern
(magnitude, Wanda) or by a *select* pass that chooses the mask while it updates the weights
(SparseGPT's OBS sweep, ADMM-Grad's gradual ADMM). A *solver* then sets the kept weights to
reconstruct the dense layer's output. A select method's own update is its default solver;
naming another solver re-solves its mask (``solver="none"`` gives SparseGPT's mask on the
original weights, the mask-only prior MaskLLM starts from).

Each entry says which calibration statistics it needs (``col_sq``: Σx² per input channel,
``xtx``: XᵀX); the engine accumulates each once per layer input and hands them over.

Matrices that read the same input (q/k/v, gate/up) come in together as one *group*, so
solvers can factor XᵀX once for all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmprune.sparsity.admm import (
    ADMM_DAMP,
    ADMM_ITERS,
    ADMM_KS,
    ADMM_RHO,
    admm_gradual,
    admm_update,
)
from llmprune.sparsity.patterns import Target, apply_target
from llmprune.sparsity.scores import magnitude_score, wanda_score
from llmprune.sparsity.sparsegpt import sparsegpt

Stats = dict[str, torch.Tensor]
# (W, stats, target, row_groups, **options) -> (W_new, keep)
SelectFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
# (W, keep, stats, **options) -> W_new
UpdateFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Method:
    name: str
    needs: frozenset[str]
    score: Callable[[torch.Tensor, Stats], torch.Tensor] | None = None
    select: SelectFn | None = None  # chooses the mask while updating (exclusive with score)
    per: str = "row"  # where an unstructured ratio is enforced: each output row, or the matrix
    default_solver: str = "none"


@dataclass(frozen=True)
class Solver:
    name: str
    needs: frozenset[str]
    update: UpdateFn


def _sparsegpt_select(W, stats, target, row_groups, blocksize=128, percdamp=0.01, **_):
    return sparsegpt(W, stats["xtx"], target=target, blocksize=blocksize, percdamp=percdamp,
                     row_groups=row_groups)


def _admm_select(W, stats, target, row_groups, admm_iters=ADMM_ITERS, admm_ks=ADMM_KS,
                 admm_rho=ADMM_RHO, admm_damp=ADMM_DAMP, **_):
    # Per matrix, as the reference code ranks the Wanda scores of the whole matrix.
    return admm_gradual(W, stats["xtx"], target, iters=admm_iters, ks=admm_ks, rho=admm_rho,
                        damp=admm_damp, per="matrix", row_groups=row_groups)


def _sparsegpt_update(W, keep, stats, blocksize=128, percdamp=0.01, **_):
    return sparsegpt(W, stats["xtx"], mask=keep, blocksize=blocksize, percdamp=percdamp)[0]


def _admm_update(W, keep, stats, admm_iters=ADMM_ITERS, admm_rho=ADMM_RHO, admm_damp=ADMM_DAMP, **_):
    return admm_update(W, stats["xtx"], keep, iters=admm_iters, rho=admm_rho, damp=admm_damp)


METHODS: dict[str, Method] = {
    # Magnitude ranks all weights of the matrix together, as in the Wanda paper's baseline.
    "magnitude": Method("magnitude", frozenset(), lambda W, s: magnitude_score(W), per="matrix"),
    # Wanda compares weights within each output row (its "per-output" comparison group).
    "wanda": Method("wanda", frozenset({"col_sq"}), lambda W, s: wanda_score(W, s["col_sq"])),
    "sparsegpt": Method("sparsegpt", frozenset({"xtx"}), select=_sparsegpt_select,
                        default_solver="sparsegpt"),
    "admm-grad": Method("admm-grad", frozenset({"xtx"}), select=_admm_select, per="matrix",
                        default_solver="admm"),
}

SOLVERS: dict[str, Solver] = {
    "none": Solver("none", frozenset(), lambda W, keep, stats, **_: W * keep),
    "sparsegpt": Solver("sparsegpt", frozenset({"xtx"}), _sparsegpt_update),
    "admm": Solver("admm", frozenset({"xtx"}), _admm_update),
}


def required_stats(method: str, solver: str | None, recon_error: bool = False) -> frozenset[str]:
    """Statistics the engine must collect for this method/solver pair (plus XᵀX to measure the
    reconstruction error when ``recon_error``)."""
    m = METHODS[method]
    needs = m.needs | SOLVERS[solver or m.default_solver].needs
    return needs | {"xtx"} if recon_error else needs


def prune_weight(
    method: str,
    Ws: list[torch.Tensor],
    stats: Stats,
    target: Target,
    solver: str | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    **options,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Prune a group of weight matrices that share one input; returns ``[(W_new, keep), ...]``.

    ``W_new`` is fp32 and exactly zero where ``keep`` is False. ``options`` carry
    method/solver-specific settings (e.g. ``admm_iters``) through to the solver.
    """
    m = METHODS[method]
    solver = solver or m.default_solver
    rows = [W.shape[0] for W in Ws]
    slices, start = [], 0
    for r in rows:
        slices.append(slice(start, start + r))
        start += r
    W = torch.cat([w.detach().float() for w in Ws]) if len(Ws) > 1 else Ws[0].detach().float()
    opts = dict(blocksize=blocksize, percdamp=percdamp, **options)

    if m.select is not None:  # mask and update in one pass; its update is the default solver
        W_new, keep = m.select(W, stats, target, slices, **opts)
        if solver != m.default_solver:
            W_new = solve(solver, W, keep, stats, **opts)
    else:
        keep = torch.cat([apply_target(m.score(W[s], stats), target, per=m.per) for s in slices])
        W_new = solve(solver, W, keep, stats, **opts)
    return [(W_new[s], keep[s]) for s in slices]


def solve(solver: str, W: torch.Tensor, keep: torch.Tensor, stats: Stats, **opts) -> torch.Tensor:
    """Weights for a fixed keep-mask: unchanged (``none``) or reconstructed by a solver."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose from {', '.join(SOLVERS)}")
    return SOLVERS[solver].update(W, keep, stats, **opts)
