"""Recovery fine-tuning's options, declared once: the trainer's plus the mode and LoRA's own.

LoRA defaults follow the LoRA fine-tuning of the Wanda / OWL code (``lora_ft``: r 8, α 16,
dropout 0.05, lr 1e-4), with every decoder linear as a target; masked fine-tuning uses MaskLLM's
weight learning rate (the reference's 5e-5; measured on SmolLM2-135M 2:4 at 82 k tokens: 39 % of the
gap to dense closed, 29 % with 2e-5). Recovery starts from a trained model, so the
weight decay defaults to 0 (decay would pull the kept weights towards zero).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from llmprune.options import CommaList, NonNegativeFloat, PositiveFloat, PositiveInt
from llmprune.train.trainer import TrainerOptions

MODES = ("masked", "lora")
DEFAULT_LR = {"masked": 5e-5, "lora": 1e-4}
LORA_DEFAULTS = {"lora_rank": 8, "lora_alpha": 16.0, "lora_dropout": 0.05}
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")


class RecoverOptions(TrainerOptions):
    """Recovery after pruning: train the kept weights (``masked``) or a LoRA adapter (``lora``)
    with the mask fixed. ``None`` means the mode's default (filled in on validation)."""

    mode: Literal["masked", "lora"] = Field("masked", description="masked: train the kept weights, "
                                                                  "zeros stay zero | lora: train a "
                                                                  "LoRA adapter (needs peft)")
    lr: PositiveFloat | None = Field(None, description="base learning rate, decayed by a cosine to "
                                                       "min_lr (default: 5e-5 masked, 1e-4 lora)")
    min_lr: NonNegativeFloat | None = Field(None, description="cosine floor of the learning rate "
                                                              "(default: lr / 10)")
    weight_decay: NonNegativeFloat = Field(0.0, description="AdamW weight decay (pruned weights stay "
                                                            "zero whatever its value)")
    lora_rank: PositiveInt | None = Field(None, description="LoRA rank r (lora only; default 8)")
    lora_alpha: PositiveFloat | None = Field(None, description="LoRA scale α (update = α/r·BA; "
                                                               "lora only; default 16)")
    lora_dropout: NonNegativeFloat | None = Field(None, description="dropout on the LoRA path "
                                                                    "(lora only; default 0.05)")
    lora_targets: CommaList | None = Field(None, description="linears that get an adapter, by name "
                                                             "suffix, e.g. q_proj,v_proj (lora only; "
                                                             "default: every decoder linear)")
    keep_adapter: bool = Field(False, strict=True, description="lora: save the adapter in OUT/adapter "
                                                               "beside the untouched sparse base "
                                                               "instead of merging it and re-masking")

    @model_validator(mode="after")
    def _mode_defaults(self) -> RecoverOptions:
        if self.mode == "masked":
            given = [f for f in LORA_FIELDS if getattr(self, f) is not None]
            if self.keep_adapter:
                given.append("keep_adapter")
            if given:
                flags = ", ".join("--" + f.replace("_", "-") for f in given)
                raise ValueError(f"{flags} only appl{'ies' if len(given) == 1 else 'y'} to --mode lora, "
                                 "not --mode masked")
        else:
            for k, v in LORA_DEFAULTS.items():
                if getattr(self, k) is None:
                    setattr(self, k, v)
            if self.lora_dropout >= 1:
                raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
            if self.lora_targets is not None and not self.lora_targets:
                raise ValueError("lora_targets is empty; name at least one linear (e.g. q_proj,v_proj)")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.mode]
        if self.min_lr is None:
            self.min_lr = self.lr / 10
        return self
