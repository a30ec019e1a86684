"""OSSCAR inside the kept experts of a MoE block: every kept expert's MLP loses the same number
of intermediate channels, chosen and re-fitted by :func:`~llmprune.structured.osscar.osscar_prune`
on the tokens the (already shrunk) router sends to it.

Expert ``e`` adds ``g_e(x) · W_e a_e(x)`` to the block's output (``a_e`` the input of its
down_proj, ``g_e`` the routing weight), so with the routing fixed the block's output error from
changing ``W_e`` is ``Σ_x g_e(x)² ‖(W_e − Ŵ_e) a_e(x)‖²``: OSSCAR's objective with the
router-weighted Gram matrix ``H_e = Σ_x g_e(x)² a_e(x) a_e(x)ᵀ`` — a token the router barely
weights barely counts. The statistics are collected after expert removal, with the shrunk
router, so they are the traffic of the final model (re-routed tokens included).

The saved config keeps one width for every expert of every layer (``moe_intermediate_size``,
or ``intermediate_size`` where only experts read it, as in Mixtral): plain ``transformers``
loads the result. Shared experts and dense MLP layers are left alone.
"""

from __future__ import annotations

import torch
from torch import nn

from llmprune.errors import LLMPruneError
from llmprune.models.adapter import (
    MoEBlock,
    PerExpertLinears,
    decoder_layers,
    moe_blocks,
    text_config,
)
from llmprune.structured.osscar import DTYPE, osscar_prune
from llmprune.structured.shrink import set_tensor

# Most float64 Gram-matrix bytes held at once; the experts' statistics are gathered in passes of
# as many experts as fit (Mixtral-8x7B: 1.6 GB per expert).
GRAM_BUDGET = 2 << 30


def expert_width_key(model: nn.Module, intermediate: int) -> str:
    """The config attribute that holds the experts' intermediate width, or a clear error where no
    attribute says it alone (the saved model could not express a smaller width)."""
    text = text_config(model.config)
    if getattr(text, "moe_intermediate_size", None) == intermediate:
        return "moe_intermediate_size"
    dense_mlp = any(not moe_blocks(layer) for layer in decoder_layers(model))
    if getattr(text, "intermediate_size", None) == intermediate and not dense_mlp:
        return "intermediate_size"
    raise LLMPruneError(f"--expert-mlp-ratio: no config attribute holds the experts' width ({intermediate}) alone "
                        "(moe_intermediate_size, or intermediate_size in a model without dense MLP layers), so the "
                        "saved model could not say it; drop --expert-mlp-ratio")


def check_expert_layout(mb: MoEBlock) -> int:
    """The experts' intermediate width, or a clear error for a layout OSSCAR cannot re-fit."""
    view = mb.block.experts
    fused = view.fused if isinstance(view, PerExpertLinears) else mb.experts
    if getattr(fused, "has_post_expert_norm", False):
        raise LLMPruneError(f"{mb.name}: its experts normalise their output after down_proj, so a least-squares "
                            "re-fit of down_proj is not the block's error; drop --expert-mlp-ratio")
    return (PerExpertLinears(fused) if not isinstance(view, PerExpertLinears) else view)[0].down_proj.in_features


def expert_mlp_params(mb: MoEBlock) -> int:
    """Parameters of one expert's MLP that scale with its intermediate width (its gate / up rows
    with their biases, its down_proj columns)."""
    view = mb.block.experts if isinstance(mb.block.experts, PerExpertLinears) else PerExpertLinears(mb.experts)
    expert = view[0]
    lins = [getattr(expert, n) for n in ("gate_proj", "up_proj") if hasattr(expert, n)]
    return (sum(lin.weight.numel() + (lin.bias.numel() if lin.bias is not None else 0) for lin in lins)
            + expert.down_proj.weight.numel())


class ExpertGrams:
    """``H_e = Σ g² a aᵀ`` (float64) and the routed-token count of the experts ``which`` of a
    per-expert view, while the block runs."""

    def __init__(self, view: PerExpertLinears, which: list[int]):
        width = view[0].down_proj.in_features
        self.H = {e: torch.zeros(width, width, dtype=DTYPE, device=view[e].down_proj.weight.device) for e in which}
        self.tokens = dict.fromkeys(which, 0)
        self._route = None
        self._handles = [view.register_forward_pre_hook(self._routing)]
        self._handles += [view[e].down_proj.register_forward_pre_hook(self._input(e)) for e in which]

    def _routing(self, _module, args) -> None:
        self._route = args[1], args[2]

    def _input(self, e: int):
        @torch.no_grad()
        def hook(_module, args):
            index, weight = self._route
            token, slot = torch.where(index == e)
            ga = args[0].to(DTYPE) * weight[token, slot].to(DTYPE)[:, None]
            self.H[e].addmm_(ga.T, ga)
            self.tokens[e] += token.numel()
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _intermediate_rows(keep: torch.Tensor, width: int, view: PerExpertLinears) -> torch.Tensor:
    """Rows of the fused gate/up tensor that hold channels ``keep`` of ``width``."""
    if not view.has_gate:
        return keep
    if view.concatenated:
        return torch.cat([keep, keep + width])
    return torch.stack([2 * keep, 2 * keep + 1], dim=1).flatten()


@torch.no_grad()
def shrink_expert_mlps(mb: MoEBlock, xs: list[torch.Tensor], width: int, **osscar) -> dict:
    """Keep ``width`` intermediate channels in every expert of ``mb`` (inside the LayerWalk: its
    experts are a :class:`PerExpertLinears` view), chosen by OSSCAR on the block inputs ``xs``;
    ``osscar``: :func:`osscar_prune`'s options. Returns the block's report entry."""
    view = mb.block.experts
    fused = view.fused
    n = len(view)
    inter = view[0].down_proj.in_features
    per_pass = max(1, GRAM_BUDGET // (inter * inter * 8))
    results, tokens = {}, {}
    for start in range(0, n, per_pass):
        grams = ExpertGrams(view, list(range(start, min(n, start + per_pass))))
        try:
            for x in xs:
                mb.block(x)
        finally:
            grams.remove()
        for e, H in grams.H.items():
            W = view[e].down_proj.weight
            if grams.tokens[e] == 0:  # no calibration token reaches it: keep by ‖W column‖
                H = torch.eye(inter, dtype=DTYPE, device=H.device)
            results[e] = osscar_prune(W, H, width, **osscar)
            tokens[e] = grams.tokens[e]
        del grams
    transposed = getattr(fused, "is_transposed", False)
    first = "gate_up_proj" if view.has_gate else "up_proj"
    rows = [_intermediate_rows(results[e].keep, inter, view) for e in range(n)]

    def keep_rows(name: str, dim: int) -> None:  # every expert's kept intermediate rows of a fused tensor
        t = getattr(fused, name).data
        set_tensor(fused, name, torch.stack([t[e].index_select(dim, rows[e].to(t.device)) for e in range(n)]))

    keep_rows(first, int(transposed))
    down = fused.down_proj.data
    set_tensor(fused, "down_proj", torch.stack([(results[e].down.T if transposed else results[e].down).to(down)
                                                for e in range(n)]))
    if getattr(fused, "has_bias", False):
        keep_rows(f"{first}_bias", 0)
    for attr in ("intermediate_dim", "intermediate_size", "moe_intermediate_size"):
        if getattr(fused, attr, None) == inter:
            setattr(fused, attr, width)
    mb.block.experts = PerExpertLinears(fused)
    errors = [results[e].recon_error for e in range(n)]
    return {"width": {"before": inter, "after": width}, "recon_error": errors,
            "mean_recon_error": sum(errors) / n, "tokens": [tokens[e] for e in range(n)],
            "swaps": sum(r.swaps for r in results.values())}

