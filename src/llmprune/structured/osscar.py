"""OSSCAR (Meng, Behdin, Wang, Mazumder, ICML 2024) for one gated MLP: which intermediate
channels of ``down_proj`` to keep, and the re-fitted ``down_proj`` on them.

Symbols: ``X (N, I)`` the inputs of down_proj (the intermediate activations), ``H = XᵀX
(I, I)``, ``W = W_downᵀ (I, d)`` so that row ``i`` of ``W`` is channel ``i``. Damping adds
``λ = percdamp · mean diag H`` to H: ``H' = H + λI``. For a removed set ``R`` (kept set ``S``)
the objective is

    E(R) = min_{Ŵ, Ŵ_R = 0} tr((W − Ŵ)ᵀ H' (W − Ŵ)) = tr(W_Rᵀ (P_RR)⁻¹ W_R),   P = H'⁻¹,

the output error ‖X W − X_S Ŵ_S‖² plus λ‖W − Ŵ‖² (a ridge towards the dense weights, so that
nothing pruned is exactly the dense layer). The minimiser is the least-squares re-fit
``Ŵ_S = (H'_SS)⁻¹ (H' W)_S``. All three steps work on this one objective:

- **greedy**: remove channels one ``block`` at a time by the OBS cost ``‖Ŵ_i‖² / [H'_SS⁻¹]_ii``,
  with low-rank updates of ``Ŵ`` and of the tracked inverse (OSSCAR's fast prune);
- **local search**: swap a kept ``i`` and a removed ``j`` while E drops; every pair's exact
  change is ``cost_i − gain'_j`` with ``gain'_j = ‖V'_j‖² / N'_jj`` (``N' = (P_R'R')⁻¹``,
  ``V' = N' W_R'``, ``R' = R ∪ {i}``), from a rank-one border update of N;
- **re-fit**: solve for ``Ŵ_S`` once more from H' directly (no accumulated rounding).

Before all three, H is shrunk toward its diagonal (:func:`shrunk`, option ``shrink``): the
correlations between channels that every step relies on are over-estimated on a few
calibration documents. Without re-fit the kept columns keep their dense values (what the
bench compares against).
Everything runs in float64: the tracked inverses are updated hundreds of times.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from llmprune.errors import LLMPruneError
from llmprune.sparsity.numerics import NumericalWarning

DTYPE = torch.float64


@dataclass
class OSSCARResult:
    """The kept channels (sorted) and down_proj on them, with the objective at each step."""

    keep: torch.Tensor  # (width,) long, ascending channel indices
    down: torch.Tensor  # (d, width) the new down_proj weight, float32
    damping: float  # λ / mean diag H actually used
    errors: dict[str, float] = field(default_factory=dict)  # E(R) after each step, damped objective
    recon_error: float = 0.0  # ‖X W − X_S Ŵ_Sᵀ‖² / ‖X W‖² with the undamped H
    swaps: int = 0  # accepted local-search swaps


def mlp_width(intermediate: int, ratio: float, round_to: int) -> int:
    """Channels kept when removing ``ratio`` of ``intermediate``, rounded to a multiple of
    ``round_to`` (nearest); raises if that keeps no channel or removes none."""
    if not 0 < ratio < 1:
        raise LLMPruneError(f"ratio must be in (0, 1) (the share of MLP channels removed), got {ratio!r}")
    width = round(intermediate * (1 - ratio) / round_to) * round_to
    if width <= 0:
        raise LLMPruneError(f"ratio {ratio:g} leaves no MLP channel: {intermediate} x (1 − {ratio:g}) "
                            f"rounds to 0 in multiples of {round_to}; lower --ratio or --round-to")
    if width >= intermediate:
        raise LLMPruneError(f"ratio {ratio:g} removes no MLP channel: {intermediate} x (1 − {ratio:g}) "
                            f"rounds to {width} in multiples of {round_to}; raise --ratio or lower --round-to")
    return width


def damped(H: torch.Tensor, percdamp: float, max_tries: int = 8) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(H', P = H'⁻¹, damping)`` in float64; a singular H is retried with 10× more damping."""
    H = H.to(DTYPE)
    mean_diag = torch.diagonal(H).mean().clamp_min(torch.finfo(DTYPE).tiny)
    eye = torch.eye(H.shape[0], dtype=DTYPE, device=H.device)
    damp = percdamp
    for _ in range(max_tries):
        Hd = H + damp * mean_diag * eye
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            P = torch.cholesky_inverse(L)
            if torch.isfinite(P).all():
                if damp != percdamp:
                    warnings.warn(NumericalWarning(
                        f"XᵀX of down_proj is singular with damping {percdamp:g}; used {damp:g} x mean diag",
                        damping=damp), stacklevel=2)
                return Hd, P, damp
        damp = damp * 10 if damp > 0 else 1e-6
    raise FloatingPointError(f"XᵀX is not positive definite even with damping {damp / 10:g} x mean diag")


def shrunk(H: torch.Tensor, shrink: float) -> torch.Tensor:
    """``(1 − shrink) H + shrink diag(H)``: XᵀX with its off-diagonal part (the channel
    correlations) scaled down, each channel's own energy kept.

    Why: greedy, local search and re-fit all lean on the correlations between channels (a
    removed channel is "explained" by the kept ones). Estimated on a few calibration documents
    those correlations are too strong, so the selection and the re-fit chase the sample: at
    32 x 1024 C4 tokens on SmolLM2-135M, greedy + re-fit had a lower calibration error than
    the channel score + re-fit in every layer but a higher error on held-out text in some.
    Shrinking toward the diagonal (not toward λI, which would pull every channel to the same
    scale and the selection toward plain weight magnitude) keeps the per-channel scales and
    discounts only the correlations; shrink = 1 makes the greedy cost ‖W_i‖²·H_ii, the
    channel score's.
    """
    if shrink == 0:
        return H
    return (1 - shrink) * H + shrink * torch.diag(torch.diagonal(H))


def _spd_inverse(M: torch.Tensor) -> torch.Tensor:
    """Inverse of a small symmetric positive definite block (Cholesky; LU if rounding broke it)."""
    L, info = torch.linalg.cholesky_ex(M)
    return torch.cholesky_inverse(L) if info == 0 else torch.linalg.inv(M)


def objective(W: torch.Tensor, P: torch.Tensor, removed: torch.Tensor) -> float:
    """E(R) = tr(W_Rᵀ (P_RR)⁻¹ W_R): the damped error of the best re-fit without ``removed``."""
    R = removed.nonzero().squeeze(1)
    if R.numel() == 0:
        return 0.0
    return float((W[R] * torch.linalg.solve(P[R][:, R], W[R])).sum())


def greedy_remove(W: torch.Tensor, P: torch.Tensor, n_remove: int, block: int = 1,
                  trace: list[float] | None = None) -> torch.Tensor:
    """Boolean mask of ``n_remove`` channels removed greedily by the OBS cost (OSSCAR's fast
    prune): after each block, ``Ŵ`` and ``Q = H'_SS⁻¹`` get the block's low-rank update.

    ``trace``: if given, E(R) as the updates track it is appended after each block (the sum of
    the blocks' exact costs ``tr(Ŵ_Bᵀ (Q_BB)⁻¹ Ŵ_B)``), for checking against a fresh re-fit.
    """
    removed = torch.zeros(W.shape[0], dtype=torch.bool, device=W.device)
    Q, Wc = P.clone(), W.clone()  # nothing removed yet: the re-fit is W itself
    done, E = 0, 0.0
    while done < n_remove:
        m = min(block, n_remove - done)
        d = torch.diagonal(Q)
        cost = torch.where(removed, torch.inf, (Wc * Wc).sum(1) / torch.where(removed, 1, d))
        idx = torch.topk(cost, m, largest=False).indices
        B = _spd_inverse(Q[idx][:, idx])  # (m, m)
        if trace is not None:  # the block's joint cost (≥ the sum of its single costs)
            E += float((Wc[idx] * (B @ Wc[idx])).sum())
            trace.append(E)
        Qc = Q[:, idx]  # a copy (advanced indexing), so the in-place updates below may overwrite Q
        Wc.addmm_(Qc, B @ Wc[idx], alpha=-1)
        Q.addmm_(Qc, B @ Qc.T, alpha=-1)  # Q is symmetric: Q[idx] = Qcᵀ
        Wc[idx] = 0
        Q[idx] = 0
        Q[:, idx] = 0
        removed[idx] = True
        done += m
    return removed


def local_search(W: torch.Tensor, P: torch.Tensor, removed: torch.Tensor, max_swaps: int = 100,
                 candidates: int = 64, rtol: float = 1e-10) -> tuple[torch.Tensor, int]:
    """Swap kept ↔ removed channels while E(R) strictly drops; returns ``(removed, swaps)``.

    Each round takes the ``candidates`` kept channels cheapest to remove and, for each, the
    removed channel best to bring back given that removal, both exact; the best pair is
    applied when it lowers E by more than ``rtol`` relative, and E is recomputed from scratch
    so that rounding can never make a swap look better than it is.
    """
    removed = removed.clone()
    if not removed.any() or removed.all():
        return removed, 0
    E = objective(W, P, removed)
    swaps = 0
    for _ in range(max_swaps):
        R = removed.nonzero().squeeze(1)
        S = (~removed).nonzero().squeeze(1)
        N = _spd_inverse(P[R][:, R])  # (r, r)
        V = N @ W[R]  # (r, d)
        A = P[S][:, R]  # (s, r)
        AN = A @ N
        W_hat = W[S] - A @ V  # the current re-fit on S
        s = torch.diagonal(P)[S] - (AN * A).sum(1)  # Schur complements = [H'_SS⁻¹]_ii
        cost = (W_hat * W_hat).sum(1) / s  # E(R ∪ i) − E(R)
        c = torch.topk(cost, min(candidates, S.numel()), largest=False).indices
        u = AN[c].T  # (r, c): N p_i for each candidate
        r, sc = W_hat[c], s[c]  # (c, d), (c,)
        Vr = V @ r.T  # (r, c)
        v2 = (V * V).sum(1, keepdim=True)  # (r, 1)
        # after adding candidate i to R: V'_j = V_j − u_j r_i / s_i, N'_jj = N_jj + u_j² / s_i
        num = v2 - 2 * u * Vr / sc + u * u * (r * r).sum(1) / sc**2
        den = torch.diagonal(N)[:, None] + u * u / sc
        gain = num / den  # (r, c): E(R ∪ i) − E(R ∪ i \ j)
        best_gain, best_j = gain.max(0)
        delta = cost[c] - best_gain
        k = int(torch.argmin(delta))
        if not delta[k] < -rtol * max(E, 1e-300):
            break
        trial = removed.clone()
        trial[S[c[k]]] = True
        trial[R[best_j[k]]] = False
        E_new = objective(W, P, trial)
        if not E_new < E:
            break
        removed, E, swaps = trial, E_new, swaps + 1
    return removed, swaps


def channel_scores(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """The baseline's channel score ‖W_i‖ · ‖X_i‖ (Wanda's |W|·‖x‖ over a whole channel)."""
    return W.norm(dim=1) * torch.diagonal(H).clamp_min(0).sqrt()


def refit(W: torch.Tensor, Hd: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``Ŵ_S = (H'_SS)⁻¹ (H' W)_S``: the least-squares down_proj rows on the kept channels."""
    G = (Hd @ W)[keep]
    Hs = Hd[keep][:, keep]
    L, info = torch.linalg.cholesky_ex(Hs)
    return torch.cholesky_solve(G, L) if info == 0 else torch.linalg.solve(Hs, G)


def osscar_prune(W_down: torch.Tensor, H: torch.Tensor, width: int, *, greedy: bool = True,
                 local_search_swaps: int = 100, refit_down: bool = True, block: int = 1,
                 candidates: int = 64, percdamp: float = 0.01, shrink: float = 0.4,
                 XtY: torch.Tensor | None = None, YtY: float | None = None) -> OSSCARResult:
    """Keep ``width`` of the ``I`` input channels of ``W_down (d, I)`` given ``H = XᵀX (I, I)``.

    ``greedy=False`` selects by :func:`channel_scores` instead (the baseline);
    ``local_search_swaps=0`` skips the swaps; ``refit_down=False`` keeps the dense columns.
    ``shrink``: every step works on :func:`shrunk` ``(H, shrink)`` (the reported ``recon_error``
    uses the plain H).

    ``XtY (I, d)`` and ``YtY = ‖Y‖²`` fit another target ``Y`` than ``X W`` (the dense model's
    output of this down_proj, as the reference's ``fullseq``): every step then works on
    ``W* = H'⁻¹(XᵀY + λW)``, since ``‖Y − XŴ‖² + λ‖W − Ŵ‖² = (Ŵ − W*)ᵀH'(Ŵ − W*) + const``.
    With ``shrink`` XᵀY is shrunk alike, to ``(1 − shrink) XᵀY + shrink diag(H) W``, so that
    inputs equal to the dense ones still give ``W* = W``.
    """
    d, inter = W_down.shape
    if H.shape != (inter, inter):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected ({inter}, {inter})")
    if not 0 < width <= inter:
        raise ValueError(f"width must be in [1, {inter}], got {width}")
    if (XtY is None) != (YtY is None):
        raise ValueError("give XtY and YtY together")
    if not 0 <= shrink < 1:
        raise ValueError(f"shrink must be in [0, 1), got {shrink}")
    W = W_down.detach().to(DTYPE).T.contiguous()  # (I, d)
    H64 = H.to(DTYPE)
    Hd, P, damp = damped(shrunk(H64, shrink), percdamp)
    if XtY is None:
        Wt = W
    else:  # the least-squares target with every channel kept
        lam = damp * torch.diagonal(H64).mean()
        G = XtY.to(DTYPE)
        if shrink:
            G = (1 - shrink) * G + shrink * torch.diagonal(H64)[:, None] * W
        Wt = P @ (G + lam * W)
    errors = {}
    if greedy:
        removed = greedy_remove(Wt, P, inter - width, block)
        errors["greedy"] = objective(Wt, P, removed)
    else:
        removed = torch.ones(inter, dtype=torch.bool, device=W.device)
        removed[torch.topk(channel_scores(W, H64), width).indices] = False
        errors["channel_score"] = objective(Wt, P, removed)
    swaps = 0
    if local_search_swaps > 0 and width < inter:
        removed, swaps = local_search(Wt, P, removed, local_search_swaps, candidates)
        errors["local_search"] = objective(Wt, P, removed)
    keep = (~removed).nonzero().squeeze(1)
    fit = refit_down and (width < inter or XtY is not None)
    W_new = refit(Wt, Hd, keep) if fit else W[keep]
    if XtY is None:  # ‖X(W − Ŵ)‖² from the difference: exactly 0 when nothing changed
        diff = W.clone()
        diff[keep] -= W_new
        dense = float((W * (H64 @ W)).sum())
        err = float((diff * (H64 @ diff)).sum())
    else:  # ‖Y − X_S Ŵ_S‖² = ‖Y‖² − 2 tr(Ŵ_Sᵀ (XᵀY)_S) + tr(Ŵ_Sᵀ H_SS Ŵ_S)
        dense = float(YtY)
        G = XtY.to(DTYPE)[keep]
        err = max(0.0, dense - 2 * float((W_new * G).sum()) + float((W_new * (H64[keep][:, keep] @ W_new)).sum()))
    return OSSCARResult(keep=keep, down=W_new.T.float().contiguous(), damping=damp, errors=errors,
                        recon_error=err / dense if dense > 0 else (0.0 if err == 0 else math.inf),
                        swaps=swaps)
