"""The method and solver registries: which weights stay, and how the kept ones compensate.

A *method* picks the keep-mask of a weight matrix from its score and the target pattern. A
*solver* then updates the kept weights to reconstruct the dense layer's output. SparseGPT is
both: its OBS pass chooses the mask block by block *while* updating, so ``solver="none"`` with
it gives SparseGPT's mask on the original weights (the mask-only prior MaskLLM starts from).

Each entry says which calibration statistics it needs (``col_sq``: Σx² per input channel,
``xtx``: XᵀX); the engine accumulates each once per layer input and hands them over.

Matrices that read the same input (q/k/v, gate/up) come in together as one *group*, so
solvers can factor XᵀX once for all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmprune.sparsity.patterns import Target, apply_target
from llmprune.sparsity.scores import magnitude_score, wanda_score
from llmprune.sparsity.sparsegpt import sparsegpt

Stats = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Method:
    name: str
    needs: frozenset[str]
    score: Callable[[torch.Tensor, Stats], torch.Tensor] | None
    per: str = "row"  # where an unstructured ratio is enforced: each output row, or the matrix
    default_solver: str = "none"


@dataclass(frozen=True)
class Solver:
    name: str
    needs: frozenset[str]


METHODS: dict[str, Method] = {
    # Magnitude ranks all weights of the matrix together, as in the Wanda paper's baseline.
    "magnitude": Method("magnitude", frozenset(), lambda W, s: magnitude_score(W), per="matrix"),
    # Wanda compares weights within each output row (its "per-output" comparison group).
    "wanda": Method("wanda", frozenset({"col_sq"}), lambda W, s: wanda_score(W, s["col_sq"])),
    "sparsegpt": Method("sparsegpt", frozenset({"xtx"}), None, default_solver="sparsegpt"),
}

SOLVERS: dict[str, Solver] = {
    "none": Solver("none", frozenset()),
    "sparsegpt": Solver("sparsegpt", frozenset({"xtx"})),
}


def required_stats(method: str, solver: str | None) -> frozenset[str]:
    """Statistics the engine must collect for this method/solver pair."""
    m = METHODS[method]
    return m.needs | SOLVERS[solver or m.default_solver].needs


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

    if m.score is None:  # SparseGPT: mask selection and update are one pass
        W_new, keep = sparsegpt(W, stats["xtx"], target=target, blocksize=blocksize,
                                percdamp=percdamp, row_groups=slices)
        if solver == "none":
            W_new = W * keep
        elif solver != "sparsegpt":
            W_new = solve(solver, W, keep, stats, blocksize=blocksize, percdamp=percdamp, **options)
    else:
        keep = torch.cat([apply_target(m.score(W[s], stats), target, per=m.per) for s in slices])
        W_new = solve(solver, W, keep, stats, blocksize=blocksize, percdamp=percdamp, **options)
    return [(W_new[s], keep[s]) for s in slices]


def solve(solver: str, W: torch.Tensor, keep: torch.Tensor, stats: Stats, **opts) -> torch.Tensor:
    """Weights for a fixed keep-mask: unchanged (``none``) or reconstructed by a solver."""
    if solver == "none":
        return W * keep
    if solver == "sparsegpt":
        return sparsegpt(W, stats["xtx"], mask=keep, blocksize=opts.get("blocksize", 128),
                         percdamp=opts.get("percdamp", 0.01))[0]
    raise ValueError(f"unknown solver {solver!r}; choose from {', '.join(SOLVERS)}")
