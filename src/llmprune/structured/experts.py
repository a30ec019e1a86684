"""Expert removal for mixture-of-experts models: the same number of routed experts leaves every
MoE layer, chosen per layer by REAP (Lasby et al., "REAP the Experts: Why Pruning Prevails for
One-Shot MoE Compression", Cerebras 2025) or a baseline; the router keeps the rows of the kept
experts and the config's expert count is set, so plain ``transformers`` loads the result.

REAP's saliency of expert j over the calibration tokens X_j routed to it (j among the token's
top-k) is the mean of the gate weight times the norm of the expert's output,

    S_j = 1/|X_j| Σ_{x ∈ X_j} g_j(x) · ‖f_j(x)‖₂,

and the experts with the least saliency go. g_j(x) here is the weight the model itself
multiplies f_j(x) by (the softmax probability, renormalised over the top-k where the family
does so: Mixtral always, Qwen-MoE with ``norm_topk_prob``), so g_j · f_j is exactly expert j's
share of the block's output.

REAP scores each expert alone, while removal re-routes the tokens of a removed expert to
another one. ``output`` removes experts greedily by what the block's output actually loses,
‖Y − Ŷ‖² on the calibration tokens with every token re-routed as the shrunk model would (the
structure's reconstruction error; see :func:`greedy_output_removal`). Baselines: ``frequency``
(tokens routed, the usual count) and ``random``.

After removal the router's softmax runs over the kept experts only: a token's weights are its
probabilities divided by the router mass the kept experts hold. Where the family renormalises
over the top-k (Mixtral, ``norm_topk_prob``) that changes nothing for a token whose top-k
experts are all kept; without renormalisation (Qwen2/3-MoE's default) every kept weight grows
by 1 / (kept mass). The report measures both effects per layer: the share of tokens that had a
removed expert in their top-k (they are re-routed) and the share of the routed weight that
went to kept experts.

Runs in the sequential :class:`~llmprune.engine.sequential.LayerWalk` like OSSCAR: one layer
on the device, routing statistics from the outputs of the layers already pruned, the layer's
experts removed, its new outputs fed to the next layer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmprune.engine.sequential import LayerWalk
from llmprune.engine.stats import NO_STATS
from llmprune.errors import LLMPruneError
from llmprune.models.adapter import (
    MoEBlock,
    PerExpertLinears,
    decoder_layers,
    moe_blocks,
    text_config,
)
from llmprune.models.loading import BUNDLED, cache_dir
from llmprune.structured import expert_mlp
from llmprune.structured.osscar import mlp_width
from llmprune.structured.shrink import set_tensor

# Config attributes that hold the number of routed experts, as the families spell them.
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


@dataclass(frozen=True)
class MoEConfig:
    """What the config says about routing."""

    key: str  # the attribute that holds the routed-expert count
    num_experts: int
    top_k: int
    norm_topk_prob: bool | None  # None: not an option of this family (Mixtral always renormalises)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def moe_config(config) -> MoEConfig:
    """The routed-expert count and top-k of ``config`` (a transformers config), or a clear error
    for a dense model or a routing the removal would break."""
    text = text_config(config)
    kind = getattr(text, "model_type", type(text).__name__)
    key = next((k for k in EXPERT_COUNT_KEYS if _int(getattr(text, k, None)) and getattr(text, k) > 0), None)
    if key is None:
        raise LLMPruneError(f"--method experts needs a mixture-of-experts model; this {kind} model has no routed "
                            f"experts (its config has none of {', '.join(EXPERT_COUNT_KEYS)}); use --method "
                            "osscar or depth")
    top_k = getattr(text, "num_experts_per_tok", None)
    if not _int(top_k) or top_k < 1:
        raise LLMPruneError(f"{kind}: the config has no integer num_experts_per_tok (experts per token), which "
                            "expert removal must keep below the expert count")
    groups = getattr(text, "n_group", None)
    if _int(groups) and groups > 1:
        raise LLMPruneError(f"{kind} routes within {groups} expert groups (n_group); removing experts would "
                            "unbalance the groups, so expert removal does not support grouped routing")
    norm = getattr(text, "norm_topk_prob", None)
    return MoEConfig(key, getattr(text, key), top_k, norm if isinstance(norm, bool) else None)


def experts_removed(moe: MoEConfig, ratio: float) -> int:
    """Experts removed per layer for a share ``ratio`` of them (nearest count), or a clear error
    when that is none or leaves fewer than the top-k."""
    n = moe.num_experts
    removed = int(ratio * n + 0.5)
    if removed < 1:
        raise LLMPruneError(f"ratio {ratio:g} of {n} experts removes none (it rounds to 0); use --ratio ≥ "
                            f"{0.5 / n:.3g}")
    return _check_kept(moe, removed, f"ratio {ratio:g}", f"--ratio ≤ {(n - moe.top_k) / n:.3g}")


def _check_kept(moe: MoEConfig, removed: int, what: str, fix: str) -> int:
    n, k = moe.num_experts, moe.top_k
    if n - removed < k:
        raise LLMPruneError(f"{what} would remove {removed} of the {n} experts per layer; at most {n - k} can go, "
                            f"since every token is routed to {k} (num_experts_per_tok); use {fix}")
    return removed


def check_source(name_or_path: str, ratio: float | None, trust_remote_code: bool = False) -> None:
    """The config-only checks (a MoE model, a ratio that keeps ≥ top-k experts), before the model
    loads, wherever its config.json is on disk; the rest waits for :func:`plan_experts`."""
    d = cache_dir() / name_or_path if name_or_path in BUNDLED else Path(name_or_path).expanduser()
    if not (d / "config.json").is_file():
        return  # a hub id or a GGUF file: checked once loaded
    from transformers import AutoConfig

    moe = moe_config(AutoConfig.from_pretrained(d, trust_remote_code=trust_remote_code))
    if ratio is not None:
        experts_removed(moe, ratio)


def expert_params(mb: MoEBlock) -> int:
    """Parameters one expert owns in ``mb``: its slices of the fused tensors and its router row(s)."""
    n = mb.num_experts
    return sum(t.numel() // n for mod, nested in ((mb.experts, False), (mb.router, True))
               for _, _, t, _ in _expert_tensors(mod, n, nested))


@dataclass
class ExpertsPlan:
    """What expert removal will do, known before any data is read."""

    moe: MoEConfig
    removed: int  # experts removed from every MoE layer
    width: int | None = None  # --expert-mlp-ratio: every kept expert's intermediate width after
    intermediate: int | None = None  # ... and before
    width_key: str | None = None  # the config attribute that holds it

    @property
    def kept(self) -> int:
        return self.moe.num_experts - self.removed


def plan_experts(model: nn.Module, ratio: float | None, param_ratio: float | None,
                 total_params: int, mlp_ratio: float | None = None, round_to: int = 64) -> ExpertsPlan:
    """Every model-dependent check of expert removal, before any data: the count per layer,
    uniform expert counts, a supported MoE layout; with ``mlp_ratio`` (OSSCAR inside the kept
    experts) the width, which ``param_ratio`` then counts as removed before the experts."""
    moe = moe_config(model.config)
    blocks = {i: moe_blocks(layer) for i, layer in enumerate(decoder_layers(model))}
    blocks = {i: b for i, b in blocks.items() if b}
    if not blocks:
        raise LLMPruneError(f"--method experts: no MoE block found in the decoder layers of {type(model).__name__}")
    counts = sorted({mb.num_experts for bs in blocks.values() for mb in bs})
    if counts != [moe.num_experts]:
        raise LLMPruneError(f"the MoE blocks hold {counts} experts but config.{moe.key} says {moe.num_experts}; "
                            "expert removal keeps one count for every layer")
    first = next(iter(blocks.values()))[0]
    width = inter = key = None
    shrunk = 0  # parameters OSSCAR takes from each kept expert
    if mlp_ratio is not None:
        inter = {expert_mlp.check_expert_layout(mb) for bs in blocks.values() for mb in bs}
        if len(inter) != 1:
            raise LLMPruneError(f"the experts' widths differ between layers ({sorted(inter)}); "
                                "--expert-mlp-ratio keeps one width")
        inter = inter.pop()
        key = expert_mlp.expert_width_key(model, inter)
        width = mlp_width(inter, mlp_ratio, round_to, "expert channel")
        shrunk = expert_mlp.expert_mlp_params(first) * (inter - width) // inter
    if ratio is not None:
        removed = experts_removed(moe, ratio)
    else:
        per_expert = expert_params(first)
        n_blocks = sum(len(b) for b in blocks.values())
        budget = param_ratio * total_params / n_blocks - moe.num_experts * shrunk  # per layer, beyond the shrink
        removed = round(budget / (per_expert - shrunk))
        if removed < 1:
            also = " beside --expert-mlp-ratio's" if shrunk else ""
            raise LLMPruneError(f"param_ratio {param_ratio:g} is less than one expert per MoE layer{also} "
                                f"({n_blocks * per_expert / total_params:.4f} of the parameters per expert removed "
                                "from every layer)")
        most = (moe.num_experts * shrunk + (moe.num_experts - moe.top_k) * (per_expert - shrunk)) \
            * n_blocks / total_params
        removed = _check_kept(moe, removed, f"param_ratio {param_ratio:g}", f"--param-ratio ≤ {most:.3g}")
    return ExpertsPlan(moe, removed, width, inter, key)


# --- routing statistics -----------------------------------------------------------------------
class RoutingStats:
    """Per expert of one MoE block, over the calibration tokens: tokens routed (``count``),
    Σ g·‖f‖ (``reap_sum``), Σ g (``gate_sum``), and every token's top-k (indices, weights).

    Hooks on the per-expert view (:class:`~llmprune.models.adapter.PerExpertLinears`): a
    pre-hook records the routing the block passes its experts, a hook on each expert's
    ``down_proj`` the expert's output for the tokens routed to it (in the order the view
    computes them, ``torch.where(top_k_index == e)``).
    """

    def __init__(self, mb: MoEBlock):
        view = mb.block.experts
        if not isinstance(view, PerExpertLinears):
            raise ValueError("routing statistics need the per-expert view: collect inside the LayerWalk")
        n = mb.num_experts
        self.count = torch.zeros(n, dtype=torch.float64)
        self.reap_sum = torch.zeros(n, dtype=torch.float64)
        self.gate_sum = torch.zeros(n, dtype=torch.float64)
        self.top_k_index: list[torch.Tensor] = []
        self.top_k_weight: list[torch.Tensor] = []
        self._route: tuple[torch.Tensor, torch.Tensor] | None = None
        post_norm = view.fused.post_expert_norm if getattr(view.fused, "has_post_expert_norm", False) else None
        self._handles = [view.register_forward_pre_hook(self._routing)]
        self._handles += [expert.down_proj.register_forward_hook(self._output(e, post_norm))
                          for e, expert in enumerate(view)]

    def _routing(self, _module, args) -> None:
        _, index, weight = args[:3]
        self._route = (index, weight)
        self.top_k_index.append(index.to("cpu", torch.int32))
        self.top_k_weight.append(weight.detach().to("cpu", torch.float32))

    def _output(self, e: int, post_norm):
        @torch.no_grad()
        def hook(_module, _args, y):
            index, weight = self._route
            token, slot = torch.where(index == e)
            if post_norm is not None:
                y = post_norm(y)
            g = weight[token, slot].double()
            norm = torch.linalg.vector_norm(y.double(), dim=-1)
            self.count[e] += token.numel()
            self.reap_sum[e] += float((g * norm).sum())
            self.gate_sum[e] += float(g.sum())
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._route = None

    def routing(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every calibration token's ``(top-k indices, top-k weights)``."""
        return torch.cat(self.top_k_index), torch.cat(self.top_k_weight)


def expert_scores(stats: RoutingStats, score: str, seed: int = 0) -> torch.Tensor:
    """Saliency of each expert (higher = keep): REAP's mean g·‖f‖ over the tokens routed to it
    (0 for an expert no token reached), the token count, or a seeded random draw."""
    if score == "reap":
        return torch.where(stats.count > 0, stats.reap_sum / stats.count.clamp(min=1), 0.0)
    if score == "frequency":
        return stats.count.clone()
    if score == "random":
        return torch.rand(len(stats.count), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    raise ValueError(f"unknown expert score {score!r}")


def keep_experts(scores: torch.Tensor, kept: int) -> torch.Tensor:
    """The ``kept`` experts of highest score, in their original order (ties: lower index)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:kept].sort().values


def removal_effect(index: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor) -> dict:
    """What removing the other experts does to the calibration routing: the share of tokens with
    a removed expert in their top-k (re-routed) and the share of routed weight kept."""
    kept = torch.zeros(int(max(index.max(), keep.max())) + 1, dtype=torch.bool)
    kept[keep] = True
    hit = kept[index.long()]
    return {"rerouted_share": float((~hit).any(dim=-1).double().mean()),
            "routed_weight_kept": float(weight[hit].double().sum() / weight.double().sum())}


# --- shrink -----------------------------------------------------------------------------------
def _expert_tensors(mod: nn.Module, n: int, nested: bool) -> Iterator[tuple[nn.Module, str, torch.Tensor, int]]:
    """``(owner, name, tensor, dim)`` for every parameter / buffer of ``mod`` indexed by expert:
    the experts' fused tensors along their first dimension; in a router (``nested``: its
    submodules too, e.g. Ernie's score-correction statistics) the first dimension of size ``n``
    (router weight rows, bias, a ``(1, n)`` correction bias)."""
    for _, owner in (mod.named_modules() if nested else [("", mod)]):
        for name, t in [*owner.named_parameters(recurse=False), *owner.named_buffers(recurse=False)]:
            if nested:
                dim = next((d for d, size in enumerate(t.shape) if size == n), None)
            else:
                dim = 0 if t.dim() >= 1 and t.shape[0] == n else None
            if dim is not None:
                yield owner, name, t, dim


def _slice_experts(mod: nn.Module, n: int, keep: torch.Tensor, nested: bool) -> None:
    """Keep entries ``keep`` of every tensor of ``mod`` indexed by expert (:func:`_expert_tensors`)."""
    for owner, name, t, dim in list(_expert_tensors(mod, n, nested)):
        set_tensor(owner, name, t.data.index_select(dim, keep.to(t.device)).contiguous())
    for owner in (mod.modules() if nested else [mod]):
        for attr in ("num_experts", "num_local_experts", "out_features"):  # the modules' own counts
            if getattr(owner, attr, None) == n and _int(getattr(owner, attr)):
                setattr(owner, attr, len(keep))


@torch.no_grad()
def remove_experts(mb: MoEBlock, keep: torch.Tensor) -> MoEBlock:
    """Keep only the experts ``keep`` of ``mb``, in place: the fused tensors, the router's rows
    (and bias / score-correction bias), the modules' expert counts. Returns the new block entry.
    Inside the LayerWalk the per-expert view is rebuilt on the new tensors."""
    n = mb.num_experts
    keep = torch.as_tensor(keep, dtype=torch.long).cpu()
    if keep.numel() == 0 or keep.min() < 0 or keep.max() >= n or keep.unique().numel() != keep.numel():
        raise ValueError(f"keep must be distinct expert indices in [0, {n})")
    _slice_experts(mb.experts, n, keep, nested=False)
    _slice_experts(mb.router, n, keep, nested=True)
    if getattr(mb.block, "num_experts", None) == n:
        mb.block.num_experts = len(keep)
    if isinstance(mb.block.experts, PerExpertLinears):  # the view aliases the old tensors
        mb.block.experts = PerExpertLinears(mb.experts)
    return MoEBlock(mb.name, mb.block, mb.router, mb.experts, len(keep))


def set_config(model: nn.Module, key: str, value: int) -> None:
    """Write ``key`` (the expert count, the experts' width) into the config and the text config's
    parent."""
    config = model.config
    text = text_config(config)
    for c in {id(config): config, id(text): text}.values():
        if hasattr(c, key):
            setattr(c, key, value)
    if getattr(text, key) != value:
        raise RuntimeError(f"config.{key} did not take the new value {value}")


# --- greedy selection by the block's output error ---------------------------------------------
@contextmanager
def routed_to(mb: MoEBlock, keep: torch.Tensor) -> Iterator[None]:
    """Inside the block, ``mb`` routes as if only the experts ``keep`` were left: the router's
    rows (and biases) are sliced, so its softmax / top-k / renormalisation run over the kept
    experts exactly as in the shrunk model, and a pre-hook maps the router's kept-expert
    indices back to the experts' own. The expert tensors are not copied."""
    n = mb.num_experts
    saved = [(owner, name, t) for owner, name, t, _ in _expert_tensors(mb.router, n, nested=True)]
    counts = [(m, a, getattr(m, a)) for m in mb.router.modules()
              for a in ("num_experts", "num_local_experts", "out_features") if hasattr(m, a)]
    _slice_experts(mb.router, n, keep, nested=True)
    back = keep.to(mb.experts.down_proj.device)

    def remap(_module, args):
        return (args[0], back[args[1]], *args[2:])

    handle = mb.block.experts.register_forward_pre_hook(remap)
    try:
        yield
    finally:
        handle.remove()
        for owner, name, t in saved:
            set_tensor(owner, name, t)
        for m, a, v in counts:
            setattr(m, a, v)


def block_output(mb: MoEBlock, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The block's output for each captured input batch ``(rows, seq, hidden)`` (the hidden
    states only, where a block also returns its router scores, e.g. GPT-OSS)."""
    outs = [mb.block(x) for x in xs]
    return [y[0] if isinstance(y, tuple) else y for y in outs]


def output_error(mb: MoEBlock, xs: list[torch.Tensor], ys: list[torch.Tensor], keep: torch.Tensor) -> float:
    """‖Y − Ŷ‖² over the calibration tokens, Ŷ the block's output with only ``keep`` routed."""
    with routed_to(mb, keep):
        return sum(float((y - yhat).double().pow(2).sum()) for y, yhat in zip(ys, block_output(mb, xs), strict=True))


def greedy_output_removal(mb: MoEBlock, xs: list[torch.Tensor], removed: int, salience: torch.Tensor,
                          candidates: int) -> tuple[torch.Tensor, list[float]]:
    """Remove ``removed`` experts one at a time, each time the one whose removal (with every
    token re-routed among the experts left) changes the block's output least; the
    ``candidates`` least salient experts left (by ``salience``, REAP's) are tried at each step.
    Returns the kept experts and the relative output error after each step."""
    ys = block_output(mb, xs)
    total = sum(float(y.double().pow(2).sum()) for y in ys)
    keep = list(range(mb.num_experts))
    errors = []
    for _ in range(removed):
        tried = sorted(keep, key=lambda e: (float(salience[e]), e))[:candidates]
        errs = {j: output_error(mb, xs, ys, torch.tensor([e for e in keep if e != j])) for j in tried}
        j = min(errs, key=lambda e: (errs[e], e))
        keep.remove(j)
        errors.append(errs[j] / total)
    return torch.tensor(keep), errors


# --- the walk ---------------------------------------------------------------------------------
@torch.no_grad()
def run_experts(model: nn.Module, ids: torch.Tensor, plan: ExpertsPlan, score: str, seed: int = 0,
                device: str | torch.device = "cpu", progress: bool = True, candidates: int = 16,
                osscar: dict | None = None) -> dict:
    """Remove ``plan.removed`` experts from every MoE layer, layer by layer; the report's
    ``experts`` part. Every layer's entry has the relative output error ‖Y − Ŷ‖² / ‖Y‖² of its
    MoE block on the calibration tokens (Y with every expert, Ŷ with the kept ones). With
    ``plan.width`` every kept expert's MLP is then shrunk by OSSCAR (``osscar``: its options)."""
    walk = LayerWalk(model, ids, device, f"experts ({score})", progress)
    entries = []
    for i, layer in walk:
        blocks = moe_blocks(layer)
        if not blocks:
            continue  # a dense layer (e.g. mlp_only_layers): the walk just feeds it forward
        t0 = time.perf_counter()
        stats = [RoutingStats(mb) for mb in blocks]
        inputs: list[list[torch.Tensor]] = [[] for _ in blocks]
        hooks = [mb.block.register_forward_pre_hook(lambda _m, a, xs=xs: xs.append(a[0]))
                 for mb, xs in zip(blocks, inputs, strict=True)]
        try:
            walk.collect(layer, NO_STATS)  # the dense layer's forward; the walk then re-runs the pruned one
        finally:
            for h in [*stats, *hooks]:
                h.remove()
        for mb, s, xs in zip(blocks, stats, inputs, strict=True):
            saliency = expert_scores(s, "reap")
            steps = None
            if score == "output":
                keep, steps = greedy_output_removal(mb, xs, plan.removed, saliency, candidates)
            else:
                keep = keep_experts(expert_scores(s, score, seed + i), plan.kept)
            ys = block_output(mb, xs)
            error = output_error(mb, xs, ys, keep) / sum(float(y.double().pow(2).sum()) for y in ys)
            del ys
            index, weight = s.routing()
            kept_mb = remove_experts(mb, keep)
            mlp = (expert_mlp.shrink_expert_mlps(kept_mb, xs, plan.width, **(osscar or {}))
                   if plan.width is not None else None)
            del xs[:]
            removed = sorted(set(range(mb.num_experts)) - set(keep.tolist()))
            entries.append({"index": i, "block": mb.name, "removed": removed, "kept": keep.tolist(),
                            "output_error": error, **({"greedy_errors": steps} if steps else {}),
                            **({"expert_mlp": mlp} if mlp else {}),
                            "tokens": int(index.shape[0]), "tokens_routed": s.count.long().tolist(),
                            "reap": saliency.tolist(), "gate_sum": s.gate_sum.tolist(),
                            **removal_effect(index, weight, keep), "seconds": time.perf_counter() - t0})
    set_config(model, plan.moe.key, plan.kept)
    if plan.width is not None:
        set_config(model, plan.width_key, plan.width)
    mean = {k: sum(e[k] for e in entries) / len(entries)
            for k in ("output_error", "rerouted_share", "routed_weight_kept")}
    return {"score": score, "config_key": plan.moe.key,
            "num_experts": {"before": plan.moe.num_experts, "after": plan.kept},
            "top_k": plan.moe.top_k, "norm_topk_prob": plan.moe.norm_topk_prob,
            "removed_ratio": plan.removed / plan.moe.num_experts,
            "router": "softmax over the kept experts (the router's rows of removed experts are deleted)",
            **({"expert_mlp": {"config_key": plan.width_key, "width": {"before": plan.intermediate,
                                                                       "after": plan.width},
                               "mean_recon_error": sum(e["expert_mlp"]["mean_recon_error"] for e in entries)
                               / len(entries)}} if plan.width is not None else {}),
            **{f"mean_{k}": v for k, v in mean.items()}, "layers": entries}
