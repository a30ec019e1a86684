"""Recovery as :class:`~llmprune.train.trainer.TrainTask`\\ s: masked fine-tuning of the kept
weights, and a LoRA adapter over the frozen sparse weights, each on loss terms
(:mod:`llmprune.train.losses`: the LM loss, or distillation from a teacher). One loop: the trainer."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import torch
from torch import nn

from llmprune.models.adapter import masked_linears
from llmprune.train.losses import LMLoss, LossTerm


def recover_fingerprint(model: nn.Module, masks: Mapping[str, torch.Tensor], mode: str) -> dict:
    """What a recovery checkpoint must match: the mode, the model's class, the masked weights'
    names and shapes, a checksum of the first weight's first (masked) row, and the mask's kept
    counts."""
    linears = masked_linears(model)
    shapes = {f"{k}.weight": list(v.weight.shape) for k, v in linears.items()}
    name, lin = next(iter(linears.items()))
    # the masked row: the same before and after a given mask is applied to the weights
    row = lin.weight.detach()[0].float().cpu().masked_fill(~masks[f"{name}.weight"][0].cpu(), 0)
    first = row.numpy().tobytes()
    kept = {n: int(m.sum()) for n, m in masks.items()}
    digest = lambda b: hashlib.sha256(b).hexdigest()[:16]  # noqa: E731
    return {"mode": mode, "class": type(model).__name__,
            "shapes": digest(json.dumps(shapes).encode()),
            "weights": digest(first),
            "mask": digest(json.dumps(kept).encode())}


class _RecoveryTask:
    """What both recovery tasks share: one parameter group ``trained``, no schedules, the loss
    ``terms`` (default: the LM loss; a teacher's are attached while training), and
    checkpoints that hold the trained tensors."""

    name = "recover"
    group = "trained"

    def __init__(self, model: nn.Module, trained: dict[str, torch.Tensor], fingerprint: dict,
                 terms: list[LossTerm] | None = None, teacher=None) -> None:
        self.model = model
        self.trained = trained
        self._fingerprint = fingerprint
        self.terms = terms if terms is not None else [LMLoss()]
        self.teacher = teacher  # a llmprune.train.teacher.Teacher, placed and hooked while training

    def param_groups(self, lr: float) -> list[dict]:
        return [{"name": self.group, "params": list(self.trained.values()), "lr": lr}]

    def loss_terms(self) -> list[LossTerm]:
        return self.terms

    def set_training(self, training: bool) -> None:
        """Attach the teacher and the terms' hooks for the run; detach them after."""
        for part in [self.teacher, *self.terms]:
            if part is None or not hasattr(part, "attach"):
                continue
            if training:
                part.attach()
            else:
                part.detach()

    def before_step(self, step: int) -> dict[str, float]:
        return {}

    def before_micro_batch(self, seed: int) -> None:
        pass

    def extra_loss(self) -> tuple[torch.Tensor | None, dict[str, float]]:
        return None, {}

    def log_stats(self) -> dict[str, float]:
        return {}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {n: t.detach() for n, t in self.trained.items()}

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for n, t in self.trained.items():
            t.copy_(tensors[n])

    def fingerprint(self) -> dict:
        return self._fingerprint


class MaskedFinetuneTask(_RecoveryTask):
    """Train every masked decoder linear's kept weights; the pruned ones stay exactly zero.

    Two guards, because either alone has a gap: a gradient hook zeroes the pruned entries'
    gradients (so clipping and AdamW's moments never see them), and :meth:`after_step`
    re-applies the mask after each optimiser step (a weight that was not exactly zero at the
    start, or a fused kernel's rounding, can never leak through).
    """

    name, group = "recover masked", "weights"

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor], fingerprint: dict,
                 terms: list[LossTerm] | None = None, teacher=None) -> None:
        lins = masked_linears(model)
        super().__init__(model, {n: lins[n.removesuffix(".weight")].weight for n in masks}, fingerprint,
                         terms, teacher)
        self.pruned = {n: ~m.to(torch.bool) for n, m in masks.items()}  # one byte per weight
        self._hooks: list = []

    def set_training(self, training: bool) -> None:
        super().set_training(training)
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if training:
            for n, w in self.trained.items():
                # the trainer places the model (accelerate's prepare) after the task is built:
                # the masks follow the weights here, once
                pruned = self.pruned[n] = self.pruned[n].to(w.device)
                self._hooks.append(w.register_hook(lambda g, pruned=pruned: g.masked_fill(pruned, 0)))

    @torch.no_grad()
    def after_step(self) -> None:
        for n, w in self.trained.items():
            w.masked_fill_(self.pruned[n], 0)


class LoraTask(_RecoveryTask):
    """Train the LoRA matrices of a ``peft`` model; the sparse base weights stay frozen."""

    name, group = "recover lora", "lora"

    def __init__(self, peft_model: nn.Module, dropout: float, fingerprint: dict,
                 terms: list[LossTerm] | None = None, teacher=None) -> None:
        super().__init__(peft_model, {n: p for n, p in peft_model.named_parameters()
                                      if "lora_" in n and p.requires_grad}, fingerprint, terms, teacher)
        # peft's dropout modules: the trainer puts the whole model in eval mode (MaskLLM trains
        # without dropout), so the adapter's dropout is switched on here
        self.dropouts = [m for n, m in peft_model.named_modules()
                         if n.split(".")[-2:-1] == ["lora_dropout"] and isinstance(m, nn.Dropout)]
        self.dropout = dropout

    def set_training(self, training: bool) -> None:
        super().set_training(training)
        for m in self.dropouts:
            m.train(training)

    def before_micro_batch(self, seed: int) -> None:
        if self.dropout > 0:
            # dropout draws from the global generator: seed it per micro-batch so that a resumed
            # or multi-process run draws what the uninterrupted single-process one does
            torch.manual_seed(seed)
