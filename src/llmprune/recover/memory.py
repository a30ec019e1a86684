"""How much memory recovery training adds to the loaded model (and its teacher), checked
before it starts."""

from __future__ import annotations

import torch
from torch import nn

from llmprune.engine.memory import check_fits, token_bytes
from llmprune.eval.loss import chunk_positions
from llmprune.eval.placement import choose_placement, module_bytes
from llmprune.models.adapter import masked_linears
from llmprune.models.layers import decoder_layers
from llmprune.recover.options import RecoverOptions
from llmprune.train.trainer import model_bytes_to_move


def estimate_recover_bytes(model: nn.Module, opts: RecoverOptions, targets: list[str] | None = None) -> dict[str, int]:
    """Extra bytes of one process, by part (an estimate, not a bound).

    ``weights`` (masked): the kept weights' gradient and AdamW's two moments, in the model's
    dtype, plus one byte per weight for the mask. ``adapter`` (lora): the LoRA matrices, their
    gradient and two moments in fp32. ``activations``: as for MaskLLM, Korthikanti et al.'s
    ``34·s·b·h`` bytes per layer at 16 bits plus the fp32 output logits and their gradient.
    With distillation, ``distill``: the logit KL's kept fp32 gradient (one logit tensor) and
    one chunk's temporaries, and with the hidden term each layer's fp32 difference.
    """
    lins = masked_linears(model)
    param = next(model.parameters())
    numel = sum(lin.weight.numel() for lin in lins.values())
    tokens = opts.batch_size * opts.seqlen
    width = model.get_input_embeddings().weight.shape[1]
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else 0
    layers = len(decoder_layers(model))
    act = int(34 * tokens * width * layers * param.element_size() / 2) + 2 * 4 * tokens * vocab
    if opts.mode == "masked":
        parts = {"weights": 3 * numel * param.element_size() + numel, "activations": act}
    else:
        chosen = targets if targets is not None else list(lins)
        lora = sum(opts.lora_rank * (lins[n].in_features + lins[n].out_features) for n in chosen)
        parts = {"adapter": 4 * 4 * lora, "activations": act}
    if opts.distills:
        kd = 4 * tokens * vocab + 4 * 4 * min(tokens, chunk_positions(vocab)) * vocab
        if opts.kd_hidden_weight:
            kd += 4 * tokens * width * layers
        parts["distill"] = kd
    return parts


def estimate_teacher_bytes(teacher: nn.Module, opts: RecoverOptions, student_layers: int,
                           device: torch.device, loaded: bool) -> dict[str, dict[str, int]]:
    """The teacher's bytes by device and part: ``teacher weights`` where they load (the CPU)
    unless ``loaded``, and on its compute ``device`` the weights moved there (all of them, or
    one decoder layer plus the rest when it will stream) and ``teacher activations``: one
    micro-batch's logits in its dtype (or the top-k values and ids), one layer's
    intermediates and, with the hidden term, ``student_layers`` kept layer outputs.

    ``teacher`` may be a skeleton on the meta device (sizes only).
    """
    param = next(teacher.parameters())
    elt = param.element_size()
    tokens = opts.batch_size * opts.seqlen
    vocab = teacher.get_output_embeddings().weight.shape[0]
    width = teacher.get_input_embeddings().weight.shape[1]
    layers = decoder_layers(teacher)
    logits = tokens * vocab * elt if not opts.kd_topk else tokens * opts.kd_topk * (elt + 8)
    act = logits + tokens * token_bytes(layers[0]) + (tokens * width * elt * student_layers
                                                      if opts.kd_hidden_weight else 0)
    weights = module_bytes(teacher)
    out: dict[str, dict[str, int]] = {}
    if not loaded:
        out.setdefault("cpu", {})["teacher weights"] = weights
    # a skeleton sits on the meta device: the placement is decided as it will be once loaded
    where = "here" if device.type == "cpu" else choose_placement(teacher, device, opts.batch_size, opts.seqlen)
    on_device = out.setdefault(_key(device), {})
    if where == "whole":
        on_device["teacher weights"] = weights
    elif where == "layers":
        on_device["teacher weights"] = weights - sum(module_bytes(L) for L in layers) + module_bytes(layers[0])
    on_device["teacher activations"] = act
    return out


def _key(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def check_recover_memory(model: nn.Module, opts: RecoverOptions, targets: list[str] | None = None,
                         teacher: nn.Module | None = None, teacher_device: str | torch.device | None = None,
                         teacher_loaded: bool = True, device: str | torch.device | None = None) -> None:
    """Refuse a run whose training state (and teacher) clearly does not fit, with the numbers.

    The student trains on ``device`` (default: where its parameters are; its weights count there
    when they will move); the teacher's parts count there too when it runs on the same device,
    else on its own.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    parts = {_key(device): {**model_bytes_to_move(model, device), **estimate_recover_bytes(model, opts, targets)}}
    if teacher is not None:
        tdev = torch.device(teacher_device) if teacher_device is not None else device
        for dev, extra in estimate_teacher_bytes(teacher, opts, len(decoder_layers(model)), tdev,
                                                 teacher_loaded).items():
            parts.setdefault(_key(torch.device(dev)), {}).update(extra)
    hint = (f"lower --batch-size ({opts.batch_size}) or --seqlen ({opts.seqlen}) and raise --grad-accum"
            + (", or use --mode lora" if opts.mode == "masked" else "")
            + (", or give the teacher another --teacher-device, or --kd-topk" if teacher is not None else ""))
    what = f"recovery ({opts.mode}{', distill' if opts.distills else ''})"
    for dev, p in parts.items():
        check_fits(p, dev, what, hint)
