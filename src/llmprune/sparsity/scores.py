"""Importance scores for one weight matrix ``W (out, in)``; higher means keep."""

from __future__ import annotations

import torch


def magnitude_score(W: torch.Tensor) -> torch.Tensor:
    """|W| (the classic baseline)."""
    return W.abs().float()


def wanda_score(W: torch.Tensor, col_sq: torch.Tensor) -> torch.Tensor:
    """Wanda: |W_ij| · ‖X_j‖₂, where ``col_sq[j]`` is Σ x_j² over calibration tokens."""
    return W.abs().float() * col_sq.float().sqrt().unsqueeze(0)
