"""ADMM weight update and ADMM gradual pruning (Boža, "Fast and Effective Weight Update for
Pruned Large Language Models", TMLR 2024).

Symbols: ``W (rows, cols)`` the dense weights, ``H = XᵀX (cols, cols)`` from the calibration
inputs ``X (tokens, cols)``, ``M (rows, cols)`` the keep-mask. Given ``M``, the weights that
best reconstruct the layer's outputs solve

    min_Ŵ  tr((W − Ŵ)(H + λ·diag H)(W − Ŵ)ᵀ)   s.t.  Ŵ = 0 outside M,

(λ: dampening; it pulls the kept weights toward W where X says little). ADMM splits Ŵ into an
unconstrained copy ``W`` and a masked copy ``Z``; with the scaled dual ``U`` one iteration is

    Z ← (W + U) ⊙ M                               projection of W + U onto the mask
    U ← U + W − Z   (= (W + U) − Z)
    W ← (W₀(H + λ) + ρ(Z − U)) (H + λ + ρI)⁻¹       one factorisation serves every iteration

and the answer is ``Z``, which is exactly zero outside ``M``. The first iterate is the dense
W₀ (the unconstrained optimum), so the loop starts with the Z-update, as the reference does.

Preconditioning, as in the reference code: every input column j is scaled by
``d_j = ‖X_j‖ = sqrt(H_jj)``, so H becomes a correlation-like matrix with unit diagonal. That
makes ρ = 1 and λ = 0.1 mean the same thing in every layer, keeps (H + λ + ρI) well conditioned
(eigenvalues in [λ + ρ, cols + λ + ρ]), and turns the magnitude of a scaled weight into
Wanda's score |W_ij|·‖X_j‖ — which ADMM-Grad uses to choose the mask.

ADMM-Grad (gradual pruning): during the first ``ks`` iterations the Z-update projects onto a
sparsity set that grows along a cubic schedule, s_t = s·(1 − (1 − (t+1)/ks)³), choosing the
mask from |W + U| (the projection's own criterion, i.e. the Wanda score of the point being
projected); after step ``ks`` the mask is fixed and ADMM only refines the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from pydantic import Field

from llmprune.options import NonNegativeFloat, Options, PositiveFloat, PositiveInt
from llmprune.sparsity.patterns import Target, nm_mask, unstructured_mask

# The paper's defaults: k = 20 iterations, ks = 15 sparsification steps, ρ = 1, λ = 0.1.
ADMM_ITERS = 20
ADMM_KS = 15
ADMM_RHO = 1.0
ADMM_DAMP = 0.1


class ADMMOptions(Options):
    """Settings of the ADMM weight update (solver ``admm``) and of ADMM-Grad."""

    admm_iters: PositiveInt = Field(ADMM_ITERS, description="ADMM iterations k")
    admm_ks: PositiveInt = Field(ADMM_KS, description="ADMM-Grad sparsification steps (≤ --admm-iters)")
    admm_rho: PositiveFloat = Field(ADMM_RHO, description="ADMM penalty rho")
    admm_damp: NonNegativeFloat = Field(ADMM_DAMP, description="ADMM dampening, x mean diag(XᵀX)")

# Above this bound on cond(H + λ + ρI) the factorisation is done in fp64 (fp32 keeps ~7 digits).
FP32_MAX_COND = 1e4


@dataclass
class ScaledProblem:
    """One layer's least-squares problem in preconditioned coordinates (tilde = scaled)."""

    W0: torch.Tensor  # W̃₀ = W₀·diag(d)               (rows, cols)  dense weights, scaled
    d: torch.Tensor  # d_j = ‖X_j‖, 1 for dead inputs  (cols,)
    live: torch.Tensor  # H_jj > 0                      (cols,) bool
    B: torch.Tensor  # W̃₀(H̃ + λI)                      (rows, cols)  data term of the W-update
    Ainv: torch.Tensor  # (H̃ + λI + ρI)⁻¹               (cols, cols)


def check_admm_options(iters: int, rho: float, damp: float, ks: int | None = None) -> None:
    """Raise ValueError for settings under which ADMM is undefined."""
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"ADMM needs iters ≥ 1, got {iters!r}")
    if not rho > 0:
        raise ValueError(f"ADMM penalty rho must be > 0, got {rho!r}")
    if not damp >= 0:
        raise ValueError(f"ADMM dampening must be ≥ 0, got {damp!r}")
    if ks is not None and not (isinstance(ks, int) and 1 <= ks <= iters):
        raise ValueError(f"ADMM-Grad needs 1 ≤ ks ≤ iters (the mask must be final before the "
                         f"last iteration), got ks={ks!r}, iters={iters}")


def _inverse_spd(A: torch.Tensor, cond_bound: float) -> torch.Tensor:
    """A⁻¹ for a symmetric positive definite A, via one Cholesky factorisation.

    fp32 unless the caller works in fp64 or ``cond_bound`` says fp32 would lose the answer;
    a failed fp32 factorisation (rounding made A look indefinite) is retried in fp64.
    """
    use64 = A.dtype == torch.float64 or cond_bound > FP32_MAX_COND
    for dtype in ((torch.float64,) if use64 else (torch.float32, torch.float64)):
        L, info = torch.linalg.cholesky_ex(A.to(dtype))
        if info == 0:
            Ainv = torch.cholesky_inverse(L)
            if torch.isfinite(Ainv).all():
                return Ainv.to(A.dtype)
    raise FloatingPointError("H + (λ + ρ)I is not positive definite; is H finite?")


def scaled_problem(W: torch.Tensor, XtX: torch.Tensor, rho: float, damp: float) -> ScaledProblem:
    """Precondition ``W (rows, cols)`` and ``XtX (cols, cols)`` and factor the W-update once.

    Works in fp32 (fp64 if ``W`` is fp64) on the tensors' device. Peak extra memory: two
    (cols, cols) matrices.
    """
    dtype = torch.promote_types(W.dtype, torch.float32)
    W0 = W.detach().to(dtype)
    H = XtX.detach().to(device=W.device, dtype=dtype)
    diag = torch.diagonal(H)
    live = diag > 0
    # Dead inputs (never nonzero in calibration) get d = 1: their row/column of H is zero, so
    # the damping alone keeps their weights at W₀ unless the mask removes them.
    d = torch.where(live, diag.clamp_min(0).sqrt(), torch.ones_like(diag))
    A = H / d.unsqueeze(0) / d.unsqueeze(1)  # H̃ = D⁻¹HD⁻¹, diag 1 (0 for dead inputs)
    del H
    lam = damp * torch.diagonal(A).mean()
    A.diagonal().add_(lam)
    W0 = W0 * d.unsqueeze(0)
    B = W0 @ A  # W̃₀(H̃ + λI); A is symmetric
    A.diagonal().add_(rho)
    cond_bound = float((int(live.sum()) + lam + rho) / (lam + rho))
    Ainv = _inverse_spd(A, cond_bound)
    del A
    return ScaledProblem(W0, d, live, B, Ainv)


Select = Callable[[int, torch.Tensor], torch.Tensor | None]


def admm_iterate(P: ScaledProblem, mask: torch.Tensor | None, iters: int, rho: float,
                 select: Select | None = None,
                 trace: Callable[[int, torch.Tensor], None] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``iters`` ADMM iterations in scaled coordinates; returns ``(Z̃, mask)``.

    ``select(t, W + U)`` may return a new keep-mask before the Z-update of iteration ``t``
    (ADMM-Grad) or None to keep the current one. ``trace(t, Z̃)`` sees the masked iterate after
    each iteration (for convergence plots; it costs nothing when None).
    """
    # Five (rows, cols) buffers written in place: fresh tensors every iteration were 60 % slower
    # where the engine has glibc map blocks of ≥ 1 MiB (each faulted in anew, page by page). The
    # arithmetic is the same expressions in the same order, so the results are bit for bit equal.
    Wt = P.W0.clone()  # the W-update's optimum without the mask: the dense weights themselves
    U = torch.zeros_like(Wt)
    V, Z, R = (torch.empty_like(Wt) for _ in range(3))  # each written before it is read
    for t in range(iters):
        torch.add(Wt, U, out=V)
        if select is not None:
            new = select(t, V)
            mask = new if new is not None else mask
        torch.mul(V, mask, out=Z)
        torch.sub(V, Z, out=U)  # U + W − Z
        torch.sub(Z, U, out=R)
        R.mul_(rho).add_(P.B)  # B + ρ(Z − U)
        torch.mm(R, P.Ainv, out=Wt)  # Ainv is symmetric: right-multiplying solves per row
        if trace is not None:
            trace(t, (Wt + U) * mask)
    torch.add(Wt, U, out=V)
    return V.mul_(mask), mask


def admm_update(W: torch.Tensor, XtX: torch.Tensor, mask: torch.Tensor, iters: int = ADMM_ITERS,
                rho: float = ADMM_RHO, damp: float = ADMM_DAMP) -> torch.Tensor:
    """ADMM1: the best-reconstructing weights for a fixed keep-``mask (rows, cols)``.

    Returns ``W_new (rows, cols)`` (fp32, or fp64 for fp64 input), exactly zero outside the mask.
    Rows are independent, so matrices sharing an input can be stacked into one call.
    """
    check_admm_options(iters, rho, damp)
    P = scaled_problem(W, XtX, rho, damp)
    keep = mask.to(device=P.W0.device, dtype=torch.bool)
    Z, _ = admm_iterate(P, keep, iters, rho)
    return Z / P.d.unsqueeze(0)


def cubic_sparsity(sparsity: float, t: int, ks: int) -> float:
    """ADMM-Grad's schedule: sparsity after step ``t`` (0-based) of ``ks``; reaches ``sparsity``
    exactly at t = ks − 1 and prunes most in the first steps, while the weights still move most."""
    return sparsity * (1 - (1 - (t + 1) / ks) ** 3)


def kth_smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th smallest entry (1-based) of a 1-D tensor, exactly as ``kthvalue``.

    For non-negative float32 (scores: |W|·‖x‖, +inf allowed) the bit patterns, read as int32,
    sort like the values: one histogram of the top 16 bits finds the bucket holding the k-th
    entry, and ``kthvalue`` runs on that bucket alone — 4–8x faster than ``kthvalue`` on the
    whole matrix on a CPU (ADMM-Grad selects 15 times per matrix). Anything else (negative
    entries, other dtypes) takes ``kthvalue`` directly.
    """
    if flat.dtype != torch.float32:
        return flat.kthvalue(k).values
    hi = flat.view(torch.int32) >> 16  # sign bit set (negative) -> a negative bucket
    if int(hi.min()) < 0:
        return flat.kthvalue(k).values
    cum = torch.bincount(hi, minlength=1 << 15).cumsum(0)
    bucket = int(torch.searchsorted(cum, k))  # first bucket whose running count reaches k
    below = int(cum[bucket - 1]) if bucket else 0
    return flat[hi == bucket].kthvalue(k - below).values


def drop_lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask without exactly the ``k`` lowest entries of the whole matrix (ties: first by
    position). Same mask as ``unstructured_mask(per="matrix")`` up to ties, but via a k-th value
    (:func:`kth_smallest`) instead of topk, which is several times slower with k ≈ size/2."""
    flat = score.flatten()
    if k <= 0:
        return torch.ones_like(score, dtype=torch.bool)
    if k >= flat.numel():
        return torch.zeros_like(score, dtype=torch.bool)
    thr = kth_smallest(flat, k)
    keep = flat > thr
    tied = (flat == thr).nonzero().flatten()
    n_below = int((flat < thr).sum())
    keep[tied[k - n_below :]] = True  # drop only as many tied entries as k still needs
    return keep.view_as(score)


def gradual_mask(score: torch.Tensor, target: Target, s_t: float, per: str = "matrix") -> torch.Tensor:
    """Keep-mask at intermediate sparsity ``s_t`` on the way to ``target``.

    Unstructured: drop the int(size·s_t) lowest scores (per matrix or per row). N:M: the final
    N:M choice is made from the current scores and only weights outside it are dropped, lowest
    first, so at s_t = target.sparsity exactly the N:M mask remains.
    """
    if target.is_nm:
        keep_nm = nm_mask(score, target.n, target.m)
        if s_t >= target.sparsity:
            return keep_nm
        # +inf never ranks among the lowest: N:M survivors are kept at every intermediate step.
        score = score.masked_fill(keep_nm, float("inf"))
    if per == "matrix":
        return drop_lowest(score, int(score.numel() * s_t))
    return unstructured_mask(score, s_t, per=per)


def admm_gradual(W: torch.Tensor, XtX: torch.Tensor, target: Target, iters: int = ADMM_ITERS,
                 ks: int = ADMM_KS, rho: float = ADMM_RHO, damp: float = ADMM_DAMP,
                 per: str = "matrix", row_groups: list[slice] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """ADMM-Grad: choose the mask gradually inside the ADMM iterations and update the weights.

    Returns ``(W_new (rows, cols), keep (rows, cols) bool)``; ``keep`` meets ``target`` exactly
    (int(size·s) pruned per matrix — or per row with ``per="row"`` — or N kept of every M).
    ``row_groups`` keeps the unstructured selection of stacked matrices (q/k/v) separate, so a
    stacked call equals separate calls.
    """
    check_admm_options(iters, rho, damp, ks)
    P = scaled_problem(W, XtX, rho, damp)
    groups = row_groups or [slice(0, W.shape[0])]
    live = P.live.unsqueeze(0)
    score = torch.empty_like(P.W0)  # reused by every selection (see admm_iterate)

    def select(t: int, V: torch.Tensor) -> torch.Tensor | None:
        if t >= ks:
            return None
        s_t = target.sparsity if t == ks - 1 else cubic_sparsity(target.sparsity, t, ks)
        torch.abs(V, out=score).mul_(live)  # Wanda-style |V_ij|·‖X_j‖ (V is scaled); dead inputs score 0
        masks = [gradual_mask(score[g], target, s_t, per) for g in groups]
        return masks[0] if len(masks) == 1 else torch.cat(masks)

    Z, keep = admm_iterate(P, None, iters, rho, select=select)
    return Z / P.d.unsqueeze(0), keep
