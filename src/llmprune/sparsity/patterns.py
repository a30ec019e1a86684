"""Sparsity patterns: turn a score matrix into a keep-mask (True = weight stays).

Weights are ``(out_features, in_features)``; N:M groups run along the input dimension, as the
sparse tensor cores expect. ``N:M`` means N weights *kept* in every group of M.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from llmprune.errors import LLMPruneError


@dataclass(frozen=True)
class Target:
    """What one weight matrix must become: an unstructured ratio, or N kept of every M."""

    sparsity: float = 0.0
    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    @classmethod
    def nm(cls, n: int, m: int) -> Target:
        if not (0 < n < m):
            raise LLMPruneError(f"N:M pattern {n}:{m} needs 0 < N < M (N weights kept of every M)")
        return cls(sparsity=1 - n / m, n=n, m=m)

    @classmethod
    def unstructured(cls, sparsity: float) -> Target:
        if not (0 <= sparsity < 1):
            raise LLMPruneError(f"sparsity {sparsity} must be in [0, 1)")
        return cls(sparsity=float(sparsity))

    @classmethod
    def parse(cls, pattern: str | None, sparsity: float | None) -> Target:
        """``pattern`` is ``None``/``"unstructured"`` (then ``sparsity`` is used) or ``"N:M"``."""
        if pattern in (None, "", "unstructured"):
            if sparsity is None:
                raise LLMPruneError("give --sparsity (e.g. 0.5) or --pattern N:M (e.g. 2:4)")
            return cls.unstructured(sparsity)
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
        if not m:
            raise LLMPruneError(f"pattern {pattern!r} is not 'unstructured' or N:M such as 2:4")
        return cls.nm(int(m.group(1)), int(m.group(2)))

    def check_shape(self, in_features: int, name: str = "layer") -> None:
        if self.is_nm and in_features % self.m:
            raise LLMPruneError(
                f"{name} has {in_features} input features, not divisible by M={self.m} of the "
                f"{self.n}:{self.m} pattern; choose an M that divides it"
            )

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity:g}"


def unstructured_mask(scores: torch.Tensor, sparsity: float, per: str = "row") -> torch.Tensor:
    """Keep-mask dropping exactly ``int(sparsity * size)`` lowest scores per row or per matrix."""
    if per == "row":
        k = int(scores.shape[1] * sparsity)
        mask = torch.ones_like(scores, dtype=torch.bool)
        if k:
            idx = torch.topk(scores, k, dim=1, largest=False).indices
            mask.scatter_(1, idx, False)
        return mask
    if per == "matrix":
        k = int(scores.numel() * sparsity)
        mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
        if k:
            mask[torch.topk(scores.flatten(), k, largest=False).indices] = False
        return mask.view_as(scores)
    raise ValueError(f"per must be 'row' or 'matrix', not {per!r}")


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with the ``n`` highest scores of every ``m`` consecutive inputs in each row."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    idx = torch.topk(groups, n, dim=2).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return mask.reshape(rows, cols)


def apply_target(scores: torch.Tensor, target: Target, per: str = "row") -> torch.Tensor:
    """Keep-mask for ``target`` from ``scores`` (higher = more important)."""
    if target.is_nm:
        return nm_mask(scores, target.n, target.m)
    return unstructured_mask(scores, target.sparsity, per=per)
