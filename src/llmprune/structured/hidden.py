"""Hidden-size pruning (``--method hidden``): remove residual-stream channels everywhere.

A hidden channel is a column of the embedding (and of a tied LM head), one entry of every
RMSNorm on the stream, an input column of every linear that reads the stream (q/k/v,
gate/up, the LM head) and an output row of every linear that writes it (o_proj, down_proj).
The layout comes from the model itself (:mod:`llmprune.models.residual`); the result is the
same family with a smaller ``hidden_size`` (``head_dim`` written explicitly).

Writers lose rows exactly: the kept channels of the stream evolve as before. What changes is
what the **readers** see. Each read is ``y = g ⊙ x / rms(x)`` feeding consumers ``W``; after
pruning it is ``y' = g_S ⊙ x_S / rms_S(x)``, where ``rms_S`` averages over the kept channels
only, so every kept entry is scaled by ``rms(x) / rms_S(x) = √(d'/(d(1 − f(x))))`` (``f``: the
removed channels' share of the token's energy) — a per-token factor, not just fewer inputs.

Two passes over the calibration data, each one decoder layer at a time on the *dense* model
(the engine's :class:`~llmprune.engine.sequential.LayerWalk`; the final norm on the last
layer's outputs):

1. **Selection statistics**: per read ``H = Σ y yᵀ`` (the consumers' inputs). Channels are
   chosen by OSSCAR's objective summed over every read, ``Σ_r E_r(R) / E_r(all)`` with
   ``E_r(R) = min ‖Y W_rᵀ − Y_S Ŵᵀ‖² + λ‖W_r − Ŵ‖²`` (each reader's output error with its
   best re-fit, relative to its output energy so that every reader counts alike): greedy
   removal and local search (:mod:`~llmprune.structured.osscar`, several problems sharing
   the channels). ``greedy=False`` uses Minitron's importance instead (Σ over the layers'
   norms of the L2 over calibration rows of the token-mean ``|y_j|``, as NVIDIA ModelOpt
   computes it).
2. **Re-fit statistics** for the chosen S: per read, the pruned input ``b = norm_S(x_S)``
   (the sliced norm run on the sliced stream, RMS change included) against the dense one
   ``a = y``: ``Σ bbᵀ``, ``Σ baᵀ``. Each untied consumer is re-fitted by least squares,
   ``W' = argmin ‖a Wᵀ − b W'ᵀ‖² + λ‖W' − W_S‖²`` (``shrink`` pulls ``Σ bbᵀ`` and ``Σ baᵀ``
   toward their diagonal part as for OSSCAR; at 1 the fit is a per-channel scale). A tied LM
   head cannot be re-fitted apart from the embedding: the final norm's gains are fitted
   instead (``min ‖E a − E_S(κ ⊙ b)‖²`` over κ). Gemma's writer norms (applied to o_proj /
   down outputs before the residual add) get per-channel gains the same way.

Without ``refit`` there is no second pass: the consumers keep their columns and each norm
only gets the scalar that undoes the mean RMS change, ``g' = g_S · √(d(1 − f̄)/d')`` (f̄: the
removed channels' mean share of the norm input's energy, from pass 1). Gemma multiplies the
embedding by √hidden_size (from the config): the kept columns are scaled by √(d/d') so the
stream starts as before.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from llmprune.engine.sequential import LayerWalk
from llmprune.engine.stats import NO_STATS
from llmprune.errors import LLMPruneError
from llmprune.models.adapter import decoder_layers, text_config
from llmprune.models.residual import ResidualLayout, residual_layout
from llmprune.structured.osscar import (
    DTYPE,
    damped,
    greedy_remove,
    local_search,
    mlp_width,
    objective,
    shrunk,
)
from llmprune.structured.shrink import config_rejects, keep_columns, keep_rows


@dataclass(frozen=True)
class HiddenPlan:
    """The hidden size kept, known before any data is read."""

    layout: ResidualLayout
    hidden: int
    kept: int


def channel_params(model: nn.Module, layout: ResidualLayout) -> int:
    """Parameters one hidden channel owns (every one of them goes with it)."""
    layers = decoder_layers(model)
    layer = layers[0]
    n = model.get_submodule(layout.embed).num_embeddings
    if not layout.tied:
        n += model.get_submodule(layout.final.consumers[0]).out_features
    per_layer = 0
    for r in layout.reads:
        per_layer += 1 + sum(layer.get_submodule(c).out_features for c in r.consumers)
    for w in layout.writers:
        lin = layer.get_submodule(w.linear)
        per_layer += lin.in_features + (lin.bias is not None) + (w.norm is not None)
    return n + 1 + len(layers) * per_layer


def plan_hidden(model: nn.Module, ratio: float | None, param_ratio: float | None, round_to: int,
                total_params: int) -> HiddenPlan:
    """The kept hidden size for ``ratio`` (share of hidden_size) or ``param_ratio`` (share of all
    parameters), rounded to ``round_to``; or one clear error (MoE, LayerNorm, unknown layout)."""
    layout = residual_layout(model)
    d = layout.hidden
    if ratio is not None:
        return _expressible(model, HiddenPlan(layout, d, mlp_width(d, ratio, round_to, what="hidden channel")),
                            round_to)
    per = channel_params(model, layout)
    share = param_ratio * total_params / (per * d)
    if share >= 1:
        raise LLMPruneError(f"param_ratio {param_ratio:g} needs more than all {d} hidden channels "
                            f"(at most {per * d / total_params:.3f})")
    try:
        plan = HiddenPlan(layout, d, mlp_width(d, share, round_to, what="hidden channel"))
    except LLMPruneError as e:
        raise LLMPruneError(f"param_ratio {param_ratio:g} is {share:.3g} of the hidden channels: {e}") from None
    return _expressible(model, plan, round_to)


def _expressible(model: nn.Module, plan: HiddenPlan, round_to: int) -> HiddenPlan:
    """The plan, if the model's config accepts its hidden size; else one line naming the nearest
    sizes it does accept (multiples of ``round_to``)."""
    why = config_rejects(model, hidden_size=plan.kept)
    if why is None:
        return plan
    ok = [w for w in range(round_to, plan.hidden, round_to) if config_rejects(model, hidden_size=w) is None]
    near = sorted(ok, key=lambda w: abs(w - plan.kept))[:2]
    hint = (f"the nearest it accepts (multiples of --round-to {round_to}): {' or '.join(map(str, sorted(near)))}"
            if near else f"no multiple of --round-to {round_to} below {plan.hidden} is accepted")
    raise LLMPruneError(f"hidden size {plan.kept} is not one {type(text_config(model)).__name__} accepts ({why}); "
                        f"{hint}: choose --ratio / --param-ratio or --round-to to land there")


# --- statistics ---------------------------------------------------------------------------------
def _sliced_norm(norm: nn.Module, keep: torch.Tensor) -> nn.Module:
    """A copy of ``norm`` over the kept channels: what the pruned model will compute."""
    out = copy.deepcopy(norm)
    out.weight = nn.Parameter(norm.weight.detach()[keep.to(norm.weight.device)].clone(), requires_grad=False)
    return out


class NormStats:
    """Hooks on one norm, accumulated over every calibration token.

    - no ``keep`` (pass 1): ``share`` = Σ_t x_j² / ‖x‖² (each channel's share of the norm
      input's energy); with ``select`` also ``H = Σ y yᵀ`` of the output (unless ``gram`` is
      off: the engine's XᵀX of a consumer is the same) and Minitron's statistic (per
      calibration row the token mean of |y|, squared and summed over rows);
    - ``keep`` (pass 2): ``b = norm_S(x_S)`` against ``a = y``: ``Cbb = Σ bbᵀ``, ``Cba = Σ baᵀ``
      (``diag``: only their per-channel diagonal, ``Σ b_j a_{S_j}`` and ``Σ b_j²``)."""

    def __init__(self, norm: nn.Module, keep: torch.Tensor | None = None, select: bool = False,
                 diag: bool = False, gram: bool = True):
        self.keep, self.select, self.diag, self.gram, self.tokens = keep, select, diag, gram, 0
        self.H = self.Cbb = self.Cba = self.minitron = self.share = None
        self._x = None
        self._sliced = _sliced_norm(norm, keep) if keep is not None else None
        self._handles = [norm.register_forward_pre_hook(self._pre), norm.register_forward_hook(self._post)]

    def _pre(self, _m, args):
        self._x = args[0]

    @staticmethod
    def _add(acc: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
        return value if acc is None else acc.add_(value)

    @torch.no_grad()
    def _post(self, _m, _args, out):
        x, self._x = self._x, None
        d = out.shape[-1]
        a = out.reshape(-1, d).float()
        self.tokens += a.shape[0]
        if self.keep is None:
            e = x.reshape(-1, d).float().pow(2)
            self.share = self._add(self.share, (e / e.sum(1, keepdim=True).clamp_min(1e-30)).sum(0))
            if self.select:
                if self.gram:
                    self.H = self._add(self.H, a.T @ a)
                self.minitron = self._add(self.minitron, out.float().abs().mean(-2).reshape(-1, d).pow(2).sum(0))
            return
        keep = self.keep.to(x.device)
        self._sliced.to(x.device)  # made where the norm was; the walk may have moved the norm since
        b = self._sliced(x[..., keep]).reshape(-1, keep.numel()).float()
        if self.diag:
            self.Cbb = self._add(self.Cbb, (b * b).sum(0))
            self.Cba = self._add(self.Cba, (b * a[:, keep]).sum(0))
        else:
            self.Cbb = self._add(self.Cbb, b.T @ b)
            self.Cba = self._add(self.Cba, b.T @ a)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def run_final_norm(model: nn.Module, layout: ResidualLayout, inps: torch.Tensor) -> None:
    """Feed the last layer's outputs through the final norm, so that hooks on it see them."""
    norm = model.get_submodule(layout.final.norm)
    home = norm.weight.device
    norm.to(inps.device)
    try:
        with torch.no_grad():
            for j in range(inps.shape[0]):
                norm(inps[j : j + 1])
    finally:
        norm.to(home)


@dataclass
class HiddenStats:
    """Pass 1 over the dense model: per layer and read ``H`` and ``share``, per writer norm its
    ``share``; the final norm's; Minitron's importance; OSSCAR's problem per read (with greedy)."""

    reads: list[list[NormStats]] = field(default_factory=list)
    writers: list[dict[str, NormStats]] = field(default_factory=list)
    final: NormStats | None = None
    minitron: torch.Tensor | None = None
    problems: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


def _consumer_weight(module: nn.Module, names: tuple[str, ...]) -> torch.Tensor:
    """The consumers' weights stacked, ``(Σ out, d)`` float32."""
    return torch.cat([module.get_submodule(n).weight.detach().float() for n in names])


def reader_problem(W: torch.Tensor, H: torch.Tensor, percdamp: float, shrink: float):
    """OSSCAR's problem for one read, ``(F, P)`` with ``F Fᵀ = WᵀW`` (d × d, however many
    outputs the consumers have) scaled so the read's dense output energy is 1."""
    H64 = H.to(DTYPE)
    K = (W.T @ W).to(DTYPE)  # float32 product: the LM head has vocab-many rows
    energy = float((K * H64).sum())
    lam, U = torch.linalg.eigh(K)
    F = U * lam.clamp_min(0).sqrt() / math.sqrt(max(energy, 1e-300))
    _, P, _ = damped(shrunk(H64, shrink), percdamp)
    return F, P


@torch.no_grad()
def collect_stats(model: nn.Module, ids: torch.Tensor, layout: ResidualLayout, problems: bool, percdamp: float,
                  shrink: float, device: str | torch.device = "cpu", progress: bool = True) -> HiddenStats:
    """Pass 1 (one decoder layer at a time on the dense model, then the final norm)."""
    walk = LayerWalk(model, ids, device, "hidden: statistics", progress)
    st = HiddenStats(minitron=torch.zeros(layout.hidden, dtype=DTYPE))
    for _i, layer in walk:
        reads = [NormStats(layer.get_submodule(r.norm), select=True) for r in layout.reads]
        writers = {w.norm: NormStats(layer.get_submodule(w.norm)) for w in layout.writers if w.norm}
        try:
            walk.collect(layer, NO_STATS, propagate=True)
        finally:
            for s in [*reads, *writers.values()]:
                s.remove()
        st.reads.append(reads)
        st.writers.append(writers)
        for r, s in zip(layout.reads, reads, strict=True):
            st.minitron += s.minitron.sqrt().to(DTYPE).cpu()
            s.minitron = None
            if problems:
                st.problems.append(reader_problem(_consumer_weight(layer, r.consumers), s.H, percdamp, shrink))
    st.final = NormStats(model.get_submodule(layout.final.norm), select=True)
    try:
        run_final_norm(model, layout, walk.inps)
    finally:
        st.final.remove()
    if problems:
        head = _consumer_weight(model, layout.final.consumers).to(st.final.H.device)
        st.problems.append(reader_problem(head, st.final.H, percdamp, shrink))
    return st


def choose_channels(st: HiddenStats, d: int, kept: int, options, order: list[int] | None = None
                    ) -> tuple[torch.Tensor, dict]:
    """The kept channels (ascending) and how they were chosen: greedy + local search on the
    summed objective, or Minitron's importance (``options.greedy`` off)."""
    t0 = time.perf_counter()
    info: dict = {}
    if options.greedy:
        Fs, Ps = [p[0] for p in st.problems], [p[1] for p in st.problems]
        removed = greedy_remove(Fs, Ps, d - kept, options.greedy_block, order=order)
        info["objective"] = {"greedy": objective(Fs, Ps, removed)}
        swaps = 0
        if options.local_search:
            removed, swaps = local_search(Fs, Ps, removed, options.swaps, options.candidates)
            info["objective"]["local_search"] = objective(Fs, Ps, removed)
        info.update(selection="greedy (OSSCAR objective summed over every reader, each relative)", swaps=swaps)
    else:
        removed = torch.ones(d, dtype=torch.bool)
        removed[torch.topk(st.minitron, kept).indices] = False
        info["selection"] = "Minitron importance (Σ over layer norms of the rows' L2 of mean |y|)"
    info["select_s"] = time.perf_counter() - t0
    return (~removed).nonzero().squeeze(1).cpu(), info


# --- fits and shrinking -------------------------------------------------------------------------
def fit_consumers(W: torch.Tensor, Cbb: torch.Tensor, Cba: torch.Tensor, keep: torch.Tensor,
                  shrink: float, percdamp: float) -> torch.Tensor:
    """``W' (out, d')`` = argmin ‖a Wᵀ − b W'ᵀ‖² + λ‖W' − W_S‖² from ``Σ bbᵀ`` and ``Σ baᵀ``,
    both pulled toward their diagonal part by ``shrink`` (1: a per-channel scale of W_S)."""
    Cbb, Cba = Cbb.to(DTYPE), Cba.to(DTYPE)
    n = keep.numel()
    rows = torch.arange(n, device=Cbb.device)
    diag = torch.diagonal(Cbb)
    A = (1 - shrink) * Cbb + shrink * torch.diag(diag)
    B = (1 - shrink) * Cba
    B[rows, keep] += shrink * Cba[rows, keep]
    lam = percdamp * float(diag.mean())
    rhs = (B.float() @ W.float().T).to(DTYPE) + lam * W[:, keep].T.to(DTYPE)
    A = A + lam * torch.eye(n, dtype=DTYPE, device=A.device)
    L, info = torch.linalg.cholesky_ex(A)
    return (torch.cholesky_solve(rhs, L) if info == 0 else torch.linalg.solve(A, rhs)).T


def relative_error(W: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor, Cbb: torch.Tensor,
                   Cba: torch.Tensor) -> float:
    """‖a Wᵀ − b W'ᵀ‖² / ‖a Wᵀ‖² on the calibration tokens, from the accumulated statistics."""
    dev = H.device  # the statistics' device; the weights may still be on the CPU
    W, W_new, Cbb, Cba = W.float().to(dev), W_new.float().to(dev), Cbb.to(dev), Cba.to(dev)
    dense = float(((W.T @ W).to(DTYPE) * H.to(DTYPE)).sum())
    cross = float(((W_new.T @ W).to(DTYPE) * Cba.to(DTYPE)).sum())
    own = float(((W_new.T @ W_new).to(DTYPE) * Cbb.to(DTYPE)).sum())
    return max(0.0, dense - 2 * cross + own) / dense if dense > 0 else 0.0


def rms_scale(share: NormStats, keep: torch.Tensor, d: int) -> float:
    """√(d(1 − f̄)/d'): the gain factor that undoes the mean RMS change of a norm's output."""
    if keep.numel() == d:
        return 1.0  # nothing removed: exactly nothing changes
    f = 1 - float(share.share[keep.to(share.share.device)].sum()) / share.tokens
    return math.sqrt(d * max(1 - f, 1e-12) / keep.numel())


def _gain(norm: nn.Module, offset: float, keep: torch.Tensor) -> torch.Tensor:
    return (offset + norm.weight.detach().to(DTYPE))[keep.to(norm.weight.device)]


def _set_gain(norm: nn.Module, offset: float, gain: torch.Tensor) -> None:
    w = norm.weight
    norm.weight = nn.Parameter((gain - offset).to(device=w.device, dtype=w.dtype).contiguous(), requires_grad=False)


@torch.no_grad()
def shrink_layer(layer: nn.Module, layout: ResidualLayout, keep: torch.Tensor, d: int,
                 reads: list[tuple[torch.Tensor | None, float]], writers: dict[str, torch.Tensor]) -> None:
    """Keep the hidden channels ``keep`` of one decoder layer, in place: per read either new
    consumer weights ``(W', 1)`` (stacked) or ``(None, scale)`` (the columns kept, the norm's
    gains scaled); writers lose rows, each writer norm's kept gains are multiplied by
    ``writers[name]`` (per channel or a scalar tensor)."""
    for r, (W_new, scale) in zip(layout.reads, reads, strict=True):
        norm = layer.get_submodule(r.norm)
        start = 0
        for name in r.consumers:
            lin = layer.get_submodule(name)
            n_out = lin.out_features
            keep_columns(lin, keep, None if W_new is None else W_new[start : start + n_out])
            start += n_out
        _set_gain(norm, r.offset, _gain(norm, r.offset, keep) * scale)
    for w in layout.writers:
        keep_rows(layer.get_submodule(w.linear), keep)
        if w.norm:
            norm = layer.get_submodule(w.norm)
            _set_gain(norm, w.offset, _gain(norm, w.offset, keep) * writers[w.norm].to(DTYPE).to(norm.weight.device))
    _resize_attributes(layer, d, keep.numel())


@torch.no_grad()
def shrink_ends(model: nn.Module, layout: ResidualLayout, keep: torch.Tensor, head: torch.Tensor | None,
                final_scale: torch.Tensor | float) -> None:
    """The embedding (scaled by √(d/d') where the model multiplies it by √hidden_size), the LM
    head (``head``: new weights of an untied head, None = its columns kept) and the final
    norm (kept gains × ``final_scale``); then the config."""
    d, n = layout.hidden, keep.numel()
    emb = model.get_submodule(layout.embed)
    lm = model.get_submodule(layout.final.consumers[0])
    norm = model.get_submodule(layout.final.norm)
    scale = math.sqrt(d / n) if abs(layout.embed_scale - 1) > 1e-4 else 1.0
    k = keep.to(emb.weight.device)
    new = nn.Parameter((emb.weight.detach()[:, k] * scale).contiguous(), requires_grad=False)
    if not layout.tied:
        keep_columns(lm, keep, head)
    emb.weight = new
    emb.embedding_dim = n
    if layout.tied:
        lm.weight = new
        lm.in_features = n
    if hasattr(emb, "embed_scale") and scale != 1.0:  # Gemma's buffer, as a reload sets it
        emb.embed_scale = torch.tensor(math.sqrt(n), dtype=emb.embed_scale.dtype, device=emb.embed_scale.device)
        emb.scalar_embed_scale = math.sqrt(n)
    if not isinstance(final_scale, torch.Tensor):
        final_scale = torch.tensor(final_scale, dtype=DTYPE)
    _set_gain(norm, layout.final.offset, _gain(norm, layout.final.offset, keep) * final_scale.to(DTYPE).to(
        norm.weight.device))
    _resize_attributes(model, d, n)
    set_hidden_size(model, n)


def shrink_scaled(model: nn.Module, layout: ResidualLayout, keep: torch.Tensor, st: HiddenStats) -> None:
    """No re-fit: slice everything, each norm's gains × :func:`rms_scale` (pass 1 only)."""
    d = layout.hidden
    for i, layer in enumerate(decoder_layers(model)):
        shrink_layer(layer, layout, keep, d, [(None, rms_scale(s, keep, d)) for s in st.reads[i]],
                     {name: torch.tensor(rms_scale(s, keep, d)) for name, s in st.writers[i].items()})
    emb_scale = math.sqrt(d / keep.numel()) if abs(layout.embed_scale - 1) > 1e-4 else 1.0
    # a tied head sees the scaled embedding: divide that out of the final gains
    shrink_ends(model, layout, keep, None, rms_scale(st.final, keep, d) / (emb_scale if layout.tied else 1.0))


@torch.no_grad()
def refit_and_shrink(model: nn.Module, ids: torch.Tensor, layout: ResidualLayout, keep: torch.Tensor,
                     st: HiddenStats, options, device: str | torch.device = "cpu",
                     progress: bool = True) -> tuple[list[dict], dict]:
    """Pass 2: per layer (dense model, dense outputs propagated) the pruned reads' statistics,
    the consumers re-fitted and the layer shrunk; then the ends. Returns per-layer and final
    report entries."""
    d, n = layout.hidden, keep.numel()
    walk = LayerWalk(model, ids, device, "hidden: re-fit and shrink", progress)
    entries = []
    for i, layer in walk:
        t0 = time.perf_counter()
        reads = [NormStats(layer.get_submodule(r.norm), keep) for r in layout.reads]
        wnorms = {w.norm: NormStats(layer.get_submodule(w.norm), keep, diag=True) for w in layout.writers if w.norm}
        try:
            walk.collect(layer, NO_STATS, propagate=True)  # dense outputs feed the next layer
        finally:
            for s in [*reads, *wnorms.values()]:
                s.remove()
        fits, entry = [], {"index": i, "reads": {}, "writer_norms": {}}
        for r, s, s1 in zip(layout.reads, reads, st.reads[i], strict=True):
            W = _consumer_weight(layer, r.consumers)
            k = keep.to(s.Cbb.device)
            W_new = fit_consumers(W.to(k.device), s.Cbb, s.Cba, k, options.shrink, options.percdamp)
            entry["reads"][r.norm] = {"recon_error": relative_error(W, W_new, s1.H, s.Cbb, s.Cba),
                                      "recon_error_sliced": relative_error(W, W[:, k], s1.H, s.Cbb, s.Cba),
                                      "removed_energy": 1 - float(s1.share[keep].sum()) / s1.tokens}
            fits.append((W_new.to(W.device), 1.0))
            s1.H = None
        kappas = {}
        for name, s in wnorms.items():
            kappas[name] = s.Cba.to(DTYPE) / s.Cbb.to(DTYPE).clamp_min(1e-30)
            entry["writer_norms"][name] = {"removed_energy": 1 - float(st.writers[i][name].share[keep].sum())
                                           / st.writers[i][name].tokens}
        shrink_layer(layer, layout, keep, d, fits, kappas)
        entry["seconds"] = time.perf_counter() - t0
        entries.append(entry)
    for entry, sec in zip(entries, walk.seconds, strict=True):
        entry["seconds_with_propagation"] = sec
    # the final norm on the dense last-layer outputs
    s = NormStats(model.get_submodule(layout.final.norm), keep)
    try:
        run_final_norm(model, layout, walk.inps)
    finally:
        s.remove()
    emb = model.get_submodule(layout.embed)
    W = model.get_submodule(layout.final.consumers[0]).weight.detach().float().to(s.Cbb.device)
    k = keep.to(s.Cbb.device)
    scale = math.sqrt(d / n) if abs(layout.embed_scale - 1) > 1e-4 else 1.0
    if layout.tied:  # min ‖E a − E'(κ ⊙ b)‖² over κ (E' = the kept, scaled columns), ridge toward κ = 1
        E2 = emb.weight.detach().float()[:, keep.to(emb.weight.device)].to(s.Cbb.device) * scale
        Q = (E2.T @ E2).to(DTYPE) * s.Cbb.to(DTYPE)
        rhs = ((E2.T @ W.to(E2.device)).to(DTYPE) * s.Cba.to(DTYPE)).sum(1)
        lam = options.percdamp * float(torch.diagonal(Q).mean())
        kappa = torch.linalg.solve(Q + lam * torch.eye(n, dtype=DTYPE, device=Q.device), rhs + lam)
        W_new, head = E2 * kappa.float(), None
        how = "tied: final-norm gains fitted"
    else:
        kappa = torch.tensor(1.0, dtype=DTYPE)
        W_new = head = fit_consumers(W.to(k.device), s.Cbb, s.Cba, k, options.shrink, options.percdamp).float()
        how = "re-fitted"
    final = {"recon_error": relative_error(W, W_new, st.final.H, s.Cbb, s.Cba),
             "recon_error_sliced": relative_error(W, W[:, k] * scale if layout.tied else W[:, k], st.final.H,
                                                  s.Cbb, s.Cba),
             "removed_energy": 1 - float(st.final.share[keep].sum()) / st.final.tokens, "head": how}
    shrink_ends(model, layout, keep, head, kappa)
    return entries, final


@torch.no_grad()
def run_hidden(model: nn.Module, ids: torch.Tensor, plan: HiddenPlan, options,
               device: str | torch.device = "cpu", progress: bool = True) -> dict:
    """Select the kept channels (pass 1), then re-fit and shrink every layer (pass 2; without
    ``refit`` only the RMS scale, no second pass); the report's ``hidden`` part."""
    layout, d = plan.layout, plan.hidden
    st = collect_stats(model, ids, layout, options.greedy, options.percdamp, options.shrink, device, progress)
    keep, info = choose_channels(st, d, plan.kept, options)
    st.problems.clear()
    if options.refit:
        entries, final = refit_and_shrink(model, ids, layout, keep, st, options, device, progress)
        errs = [e["recon_error"] for entry in entries for e in entry["reads"].values()]
        extra = {"mean_recon_error": sum(errs) / len(errs), "final": final, "layers": entries}
    else:
        shrink_scaled(model, layout, keep, st)
        extra = {"layers": [{"index": i, "removed_energy": {r.norm: 1 - float(s.share[keep].sum()) / s.tokens
                                                            for r, s in zip(layout.reads, reads, strict=True)}}
                            for i, reads in enumerate(st.reads)]}
    n = keep.numel()
    return {"hidden_size": {"before": d, "after": n}, "removed_ratio": 1 - n / d,
            "removed": sorted(set(range(d)) - set(keep.tolist())), **info,
            "refit": "least squares per consumer (tied LM head: final-norm gains)" if options.refit
            else "norm gains × √(d(1 − f̄)/d') only (no second pass)",
            "embedding_scale": layout.embed_scale, "tied": layout.tied, **extra}


def _resize_attributes(module: nn.Module, d: int, n: int) -> None:
    """Modules that keep the hidden size as an attribute (e.g. LlamaMLP.hidden_size) get ``n``."""
    for m in module.modules():
        if getattr(m, "hidden_size", None) == d and not isinstance(m.hidden_size, bool):
            m.hidden_size = n


def set_hidden_size(model: nn.Module, n: int) -> None:
    """``hidden_size`` of the config(s), with ``head_dim`` written explicitly (the families
    default it to hidden_size // num_attention_heads, which would change)."""
    for config in {id(c): c for c in (text_config(model), model.config)}.values():
        if isinstance(getattr(config, "hidden_size", None), int):
            heads = getattr(config, "num_attention_heads", None)
            if getattr(config, "head_dim", None) is None and isinstance(heads, int):
                config.head_dim = config.hidden_size // heads
            config.hidden_size = n
