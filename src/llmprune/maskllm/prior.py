"""Prior masks: start the logits near a known mask (a one-shot result or a mask file).

Each candidate's logits move by ``(overlap − 1)·std(logits)·strength`` where ``overlap`` is
how many kept positions it shares with the prior's group (the reference's
``init_diff_mask_from_prior``). For 2:4 the prior's own candidate gains ``std·strength``,
the four that share one position stay, and the opposite one loses ``std·strength``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from llmprune.errors import LLMPruneError
from llmprune.maskllm.candidates import overlap
from llmprune.maskllm.gumbel import LearnableNMMask
from llmprune.models.adapter import masked_linears


def check_prior(prior: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Names and shapes must match the masked weights' exactly; name the first bad key."""
    for name in shapes:
        if name not in prior:
            raise LLMPruneError(f"the prior has no mask for {name}")
    for name, keep in prior.items():
        if name not in shapes:
            raise LLMPruneError(f"the prior has a mask for {name}, which is not a masked weight of this model")
        if tuple(keep.shape) != tuple(shapes[name]):
            raise LLMPruneError(f"prior mask {name} has shape {tuple(keep.shape)}, the weight {tuple(shapes[name])}")


def masked_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """``{weight name: shape}`` of the weights MaskLLM masks."""
    return {f"{k}.weight": tuple(v.weight.shape) for k, v in masked_linears(model).items()}


@torch.no_grad()
def apply_prior(masks: Mapping[str, LearnableNMMask], prior: Mapping[str, torch.Tensor],
                strength: float = 3.0) -> None:
    """Shift every mask's logits towards ``prior`` (``{weight name: bool keep-mask}``)."""
    check_prior(prior, {name: mask.shape for name, mask in masks.items()})
    for name, mask in masks.items():
        groups = prior[name].to(mask.logits.device).reshape(-1, mask.m)  # (G, M)
        shift = (overlap(groups, mask.cands) - 1) * mask.logits.float().std() * strength
        mask.logits.add_(shift.to(mask.logits.dtype))


def oneshot_prior(model: nn.Module, tokenizer, pattern: str = "2:4", method: str = "sparsegpt",
                  progress: bool = True, **prune_options) -> dict[str, torch.Tensor]:
    """The keep-masks a one-shot method chooses *without* a weight update (the reference's
    default prior: SparseGPT mask-only). The model's weights are restored afterwards.

    ``prune_options`` go to :func:`llmprune.prune` (``calib``, ``nsamples``, ``seqlen``, ...).
    The linears' weights are copied to the CPU for the duration (one extra copy of them).
    """
    from llmprune.config import PruneConfig
    from llmprune.pipeline import prune

    linears = masked_linears(model)
    saved = {name: lin.weight.detach().to("cpu", copy=True) for name, lin in linears.items()}
    try:
        # the reference's prior: dense statistics per layer (the exact mode) unless asked otherwise
        config = PruneConfig(method=method, pattern=pattern, solver="none",
                             **{"true_sequential": False, **prune_options})
        # A weight that was already 0 reads as pruned; the shift works with such groups too.
        masks = dict(prune(model, config, tokenizer=tokenizer, progress=progress).masks)
    finally:
        with torch.no_grad():
            for name, lin in linears.items():
                lin.weight.copy_(saved[name])
    return masks
