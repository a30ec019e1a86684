"""How much memory MaskLLM training adds to the loaded model, checked before it starts."""

from __future__ import annotations

import math

import torch
from torch import nn

from llmprune.engine.memory import check_fits
from llmprune.maskllm.options import MaskLLMOptions
from llmprune.models.adapter import masked_linears
from llmprune.models.layers import decoder_layers
from llmprune.train.trainer import model_bytes_to_move


def estimate_train_bytes(model: nn.Module, opts: MaskLLMOptions, n: int, m: int) -> dict[str, int]:
    """Extra bytes of one process, by part (an estimate, not a bound).

    ``logits``: the logits, their gradient and AdamW's two moments (4 copies of
    ``numel/M · C(M, N)`` in ``logits_dtype``); ``masks``: per step, the softmax output, its Gumbel temporaries and
    the soft mask of every layer, alive until the backward; ``weights``: with
    ``train_weights``, the weights' gradient and two moments; ``activations``: Korthikanti et
    al.'s ``34·s·b·h`` bytes per layer at 16 bits (scaled to the model's dtype) plus the fp32
    output logits and their gradient.
    """
    lins = masked_linears(model)
    numel = sum(lin.weight.numel() for lin in lins.values())
    param = next(model.parameters())
    logit_elems = numel // m * math.comb(m, n)
    tokens = opts.batch_size * opts.seqlen
    width = model.get_input_embeddings().weight.shape[1]
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else 0
    layers = len(decoder_layers(model))
    return {"logits": 4 * getattr(torch, opts.logits_dtype).itemsize * logit_elems,
            "masks": 4 * (2 * logit_elems + numel),
            "weights": 3 * numel * param.element_size() if opts.train_weights else 0,
            "activations": int(34 * tokens * width * layers * param.element_size() / 2) + 2 * 4 * tokens * vocab}


def check_train_memory(model: nn.Module, opts: MaskLLMOptions, n: int, m: int,
                       device: str | torch.device | None = None) -> None:
    """Refuse a run whose training state clearly does not fit on ``device`` (where it trains;
    default: where the model is), with the numbers."""
    device = device if device is not None else next(model.parameters()).device
    check_fits({**model_bytes_to_move(model, device), **estimate_train_bytes(model, opts, n, m)}, device,
               "MaskLLM training",
               f"lower --batch-size ({opts.batch_size}) or --seqlen ({opts.seqlen}) and raise "
               "--grad-accum, or spread the run over more devices")
