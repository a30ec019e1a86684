"""How much memory recovery training adds to the loaded model, checked before it starts."""

from __future__ import annotations

from torch import nn

from llmprune.engine.memory import check_fits
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
    """
    lins = masked_linears(model)
    param = next(model.parameters())
    numel = sum(lin.weight.numel() for lin in lins.values())
    tokens = opts.batch_size * opts.seqlen
    width = model.get_input_embeddings().weight.shape[1]
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else 0
    act = int(34 * tokens * width * len(decoder_layers(model)) * param.element_size() / 2) + 2 * 4 * tokens * vocab
    if opts.mode == "masked":
        return {"weights": 3 * numel * param.element_size() + numel, "activations": act}
    chosen = targets if targets is not None else list(lins)
    lora = sum(opts.lora_rank * (lins[n].in_features + lins[n].out_features) for n in chosen)
    return {"adapter": 4 * 4 * lora, "activations": act}


def check_recover_memory(model: nn.Module, opts: RecoverOptions, targets: list[str] | None = None,
                         device=None) -> None:
    """Refuse a run whose training state clearly does not fit on ``device`` (where it trains;
    default: where the model is), with the numbers."""
    device = device if device is not None else next(model.parameters()).device
    check_fits({**model_bytes_to_move(model, device), **estimate_recover_bytes(model, opts, targets)}, device,
               f"recovery ({opts.mode})",
               f"lower --batch-size ({opts.batch_size}) or --seqlen ({opts.seqlen}) and raise "
               "--grad-accum" + (", or use --mode lora" if opts.mode == "masked" else ""))
