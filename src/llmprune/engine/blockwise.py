"""Block-wise reconstruction: an optional engine stage that tunes each decoder layer after it
is pruned, before the walk moves on (EBFT, arXiv 2402.12419; AMD Quark's block-wise tuning;
"local reconstruction" in arXiv 2510.14444).

For layer ``i`` with ``x`` its inputs on the pruned stream (the outputs of the pruned layers
before it) and ``T`` the *target*, Adam minimises the mean over tokens τ of the relative error

    L = mean_τ ‖f_pruned(x)_τ − T_τ‖² / ‖T_τ‖²

(``recon_loss: token``; ``mse`` is EBFT's plain mean squared error, which on SmolLM2 is mostly
the attention-sink token: it holds up to 95 % of ‖T‖² in the middle layers, while every consumer
of a hidden state — the next norm, the final norm — sees each token normalised) over
mini-batches of calibration rows, changing only what the layer kept: every linear's kept
weights (its keep-mask is re-applied after each step, so the pattern stays exact) and biases,
and with ``recon_norms`` its norm weights. Two targets (``recon_target``):

- ``dense`` (default): ``T = f_dense(x_dense)``, the dense layer on the *dense* stream — the
  dense model's own hidden states. The layer is fit to undo the error of the layers before it
  too, which is why the stream it reads is the pruned one (as the issue asks; the dense
  ``fullseq`` target of OSSCAR is the same idea for one linear).
- ``local``: ``T = f_dense(x)``, the dense layer on the same pruned-stream input (EBFT's target):
  only this layer's own error.

The dense stream is one more ``(nsamples, seqlen, hidden)`` buffer, kept by :class:`BlockTuner`
and advanced in place one layer at a time (its inputs are never needed again), so memory stays
one layer plus two activation buffers (see ``engine.memory.estimate_bytes``). The per-token
relative error (the ``token`` loss over every calibration token) is reported before and after
tuning.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from llmprune.engine.capture import layer_output
from llmprune.engine.memory import reuse_one_call_blocks
from llmprune.models.layers import linear_layers
from llmprune.options import Options, PositiveFloat, PositiveInt

# Below this relative error the pruned layer already gives the target (float round-off of
# identical weights is ~1e-14): nothing is tuned. Adam would otherwise scale the gradient of
# pure round-off up to full-size steps.
SKIP_BELOW = 1e-10


class BlockwiseOptions(Options):
    """Block-wise reconstruction after each pruned layer (off unless ``reconstruct: blockwise``)."""

    reconstruct: Literal["none", "blockwise"] = Field(
        "none", description="blockwise: after each layer is pruned, tune its kept weights (mask fixed) "
        "with Adam so its output matches the dense layer's, then propagate")
    recon_steps: PositiveInt = Field(16, description="blockwise: Adam steps per layer")
    recon_lr: PositiveFloat = Field(3e-3, description="blockwise: Adam learning rate (decayed linearly to 0)")
    recon_batch: PositiveInt = Field(2, description="blockwise: calibration rows per step (at most nsamples)")
    recon_norms: bool = Field(False, strict=True, description="blockwise: also tune the layer's norm weights")
    recon_target: Literal["dense", "local"] = Field(
        "dense", description="blockwise: dense = the dense model's own hidden states (the dense layer on "
        "the dense stream; corrects earlier layers' error too) | local = the dense layer on the same "
        "pruned-stream input (EBFT)")

    recon_loss: Literal["token", "mse"] = Field(
        "token", description="blockwise: token = each token's squared error relative to its target's norm, "
        "averaged (what the next norm sees; an attention-sink token can hold most of ‖T‖²) | mse = plain mean "
        "squared error (EBFT)")

    @property
    def enabled(self) -> bool:
        return self.reconstruct == "blockwise"


def norm_parameters(layer: nn.Module) -> list[nn.Parameter]:
    """The weights (and biases) of the layer's normalisation modules (RMSNorm, LayerNorm, ...)."""
    out = []
    for m in layer.modules():
        if isinstance(m, nn.LayerNorm) or "norm" in type(m).__name__.lower():
            out += list(m.parameters(recurse=False))
    return out


def token_errors(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``‖y_τ − t_τ‖² / ‖t_τ‖²`` for every token τ (the last dimension is the hidden one)."""
    t = t.float()
    den = t.pow(2).sum(-1).clamp_min(torch.finfo(torch.float32).tiny)
    return (y.float() - t).pow(2).sum(-1) / den


def block_loss(y: torch.Tensor, t: torch.Tensor, kind: str) -> torch.Tensor:
    """The tuning loss: ``token`` = the mean of :func:`token_errors`, ``mse`` = plain MSE."""
    if kind == "mse":
        return nn.functional.mse_loss(y.float(), t.float())
    return token_errors(y, t).mean()


class ErrorMeter:
    """The mean over tokens of ``‖y_τ − T_τ‖² / ‖T_τ‖²``, accumulated batch by batch:
    ``meter(j, y)`` for the outputs ``y`` of rows ``j…``."""

    def __init__(self, target: torch.Tensor):
        self.target = target
        self.total = 0.0
        self.tokens = 0

    def __call__(self, j: int, y: torch.Tensor) -> None:
        e = token_errors(y, self.target[j : j + y.shape[0]])
        self.total += float(e.sum())
        self.tokens += e.numel()

    @property
    def error(self) -> float:
        return self.total / self.tokens if self.tokens else 0.0


class BlockTuner:
    """The block-wise stage of one walk: the target buffer, and the tuning of each layer.

    The walk runs the forwards (:meth:`~llmprune.engine.sequential.LayerWalk.set_target`,
    :meth:`~llmprune.engine.sequential.LayerWalk.reconstruct`); per layer, in this order: the
    targets from the still dense layer, pruning, the error before tuning (measured by the
    pruning pass itself where it runs the pruned layer anyway), :meth:`tune`, and the error
    after, measured by the forward that propagates through the tuned layer.
    """

    def __init__(self, options: BlockwiseOptions, inps: torch.Tensor):
        self.options = options
        # The dense stream starts as the first layer's inputs (nothing is pruned before it).
        self.target = inps.clone()

    def source(self, x: torch.Tensor) -> torch.Tensor:
        """What the dense layer reads to give the targets: the dense stream (``dense``; the
        outputs replace it in place, its inputs are never needed again) or ``x`` (``local``)."""
        return self.target if self.options.recon_target == "dense" else x

    def write(self, j: int, y: torch.Tensor) -> None:
        """Store the dense layer's outputs ``y`` of rows ``j…`` as their targets."""
        self.target[j : j + y.shape[0]] = y

    def meter(self) -> ErrorMeter:
        """A fresh error meter against the current targets."""
        return ErrorMeter(self.target)

    def tune(self, layer: nn.Module, x: torch.Tensor, kwargs: dict, masks: dict[str, torch.Tensor],
             before: float, seed: int = 0) -> dict:
        """Tune ``layer`` in place on inputs ``x`` towards the targets, unless its error
        ``before`` is already round-off (:data:`SKIP_BELOW`); returns its report entry.

        ``masks``: linear name → bool keep-mask of its weight (True = kept); a linear without
        one is tuned whole (e.g. a shrunk, dense MLP). ``seed`` orders the rows.
        """
        entry = {"error_before": before, "steps": 0}
        if not math.isfinite(before) or before <= SKIP_BELOW:
            entry["skipped"] = True
            return entry
        losses = tune_layer(layer, x, self.target, kwargs, masks, self.options, seed)
        entry.update(steps=len(losses), loss_first=losses[0], loss_last=losses[-1])
        return entry


def summarize(entries: list[dict], options: BlockwiseOptions) -> dict:
    """The report's ``blockwise`` section: the options, mean errors before / after over the
    layers, how many were tuned or skipped, the layers that got worse (an entry's ``index``, else
    its position), and the seconds the stage added."""
    before = [e["error_before"] for e in entries]
    after = [e["error_after"] for e in entries]
    return {"options": options.model_dump(), "layers": len(entries),
            "tuned": sum(e["steps"] > 0 for e in entries), "skipped": sum(bool(e.get("skipped")) for e in entries),
            "worse": [e.get("index", i) for i, e in enumerate(entries) if e["error_after"] > e["error_before"]],
            "error_before_mean": sum(before) / len(before) if before else None,
            "error_after_mean": sum(after) / len(after) if after else None,
            "seconds": sum(e["seconds"] for e in entries)}


def tuned_parameters(layer: nn.Module, masks: dict[str, torch.Tensor], norms: bool
                     ) -> list[tuple[nn.Parameter, torch.Tensor | None]]:
    """``(parameter, keep-mask or None)`` for everything the stage may change: each linear's
    weight (masked where ``masks`` has it) and bias, and with ``norms`` the norm weights."""
    out: list[tuple[nn.Parameter, torch.Tensor | None]] = []
    for name, lin in linear_layers(layer).items():
        keep = masks.get(name)
        if keep is not None:
            keep = keep.to(lin.weight.device, torch.bool)
        out.append((lin.weight, keep))
        if lin.bias is not None:
            out.append((lin.bias, None))
    if norms:
        seen = {id(p) for p, _ in out}
        out += [(p, None) for p in norm_parameters(layer) if id(p) not in seen]
    return out


def tune_layer(layer: nn.Module, x: torch.Tensor, target: torch.Tensor, kwargs: dict,
               masks: dict[str, torch.Tensor], options: BlockwiseOptions, seed: int = 0) -> list[float]:
    """``options.recon_steps`` Adam steps on ``mean ‖layer(x_b) − target_b‖²`` over mini-batches
    ``b`` of ``options.recon_batch`` rows (a seeded permutation, then the next one); returns the
    loss of each step. The learning rate decays linearly from ``recon_lr`` to 0 (EBFT's
    schedule, without its warm-up). After every step each masked weight is zeroed again where
    its mask prunes it, so the pattern is exact whatever Adam did."""
    params = tuned_parameters(layer, masks, options.recon_norms)
    b = min(options.recon_batch, x.shape[0])
    if x.device.type == "cpu":  # each step's activations come from the heap the last step freed
        reuse_one_call_blocks(layer, b, x.shape[1])
    flags = {id(p): p.requires_grad for p in layer.parameters()}
    for p in layer.parameters():
        p.requires_grad_(False)
    for p, _ in params:
        p.requires_grad_(True)
    steps = options.recon_steps
    opt = torch.optim.Adam([p for p, _ in params], lr=options.recon_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    gen = torch.Generator().manual_seed(seed)
    rows = x.shape[0]
    order: list[int] = []
    losses = []
    try:
        with torch.enable_grad():
            for _ in range(steps):
                if len(order) < b:
                    order += torch.randperm(rows, generator=gen).tolist()
                idx, order = order[:b], order[b:]
                pick = torch.tensor(idx, device=x.device)
                y = layer_output(layer(x.index_select(0, pick), **kwargs))
                loss = block_loss(y, target.index_select(0, pick), options.recon_loss)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sched.step()
                with torch.no_grad():
                    for p, keep in params:
                        if keep is not None:
                            p.masked_fill_(~keep, 0)
                losses.append(float(loss.detach()))
    finally:
        for p in layer.parameters():
            p.requires_grad_(flags.get(id(p), True))
    return losses
