"""Depth pruning: which block of ``k`` consecutive decoder layers hurts least when deleted.

Every window ``[ℓ, ℓ + k)`` gets a score; the lowest is removed.

- ``ppl``: the exact search (AMD Quark's): calibration perplexity of the model without the
  window, one evaluation per window;
- ``cosine``: block influence, ShortGPT's ``1 − cos(h_ℓ, h_ℓ+k)`` extended from one layer to a
  block — how much the block turns the hidden state it is given;
- ``angular``: Gromov et al.'s angular distance ``arccos(cos(h_ℓ, h_ℓ+k)) / π``.

``h_ℓ`` is the hidden state entering layer ℓ (``h_L`` the last layer's output, before the final
norm). The paper of each cheap score looks at the last token only; here every token of every
calibration row is averaged, which is steadier on a few hundred rows. Both cheap scores, for
every pair of layers at once, come from one forward pass (:func:`similarity_matrices`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from llmprune.eval.perplexity import perplexity
from llmprune.eval.placement import choose_placement, model_device, placed
from llmprune.models.adapter import decoder_layers
from llmprune.structured.shrink import layers_removed

SCORES = ("ppl", "cosine", "angular")


class _Stop(Exception):
    pass


@torch.no_grad()
def similarity_matrices(model: nn.Module, ids: torch.Tensor, batch_size: int = 1,
                        device: str | torch.device | None = None,
                        progress: bool = True) -> dict[str, torch.Tensor]:
    """Mean over calibration tokens of ``cos(h_i, h_j)`` and of ``arccos(cos)/π`` for every pair
    of layer boundaries ``0 ≤ i, j ≤ L``: two ``(L + 1, L + 1)`` float64 matrices.

    Hooks record each decoder layer's input and the last one's output; the forward stops
    there (no head, no logits).
    """
    layers = decoder_layers(model)
    with placed(model, device, choose_placement(model, device, batch_size, ids.shape[1])):
        cos, ang = _similarity_sums(model, layers, ids, batch_size, progress)
    cos = torch.triu(cos) + torch.triu(cos, 1).T
    ang = torch.triu(ang) + torch.triu(ang, 1).T
    return {"cosine": cos, "angular": ang}


def _similarity_sums(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, batch_size: int,
                     progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token means of cos and angular distance, upper triangle (i ≤ j) only."""
    n = len(layers)
    states: list[torch.Tensor | None] = [None] * (n + 1)  # unit-norm rows, of the current batch

    def post(_module, _args, out):
        h = out[0] if isinstance(out, tuple | list) else out
        states[n] = nn.functional.normalize(h.float().reshape(-1, h.shape[-1]), dim=-1)
        raise _Stop

    def pre(i: int):
        def fn(_module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            states[i] = nn.functional.normalize(h.float().reshape(-1, h.shape[-1]), dim=-1)
        return fn

    handles = [layer.register_forward_pre_hook(pre(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(post))
    cos_sum = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    ang_sum = torch.zeros_like(cos_sum)
    tokens = 0
    device = model_device(model)
    try:
        for j in tqdm(range(0, ids.shape[0], batch_size), desc="layer similarity", disable=not progress):
            try:
                model(ids[j : j + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
            S = torch.stack(states)  # (L + 1, tokens, hidden), unit rows
            for a in range(n + 1):
                c = (S[a : a + 1] * S[a:]).sum(-1).clamp(-1, 1)  # (L + 1 − a, tokens)
                cos_sum[a, a:] += c.sum(1).double().cpu()
                ang_sum[a, a:] += (torch.arccos(c) / math.pi).sum(1).double().cpu()
            tokens += S.shape[1]
            del S
    finally:
        for h in handles:
            h.remove()
    return cos_sum / tokens, ang_sum / tokens


def window_scores_from_similarity(sim: dict[str, torch.Tensor], k: int) -> dict[str, list[float]]:
    """The cheap scores of every window ``[ℓ, ℓ + k)``: lower = less change = removed first."""
    n = sim["cosine"].shape[0] - 1
    starts = range(n - k + 1)
    return {"cosine": [1 - float(sim["cosine"][s, s + k]) for s in starts],
            "angular": [float(sim["angular"][s, s + k]) for s in starts]}


@torch.no_grad()
def ppl_window_scores(model: nn.Module, ids: torch.Tensor, k: int, batch_size: int = 4,
                      device: str | torch.device | None = None, progress: bool = True) -> list[float]:
    """Calibration perplexity of the model without each window ``[ℓ, ℓ + k)`` (the rows of
    ``ids`` are the evaluation windows)."""
    n = len(decoder_layers(model))
    stream = ids.reshape(1, -1)
    out = []
    for s in tqdm(range(n - k + 1), desc=f"ppl without {k} layers", disable=not progress):
        with layers_removed(model, range(s, s + k)):
            out.append(perplexity(model, stream, ids.shape[1], progress=False, batch_size=batch_size,
                                  device=device)["ppl"])
    return out


def ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    r = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for t in range(i, j + 1):
            r[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation of two score lists (None when undefined)."""
    if len(a) != len(b) or len(a) < 2:
        return None
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else None


def rank_agreement(scores: dict[str, list[float]]) -> dict[str, float | None]:
    """Spearman correlation for each pair of scores, keyed ``"a~b"``."""
    names = sorted(scores)
    return {f"{a}~{b}": spearman(scores[a], scores[b]) for i, a in enumerate(names) for b in names[i + 1:]}


def best_window(scores: list[float]) -> int:
    """Start of the lowest-scoring window (NaN never wins; the first of equals does)."""
    clean = [s if not math.isnan(s) else math.inf for s in scores]
    return min(range(len(clean)), key=lambda i: clean[i])
