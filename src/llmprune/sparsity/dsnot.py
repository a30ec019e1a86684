"""DSnoT: Dynamic Sparse No Training (Zhang et al., ICLR 2024), a training-free mask refinement.

After any method has chosen a mask, each output row ``r`` swaps pruned and kept weights to shrink
the *expected* reconstruction error of its output over the calibration inputs,

    ε_r = E[W_r·x − (M_r ⊙ W_r)·x] = Σ_{j pruned} W_rj · E[x_j],

one pair per cycle, all rows at once (reference code: github.com/zyxxmu/DSnoT, ``prune_DSnoT``):

* **grow** the pruned weight whose contribution W_rj·E[x_j] has the sign of ε_r and is largest
  relative to the input's variance, |W_rj·E[x_j]| / Var(x_j)^p (p = 1): it removes the most
  error, and reliably so;
* **prune** — unstructured: of the kept weights whose contribution has the opposite sign (so
  that removing them also moves ε_r towards 0), the one with the lowest Wanda score
  |W_rj|·‖X_j‖₂; N:M: the kept weight with the lowest Wanda score in the grown weight's group of
  M, so every group still keeps exactly N;
* a row stops for good when |ε_r| is within the threshold, when the swap would flip the sign of
  ε_r (so |ε_r| only decreases), or after ``dsnot_cycles`` cycles.

Both candidate lists are ranked once, before the first cycle, as in the reference: a weight
grown back is never pruned again, and one pruned by a swap is never grown back. A swap keeps
every row's count (and every N:M group's), so the target pattern holds exactly — per row,
per matrix, or N:M. The weights themselves are not changed; a solver may run afterwards.

Units of the threshold: the reference sums the inputs over each 2048-token calibration window
(its ``sum_metric_row``), so its ε is 2048 × the per-token expectation; the threshold here is
compared with 2048·|ε_r| to keep the reference's default (0.1) meaning the same at any
``--seqlen``. See docs/ria_dsnot.md for the other departures.
"""

from __future__ import annotations

import torch
from pydantic import Field

from llmprune.options import NonNegativeFloat, Options, PositiveInt
from llmprune.sparsity.patterns import Target
from llmprune.sparsity.slots import Refiner, Stats

# The reference's calibration window: its expected error is a sum over this many tokens.
REFERENCE_WINDOW = 2048


class DSnoTOptions(Options):
    """DSnoT's settings (``--refine dsnot``); defaults are the reference code's."""

    dsnot_cycles: PositiveInt = Field(50, description="DSnoT: at most this many grow/prune swaps per row")
    dsnot_threshold: NonNegativeFloat = Field(
        0.1, description="DSnoT: a row stops once its expected output error |Σ ΔW·E[x]| (summed over a "
                         "2048-token window, as the reference) is at most this")
    dsnot_var_power: NonNegativeFloat = Field(1.0, description="DSnoT: growth ranks |W·E[x]| / Var(x)^p; this is p")
    dsnot_same_sign: bool = Field(True, strict=True, description="DSnoT: refuse a swap that flips the sign of "
                                                                  "the row's expected error (so it only shrinks)")


def expected_error(W: torch.Tensor, keep: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """ε_r = Σ_{j pruned} W_rj·E[x_j] per row: the mean of the dense minus the masked output."""
    return (W.float() * mean.float().unsqueeze(0) * ~keep).sum(1)


def input_variance(col_sq: torch.Tensor, mean: torch.Tensor, tokens: torch.Tensor | float) -> torch.Tensor:
    """Var(x_j) over the calibration tokens from Σx², E[x] and the token count (≥ 0)."""
    return (col_sq.double() / float(tokens) - mean.double() ** 2).clamp_min(0).float()


@torch.no_grad()
def dsnot(W: torch.Tensor, keep: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, col_sq: torch.Tensor,
          target: Target, cycles: int = 50, threshold: float = 0.1, var_power: float = 1.0,
          same_sign: bool = True) -> torch.Tensor:
    """The refined keep-mask of ``W (rows, cols)`` (``keep`` is not modified).

    ``mean``/``var``: E[x_j] and Var(x_j) per input column; ``col_sq``: Σx_j² (for the Wanda
    score that orders pruning). N:M targets swap only within a group of ``target.m`` inputs.
    """
    W = W.float()
    rows, cols = W.shape
    K0 = keep.bool()
    K = K0.clone()
    D = W * mean.float().unsqueeze(0)  # (rows, cols): each weight's share of the expected output
    eps = (D * ~K0).sum(1)  # (rows,) expected error, per token
    sign0 = torch.sign(eps)
    tiny = torch.finfo(torch.float32).tiny  # a constant input (Var 0) is the most reliable growth
    G = torch.where(K0, 0.0, D / var.float().pow(var_power).clamp_min(tiny).unsqueeze(0))
    grow_order = torch.sort(G, dim=1, stable=True).indices  # ascending: most negative ... most positive
    lo = torch.zeros(rows, dtype=torch.long, device=W.device)
    hi = torch.full((rows,), cols - 1, dtype=torch.long, device=W.device)
    S = W.abs() * col_sq.float().sqrt().unsqueeze(0)  # Wanda score: pruning takes the lowest
    inf = torch.tensor(float("inf"), device=W.device)
    if not target.is_nm:  # kept weights by sign of contribution, lowest Wanda first
        neg_order = torch.sort(torch.where(K0 & (D < 0), S, inf), dim=1, stable=True).indices
        pos_order = torch.sort(torch.where(K0 & (D > 0), S, inf), dim=1, stable=True).indices
        pn = torch.zeros(rows, dtype=torch.long, device=W.device)
        pp = torch.zeros(rows, dtype=torch.long, device=W.device)
    r = torch.arange(rows, device=W.device)
    active = torch.ones(rows, dtype=torch.bool, device=W.device)
    for _ in range(cycles):
        if not active.any():
            break
        up = eps > 0  # too much output lost: grow a positive contribution back (prune a negative)
        gi = grow_order[r, torch.where(up, hi, lo).clamp(0, cols - 1)]
        g = G[r, gi]
        valid = torch.where(up, g > 0, g < 0) & ~K[r, gi]
        hi, lo = hi - up.long(), lo + (~up).long()
        if target.is_nm:
            start = gi - gi % target.m
            idx = start.unsqueeze(1) + torch.arange(target.m, device=W.device)
            cand = K.gather(1, idx) & K0.gather(1, idx)  # kept from the start, not swapped out yet
            key, arg = torch.where(cand, S.gather(1, idx), inf).min(1)
            pi = start + arg
            valid &= torch.isfinite(key)
        else:
            down = eps < 0
            pi = torch.where(down, pos_order[r, pp.clamp(max=cols - 1)], neg_order[r, pn.clamp(max=cols - 1)])
            valid &= K[r, pi] & K0[r, pi] & torch.where(down, D[r, pi] > 0, D[r, pi] < 0)
            pp, pn = pp + down.long(), pn + (~down).long()
        after = eps + D[r, pi] - D[r, gi]
        ok = active & valid & (eps.abs() * REFERENCE_WINDOW > threshold)
        if same_sign:
            ok &= torch.sign(after) == sign0
        active = ok
        K[r[ok], gi[ok]] = True
        K[r[ok], pi[ok]] = False
        eps = torch.where(ok, after, eps)
    return K


def _refine(W: torch.Tensor, keep: torch.Tensor, stats: Stats, target: Target, o: DSnoTOptions) -> torch.Tensor:
    var = input_variance(stats["col_sq"], stats["col_mean"], stats["tokens"])
    return dsnot(W, keep, stats["col_mean"], var, stats["col_sq"], target, cycles=o.dsnot_cycles,
                 threshold=o.dsnot_threshold, var_power=o.dsnot_var_power, same_sign=o.dsnot_same_sign)


DSNOT = Refiner("dsnot", frozenset({"col_mean", "col_sq", "tokens"}), _refine, DSnoTOptions)
