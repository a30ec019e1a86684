"""The C(M, N) candidate masks of one N:M group, in a fixed order.

Candidates are the combinations of kept positions in lexicographic order
(``itertools.combinations(range(M), N)``). For 2:4 that is
``1100, 1010, 1001, 0110, 0101, 0011`` — the reference's order, so logits transfer.
"""

from __future__ import annotations

import math
import re
from itertools import combinations

import torch

from llmprune.errors import LLMPruneError
from llmprune.sparsity.patterns import Target


def parse_nm(pattern: str) -> tuple[int, int]:
    """``"2:4"`` → ``(2, 4)``; anything that is not N:M with 0 < N < M is an error."""
    found = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not found:
        raise LLMPruneError(f"MaskLLM learns N:M masks; pattern {pattern!r} is not N:M such as 2:4")
    target = Target.nm(int(found.group(1)), int(found.group(2)))  # refuses N ≥ M and N = 0
    return target.n, target.m


def candidates(n: int, m: int, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> torch.Tensor:
    """``(C(M, N), M)``: row k keeps the positions of the k-th combination, lexicographically."""
    if not 0 < n < m:
        raise LLMPruneError(f"N:M pattern {n}:{m} needs 0 < N < M")
    rows = torch.zeros(math.comb(m, n), m, dtype=dtype, device=device)
    for k, kept in enumerate(combinations(range(m), n)):
        rows[k, list(kept)] = 1
    return rows


def overlap(groups: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
    """``(G, C)``: how many kept positions of each ``(G, M)`` group mask each candidate shares."""
    return groups.to(cands.dtype) @ cands.T


def group_view(x: torch.Tensor, m: int) -> torch.Tensor:
    """A ``(out, in)`` matrix as ``(out·in/M, M)`` groups along the input dimension."""
    return x.reshape(-1, m)
