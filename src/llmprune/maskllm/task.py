"""MaskLLM as a :class:`~llmprune.train.trainer.TrainTask`: the logits (and optionally the
kept weights) to train, the τ/κ/λ schedules, the sparse-weight regulariser and flip counts."""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from llmprune.maskllm.gumbel import LearnableNMMask, NoiseSource
from llmprune.maskllm.options import MaskLLMOptions
from llmprune.maskllm.schedule import MaskSchedule
from llmprune.models.adapter import masked_linears


def prior_fingerprint(prior, prior_options: dict | None = None) -> str:
    """What identifies a run's prior: ``none``, a one-shot method with its options, or a checksum
    of a mask dict (a resume with another prior would continue the old one's logits)."""
    if prior is None or prior == "none":
        return "none"
    if isinstance(prior, str):
        return prior + (f" {json.dumps(prior_options, sort_keys=True)}" if prior_options else "")
    h = hashlib.sha256()
    for name in sorted(prior):
        h.update(name.encode())
        h.update(torch.as_tensor(prior[name]).bool().cpu().numpy().tobytes())
    return f"masks sha256:{h.hexdigest()[:16]}"


def model_fingerprint(model: nn.Module, pattern: str, prior: str = "none") -> dict:
    """What identifies a MaskLLM run's model: the pattern, the prior (:func:`prior_fingerprint`),
    the masked weights' names and shapes, and a checksum of the first masked weight's first row
    (tells same-shaped models apart)."""
    linears = masked_linears(model)
    shapes = {f"{k}.weight": list(v.weight.shape) for k, v in linears.items()}
    first = next(iter(linears.values())).weight.detach()[0].float().cpu().numpy().tobytes()
    return {"pattern": pattern,
            "prior": prior,
            "class": type(model).__name__,
            "shapes": hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16],
            "weights": hashlib.sha256(first).hexdigest()[:16]}


class MaskLLMTask:
    """The method's side of the loop (see :class:`~llmprune.train.trainer.TrainTask`)."""

    name = "maskllm"

    def __init__(self, model: nn.Module, masks: dict[str, LearnableNMMask], opts: MaskLLMOptions,
                 noise: NoiseSource, fingerprint: dict) -> None:
        self.model, self.masks, self.opts, self.noise = model, masks, opts, noise
        self.schedule = MaskSchedule(opts.steps, (opts.tau_start, opts.tau_end),
                                     (opts.kappa_start, opts.kappa_end), (opts.reg_lambda, 0.0))
        self._fingerprint = fingerprint
        self._lambda = 0.0
        self._last = self._choices()

    def _weights(self) -> dict[str, nn.Parameter]:
        lins = masked_linears(self.model)
        return {name: lins[name.removesuffix(".weight")].parametrizations.weight.original for name in self.masks}

    def param_groups(self, lr: float) -> list[dict]:
        groups = [{"name": "logits", "params": [m.logits for m in self.masks.values()],
                   "lr": lr * self.opts.logit_lr_mult}]
        if self.opts.train_weights:
            groups.append({"name": "weights", "params": list(self._weights().values()),
                           "lr": self.opts.weights_lr or lr})
        return groups

    def set_training(self, training: bool) -> None:
        for m in self.masks.values():
            m.train(training)
            m.sq_norm = None

    def before_step(self, step: int) -> dict[str, float]:
        vals = self.schedule.at(step)
        self._lambda = vals["lambda"]
        for m in self.masks.values():
            m.tau, m.kappa = vals["tau"], vals["kappa"]
        return vals

    def before_micro_batch(self, seed: int) -> None:
        self.noise.reseed(seed)

    def extra_loss(self) -> tuple[torch.Tensor | None, dict[str, float]]:
        """``−λ(t)·Σ‖W ⊙ mask‖²``: rewards masks that keep large weights (W detached)."""
        norms = [m.sq_norm for m in self.masks.values() if m.sq_norm is not None]
        for m in self.masks.values():
            m.sq_norm = None  # free the graph reference once the loss holds it
        if not norms:
            return None, {}
        total = torch.stack(norms).sum()
        vals = {"sparse_weight_norm": total.item()}
        if self._lambda == 0:
            return None, vals
        return -self._lambda * total, vals

    def _choices(self) -> dict[str, torch.Tensor]:
        # uint8 is enough for up to 256 candidates (C(8,4) = 70); int32 beyond
        return {n: m.choice().to(torch.uint8 if m.cands.shape[0] <= 256 else torch.int32)
                for n, m in self.masks.items()}

    def log_stats(self) -> dict[str, float]:
        """``flipped``: the share of groups whose hard mask changed since the last call."""
        now = self._choices()
        flips = sum(int((now[n] != self._last[n]).sum()) for n in now)
        groups = sum(v.numel() for v in now.values())
        self._last = now
        return {"flipped": flips / max(groups, 1)}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"{n}.logits": m.logits.detach() for n, m in self.masks.items()}
        if self.opts.train_weights:
            out.update({n: w.detach() for n, w in self._weights().items()})
        return out

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for n, m in self.masks.items():
            m.logits.copy_(tensors[f"{n}.logits"])
        if self.opts.train_weights:
            for n, w in self._weights().items():
                w.copy_(tensors[n])
        self._last = self._choices()

    def fingerprint(self) -> dict:
        return self._fingerprint
