"""Recovery fine-tuning's options, declared once: the trainer's plus the mode, the loss and
LoRA's and distillation's own.

Two questions, two options: ``mode`` says *what* trains (``masked``: the kept weights;
``lora``: an adapter) and ``loss`` *on what* (``ce``: the next-token loss; ``kd``: the dense
teacher's logits, Hinton's KL at temperature ``kd_temperature``, plus SquareHead's hidden-state
term with ``kd_hidden_weight`` > 0; ``kd+ce``: both). ``mode: distill`` is the issue's spelling
of ``mode: masked, loss: kd`` and is stored that way.

LoRA defaults follow the LoRA fine-tuning of the Wanda / OWL code (``lora_ft``: r 8, α 16,
dropout 0.05, lr 1e-4), with every decoder linear as a target; masked fine-tuning uses MaskLLM's
weight learning rate (the reference's 5e-5; measured on SmolLM2-135M 2:4 at 82 k tokens: 39 % of the
gap to dense closed, 29 % with 2e-5). Recovery starts from a trained model, so the
weight decay defaults to 0 (decay would pull the kept weights towards zero).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from llmprune.options import CommaList, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from llmprune.train.trainer import TrainerOptions

DEFAULT_LR = {"masked": 5e-5, "lora": 1e-4}
LORA_DEFAULTS = {"lora_rank": 8, "lora_alpha": 16.0, "lora_dropout": 0.05}
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")
KD_DEFAULTS = {"kd_temperature": 1.0, "kd_topk": 0, "kd_hidden_weight": 0.0}
KD_FIELDS = ("teacher", "teacher_device", *KD_DEFAULTS)


class RecoverOptions(TrainerOptions):
    """Recovery after pruning: train the kept weights (``masked``) or a LoRA adapter (``lora``)
    with the mask fixed. ``None`` means the mode's default (filled in on validation)."""

    mode: Literal["masked", "lora", "distill"] = Field(
        "masked", description="masked: train the kept weights, zeros stay zero | lora: train a LoRA "
        "adapter (needs peft) | distill: masked, learning from the dense teacher (= --loss kd)")
    loss: Literal["ce", "kd", "kd+ce"] | None = Field(
        None, description="ce: next-token cross-entropy | kd: distillation from --teacher (logit KL, "
        "plus hidden states with --kd-hidden-weight) | kd+ce: both (default: ce; kd with --mode distill)")
    teacher: str | None = Field(None, description="the model to distil from, anything load_model reads "
                                                  "(default: the model recorded in the input's pruning.json)")
    teacher_device: str | None = Field(None, description="where the teacher's forward runs: cpu | cuda | "
                                                         "cuda:N (default: the student's device); streamed "
                                                         "one layer at a time if it does not fit there")
    kd_temperature: PositiveFloat | None = Field(None, description="softmax temperature T of the logit KL, "
                                                                   "scaled by T² (kd; default 1)")
    kd_topk: NonNegativeInt | None = Field(None, description="compare the teacher's top-k tokens only, "
                                                             "renormalised (kd; default 0: the full vocabulary)")
    kd_hidden_weight: NonNegativeFloat | None = Field(None, description="weight of SquareHead's per-layer "
                                                                        "‖h_s−h_t‖²/‖h_t‖², averaged over "
                                                                        "layers (kd; default 0: logits only)")
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

    @property
    def distills(self) -> bool:
        """Whether the loss learns from a teacher."""
        return self.loss in ("kd", "kd+ce")

    @model_validator(mode="after")
    def _mode_defaults(self) -> RecoverOptions:
        if self.mode == "distill":
            if self.loss == "ce":
                raise ValueError("--mode distill trains on the teacher (--loss kd or kd+ce), not --loss ce; "
                                 "give --mode masked for the plain loss")
            self.mode, self.loss = "masked", self.loss or "kd"
        self.loss = self.loss or "ce"
        if self.distills:
            for k, v in KD_DEFAULTS.items():
                if getattr(self, k) is None:
                    setattr(self, k, v)
        else:
            _refuse([f for f in KD_FIELDS if getattr(self, f) is not None],
                    "--mode distill or --loss kd", f"--loss {self.loss}")
        if self.mode == "masked":
            given = [f for f in LORA_FIELDS if getattr(self, f) is not None]
            if self.keep_adapter:
                given.append("keep_adapter")
            _refuse(given, "--mode lora", "--mode masked")
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


def _refuse(given: list[str], where: str, here: str) -> None:
    """One line naming the options ``given`` that only apply ``where``, not ``here``."""
    if given:
        flags = ", ".join("--" + f.replace("_", "-") for f in given)
        raise ValueError(f"{flags} only appl{'ies' if len(given) == 1 else 'y'} to {where}, not {here}")
