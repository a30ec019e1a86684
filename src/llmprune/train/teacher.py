"""The frozen teacher of distillation: run once per micro-batch under ``no_grad`` on its own
device (whole, or one decoder layer at a time when it does not fit there: the evaluation's
placement, :mod:`llmprune.eval.placement`), its outputs cached for the terms of that
micro-batch and handed over on the student's device.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from llmprune.eval.placement import choose_placement, model_device, placed
from llmprune.models.adapter import decoder_layers
from llmprune.train.losses import LayerOutputs, MicroBatch


@dataclass
class TeacherOutputs:
    """``logits (b, s, V)``, or with top-k the ``(b, s, k)`` logits at the token ids ``index``;
    ``hidden``: decoder layer outputs, keyed by the student layer they are compared with."""

    logits: torch.Tensor
    index: torch.Tensor | None = None
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)


class Teacher:
    """A model the student learns from; it is never trained (no graph, no gradients).

    ``layer_map[i]``: the teacher decoder layer whose output student layer ``i`` is compared
    with (None: no hidden states are kept). ``topk`` > 0 keeps only the top-k logits of each
    position. ``device``: where its forward runs (None: where it is); ``batch_size`` and
    ``seqlen`` size a micro-batch, to decide whether the whole model fits there.
    """

    def __init__(self, model: nn.Module, layer_map: list[int] | None = None, topk: int = 0,
                 device: str | torch.device | None = None, batch_size: int = 1, seqlen: int = 2048) -> None:
        self.model, self.layer_map, self.topk = model, layer_map, topk
        self.device = torch.device(device) if device is not None else None
        self.shape = (batch_size, seqlen)
        layers = decoder_layers(model)
        self.recorder = LayerOutputs([layers[j] for j in layer_map]) if layer_map else None
        self.placement = "here"
        self._stack: contextlib.ExitStack | None = None

    def attach(self) -> None:
        """Place the model for the run and hook the layers it reports."""
        self.detach()
        self._stack = contextlib.ExitStack()
        self.placement = choose_placement(self.model, self.device, *self.shape)
        self._stack.enter_context(placed(self.model, self.device, self.placement))
        if self.recorder is not None:
            self.recorder.attach()
            self._stack.callback(self.recorder.detach)

    def detach(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    @torch.no_grad()
    def outputs(self, batch: MicroBatch) -> TeacherOutputs:
        """The teacher's outputs for ``batch`` (computed on the first call of the micro-batch)."""
        if "teacher" in batch.cache:
            return batch.cache["teacher"]
        home = batch.ids.device
        logits = self.model(input_ids=batch.ids.to(model_device(self.model)), use_cache=False).logits
        index = None
        if self.topk:
            logits, index = logits.topk(self.topk, dim=-1)
            index = index.to(home)
        hidden = {i: h.to(home) for i, h in self.recorder.take().items()} if self.recorder else {}
        out = batch.cache["teacher"] = TeacherOutputs(logits.to(home), index, hidden)
        return out
