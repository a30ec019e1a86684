"""SparseGPT (Frantar & Alistarh, 2023): OBS pruning with lazy batch updates.

Symbols follow the paper: ``W (rows, cols)``, ``H = XᵀX (cols, cols)``, ``Hinv`` the upper
Cholesky factor of H⁻¹. Columns are processed in blocks of ``blocksize``; inside a block the
mask is chosen from w²/[H⁻¹]²_cc, each pruned weight's error is spread over the later columns
of the block, and the whole block's error is pushed to the remaining columns at once.

Rows are independent given H, so matrices that share an input (q/k/v, gate/up) can be stacked
and solved in one call; ``row_groups`` keeps their unstructured mask selection separate, which
makes the stacked call exactly equal to separate calls.
"""

from __future__ import annotations

import warnings

import torch
from pydantic import Field

from llmprune.options import NonNegativeFloat, Options, PositiveInt
from llmprune.sparsity.numerics import NumericalWarning
from llmprune.sparsity.patterns import Target


class SparseGPTOptions(Options):
    """Settings of SparseGPT's OBS sweep (as a mask selector and as a weight-update solver)."""

    blocksize: PositiveInt = Field(128, description="SparseGPT block size: columns per lazy batch update")
    percdamp: NonNegativeFloat = Field(0.01, description="SparseGPT damping, a fraction of mean diag(XᵀX)")


def damped_cholesky_inverse(H: torch.Tensor, percdamp: float, max_tries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = percdamp·mean(diag H).

    A singular or indefinite H (e.g. too few calibration tokens) is retried with 10× more damping
    each time instead of producing NaNs.
    """
    mean_diag = torch.mean(torch.diag(H))
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    damp = percdamp
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0 and torch.isfinite(U).all():
                if damp != percdamp:
                    warnings.warn(NumericalWarning(
                        f"XᵀX is singular with damping {percdamp:g}; solved with {damp:g} x mean diag",
                        damping=damp), stacklevel=2)
                return U
        damp = damp * 10 if damp > 0 else 1e-4
    raise FloatingPointError(f"H is not positive definite even with damping {damp / 10:g} x mean diag")


def prepare_hessian(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy W, H to fp32; inputs that never fire (dead columns) get H_cc = 1 and W[:, c] = 0."""
    W = W.detach().clone().float()
    H = H.detach().clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H


def sparsegpt(
    W: torch.Tensor,
    H: torch.Tensor,
    target: Target | None = None,
    mask: torch.Tensor | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    row_groups: list[slice] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``W`` to ``target`` (or to the fixed keep-``mask``) and update the kept weights.

    Returns ``(W_new fp32, keep_mask)``; ``W_new`` is exactly zero where the mask is False.
    """
    if (target is None) == (mask is None):
        raise ValueError("give exactly one of target or mask")
    W, H = prepare_hessian(W, H)
    rows, cols = W.shape
    Hinv = damped_cholesky_inverse(H, percdamp)
    groups = row_groups or [slice(0, rows)]
    keep = torch.ones(rows, cols, dtype=torch.bool, device=W.device) if mask is None else mask.bool().clone()
    if target is not None and target.is_nm:
        blocksize = max(target.m, blocksize // target.m * target.m)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        keep1 = keep[:, i1:i2]  # a view: selection below writes into `keep`

        if target is not None and not target.is_nm and target.sparsity > 0:
            score = W1**2 / d.unsqueeze(0) ** 2
            for g in groups:
                s = score[g]
                k = int(s.numel() * target.sparsity)
                if k:
                    flat = torch.ones(s.numel(), dtype=torch.bool, device=W.device)
                    flat[torch.topk(s.flatten(), k, largest=False).indices] = False
                    keep1[g] = flat.view_as(s)

        for i in range(count):
            w = W1[:, i]
            if target is not None and target.is_nm and i % target.m == 0:
                score = W1[:, i : i + target.m] ** 2 / d[i : i + target.m].unsqueeze(0) ** 2
                idx = torch.topk(score, target.n, dim=1).indices
                keep1[:, i : i + target.m] = torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True)
            q = w * keep1[:, i]
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err

        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    W *= keep  # exact zeros even where rounding left -0.0 residue
    return W, keep
