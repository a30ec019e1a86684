"""Make a model physically smaller, keeping its config a standard one of its family.

- **width**: keep some intermediate channels of a gated MLP — rows of gate/up (both halves of a
  fused ``gate_up_proj``) and the matching columns of down — and set ``intermediate_size``;
- **depth**: delete decoder layers, set ``num_hidden_layers``, slice the per-layer config
  lists (``layer_types``, ...), recount thresholds such as Qwen2's ``max_window_layers``, and
  renumber every module's ``layer_idx`` so the KV cache indexes the layers that remain.

Depth removal returns an *undo* so the window search can try a block and put it back.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from llmprune.errors import LLMPruneError
from llmprune.models.adapter import MLPTriplet, decoder_layers, text_config

# Config lists with one entry per decoder layer (sliced when layers go).
PER_LAYER_LISTS = ("layer_types", "mlp_layer_types", "no_rope_layers", "layers_block_type",
                   "sliding_window_layers", "swa_layers")
# Config lists of layer *indices* (renumbered when layers go).
LAYER_INDEX_LISTS = ("mlp_only_layers",)
# Config counts "the first n layers are special" (recounted over the kept layers).
LAYER_THRESHOLDS = ("max_window_layers", "first_k_dense_replace")


# --- width --------------------------------------------------------------------------------------
@torch.no_grad()
def _set_weight(lin: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Give ``lin`` new (smaller) parameters in place, keeping its dtype and device."""
    w = lin.weight
    lin.weight = nn.Parameter(weight.to(device=w.device, dtype=w.dtype).contiguous(), requires_grad=False)
    if lin.bias is not None:
        lin.bias = nn.Parameter(bias.to(device=w.device, dtype=lin.bias.dtype).contiguous(), requires_grad=False)
    lin.out_features, lin.in_features = lin.weight.shape


def set_tensor(owner: nn.Module, name: str, t: torch.Tensor) -> None:
    """Replace ``owner``'s parameter (keeping its ``requires_grad``) or buffer ``name`` by ``t``."""
    if name in owner._parameters:
        old = owner._parameters[name]
        owner._parameters[name] = t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=old.requires_grad)
    else:
        owner._buffers[name] = t


def config_rejects(model: nn.Module, **changes) -> str | None:
    """Why transformers would refuse the model's config with ``changes`` (e.g. ``hidden_size``,
    ``num_attention_heads``) — Llama's requires hidden_size to be a multiple of the head count —
    or None. Checked before any work: a saved directory must load again."""
    config = copy.deepcopy(text_config(model))
    if getattr(config, "head_dim", None) is None and isinstance(getattr(config, "num_attention_heads", None), int):
        config.head_dim = config.hidden_size // config.num_attention_heads  # what every shrink writes
    try:
        for k, v in changes.items():
            setattr(config, k, v)
        if hasattr(config, "validate"):
            config.validate()
    except Exception as e:  # transformers' validators raise their own types
        lines = [s.strip() for s in str(e).strip().splitlines() if s.strip()]
        return lines[-1] if lines else type(e).__name__
    return None


def keep_rows(lin: nn.Linear, rows: torch.Tensor) -> None:
    """Keep the output rows ``rows`` of ``lin`` (and of its bias), in place."""
    rows = rows.to(lin.weight.device)
    _set_weight(lin, lin.weight[rows], lin.bias[rows] if lin.bias is not None else None)


def keep_columns(lin: nn.Linear, cols: torch.Tensor, weight: torch.Tensor | None = None) -> None:
    """Keep the input columns ``cols`` of ``lin``, in place; ``weight (out, len(cols))``, a re-fit
    of those columns, replaces them when given. The bias does not depend on the inputs."""
    new = lin.weight[:, cols.to(lin.weight.device)] if weight is None else weight
    if tuple(new.shape) != (lin.out_features, cols.numel()):
        raise ValueError(f"weight has shape {tuple(new.shape)}, expected ({lin.out_features}, {cols.numel()})")
    _set_weight(lin, new, lin.bias)


@torch.no_grad()
def shrink_mlp(layer: nn.Module, triplet: MLPTriplet, keep: torch.Tensor,
               down_weight: torch.Tensor | None = None) -> None:
    """Keep the intermediate channels ``keep`` of ``layer``'s MLP, in place.

    ``down_weight (d, len(keep))`` replaces down's kept columns (OSSCAR's re-fit); without it
    they keep their values. down's bias is unchanged: it does not depend on the channels.
    """
    keep = keep.to(torch.long).cpu()
    inter = triplet.intermediate
    if keep.numel() == 0 or keep.min() < 0 or keep.max() >= inter or keep.unique().numel() != keep.numel():
        raise ValueError(f"keep must be distinct channel indices in [0, {inter})")
    for name in triplet.rows:
        keep_rows(layer.get_submodule(name), torch.cat([keep, keep + inter]) if triplet.fused_gate_up else keep)
    keep_columns(layer.get_submodule(triplet.down), keep, down_weight)
    mlp = layer.get_submodule(triplet.down.rpartition(".")[0]) if "." in triplet.down else layer
    if isinstance(getattr(mlp, "intermediate_size", None), int):  # e.g. LlamaMLP keeps it
        mlp.intermediate_size = keep.numel()


def set_intermediate_size(model: nn.Module, width: int) -> None:
    """Write the common MLP width into the config (every layer must have it)."""
    config = text_config(model)
    if not isinstance(getattr(config, "intermediate_size", None), int):
        raise LLMPruneError(f"{type(config).__name__} has no integer intermediate_size to shrink")
    config.intermediate_size = width
    if config is not model.config and hasattr(model.config, "intermediate_size"):
        model.config.intermediate_size = width


# --- depth --------------------------------------------------------------------------------------
def check_drop(n_layers: int, drop: Iterable[int]) -> list[int]:
    """``drop`` as sorted distinct indices, leaving at least one layer."""
    drop = sorted(set(int(i) for i in drop))
    if not drop:
        raise LLMPruneError("no layer to remove")
    if drop[0] < 0 or drop[-1] >= n_layers:
        raise LLMPruneError(f"layer indices {drop} out of range for {n_layers} layers")
    if len(drop) >= n_layers:
        raise LLMPruneError(f"removing {len(drop)} of {n_layers} layers leaves none")
    return drop


def config_changes(config, n_layers: int, kept: list[int]) -> dict[str, object]:
    """New values of the per-layer config entries for the layers ``kept`` (old indices)."""
    changes: dict[str, object] = {"num_hidden_layers": len(kept)}
    new_index = {old: new for new, old in enumerate(kept)}
    for key in PER_LAYER_LISTS:
        v = getattr(config, key, None)
        if isinstance(v, list | tuple):
            if len(v) != n_layers:
                raise LLMPruneError(f"config.{key} has {len(v)} entries for {n_layers} layers; cannot slice it")
            changes[key] = type(v)(v[i] for i in kept)
    for key in LAYER_INDEX_LISTS:
        v = getattr(config, key, None)
        if isinstance(v, list | tuple):
            changes[key] = type(v)(new_index[i] for i in v if i in new_index)
    for key in LAYER_THRESHOLDS:
        v = getattr(config, key, None)
        if isinstance(v, int) and not isinstance(v, bool):
            changes[key] = sum(1 for i in kept if i < v)
    return changes


def _layer_indices(layer: nn.Module) -> list[nn.Module]:
    return [m for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)]


def drop_layers(model: nn.Module, drop: Iterable[int]) -> Callable[[], None]:
    """Delete the decoder layers ``drop`` in place; returns a function that puts them back.

    After the call the model is a standard model of its family with fewer layers: the config
    says so, and each attention module's ``layer_idx`` is its new position (the KV cache is
    indexed by it).
    """
    layers = decoder_layers(model)
    n = len(layers)
    drop = check_drop(n, drop)
    kept = [i for i in range(n) if i not in set(drop)]
    config = text_config(model)
    changes = config_changes(config, n, kept)
    old_config = {k: getattr(config, k) for k in changes}
    old_layers = list(layers)
    old_idx = [(m, m.layer_idx) for layer in old_layers for m in _layer_indices(layer)]

    for k, v in changes.items():
        setattr(config, k, v)
    for i in reversed(drop):
        del layers[i]
    for new, layer in enumerate(layers):
        for m in _layer_indices(layer):
            m.layer_idx = new

    def undo() -> None:
        del layers[:]
        layers.extend(old_layers)
        for k, v in old_config.items():
            setattr(config, k, v)
        for m, idx in old_idx:
            m.layer_idx = idx

    return undo


@contextmanager
def layers_removed(model: nn.Module, drop: Iterable[int]) -> Iterator[nn.Module]:
    """The model without the layers ``drop`` inside the block; all of it again afterwards."""
    undo = drop_layers(model, drop)
    try:
        yield model
    finally:
        undo()
