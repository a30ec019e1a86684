"""Run an evaluation forward on a compute device without leaving the model there.

The whole model goes to the device when it fits in the free memory there (with a margin for
the activations); otherwise only the embeddings, final norm and head go, and each decoder layer is
brought over just for its own forward. Weights are *swapped*, not copied back: evaluation
changes no weight, so afterwards every parameter points at its original tensor again and
nothing is copied device → host.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from llmprune.engine.memory import available_bytes
from llmprune.errors import LLMPruneError
from llmprune.eval.loss import chunk_positions
from llmprune.models.layers import decoder_layers

# Keep this share of the free device memory unused, plus RESERVE bytes for the CUDA context,
# allocator fragmentation and the attention's temporaries.
MARGIN = 0.10
RESERVE = 1 << 30


def check_device(device: str) -> str:
    """``device`` if torch can run there, else one clear error (e.g. ``cuda`` on a CPU-only host)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise LLMPruneError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LLMPruneError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LLMPruneError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    return device


def model_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: the device of its input embeddings."""
    return model.get_input_embeddings().weight.device


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (shared tensors counted once)."""
    seen: dict[int, int] = {}
    for t in [*module.parameters(), *module.buffers()]:
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def free_device_memory(device: torch.device) -> int | None:
    """Free bytes on ``device``; None where there is no probe (CPU: the model is already there)."""
    return available_bytes(device) if device.type == "cuda" else None


def workspace_bytes(model: nn.Module, batch_size: int, seqlen: int) -> int:
    """Final hidden states of one batch in the model's dtype, plus one chunk's fp32 logits and
    its log-softmax (the loss is computed a chunk of positions at a time: :mod:`llmprune.eval.loss`)."""
    vocab, width = model.get_output_embeddings().weight.shape
    elt = next(model.parameters()).element_size()
    return batch_size * seqlen * width * elt + 2 * chunk_positions(vocab) * vocab * 4


def choose_placement(model: nn.Module, device: str | torch.device | None, batch_size: int,
                     seqlen: int) -> str:
    """``"here"`` (run where the model is), ``"whole"`` (move it all) or ``"layers"`` (stream layers)."""
    if device is None or getattr(model, "hf_device_map", None):
        return "here"  # no target, or already dispatched over devices by accelerate
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device == model_device(model):
        return "here"
    free = free_device_memory(device)
    if free is None:
        return "whole"
    need = module_bytes(model) + workspace_bytes(model, batch_size, seqlen) + RESERVE
    return "whole" if need <= free * (1 - MARGIN) else "layers"


class _Swap:
    """Point the parameters and buffers of some modules at copies on ``device``, and back."""

    def __init__(self, modules: list[nn.Module], device: torch.device, skip: set[int] = frozenset()):
        self.device = device
        self.params: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
        self.buffers: list[tuple[nn.Module, str, torch.Tensor]] = []
        for top in modules:
            for mod in top.modules():
                if id(mod) in skip:
                    continue
                for p in mod._parameters.values():
                    if p is not None and id(p) not in skip:
                        self.params.setdefault(id(p), (p, p.data))
                for name, b in mod._buffers.items():
                    if b is not None:
                        self.buffers.append((mod, name, b))
        self.active = False

    def enter(self) -> None:
        for p, orig in self.params.values():
            # .data keeps the Parameter object, so tied weights stay tied.
            p.data = orig.to(self.device, non_blocking=True)
        for mod, name, orig in self.buffers:
            mod._buffers[name] = orig.to(self.device, non_blocking=True)
        self.active = True

    def exit(self) -> None:
        for p, orig in self.params.values():
            p.data = orig
        for mod, name, orig in self.buffers:
            mod._buffers[name] = orig
        self.active = False


@contextmanager
def placed(model: nn.Module, device: str | torch.device | None, mode: str):
    """Run the body with ``model`` placed as ``mode`` says (see :func:`choose_placement`)."""
    if mode == "here":
        yield
        return
    device = torch.device(device)
    if mode == "whole":
        swap = _Swap([model], device)
        swap.enter()
        try:
            yield
        finally:
            swap.exit()
        return
    if mode != "layers":
        raise ValueError(f"unknown placement {mode!r}")
    layers = list(decoder_layers(model))
    in_layers = {id(m) for layer in layers for m in layer.modules()}
    in_layers |= {id(p) for layer in layers for p in layer.parameters()}
    rest = _Swap([model], device, skip=in_layers)
    swaps = [_Swap([layer], device) for layer in layers]
    handles = []
    for layer, swap in zip(layers, swaps, strict=True):
        handles.append(layer.register_forward_pre_hook(lambda *_, s=swap: s.enter()))
        handles.append(layer.register_forward_hook(lambda *_, s=swap: s.exit()))
    rest.enter()
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for s in [rest, *swaps]:
            if s.active:
                s.exit()
