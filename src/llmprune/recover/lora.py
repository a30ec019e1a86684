"""LoRA through ``peft``: resolve the targets, wrap the model, merge and re-mask, or unwrap.

``peft`` is an optional extra (``pip install 'llmprune[lora]'``), imported only here.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from llmprune.errors import LLMPruneError
from llmprune.models.adapter import masked_linears


def require_peft() -> None:
    """One line instead of an ImportError deep inside the run."""
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise LLMPruneError("--mode lora needs the peft package: pip install 'llmprune[lora]' (or pip install peft)")


def lora_targets(model: nn.Module, targets: list[str] | None) -> list[str]:
    """Full module names of the decoder linears that get an adapter.

    ``targets`` are name suffixes (``q_proj``, ``mlp.down_proj``); ``None`` means every decoder
    linear. Full names are handed to peft, so ``lm_head`` and embeddings are never wrapped.
    """
    names = list(masked_linears(model))
    if targets is None:
        return names
    chosen = []
    for t in targets:
        hit = [n for n in names if n == t or n.endswith("." + t)]
        if not hit:
            known = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise LLMPruneError(f"lora target {t!r} matches no decoder linear; this model has "
                                f"{', '.join(known)}")
        chosen += [n for n in hit if n not in chosen]
    return [n for n in names if n in chosen]  # model order


def wrap_lora(model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float,
              seed: int) -> nn.Module:
    """``model`` with a LoRA adapter (``default``) on ``targets``: a ``peft`` model whose base
    weights are frozen. The adapter's random init is drawn from ``seed`` (B starts at zero)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's generator
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def _lora_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    """``{base module name: peft LoRA layer}``."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in peft_model.get_base_model().named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def update_outside_mask(peft_model: nn.Module, masks: Mapping[str, torch.Tensor]) -> float:
    """The share of the adapter's update ``‖ΔW‖²`` that falls on pruned weights, i.e. what
    re-masking the merged weights throws away (0: the update keeps the pattern by itself)."""
    removed = total = 0.0
    for name, layer in _lora_layers(peft_model).items():
        delta = layer.get_delta_weight("default").float()
        keep = masks.get(f"{name}.weight")
        total += float(delta.square().sum())
        if keep is not None:
            removed += float(delta.square().masked_fill(keep.to(delta.device), 0).sum())
    return removed / total if total > 0 else 0.0


def merge(peft_model: nn.Module) -> nn.Module:
    """The base model with the adapter merged into its weights (dense where it was sparse)."""
    model = peft_model.merge_and_unload()
    model.requires_grad_(True)  # peft froze the base; hand the model back as it came
    return model


def unwrap(peft_model: nn.Module) -> nn.Module:
    """The base model without the adapter, its weights untouched."""
    model = peft_model.unload()
    model.requires_grad_(True)
    return model


@torch.no_grad()
def remask(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned weights again (after a merge): the pattern is exactly the input's."""
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        p = params[name]
        p.masked_fill_(~keep.to(p.device, torch.bool), 0)
