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


def mlp_width(intermediate: int, ratio: float, round_to: int, what: str = "MLP channel") -> int:
    """Channels kept when removing ``ratio`` of ``intermediate``, rounded to a multiple of
    ``round_to`` (nearest); raises if that keeps no channel or removes none (``what``: the
    channels' name in the message)."""
    if not 0 < ratio < 1:
        raise LLMPruneError(f"ratio must be in (0, 1) (the share of {what}s removed), got {ratio!r}")
    width = round(intermediate * (1 - ratio) / round_to) * round_to
    if width <= 0:
        raise LLMPruneError(f"ratio {ratio:g} leaves no {what}: {intermediate} x (1 − {ratio:g}) "
                            f"rounds to 0 in multiples of {round_to}; lower --ratio or --round-to")
    if width >= intermediate:
        raise LLMPruneError(f"ratio {ratio:g} removes no {what}: {intermediate} x (1 − {ratio:g}) "
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


def _problems(W, P) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(W, P)`` pairs: one problem, or several sharing the same channels (lists)."""
    if isinstance(W, torch.Tensor):
        return [(W, P)]
    if len(W) != len(P) or not W:
        raise ValueError("give as many P as W, at least one")
    return list(zip(W, P, strict=True))


def objective(W, P, removed: torch.Tensor) -> float:
    """E(R) = tr(W_Rᵀ (P_RR)⁻¹ W_R): the damped error of the best re-fit without ``removed``.

    ``W`` and ``P`` may be lists of problems over the same channels: E is then their sum."""
    R = removed.nonzero().squeeze(1)
    if R.numel() == 0:
        return 0.0
    return sum(float((Wp[R] * torch.linalg.solve(Pp[R][:, R], Wp[R])).sum()) for Wp, Pp in _problems(W, P))


def rows_of(structures: torch.Tensor, group: int) -> torch.Tensor:
    """Row indices of ``W`` that make up the given structures (``group`` consecutive rows each)."""
    if group == 1:
        return structures
    return (structures[:, None] * group + torch.arange(group, device=structures.device)).reshape(-1)


def diagonal_blocks(M: torch.Tensor, group: int) -> torch.Tensor:
    """The ``(n, group, group)`` diagonal blocks of a square ``(n·group, n·group)`` matrix."""
    n = M.shape[0] // group
    return M.reshape(n, group, n, group).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def structure_costs(Wc: torch.Tensor, Q: torch.Tensor, group: int, removed: torch.Tensor) -> torch.Tensor:
    """OBS cost ``tr(Ŵ_sᵀ (Q_ss)⁻¹ Ŵ_s)`` of removing each structure ``s`` (``inf`` where removed).

    ``group == 1`` is the channel cost ``‖Ŵ_i‖² / Q_ii``."""
    if group == 1:
        d = torch.diagonal(Q)
        return torch.where(removed, torch.inf, (Wc * Wc).sum(1) / torch.where(removed, 1, d))
    eye = torch.eye(group, dtype=Q.dtype, device=Q.device)
    Qb = torch.where(removed[:, None, None], eye, diagonal_blocks(Q, group))  # removed blocks are 0
    Wb = Wc.reshape(removed.numel(), group, -1)
    cost = (Wb * torch.linalg.solve(Qb, Wb)).sum((1, 2))
    return torch.where(removed, torch.inf, cost)


def greedy_remove(W, P, n_remove: int, block: int = 1, trace: list[float] | None = None, group: int = 1,
                  buckets: torch.Tensor | None = None, order: list[int] | None = None) -> torch.Tensor:
    """Boolean mask (over the rows of ``W``) of ``n_remove`` structures removed greedily by
    the OBS cost (OSSCAR's fast prune): after each block, ``Ŵ`` and ``Q = H'_SS⁻¹`` get the
    block's low-rank update.

    A structure is ``group`` consecutive rows (1: an MLP channel; ``head_dim``: an attention
    head). ``buckets`` (one id per structure): remove the same number from every bucket
    (query heads evenly within their KV groups), one structure per step. ``W`` and ``P`` may
    be lists of problems sharing the rows (hidden channels read by many layers): the cost of
    a structure is then the sum of its costs in every problem, each problem re-fitted apart.

    ``trace``: if given, E(R) as the updates track it is appended after each block (the sum of
    the blocks' exact costs ``tr(Ŵ_Bᵀ (Q_BB)⁻¹ Ŵ_B)``), for checking against a fresh re-fit.
    ``order``: if given, the removed structures are appended in the order removed (without
    buckets every prefix is the greedy removal of that many: one call serves every width).
    """
    problems = _problems(W, P)
    W0 = problems[0][0]
    n = W0.shape[0] // group
    removed = torch.zeros(n, dtype=torch.bool, device=W0.device)  # by structure
    left = None
    if buckets is not None:
        counts = torch.bincount(buckets)
        if n_remove % counts.numel() or (counts < n_remove // counts.numel()).any():
            raise ValueError(f"cannot remove {n_remove} structures evenly from buckets of sizes {counts.tolist()}")
        left = torch.full_like(counts, n_remove // counts.numel())
        block = 1
    state = [(Pp.clone(), Wp.clone()) for Wp, Pp in problems]  # (Q, Ŵ): nothing removed, Ŵ = W
    done, E = 0, 0.0
    while done < n_remove:
        m = min(block, n_remove - done)
        cost = structure_costs(state[0][1], state[0][0], group, removed)
        for Q, Wc in state[1:]:
            cost = cost + structure_costs(Wc, Q, group, removed)
        if left is not None:
            cost = torch.where(left[buckets] > 0, cost, torch.inf)
        sel = torch.topk(cost, m, largest=False).indices
        idx = rows_of(sel, group)
        for Q, Wc in state:
            B = _spd_inverse(Q[idx][:, idx])  # (m·group, m·group)
            if trace is not None:  # the block's joint cost (≥ the sum of its single costs)
                E += float((Wc[idx] * (B @ Wc[idx])).sum())
            Qc = Q[:, idx]  # a copy (advanced indexing), so the in-place updates below may overwrite Q
            Wc.addmm_(Qc, B @ Wc[idx], alpha=-1)
            Q.addmm_(Qc, B @ Qc.T, alpha=-1)  # Q is symmetric: Q[idx] = Qcᵀ
            Wc[idx] = 0
            Q[idx] = 0
            Q[:, idx] = 0
        if trace is not None:
            trace.append(E)
        removed[sel] = True
        if order is not None:
            order.extend(sel.tolist())
        if left is not None:
            left[buckets[sel]] -= 1
        done += m
    return removed.repeat_interleave(group) if group > 1 else removed


def local_search(W, P, removed: torch.Tensor, max_swaps: int = 100, candidates: int = 64, rtol: float = 1e-10,
                 group: int = 1, buckets: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Swap kept ↔ removed structures while E(R) strictly drops; returns ``(removed, swaps)``.

    ``removed`` is a mask over the rows of ``W``; a structure is ``group`` consecutive rows.
    Each round takes the ``candidates`` kept structures cheapest to remove and, for each, the
    removed structure best to bring back given that removal, both exact; the best pair is
    applied when it lowers E by more than ``rtol`` relative, and E is recomputed from scratch
    so that rounding can never make a swap look better than it is. With ``buckets`` (one id
    per structure) only structures of the same bucket are swapped. ``W`` and ``P`` may be
    lists of problems over the same rows (E and every change are then sums).
    """
    problems = _problems(W, P)
    removed = removed.clone()
    if not removed.any() or removed.all():
        return removed, 0
    E = objective(W, P, removed)
    swaps = 0
    for _ in range(max_swaps):
        R = removed.nonzero().squeeze(1)
        S = (~removed).nonzero().squeeze(1)
        terms = [_SwapTerms(Wp, Pp, R, S, group) for Wp, Pp in problems]
        cost = sum(t.cost for t in terms[1:]) + terms[0].cost  # E(R ∪ i) − E(R), by kept structure
        if buckets is not None:  # a swap must stay within a bucket that has something removed
            bs, br = buckets[S[::group] // group], buckets[R[::group] // group]
            cost = torch.where(torch.isin(bs, br), cost, torch.inf)
        c = torch.topk(cost, min(candidates, cost.numel()), largest=False).indices
        gain = sum(t.gains(c) for t in terms[1:]) + terms[0].gains(c)  # (r, c): E(R ∪ i) − E((R ∪ i) − j)
        if buckets is not None:
            gain = torch.where(br[:, None] == bs[c][None, :], gain, -torch.inf)
        best_gain, best_j = gain.max(0)
        delta = cost[c] - best_gain
        k = int(torch.argmin(delta))
        if not delta[k] < -rtol * max(E, 1e-300):
            break
        i, j = int(c[k]), int(best_j[k])  # positions among the kept / removed structures
        trial = removed.clone()
        trial[S[i * group : (i + 1) * group]] = True
        trial[R[j * group : (j + 1) * group]] = False
        E_new = objective(W, P, trial)
        if not E_new < E:
            break
        removed, E, swaps = trial, E_new, swaps + 1
    return removed, swaps


class _SwapTerms:
    """One problem's part of a local-search round for removed rows ``R`` and kept rows ``S``:
    ``cost[i] = E(R ∪ i) − E(R)`` for every kept structure, and :meth:`gains` of bringing back
    each removed structure once a candidate is removed.

    With ``N = (P_RR)⁻¹``, ``V = N W_R``, ``A = P_SR``: the re-fit on S is ``Ŵ = W_S − A V``
    and the Schur complement ``s_i = P_ii − A_i N A_iᵀ``; after adding ``i`` to R,
    ``V'_J = V_J − u_J s_i⁻¹ Ŵ_i`` and ``N'_JJ = N_JJ + u_J s_i⁻¹ u_Jᵀ`` (``u = N P_Ri``), so
    ``gain_J = tr(V'_Jᵀ N'_JJ⁻¹ V'_J)``: one inverse of ``P_RR`` per round, not one per pair.
    For structures of one row (``group == 1``) every block is a scalar and all pairs are
    computed at once."""

    def __init__(self, W: torch.Tensor, P: torch.Tensor, R: torch.Tensor, S: torch.Tensor, group: int):
        self.g = group
        self.N = _spd_inverse(P[R][:, R])  # (r, r)
        self.V = self.N @ W[R]  # (r, d)
        A = P[S][:, R]  # (s, r)
        self.AN = A @ self.N
        self.W_hat = W[S] - A @ self.V  # the current re-fit on S
        if group == 1:
            self.s = torch.diagonal(P)[S] - (self.AN * A).sum(1)  # Schur complements = [H'_SS⁻¹]_ii
            self.cost = (self.W_hat * self.W_hat).sum(1) / self.s
        else:
            ns = S.numel() // group
            self.s = diagonal_blocks(P[S][:, S], group) - self.AN.reshape(ns, group, -1) @ A.reshape(
                ns, group, -1).transpose(1, 2)  # (ns, g, g) Schur blocks
            Wh = self.W_hat.reshape(ns, group, -1)
            self.cost = (Wh * torch.linalg.solve(self.s, Wh)).sum((1, 2))

    def gains(self, c: torch.Tensor) -> torch.Tensor:
        """``(removed structures, len(c))``: E(R ∪ i) − E((R ∪ i) − J) for each candidate i in ``c``."""
        V, N, g = self.V, self.N, self.g
        if g == 1:
            u = self.AN[c].T  # (r, c): N p_i for each candidate
            r, sc = self.W_hat[c], self.s[c]  # (c, d), (c,)
            Vr = V @ r.T  # (r, c)
            v2 = (V * V).sum(1, keepdim=True)  # (r, 1)
            # after adding candidate i to R: V'_j = V_j − u_j r_i / s_i, N'_jj = N_jj + u_j² / s_i
            num = v2 - 2 * u * Vr / sc + u * u * (r * r).sum(1) / sc**2
            den = torch.diagonal(N)[:, None] + u * u / sc
            return num / den
        nr, d = V.shape[0] // g, V.shape[1]
        Vb, Nb = V.reshape(nr, g, d), diagonal_blocks(N, g)
        Wh = self.W_hat.reshape(-1, g, d)
        out = torch.empty(nr, c.numel(), dtype=V.dtype, device=V.device)
        for t, i in enumerate(c.tolist()):
            u = self.AN[i * g : (i + 1) * g].T.reshape(nr, g, g)  # (N P_Ri)_J for every removed J
            s_r = torch.linalg.solve(self.s[i], Wh[i])  # (g, d)
            s_u = torch.linalg.solve(self.s[i], u.transpose(1, 2))  # (nr, g, g): s⁻¹ u_Jᵀ
            V2 = Vb - u @ s_r
            N2 = Nb + u @ s_u
            out[:, t] = (V2 * torch.linalg.solve(N2, V2)).sum((1, 2))
        return out


def channel_scores(W: torch.Tensor, H: torch.Tensor, group: int = 1) -> torch.Tensor:
    """The baseline's channel score ‖W_i‖ · ‖X_i‖ (Wanda's |W|·‖x‖ over a whole channel); for
    structures of ``group`` rows the root of the sum of their channels' squared scores."""
    score = W.norm(dim=1) * torch.diagonal(H).clamp_min(0).sqrt()
    return score if group == 1 else score.reshape(-1, group).square().sum(1).sqrt()


def score_removal(scores: torch.Tensor, n_remove: int, buckets: torch.Tensor | None = None) -> torch.Tensor:
    """Mask of all but the highest ``scores``, ``n_remove`` removed (with ``buckets``: the same
    number from each bucket)."""
    n = scores.numel()
    if buckets is None:
        removed = torch.ones(n, dtype=torch.bool, device=scores.device)
        removed[torch.topk(scores, n - n_remove).indices] = False
        return removed
    removed = torch.zeros(n, dtype=torch.bool, device=scores.device)
    n_buckets = int(buckets.max()) + 1
    for b in range(n_buckets):
        idx = (buckets == b).nonzero().squeeze(1)
        removed[idx[torch.topk(scores[idx], n_remove // n_buckets, largest=False).indices]] = True
    return removed


def refit(W: torch.Tensor, Hd: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``Ŵ_S = (H'_SS)⁻¹ (H' W)_S``: the least-squares down_proj rows on the kept channels."""
    G = (Hd @ W)[keep]
    Hs = Hd[keep][:, keep]
    L, info = torch.linalg.cholesky_ex(Hs)
    return torch.cholesky_solve(G, L) if info == 0 else torch.linalg.solve(Hs, G)


def osscar_prune(W_down: torch.Tensor, H: torch.Tensor, width: int, *, greedy: bool = True,
                 local_search_swaps: int = 100, refit_down: bool = True, block: int = 1,
                 candidates: int = 64, percdamp: float = 0.01, shrink: float = 0.4,
                 XtY: torch.Tensor | None = None, YtY: float | None = None, group: int = 1,
                 buckets: torch.Tensor | None = None) -> OSSCARResult:
    """Keep ``width`` of the ``I`` input channels of ``W_down (d, I)`` given ``H = XᵀX (I, I)``.

    ``group``: channels come and go in structures of ``group`` consecutive columns (an
    attention head of o_proj: ``head_dim``); ``width`` is then a multiple of it. ``buckets``
    (one id per structure): remove the same number of structures from each bucket (query
    heads evenly within their KV groups); greedy and local search keep to it.

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
    if inter % group or width % group:
        raise ValueError(f"width {width} and {inter} channels must be multiples of group {group}")
    if buckets is not None and buckets.numel() != inter // group:
        raise ValueError(f"buckets has {buckets.numel()} entries for {inter // group} structures")
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
        removed = greedy_remove(Wt, P, (inter - width) // group, block, group=group, buckets=buckets)
        errors["greedy"] = objective(Wt, P, removed)
    else:
        removed = score_removal(channel_scores(W, H64, group), (inter - width) // group, buckets)
        removed = removed.repeat_interleave(group) if group > 1 else removed
        errors["channel_score"] = objective(Wt, P, removed)
    swaps = 0
    if local_search_swaps > 0 and width < inter:
        removed, swaps = local_search(Wt, P, removed, local_search_swaps, candidates, group=group, buckets=buckets)
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
