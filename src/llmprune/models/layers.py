"""Find decoder layers and their linear sublayers without per-family code."""

from __future__ import annotations

from torch import nn

from llmprune.errors import LLMPruneError


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers: the ModuleList with ``num_hidden_layers`` entries.

    Works for Llama, Mistral, Qwen2 and other HF decoder-only families (``model.model.layers``,
    ``transformer.h``, ...) because it looks for the shape, not a name.
    """
    n = getattr(model.config, "num_hidden_layers", None)
    best = None
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            if any(isinstance(m, nn.Linear) for m in mod[0].modules()):
                if n is None or len(mod) == n:
                    if best is None or len(mod) > len(best):
                        best = mod
    if best is None:
        raise LLMPruneError(f"could not find the decoder layers of {type(model).__name__}")
    return best


def linear_layers(layer: nn.Module) -> dict[str, nn.Linear]:
    """All ``nn.Linear`` modules inside one decoder layer, by their name within it."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model was configured for, if the config says."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(model.config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None
