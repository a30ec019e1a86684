"""Capture what the decoder layers receive, so each layer can be run on its own.

The hidden states entering the first layer are captured for every calibration row. The other
arguments (attention mask, rotary embeddings, position ids) are captured *per layer*, because
models give layers of different kinds different ones: Gemma2/3 and sliding-window Qwen2 pass
each layer the mask of its ``layer_types`` entry, Gemma3 also local or global rotary
embeddings. They are recorded from one row by letting the model call every layer with the
layers swapped for pass-throughs, so no layer's real compute is paid (bar one row through
layer 0, to learn what a layer returns).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn

from llmprune.errors import LLMPruneError

# Dropped from the captured arguments: a cache is state of one forward, not an input.
CACHE_KWARGS = ("past_key_values", "past_key_value", "cache", "layer_past", "use_cache")


class _Captured(Exception):
    pass


def move(obj, device, memo: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None):
    """Move tensors inside nested tuples / lists / dicts to ``device``; leave the rest alone.

    With ``memo`` a tensor seen before (the same object) maps to the same moved copy, so the
    mask a model shares between its layers is stored once, not once per layer. The memo holds
    the original too: a freed temporary's id could otherwise be reused by another tensor.
    """
    if isinstance(obj, torch.Tensor):
        if memo is None:
            return obj.to(device)
        if id(obj) not in memo:
            memo[id(obj)] = (obj, obj.to(device))
        return memo[id(obj)][1]
    if isinstance(obj, tuple | list):
        return type(obj)(move(o, device, memo) for o in obj)
    if isinstance(obj, dict):
        return {k: move(v, device, memo) for k, v in obj.items()}
    return obj


def _by_keyword(layer: nn.Module, forward, args: tuple, kw: dict) -> tuple[torch.Tensor, dict]:
    """``(hidden_states, other arguments by keyword)`` of one call of ``layer``."""
    kw = dict(kw)
    if not args:
        return kw.pop("hidden_states"), kw
    if len(args) > 1:  # e.g. GPT-2 passes the cache and mask positionally: name them
        params = [p for p in inspect.signature(forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(params) < len(args) or any(p.kind is p.POSITIONAL_ONLY for p in params[1:len(args)]):
            raise LLMPruneError(f"{type(layer).__name__} is called with {len(args)} positional "
                                "arguments that cannot be passed by name")
        kw.update({p.name: a for p, a in zip(params[1:], args[1:], strict=False)})
    return args[0], kw


@torch.no_grad()
def capture_inputs(model: nn.Module, layers: Sequence[nn.Module], ids: torch.Tensor,
                   device: str | torch.device) -> tuple[torch.Tensor, list[dict]]:
    """Hidden states entering ``layers[0]`` for every row of ``ids``, stacked on ``device``,
    and for each layer the keyword arguments the model passes it, on ``device``.

    ``layers`` are in the order the model calls them (the model stops after the last one).
    Every row has the same length, so the arguments of the first row serve them all. Tensors
    the model shares between layers (one mask per attention kind) stay shared.
    """
    if ids.shape[0] == 0:
        raise ValueError("no calibration rows")
    hidden: list[torch.Tensor] = []  # row 0's; the rest go straight into the stacked buffer
    per_layer: list[dict | None] = [None] * len(layers)
    memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    wrap = None  # what a layer returns, as a function of the hidden state it passes on
    emb_device = model.get_input_embeddings().weight.device

    def catcher(i: int, layer: nn.Module, real):
        def forward(*args, **kw):
            nonlocal wrap
            h, named = _by_keyword(layer, real, args, kw)
            if i == 0:
                hidden.append(h.to(device))
            per_layer[i] = {k: move(v, device, memo) for k, v in named.items() if k not in CACHE_KWARGS}
            if i == len(layers) - 1:
                raise _Captured
            if wrap is None:  # one row through one real layer: does it return a tuple?
                out = real(*args, **kw)
                wrap = (lambda x, rest=tuple(out[1:]): (x, *rest)) if isinstance(out, tuple | list) else (lambda x: x)
            return wrap(h)  # pass-through: the next layer's arguments do not depend on it
        return forward

    # Row 0: every layer's forward is a catcher (an instance attribute shadows the class's).
    saved = [layer.__dict__.get("forward") for layer in layers]
    for i, layer in enumerate(layers):
        layer.forward = catcher(i, layer, layer.forward)
    try:
        model(ids[:1].to(emb_device), use_cache=False)
    except _Captured:
        pass
    finally:
        for layer, old in zip(layers, saved, strict=True):
            del layer.forward
            if old is not None:
                layer.forward = old
    missing = [i for i, kw in enumerate(per_layer) if kw is None]
    if missing or not hidden:
        raise LLMPruneError(f"{type(model).__name__} did not call decoder layers {missing} in its forward")

    # Other rows: only the first layer's input, stopping there, written into one buffer
    # (a list of rows and its concatenation would hold every row twice).
    first = hidden.pop()
    stacked = torch.empty((ids.shape[0] * first.shape[0], *first.shape[1:]), dtype=first.dtype, device=device)
    stacked[: first.shape[0]] = first
    del first
    row = 0

    def grab(_module, args, kw):
        h = args[0] if args else kw["hidden_states"]
        stacked[row * h.shape[0] : (row + 1) * h.shape[0]] = h
        raise _Captured

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for row in range(1, ids.shape[0]):
            try:
                model(ids[row : row + 1].to(emb_device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return stacked, per_layer


@torch.no_grad()
def layer_output(out) -> torch.Tensor:
    """Decoder layers return a tensor or a tuple whose first item is the hidden state."""
    return out[0] if isinstance(out, tuple | list) else out
