"""RIA: Relative Importance and Activations (Zhang et al., "Plug-and-Play", ICLR 2024).

A weight matters relative to the other weights of its input channel *and* of its output
channel, times how strongly its input fires::

    RIA_ij = (|W_ij| / Σ_k |W_kj| + |W_ij| / Σ_k |W_ik|) · ‖X_j‖₂^a,   a = 0.5

(the first sum runs over the column — every output that reads input j —, the second over the
row — every input of output i —, as ``torch.sum(|W|, dim=0)`` / ``dim=1`` in the reference code,
github.com/biomedical-cybernetics/Relative-importance-and-activation-pruning).

Comparison group: unstructured targets are enforced over the whole matrix — the reference's
default (its ``--per_outneuron`` switch, Wanda's per-row comparison, is off), which the paper
gives as a point of RIA: the relative normalisation makes weights of different rows comparable.
N:M keeps the N highest scores of every M consecutive inputs of each row.

Departures: a column or row whose weights are all zero would divide 0 by 0 in the reference
(NaN scores); here its relative importance is 0. The reference's optional channel permutation
for N:M (heuristic channel reallocation + linear sum assignment) is not implemented.
"""

from __future__ import annotations

import torch
from pydantic import Field

from llmprune.options import NonNegativeFloat, Options
from llmprune.sparsity.slots import Method, Stats


class RIAOptions(Options):
    """RIA's setting: the exponent of the input-activation norm."""

    ria_exponent: NonNegativeFloat = Field(0.5, description="RIA activation exponent a: score = relative "
                                                            "importance · ‖X_j‖^a (paper: 0.5; 0 = RI alone)")


def relative_importance(W: torch.Tensor) -> torch.Tensor:
    """|W_ij|/Σ_k|W_kj| + |W_ij|/Σ_k|W_ik| (column sum, then row sum); an all-zero line gives 0."""
    A = W.abs().float()
    tiny = torch.finfo(A.dtype).tiny  # 0 / tiny = 0 where a whole column or row is zero
    return A / A.sum(0, keepdim=True).clamp_min(tiny) + A / A.sum(1, keepdim=True).clamp_min(tiny)


def ria_score(W: torch.Tensor, col_sq: torch.Tensor, a: float = 0.5) -> torch.Tensor:
    """RIA of every weight of ``W (out, in)``; ``col_sq[j]`` is Σ x_j² over calibration tokens,
    so ‖X_j‖₂^a = col_sq^(a/2)."""
    return relative_importance(W) * col_sq.float().pow(a / 2).unsqueeze(0)


def _score(W: torch.Tensor, stats: Stats, o: RIAOptions) -> torch.Tensor:
    return ria_score(W, stats["col_sq"], o.ria_exponent)


RIA = Method("ria", frozenset({"col_sq"}), score=_score, per="matrix", options=RIAOptions)
