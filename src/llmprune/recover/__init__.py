"""Recovery fine-tuning after pruning, with the mask fixed: masked fine-tuning of the kept
weights, or a LoRA adapter (``peft``) merged and re-masked. One loop: MaskLLM's trainer.

Public surface: :func:`recover`, :class:`RecoverOptions`, :class:`RecoverResult`,
:func:`merge_adapter` / :func:`remask_result` / :func:`merge_and_remask` (LoRA results),
:func:`model_masks`, :func:`pruned_nonzero`; the job is :mod:`llmprune.recover.job`.
"""

from llmprune.recover.api import (
    RecoverResult,
    merge_adapter,
    merge_and_remask,
    model_masks,
    pruned_nonzero,
    recover,
    remask_result,
)
from llmprune.recover.options import RecoverOptions

__all__ = ["RecoverOptions", "RecoverResult", "merge_adapter", "merge_and_remask", "model_masks",
           "pruned_nonzero", "recover", "remask_result"]
