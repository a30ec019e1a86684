"""The model questions the engine asks, answered in one place from the model's own attributes.

- **decoder layers**: the ModuleList of the class named in ``model._no_split_modules`` (what
  accelerate keeps on one device: the decoder layer), else the longest ModuleList of
  ``num_hidden_layers`` entries holding linears;
- **prunable linears** of a layer: every ``nn.Linear`` except MoE routers, plus each expert's
  gate / up / down of fused MoE experts (3D parameters), as views on the fused tensors;
- **routed experts**: linears that only see the tokens the router sends them;
- **the MLP triplet** for width pruning: gate/up (rows) and down (columns);
- **fused experts** as per-expert ``nn.Linear`` modules for the engine's hooks
  (:func:`per_expert_linears`).

Each layer's forward arguments (masks, rotary embeddings) are not derived here: the model
itself is asked, by :func:`llmprune.engine.capture.capture_inputs`, so sliding-window and
local/global layers (``config.layer_types``) get exactly what the model gives them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from llmprune.errors import LLMPruneError

# Names of the gated-MLP projections, as the families spell them.
_GATED = [("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")]
_FUSED_GATED = [("gate_up_proj", "down_proj")]  # Phi-3: [gate; up] stacked in one matrix


# --- decoder layers ---------------------------------------------------------------------------
def text_config(config_or_model):
    """The config that describes the decoder stack (a multimodal model's text config), of a
    ``PretrainedConfig`` or of a model."""
    config = config_or_model.config if isinstance(config_or_model, nn.Module) else config_or_model
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _text_layers_count(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = text_config(config)
    n = getattr(text, "num_hidden_layers", None)
    return n if isinstance(n, int) else None


def _has(module: nn.Module, kind: type) -> bool:
    return any(isinstance(m, kind) for m in module.modules())


def _conv1d_error(model: nn.Module, layers: nn.ModuleList) -> LLMPruneError | None:
    """GPT-2 style models compute with transformers' Conv1D (a transposed linear)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        return None
    names = [n for n, m in layers[0].named_modules() if isinstance(m, Conv1D)]
    if not names or _has(layers[0], nn.Linear):
        return None
    return LLMPruneError(
        f"{type(model).__name__}: its decoder layers ({type(layers[0]).__name__}) compute with "
        f"transformers' Conv1D ({', '.join(names)}), not nn.Linear; Conv1D is not supported, "
        "so there are no linears to prune"
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers, in the order the model calls them."""
    n = _text_layers_count(model)
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    # The model's own word: the ModuleList of its no-split (decoder layer) class.
    named = [m for m in lists if all(type(x).__name__ in no_split for x in m)]
    if n is not None and any(len(m) == n for m in named):
        named = [m for m in named if len(m) == n]
    if named:
        layers = max(named, key=len)
        err = _conv1d_error(model, layers)
        if err is not None:
            raise err
        if not _has(layers[0], nn.Linear) and not _fused_experts(layers[0]):
            raise LLMPruneError(f"{type(model).__name__}: decoder layers {type(layers[0]).__name__} "
                                "hold no nn.Linear; nothing to prune")
        return layers
    # Fallback: the longest ModuleList of num_hidden_layers entries holding linears.
    best = None
    for mod in lists:
        if _has(mod[0], nn.Linear) and (n is None or len(mod) == n):
            if best is None or len(mod) > len(best):
                best = mod
    if best is None:
        for mod in lists:
            err = _conv1d_error(model, mod) if n is None or len(mod) == n else None
            if err is not None:
                raise err
        raise LLMPruneError(f"could not find the decoder layers of {type(model).__name__}: no "
                            f"ModuleList of {n} layers with nn.Linear sublayers")
    return best


# --- MoE --------------------------------------------------------------------------------------
def _is_moe_block(module: nn.Module) -> bool:
    return isinstance(getattr(module, "experts", None), nn.Module)


def has_experts(module: nn.Module) -> bool:
    """Whether ``module`` (a model or a layer) holds a mixture-of-experts block."""
    return any(_is_moe_block(m) for m in module.modules())


def _fused_experts(layer: nn.Module) -> dict[str, nn.Module]:
    """Fused expert modules (3D ``down_proj`` parameter) by their name within ``layer``."""
    return {name: m for name, m in layer.named_modules()
            if isinstance(getattr(m, "down_proj", None), nn.Parameter) and m.down_proj.dim() == 3}


def _routers(layer: nn.Module) -> set[str]:
    """Names of the linears that route tokens in MoE blocks; they are not pruned.

    A router's few outputs go through a top-k: a small weight change can send a token to
    another expert, a discrete jump that neither Wanda's score nor SparseGPT's least-squares
    update accounts for, and routers are tiny (experts x hidden), so there is nothing to gain.
    Routers are the linears directly inside an MoE block (``gate``, ``shared_expert_gate``)
    or inside a module whose class is a router.
    """
    out = set()
    for name, mod in layer.named_modules():
        prefix = f"{name}." if name else ""
        if _is_moe_block(mod):
            out |= {prefix + c for c, child in mod.named_children() if isinstance(child, nn.Linear)}
        if "Router" in type(mod).__name__:
            out |= {prefix + c for c, child in mod.named_modules() if isinstance(child, nn.Linear)}
    return out


class PerExpertLinears(nn.ModuleList):
    """Fused experts as one ``gate_proj`` / ``up_proj`` / ``down_proj`` ``nn.Linear`` per expert.

    The weights are *views* of the fused 3D parameters, so pruning them in place prunes the
    fused tensors; nothing has to be written back. The forward is the eager loop of
    transformers' ``@use_experts_implementation`` experts (every registered implementation,
    ``grouped_mm``, ``batched_mm``, ..., computes this same sum
    ``Σ_k w_k · down(gate(x) ⊙ up(x))``), with the fused module's own ``_apply_gate``,
    ``act_fn`` and post-expert norm, so routing and math stay the model's.
    """

    def __init__(self, fused: nn.Module):
        super().__init__()
        object.__setattr__(self, "fused", fused)  # not a child: its parameters stay hidden
        self.has_gate = getattr(fused, "has_gate", True)
        self.concatenated = getattr(fused, "is_concatenated", True)
        transposed = getattr(fused, "is_transposed", False)
        has_bias = getattr(fused, "has_bias", False)
        first = "gate_up_proj" if self.has_gate else "up_proj"
        if not isinstance(getattr(fused, first, None), nn.Parameter):
            raise LLMPruneError(f"fused experts {type(fused).__name__} have no {first} parameter; "
                                "this expert layout is not supported")

        def weight(name: str, e: int) -> torch.Tensor:
            w = getattr(fused, name).data[e]
            return w.t() if transposed else w  # (out, in) like nn.Linear

        def bias(name: str, e: int) -> torch.Tensor | None:
            return getattr(fused, f"{name}_bias").data[e] if has_bias else None

        for e in range(getattr(fused, first).shape[0]):
            expert = nn.Module()
            if self.has_gate:
                (w_gate, w_up), b = self._split(weight("gate_up_proj", e)), bias("gate_up_proj", e)
                b_gate, b_up = self._split(b) if b is not None else (None, None)
                expert.gate_proj = _view_linear(w_gate, b_gate)
                expert.up_proj = _view_linear(w_up, b_up)
            else:
                expert.up_proj = _view_linear(weight("up_proj", e), bias("up_proj", e))
            expert.down_proj = _view_linear(weight("down_proj", e), bias("down_proj", e))
            self.append(expert)

    def _split(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[gate; up] halves (concatenated layout) or even / odd rows (interleaved layout)."""
        if self.concatenated:
            half = t.shape[0] // 2
            return t[:half], t[half:]
        return t[0::2], t[1::2]

    def _join(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`_split` on the last dimension, for the fused ``_apply_gate``."""
        if self.concatenated:
            return torch.cat([gate, up], dim=-1)
        return torch.stack([gate, up], dim=-1).flatten(-2)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        fused = self.fused
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token_idx, slot = torch.where(top_k_index == e)
            if token_idx.numel() == 0:  # no token routed here: no call, so no hook fires
                continue
            x = hidden_states[token_idx]
            if self.has_gate:
                h = fused._apply_gate(self._join(expert.gate_proj(x), expert.up_proj(x)))
            else:
                h = fused.act_fn(expert.up_proj(x))
            y = expert.down_proj(h)
            if getattr(fused, "has_post_expert_norm", False):
                y = fused.post_expert_norm(y)
            y = y * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def _view_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` whose parameters alias ``weight`` / ``bias`` (no copy)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


@contextmanager
def per_expert_linears(layer: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every fused experts module of ``layer`` is a :class:`PerExpertLinears`.

    Hooks on its linears see each expert's own tokens; weights written into them land in the
    fused parameters. Enter it *after* moving the layer to its device (the views alias the
    parameters as they are) and leave it before moving the layer again.
    """
    fused = _fused_experts(layer)
    for name, mod in fused.items():
        _set_submodule(layer, name, PerExpertLinears(mod))
    try:
        yield layer
    finally:
        for name, mod in fused.items():
            _set_submodule(layer, name, mod)


# --- linears ----------------------------------------------------------------------------------
def linear_layers(layer: nn.Module) -> dict[str, nn.Linear]:
    """Every prunable linear of one decoder layer, by its name within the layer.

    All ``nn.Linear`` modules except MoE routers (see :func:`_routers`), plus
    ``{experts}.{e}.gate_proj|up_proj|down_proj`` for each expert of fused MoE experts (views
    on the fused parameters: writing them prunes the model).
    """
    routers = _routers(layer)
    out = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear) and n not in routers}
    for name, fused in _fused_experts(layer).items():
        for sub, lin in PerExpertLinears(fused).named_modules():
            if isinstance(lin, nn.Linear):
                out[f"{name}.{sub}"] = lin
    return out


def masked_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every linear inside the decoder layers, by parameter-name prefix (never ``lm_head`` or
    embeddings), e.g. ``model.layers.0.mlp.down_proj``."""
    names = {id(mod): name for name, mod in model.named_modules()}
    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        for sub, lin in linear_layers(layer).items():
            if id(lin) not in names:
                # e.g. per-expert views on fused MoE expert tensors: not modules the model calls,
                # so a parametrization on them would never be used
                raise LLMPruneError(f"layer {i} {sub} is not an nn.Linear the model calls (fused MoE "
                                    f"experts?); trained masks (MaskLLM, recovery) attach to nn.Linear weights only")
            out[names[id(lin)]] = lin
    return out


def prunable_weights(layer: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that pruning zeroes, by name within ``layer``: each linear's weight, and
    for fused MoE experts the fused 3D tensors themselves (their per-expert linears are views;
    masks and files name the parameter the model stores)."""
    fused = _fused_experts(layer)
    out = {f"{n}.weight": lin.weight for n, lin in linear_layers(layer).items()
           if not any(n.startswith(f"{f}.") for f in fused)}
    for name, mod in fused.items():
        for pname in ("gate_up_proj", "up_proj", "down_proj"):
            p = getattr(mod, pname, None)
            if isinstance(p, nn.Parameter):
                out[f"{name}.{pname}"] = p
    return out


@dataclass(frozen=True)
class MoEBlock:
    """One mixture-of-experts block of a layer, for expert removal: expert ``e`` is entry ``e``
    of every tensor of ``experts`` and ``router`` whose first dimension is ``num_experts``
    (``gate_up_proj``, ``down_proj``, their biases; the router's weight rows, bias,
    score-correction bias). A shared expert and its gate are not routed and not listed."""

    name: str  # within the layer, e.g. "mlp" or "block_sparse_moe"
    block: nn.Module
    router: nn.Module
    experts: nn.Module  # the fused experts module (never its per-expert view)
    num_experts: int


def _expert_router(name: str, block: nn.Module, n: int) -> nn.Module:
    """The child of ``block`` that scores its ``n`` experts: a weight of ``n`` rows."""
    found = [child for cname, child in block.named_children() if cname != "experts"
             and isinstance(getattr(child, "weight", None), torch.Tensor) and child.weight.dim() == 2
             and child.weight.shape[0] == n]
    if len(found) != 1:
        what = "several" if found else "no"
        raise LLMPruneError(f"MoE block {name or '(layer)'} ({type(block).__name__}) has {what} router with "
                            f"{n} output rows among its children; this MoE layout is not supported")
    return found[0]


def moe_blocks(layer: nn.Module) -> list[MoEBlock]:
    """The routed MoE blocks of ``layer`` (empty for a dense layer, e.g. Qwen2-MoE's
    ``mlp_only_layers``). Inside :func:`per_expert_linears` the fused module is still the one
    listed. Experts that are not fused 3D tensors are an error naming the block."""
    out = []
    for name, mod in layer.named_modules():
        if not _is_moe_block(mod):
            continue
        experts = mod.experts
        experts = getattr(experts, "fused", experts)  # PerExpertLinears → the fused module
        down = getattr(experts, "down_proj", None)
        if not (isinstance(down, nn.Parameter) and down.dim() == 3):
            raise LLMPruneError(f"MoE block {name} ({type(mod).__name__}) keeps its experts as "
                                f"{type(experts).__name__}, not fused 3D tensors; expert removal supports "
                                "the fused layout of transformers 5")
        n = down.shape[0]
        out.append(MoEBlock(name, mod, _expert_router(name, mod, n), experts, n))
    return out


def routed_linears(layer: nn.Module) -> set[str]:
    """Linears that see only the tokens a router sends them (MoE experts, fused or not).

    An expert may get no calibration token at all; the engine then scores it by magnitude.
    """
    out = set()
    for name, mod in layer.named_modules():
        if _is_moe_block(mod):
            prefix = f"{name}.experts" if name else "experts"
            out |= {n for n in linear_layers(layer) if n.startswith(prefix + ".")}
    return out


# --- MLP triplet ------------------------------------------------------------------------------
@dataclass(frozen=True)
class MLPTriplet:
    """The gated MLP of a layer for width pruning: intermediate channel ``j`` is output row ``j``
    of every ``rows`` linear and input column ``j`` of ``down``.

    With ``fused_gate_up`` there is one rows linear stacking ``[gate; up]``: channel ``j`` is
    its rows ``j`` and ``j + intermediate``.
    """

    rows: tuple[str, ...]
    down: str
    intermediate: int
    fused_gate_up: bool = False


def mlp_triplet(layer: nn.Module) -> MLPTriplet:
    """Gate/up (rows) and down (columns) of the layer's gated MLP, or a clear error."""
    if has_experts(layer):
        raise LLMPruneError(f"{type(layer).__name__} is a mixture-of-experts layer: its MLPs are "
                            "per expert; width pruning of experts is not supported (--method experts removes whole experts)")
    lins = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    found = []
    for prefix in {n.rpartition(".")[0] for n in lins}:
        p = f"{prefix}." if prefix else ""
        for gate, up, down in _GATED:
            if {p + gate, p + up, p + down} <= set(lins):
                inter = lins[p + down].in_features
                if lins[p + gate].out_features == lins[p + up].out_features == inter:
                    found.append(MLPTriplet((p + gate, p + up), p + down, inter))
        for gate_up, down in _FUSED_GATED:
            if {p + gate_up, p + down} <= set(lins):
                inter = lins[p + down].in_features
                if lins[p + gate_up].out_features == 2 * inter:
                    found.append(MLPTriplet((p + gate_up,), p + down, inter, fused_gate_up=True))
    if len(found) == 1:
        return found[0]
    expected = " or ".join([f"{g} + {u} + {d}" for g, u, d in _GATED] + [f"{g} + {d}" for g, d in _FUSED_GATED])
    what = "several" if found else "no"
    raise LLMPruneError(f"{type(layer).__name__} has {what} recognised gated MLP: expected one module "
                        f"with {expected} (matching shapes); its linears are {', '.join(sorted(lins))}")


# --- attention heads --------------------------------------------------------------------------
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class AttentionHeads:
    """The attention of a layer for head pruning: query head ``h`` is rows
    ``h·head_dim … (h+1)·head_dim`` of ``q`` and those columns of ``o``; it reads KV head
    ``h // (heads / kv_heads)`` (rows of ``k`` and ``v``), as transformers' ``repeat_kv`` does."""

    module: str  # the attention module, within the layer
    q: str
    k: str
    v: str
    o: str
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def per_group(self) -> int:
        """Query heads per KV head."""
        return self.heads // self.kv_heads


def attention_heads(layer: nn.Module) -> AttentionHeads:
    """q/k/v/o of the layer's self-attention and its head counts, or a clear error."""
    found = []
    for name, mod in layer.named_modules():
        lins = [getattr(mod, n, None) for n in _ATTN]
        if all(isinstance(lin, nn.Linear) for lin in lins):
            found.append((name, mod, lins))
    if len(found) != 1:
        fused = [n for n, m in layer.named_modules() if n.endswith("qkv_proj") and isinstance(m, nn.Linear)]
        hint = f" (a fused {fused[0]} is not supported)" if fused else ""
        what = "several" if found else "no"
        raise LLMPruneError(f"{type(layer).__name__} has {what} attention with separate "
                            f"{' + '.join(_ATTN)}{hint}; head pruning needs exactly one")
    name, mod, (q, k, _v, o) = found[0]
    head_dim = getattr(mod, "head_dim", None)
    if not isinstance(head_dim, int) or q.out_features % head_dim or k.out_features % head_dim:
        raise LLMPruneError(f"{type(mod).__name__}: cannot tell its head_dim ({head_dim!r}) from "
                            f"q_proj {q.out_features} / k_proj {k.out_features} outputs")
    heads, kv = q.out_features // head_dim, k.out_features // head_dim
    if heads % kv or o.in_features != q.out_features:
        raise LLMPruneError(f"{type(mod).__name__}: {heads} query heads do not split evenly over {kv} KV heads")
    p = f"{name}." if name else ""
    return AttentionHeads(name, *(p + n for n in _ATTN), heads=heads, kv_heads=kv, head_dim=head_dim)
