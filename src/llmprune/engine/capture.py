"""Capture what the first decoder layer receives, so each layer can be run on its own."""

from __future__ import annotations

import torch
from torch import nn


class _Captured(Exception):
    pass


def move(obj, device):
    """Move tensors inside nested tuples / lists / dicts to ``device``; leave the rest alone."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(move(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, first_layer: nn.Module, ids: torch.Tensor,
                         device: str | torch.device) -> tuple[torch.Tensor, dict]:
    """Hidden states entering ``first_layer`` for every row of ``ids``, stacked on ``device``,
    plus the keyword arguments (rotary embeddings, masks) the model passes to its layers.

    Every row has the same length, so the keyword arguments of the first row serve them all.
    """
    hidden: list[torch.Tensor] = []
    kwargs: dict = {}

    def grab(_module, args, kw):
        h = args[0] if args else kw["hidden_states"]
        hidden.append(h.to(device))
        if not kwargs:
            kwargs.update({k: move(v, device) for k, v in kw.items() if k != "hidden_states"})
        raise _Captured

    handle = first_layer.register_forward_pre_hook(grab, with_kwargs=True)
    emb_device = model.get_input_embeddings().weight.device
    try:
        for i in range(ids.shape[0]):
            try:
                model(ids[i : i + 1].to(emb_device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    for k in ("past_key_values", "past_key_value", "use_cache"):
        kwargs.pop(k, None)
    return torch.cat(hidden), kwargs


def layer_output(out) -> torch.Tensor:
    """Decoder layers return a tensor or a tuple whose first item is the hidden state."""
    return out[0] if isinstance(out, tuple | list) else out
