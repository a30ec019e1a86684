"""How well pruned weights reconstruct a layer's outputs on the calibration inputs."""

from __future__ import annotations

import torch


def relative_recon_error(W: torch.Tensor, W_new: torch.Tensor, XtX: torch.Tensor) -> float:
    """‖XWᵀ − XŴᵀ‖² / ‖XWᵀ‖² = tr(ΔHΔᵀ) / tr(WHWᵀ), with Δ = W − Ŵ and H = XᵀX (undamped).

    Computed from Δ directly (not as a difference of two large traces), so a small error is
    measured accurately in fp32.
    """
    H = XtX.float()
    W = W.detach().to(device=H.device, dtype=torch.float32)
    D = W - W_new.detach().to(device=H.device, dtype=torch.float32)
    num = float(((D @ H) * D).sum())
    den = float(((W @ H) * W).sum())
    if den > 0:
        return num / den
    return 0.0 if num == 0 else float("inf")
