"""Per-window language-model loss without materialising the logits of a whole batch.

The model runs as usual up to its output head (``get_output_embeddings()``), whose input — the
final hidden states — a forward pre-hook keeps; the hook hands the head only a few positions
of one row (the *probe*), so the model's forward computes and returns a tiny logit tensor
instead of ``batch × seqlen × vocab``. The loss is then the head, the model's post-head
transform (Gemma's final logit soft-capping) and an fp32 cross-entropy, applied a chunk of
positions at a time.

Exactness: the probe's logits, produced by the model's own forward, are compared with ours on
the same hidden states. A model whose forward does anything else after the head (an unknown
scaling, a second head call, a changed shape) fails that check, and the caller falls back to
the plain forward (:func:`plain_window_nlls`), so the perplexity never silently changes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# fp32 logits of one chunk stay under this many bytes (plus as much for its log-softmax).
CHUNK_BYTES = 64 << 20
MIN_CHUNK = 16
PROBE = 8  # positions of the first row the model's own forward turns into logits


def chunk_positions(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Positions per chunk so that one chunk's fp32 logits fit ``chunk_bytes``."""
    return max(MIN_CHUNK, chunk_bytes // (4 * vocab))


def logit_transform(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the model's forward does to the head's output, as transformers writes it
    (soft-capping ``cap·tanh(x / cap)`` for Gemma 2/3); the identity for other models."""
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if cap is None:
        return lambda x: x

    def softcap(x: torch.Tensor) -> torch.Tensor:
        # The same three ops in the same dtype as the model, so the result is bit-identical.
        return torch.tanh(x / cap) * cap
    return softcap


def output_head(model: nn.Module) -> nn.Module | None:
    """The module that turns hidden states into logits, or None where the model has none."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Module) else None


def plain_window_nlls(model: nn.Module, batch: torch.Tensor) -> list[float]:
    """Mean NLL of each window of ``batch (B, T)`` from the model's full logits (the old path:
    one batch's logits in the model's dtype, one window's in fp32 at a time)."""
    logits = model(batch, use_cache=False).logits
    return [nn.functional.cross_entropy(logits[j, :-1].float(), batch[j, 1:]).item()
            for j in range(batch.shape[0])]


@torch.no_grad()
def chunked_window_nlls(model: nn.Module, batch: torch.Tensor,
                        chunk: int | None = None) -> list[float] | None:
    """Mean NLL of each window of ``batch (B, T)``, the logits computed ``chunk`` positions at
    a time; None when the model's logits cannot be reproduced from its head (use
    :func:`plain_window_nlls` then)."""
    head = output_head(model)
    if head is None:
        return None
    kept: list[torch.Tensor] = []

    def keep(_module, args):
        if not args:  # called by keyword: leave it alone; the check below then fails
            return None
        kept.append(args[0])
        return (args[0][:1, :PROBE], *args[1:])

    handle = head.register_forward_pre_hook(keep)
    try:
        probe = model(batch, use_cache=False).logits
    finally:
        handle.remove()
    if len(kept) != 1 or kept[0].dim() != 3 or kept[0].shape[:2] != batch.shape:
        return None  # the head saw something other than one call on every position
    hidden, transform = kept[0], logit_transform(model)
    ours = transform(head(hidden[:1, :PROBE]))
    if probe is None or probe.shape != ours.shape:
        return None
    probe, ours = probe.float(), ours.float()
    if not torch.allclose(ours, probe, rtol=1e-5, atol=1e-5 * max(1.0, probe.abs().max().item())):
        return None
    vocab = ours.shape[-1]
    chunk = chunk or chunk_positions(vocab)
    targets = batch.to(hidden.device)
    out = []
    for j in range(batch.shape[0]):
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for s in range(0, batch.shape[1] - 1, chunk):
            e = min(s + chunk, batch.shape[1] - 1)
            logits = transform(head(hidden[j, s:e])).float()
            total += nn.functional.cross_entropy(logits, targets[j, s + 1 : e + 1], reduction="sum")
            del logits
        out.append((total / (batch.shape[1] - 1)).item())
    return out
