"""Pure tensor checks on one keep-mask: N:M groups, sparsity, agreement. No model knowledge.

Groups of M run along the last dimension (the input features of a linear, also of a fused
``(experts, out, in)`` expert weight), as the sparse tensor cores expect.
"""

from __future__ import annotations

import torch

from llmprune.sparsity.patterns import Target

NM_CANDIDATES = (2, 4, 8, 16, 32)


def sparsity(mask: torch.Tensor) -> float:
    """Share of pruned (False) entries."""
    return 1 - int(mask.sum()) / mask.numel() if mask.numel() else 0.0


def group_counts(mask: torch.Tensor, m: int) -> torch.Tensor | None:
    """Kept count of every group of ``m`` consecutive entries along the last dim (None if
    the last dim is not a multiple of ``m``)."""
    if mask.dim() == 0 or mask.shape[-1] % m:
        return None
    return mask.reshape(-1, m).sum(dim=1)


def complete_nm(nonzero: torch.Tensor, n: int, m: int, name: str = "mask") -> torch.Tensor:
    """The N:M keep-mask of weights whose nonzeros are known but whose kept zeros are not: each
    group of ``m`` with fewer than ``n`` nonzeros keeps its first zero positions too, so the
    result is exactly N:M (a weight that was kept but happens to be 0 stays a kept 0). A group
    with more than ``n`` nonzeros is not N:M: an error."""
    from llmprune.errors import LLMPruneError

    counts = group_counts(nonzero, m)
    if counts is None:
        raise LLMPruneError(f"{name}: last dimension {nonzero.shape[-1]} is not a multiple of M={m}")
    if bool((counts > n).any()):
        raise LLMPruneError(f"{name} has groups with more than {n} of {m} nonzero weights: it is not {n}:{m}")
    groups = nonzero.reshape(-1, m)
    short = (n - counts).unsqueeze(1)  # how many zeros each group must keep
    rank = (~groups).cumsum(dim=1)  # 1, 2, ... at each zero position, in order
    return (groups | (~groups & (rank <= short))).reshape(nonzero.shape)


def detect_nm(mask: torch.Tensor, candidates: tuple[int, ...] = NM_CANDIDATES) -> tuple[int, int] | None:
    """The finest ``(N, M)`` such that every group of M holds exactly N kept (0 < N < M), else None."""
    for m in candidates:
        counts = group_counts(mask, m)
        if counts is None or counts.numel() == 0:
            continue
        n = int(counts[0])
        if 0 < n < m and bool((counts == n).all()):
            return n, m
    return None


def violation(mask: torch.Tensor, target: Target, tol: float = 0.01) -> str | None:
    """Why ``mask`` breaks ``target`` (N kept of every M; or sparsity within ``tol``), else None."""
    if target.is_nm:
        counts = group_counts(mask, target.m)
        if counts is None:
            return f"last dimension {mask.shape[-1] if mask.dim() else 0} is not a multiple of M={target.m}"
        bad = (counts != target.n).nonzero()
        if bad.numel():
            g = int(bad[0])
            row, col = divmod(g * target.m, mask.shape[-1])
            return (f"group {g} (flattened row {row}, inputs {col}..{col + target.m - 1}) keeps "
                    f"{int(counts[g])} of {target.m}, not {target.n}; {bad.numel()} groups differ")
        return None
    s = sparsity(mask)
    if abs(s - target.sparsity) > tol:
        return f"sparsity {s:.4f} is not {target.sparsity:g} ± {tol:g}"
    return None


def hamming(a: torch.Tensor, b: torch.Tensor) -> int:
    """Number of entries where two masks of the same shape differ."""
    return int((a != b).sum())
