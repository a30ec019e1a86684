"""Count zeros in the prunable weights of a model."""

from __future__ import annotations

import torch
from torch import nn

from llmprune.models.layers import decoder_layers, linear_layers


@torch.no_grad()
def measure_sparsity(model: nn.Module) -> dict:
    """Fraction of exact zeros in every decoder-layer linear, per layer and overall."""
    per_layer, zeros, total = [], 0, 0
    for i, layer in enumerate(decoder_layers(model)):
        lz = lt = 0
        for lin in linear_layers(layer).values():
            lz += int((lin.weight == 0).sum())
            lt += lin.weight.numel()
        per_layer.append({"index": i, "sparsity": lz / lt, "params": lt})
        zeros, total = zeros + lz, total + lt
    return {"overall": zeros / total if total else 0.0, "params": total, "per_layer": per_layer}
