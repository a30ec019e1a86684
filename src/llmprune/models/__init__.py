"""Loading models (hub id, local directory, GGUF, bundled default) and finding their layers."""

from llmprune.models.layers import context_length, decoder_layers, linear_layers
from llmprune.models.loading import BUNDLED, load_model, resolve_bundled

__all__ = ["BUNDLED", "context_length", "decoder_layers", "linear_layers", "load_model", "resolve_bundled"]
