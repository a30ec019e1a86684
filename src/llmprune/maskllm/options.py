"""MaskLLM's options, declared once. Defaults are the reference's LLaMA-2 7B recipe
(``scripts/learnable_sparsity/llama2_7b_mask_only_tp8_c4.sh`` of NVlabs/MaskLLM)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from llmprune.maskllm.candidates import parse_nm
from llmprune.options import NonNegativeFloat, PositiveFloat
from llmprune.train.trainer import TrainerOptions


class MaskLLMOptions(TrainerOptions):
    """Learnable N:M masks (Fang et al., NeurIPS 2024): the loop's options plus the mask's own."""

    pattern: Annotated[str, AfterValidator(lambda p: parse_nm(p) and p)] = Field("2:4", description="N:M pattern to learn (N kept of every M inputs), e.g. 2:4")
    logit_lr_mult: PositiveFloat = Field(10.0, description="learning-rate multiplier of the mask logits "
                                                           "(5e-4 with the default lr)")
    tau_start: PositiveFloat = Field(4.0, description="Gumbel-softmax temperature τ at the first step")
    tau_end: PositiveFloat = Field(0.05, description="temperature τ at the last step (linear in between)")
    kappa_start: PositiveFloat = Field(1e2, description="logit scale κ at the first step")
    kappa_end: PositiveFloat = Field(5e2, description="logit scale κ at the last step (linear in between)")
    reg_lambda: NonNegativeFloat = Field(1e-5, description="sparse-weight regulariser weight λ at the "
                                                           "first step, decaying linearly to 0")
    prior_strength: NonNegativeFloat = Field(3.0, description="prior shift: (overlap − 1)·std(logits)·strength")
    init_std: PositiveFloat = Field(0.01, description="std of the N(0, std) logit initialisation")
    logits_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype of the mask logits, their gradient and AdamW moments: bfloat16 "
                               "halves that memory (large models on GPUs); the softmax runs in fp32")
    train_weights: bool = Field(False, strict=True, description="also train the kept weights (masked "
                                                                "fine-tuning); default: mask only")
    weights_lr: PositiveFloat | None = Field(None, description="base learning rate of the weights with "
                                                               "train_weights (default: lr, as the reference)")
