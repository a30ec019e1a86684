"""OSSCAR on attention heads (``--method osscar --target attention``): which query heads (or
whole KV groups) each layer keeps, and o_proj re-fitted on them.

A query head is ``head_dim`` consecutive input columns of o_proj (and rows of q_proj); its
output is o_proj's input on those columns, so OSSCAR's objective for MLP channels applies as
is with a channel replaced by a block of ``head_dim`` columns (Meng et al. treat heads the same
way): ``E(R) = min ‖X W − X_S Ŵ_S‖² + λ‖W − Ŵ‖²`` over o_proj's input X. The solver is
:func:`~llmprune.structured.osscar.osscar_prune` with ``group = head_dim``.

The result must stay a standard config (one ``num_attention_heads``, ``num_key_value_heads``
and ``head_dim`` for every layer), so with grouped-query attention two units are possible:

- ``attention_unit = heads``: remove the same number of query heads from every KV group (the
  k/v heads all stay, each now shared by fewer query heads); greedy and local search keep the
  count per group (``buckets``);
- ``attention_unit = groups``: remove whole KV groups, i.e. their query heads and their k/v
  heads together (a structure of ``heads/kv_heads · head_dim`` columns of o_proj).

With one query head per KV head (multi-head attention) both are the same: a head goes with
its k/v head. Every layer removes the same count; the layers choose *which* independently.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from llmprune.engine.sequential import LayerWalk, run_layer
from llmprune.engine.stats import XTX, LayerStats
from llmprune.errors import LLMPruneError
from llmprune.models.adapter import AttentionHeads, attention_heads, text_config
from llmprune.structured.osscar import osscar_prune
from llmprune.structured.shrink import config_rejects, keep_columns, keep_rows


@dataclass(frozen=True)
class HeadPlan:
    """How many heads every layer keeps, known before any data is read."""

    unit: str  # "heads" (query heads within each KV group) or "groups" (whole KV groups)
    heads: int
    kv_heads: int
    head_dim: int
    heads_after: int
    kv_after: int

    @property
    def structure(self) -> int:
        """o_proj input columns per removed structure."""
        return self.head_dim * (self.heads // self.kv_heads if self.unit == "groups" else 1)

    @classmethod
    def removing(cls, unit: str, heads: int, kv_heads: int, head_dim: int, r: int) -> HeadPlan:
        """``r`` whole KV groups (``groups``) or ``r`` query heads of every KV group (``heads``)."""
        if unit == "groups":
            return cls(unit, heads, kv_heads, head_dim, heads - r * (heads // kv_heads), kv_heads - r)
        return cls(unit, heads, kv_heads, head_dim, heads - r * kv_heads, kv_heads)


def head_params(layer: nn.Module, info: AttentionHeads) -> tuple[int, int]:
    """Parameters of one query head (its q rows and o columns) and of one KV head (k, v rows)."""
    q, k, v, o = (layer.get_submodule(n) for n in (info.q, info.k, info.v, info.o))
    hd = info.head_dim
    per_q = hd * (q.in_features + (q.bias is not None)) + hd * o.out_features
    per_kv = hd * (k.in_features + (k.bias is not None)) + hd * (v.in_features + (v.bias is not None))
    return per_q, per_kv


def _expressible(heads: int, kv: int) -> str:
    per = heads // kv
    parts = []
    if per > 1:
        parts.append(f"{', '.join(str(r) for r in range(1, per))} of the {per} query heads in each of the "
                     f"{kv} KV groups (ratio {', '.join(f'{r / per:.3g}' for r in range(1, per))})")
    if kv > 1:
        parts.append(f"{', '.join(str(r) for r in range(1, kv))} of the {kv} whole KV groups "
                     f"(--attention-unit groups, ratio {', '.join(f'{r / kv:.3g}' for r in range(1, kv))})")
    return "; ".join(parts) if parts else "nothing (one head)"


def plan_heads(model: nn.Module, layers: nn.ModuleList, ratio: float | None, param_ratio: float | None,
               unit: str, total_params: int) -> HeadPlan:
    """The kept head counts for ``ratio`` (share of query heads) or ``param_ratio`` (share of all
    parameters), or one clear error naming what the config can express."""
    infos = [attention_heads(layer) for layer in layers]
    shapes = {(i.heads, i.kv_heads, i.head_dim) for i in infos}
    if len(shapes) != 1:
        raise LLMPruneError(f"the layers have different attention shapes {sorted(shapes)} (heads, kv heads, "
                            "head_dim); head pruning keeps one shape so the config stays standard")
    heads, kv, hd = shapes.pop()
    config = text_config(model)
    if not isinstance(getattr(config, "num_attention_heads", None), int):
        raise LLMPruneError(f"{type(config).__name__} has no num_attention_heads to shrink")
    per = heads // kv
    if per == 1:
        unit = "groups"  # multi-head attention: a head and its k/v head go together
    can = _expressible(heads, kv)
    units, unit_name = (kv, "KV groups") if unit == "groups" else (per, f"query heads per KV group (of {kv})")
    if ratio is not None:
        exact = ratio * units
        what = f"ratio {ratio:g} × {units} {unit_name}"
    else:
        per_q, per_kv = head_params(layers[0], infos[0])
        per_unit = (per * per_q + per_kv) if unit == "groups" else kv * per_q  # one unit in every layer
        exact = param_ratio * total_params / (len(layers) * per_unit)
        what = f"param_ratio {param_ratio:g} of {total_params:,} parameters / {len(layers) * per_unit:,} per unit"
    r = round(exact)
    if r < 1:
        raise LLMPruneError(f"{what} rounds to 0: removes no head; the config can express removing {can}")
    if r >= units:
        hint = (" (remove whole KV groups with --attention-unit groups)" if unit == "heads" and kv > 1 else "")
        raise LLMPruneError(f"{what} rounds to {r}: leaves no {unit_name.split(' (')[0]}{hint}; the config can "
                            f"express removing {can}")
    plan = HeadPlan.removing(unit, heads, kv, hd, r)
    why = config_rejects(model, num_attention_heads=plan.heads_after, num_key_value_heads=plan.kv_after)
    if why is not None:
        raise LLMPruneError(f"{what}: {plan.heads_after} heads ({plan.kv_after} KV) is not a config "
                            f"{type(text_config(model)).__name__} accepts ({why}); the config can express removing {can}")
    return plan


@torch.no_grad()
def shrink_attention(layer: nn.Module, info: AttentionHeads, keep_heads: torch.Tensor,
                     o_weight: torch.Tensor | None = None) -> None:
    """Keep the query heads ``keep_heads`` (ascending) of ``layer``, in place: their q rows and o
    columns (``o_weight (d, kept·head_dim)`` replaces them: the re-fit), and the k/v rows of the
    KV heads they read. Every KV head must keep the same number of query heads."""
    hd, per = info.head_dim, info.per_group
    keep_heads = keep_heads.to(torch.long).cpu()
    kv_of = keep_heads // per
    kept_kv, counts = torch.unique(kv_of, return_counts=True)
    if (counts != counts[0]).any() or keep_heads.unique().numel() != keep_heads.numel():
        raise ValueError(f"heads {keep_heads.tolist()} do not keep the same number per KV group")
    rows_q = (keep_heads[:, None] * hd + torch.arange(hd)).reshape(-1)
    rows_kv = (kept_kv[:, None] * hd + torch.arange(hd)).reshape(-1)
    for name, rows in ((info.q, rows_q), (info.k, rows_kv), (info.v, rows_kv)):
        keep_rows(layer.get_submodule(name), rows)
    keep_columns(layer.get_submodule(info.o), rows_q, o_weight)
    attn = layer.get_submodule(info.module) if info.module else layer
    attn.num_key_value_groups = int(counts[0])
    for key, value in (("num_heads", keep_heads.numel()), ("num_attention_heads", keep_heads.numel()),
                       ("num_key_value_heads", kept_kv.numel())):
        if isinstance(getattr(attn, key, None), int):
            setattr(attn, key, value)


def set_head_counts(model: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
    """Write the kept head counts into the config, and ``head_dim`` explicitly: the families
    default it to ``hidden_size // num_attention_heads``, which changes with the head count."""
    configs = {id(c): c for c in (text_config(model), model.config)}.values()
    for config in configs:
        if hasattr(config, "num_attention_heads"):
            config.num_attention_heads = heads
            config.num_key_value_heads = kv_heads
            config.head_dim = head_dim


@torch.no_grad()
def run_attention(model: nn.Module, ids: torch.Tensor, plan: HeadPlan, options, device: str | torch.device = "cpu",
                  progress: bool = True) -> dict:
    """Shrink every layer's attention to ``plan``'s heads, layer by layer (the pruned layers'
    outputs feed the next one); the report's ``attention`` part."""
    from llmprune.structured.api import paired_stats

    walk = LayerWalk(model, ids, device, "osscar heads", progress)
    dense_in = walk.inps.clone() if options.dense_target else None
    per = plan.heads // plan.kv_heads
    buckets = torch.arange(plan.heads) // per if plan.unit == "heads" and per > 1 else None
    entries = []
    for i, layer in walk:
        t0 = time.perf_counter()
        info = attention_heads(layer)
        o = layer.get_submodule(info.o)
        target = {}
        if options.dense_target:  # the dense stream advances in place (rows are read before written)
            H, target["XtY"], target["YtY"] = paired_stats(layer, o, walk.inps, dense_in, walk.layer_kwargs[i],
                                                           dense_in)
        else:  # XᵀX of o_proj's input only (the other linears' statistics are not needed)
            stats = LayerStats({info.o: o}, XTX)
            try:
                run_layer(layer, walk.inps, walk.layer_kwargs[i], None, stats)
            finally:
                stats.remove()
            H = stats.get(info.o)["xtx"]
        res = osscar_prune(o.weight, H, plan.heads_after * plan.head_dim, **options.osscar_kwargs(
            block=1, group=plan.structure, buckets=None if buckets is None else buckets.to(H.device), **target))
        del H, target
        keep_heads = res.keep[:: plan.head_dim].cpu() // plan.head_dim
        removed = sorted(set(range(plan.heads)) - set(keep_heads.tolist()))
        shrink_attention(layer, info, keep_heads, res.down)
        entries.append({"index": i, "heads": plan.heads_after, "kv_heads": plan.kv_after,
                        "removed_heads": removed,
                        "removed_kv_heads": sorted(set(range(plan.kv_heads)) - set((keep_heads // per).tolist())),
                        "recon_error": res.recon_error, "objective": res.errors, "swaps": res.swaps,
                        "damping": res.damping, "seconds": time.perf_counter() - t0})
    for entry, sec in zip(entries, walk.seconds, strict=True):
        entry["seconds_with_propagation"] = sec
    set_head_counts(model, plan.heads_after, plan.kv_after, plan.head_dim)
    return {"unit": plan.unit,
            "num_attention_heads": {"before": plan.heads, "after": plan.heads_after},
            "num_key_value_heads": {"before": plan.kv_heads, "after": plan.kv_after},
            "head_dim": plan.head_dim,
            "removed_ratio": 1 - plan.heads_after / plan.heads,
            "selection": "greedy (OBS costs over head blocks)" if options.greedy else "head score ‖W_h‖·‖X_h‖",
            "target": "dense model's o_proj outputs" if options.dense_target else "this layer's own outputs",
            "mean_recon_error": sum(e["recon_error"] for e in entries) / len(entries),
            "layers": entries}
