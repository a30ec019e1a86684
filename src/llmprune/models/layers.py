"""Find decoder layers and their linear sublayers; the per-family answers live in
:mod:`llmprune.models.adapter`, these names stay for the code that already calls them."""

from __future__ import annotations

from torch import nn

from llmprune.models.adapter import decoder_layers, linear_layers, text_config

__all__ = ["config_context_length", "context_length", "decoder_layers", "linear_layers"]


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model was configured for, if the config says."""
    return config_context_length(model.config)


def config_context_length(config) -> int | None:
    """:func:`context_length` from a ``PretrainedConfig`` alone (no weights needed)."""
    config = text_config(config)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None
