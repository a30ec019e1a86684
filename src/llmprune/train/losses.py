"""Loss terms as data: the trainer sums ``weight · term(micro-batch)`` over a task's terms.

A term sees one micro-batch (:class:`MicroBatch`: the input ids, the model's output and a
cache the terms of that micro-batch share, e.g. one teacher forward for two distillation
terms). Terms here:

- :class:`LMLoss` (``ce``): the next-token cross-entropy the model itself computes from
  ``labels`` (the plain recipe); at weight 0 it is still measured, without a graph, for the log.
- :class:`LogitKL` (``kd``): Hinton's distillation loss ``T² · KL(p_T ‖ q_T)`` with
  ``p_T = softmax(z_teacher / T)``, ``q_T = softmax(z_student / T)``, summed over the
  vocabulary and averaged over every position of the micro-batch. Computed a chunk of
  positions at a time in fp32 (:func:`logit_kl`); with ``topk`` the teacher's distribution is
  its top-k tokens renormalised, against the student's full-vocabulary ``q_T``.
- :class:`HiddenMSE` (``hidden``): SquareHead (Kurtic et al. 2023, Neural Magic's sparse
  Llama recipes): for each decoder layer ℓ of the student and its teacher layer,
  ``‖h_s − h_t‖² / ‖h_t‖²`` over the micro-batch, averaged over layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from llmprune.eval.loss import chunk_positions

# Below this, ‖h_t‖² is treated as this (a layer whose teacher output is all zeros).
EPS = 1e-12


@dataclass
class MicroBatch:
    """What the terms of one micro-batch see: ``ids (b, s)``, the model's ``out`` (``logits``,
    ``loss`` when labels were given) and ``cache`` shared by this micro-batch's terms."""

    ids: torch.Tensor
    out: Any
    cache: dict = field(default_factory=dict)


class LossTerm(Protocol):
    """One summand of the training loss."""

    name: str  # its key in the log
    weight: float  # 0: measured and logged, not trained on

    def __call__(self, batch: MicroBatch) -> torch.Tensor:
        """The term's value (a scalar; with a graph when ``weight`` > 0)."""


def wants_labels(terms: list[LossTerm]) -> bool:
    """Whether the model should compute its own LM loss (an :class:`LMLoss` that trains)."""
    return any(isinstance(t, LMLoss) and t.weight > 0 for t in terms)


def total_loss(terms: list[LossTerm], batch: MicroBatch) -> tuple[torch.Tensor | None, dict[str, float]]:
    """``Σ weight · term`` over the terms that train, and every term's value for the log."""
    loss, vals = None, {}
    for term in terms:
        value = term(batch)
        vals[term.name] = value.item()
        if term.weight > 0:
            part = value if term.weight == 1 else term.weight * value
            loss = part if loss is None else loss + part
    return loss, vals


@torch.no_grad()
def causal_lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``logits (b, s, V)`` on ``ids``, in fp32 chunks."""
    flat, targets = logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    step = chunk_positions(logits.shape[-1])
    for i in range(0, flat.shape[0], step):
        total += nn.functional.cross_entropy(flat[i:i + step].float(), targets[i:i + step], reduction="sum")
    return (total / max(1, targets.numel())).float()


class LMLoss:
    """The model's own next-token loss (``labels = ids``)."""

    name = "ce"

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = weight

    def __call__(self, batch: MicroBatch) -> torch.Tensor:
        if self.weight > 0:
            return batch.out.loss
        return causal_lm_loss(batch.out.logits.detach(), batch.ids)  # for the log only


class _LogitKL(torch.autograd.Function):
    """``T² · mean over positions of KL(p_T ‖ q_T)`` and its gradient, a chunk at a time.

    The gradient w.r.t. the student's logits, ``T · (q_T − p_T) / N``, is computed in the
    forward and kept (one logit-sized fp32 tensor) instead of every chunk's softmax."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, index: torch.Tensor | None,
                temperature: float, chunk: int) -> torch.Tensor:
        n = student.shape[0]
        grad = torch.empty(student.shape, dtype=torch.float32, device=student.device)
        total = torch.zeros((), dtype=torch.float64, device=student.device)
        for i in range(0, n, chunk):
            log_q = torch.log_softmax(student[i:i + chunk].float() / temperature, dim=-1)
            log_p = torch.log_softmax(teacher[i:i + chunk].float() / temperature, dim=-1)
            p = log_p.exp()
            if index is None:  # full vocabulary
                gap = log_p - log_q
                g = log_q.exp().sub_(p)
            else:  # the teacher's top-k, renormalised; the student's full softmax
                idx = index[i:i + chunk]
                gap = log_p - log_q.gather(-1, idx)
                g = log_q.exp().scatter_add_(-1, idx, -p)
            # p = 0 (underflow) contributes nothing, whatever the student says
            total += torch.where(p > 0, p * gap, 0).sum(dtype=torch.float64)
            grad[i:i + chunk] = g.mul_(temperature / n)
        ctx.save_for_backward(grad)
        ctx.dtype = student.dtype
        return (total * (temperature * temperature / n)).float()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_out).to(ctx.dtype), None, None, None, None


def logit_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
             index: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
    """Hinton's ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, summed over the vocabulary and
    averaged over positions; differentiable in ``student``.

    ``student (..., V)``; ``teacher (..., V)`` or, with ``index (..., k)`` (the teacher's top-k
    token ids), its ``(..., k)`` logits at those ids, renormalised over them.
    """
    vocab = student.shape[-1]
    s = student.reshape(-1, vocab)
    t = teacher.reshape(-1, teacher.shape[-1])
    idx = None if index is None else index.reshape(-1, index.shape[-1])
    return _LogitKL.apply(s, t, idx, float(temperature), chunk or chunk_positions(vocab))


def square_head(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """SquareHead's per-layer term ``‖h_s − h_t‖² / ‖h_t‖²`` over all positions (fp32)."""
    t = teacher.float()
    return (student.float() - t).pow(2).sum() / t.pow(2).sum().clamp_min(EPS)


class LayerOutputs:
    """Forward hooks that keep each listed decoder layer's output (its hidden states) of the
    latest forward, by position in ``layers``."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers
        self.outputs: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def attach(self) -> None:
        self.detach()
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(self._keeper(i)))

    def _keeper(self, i: int):
        def keep(_module, _args, output):
            self.outputs[i] = output[0] if isinstance(output, tuple) else output
        return keep

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.outputs = {}

    def take(self) -> dict[int, torch.Tensor]:
        """The kept outputs, forgotten here (the graph keeps what the backward needs)."""
        out, self.outputs = self.outputs, {}
        return out


class LogitKL:
    """Logit distillation from ``teacher`` (a :class:`~llmprune.train.teacher.Teacher`)."""

    name = "kd"

    def __init__(self, teacher, temperature: float = 1.0, weight: float = 1.0) -> None:
        self.teacher, self.temperature, self.weight = teacher, temperature, weight

    def __call__(self, batch: MicroBatch) -> torch.Tensor:
        t = self.teacher.outputs(batch)
        return logit_kl(batch.out.logits, t.logits, self.temperature, t.index)


class HiddenMSE:
    """SquareHead: every student decoder layer's output against its teacher layer's.

    ``student_layers``: the student's decoder layers (hooked while attached); the teacher
    records the layers its ``layer_map`` names, in the same order.
    """

    name = "hidden"

    def __init__(self, teacher, student_layers: list[nn.Module], weight: float) -> None:
        self.teacher, self.weight = teacher, weight
        self.student = LayerOutputs(student_layers)

    def attach(self) -> None:
        self.student.attach()

    def detach(self) -> None:
        self.student.detach()

    def __call__(self, batch: MicroBatch) -> torch.Tensor:
        mine = self.student.take()
        theirs = self.teacher.outputs(batch).hidden
        if len(mine) != len(theirs):
            raise RuntimeError(f"hidden-state distillation saw {len(mine)} student and {len(theirs)} teacher "
                               "layer outputs in one forward")
        return torch.stack([square_head(mine[i], theirs[i]) for i in sorted(mine)]).mean()
