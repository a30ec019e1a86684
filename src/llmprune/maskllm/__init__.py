"""MaskLLM (Fang et al., NeurIPS 2024): N:M masks learned end to end with Gumbel-softmax.

Public surface: :func:`maskllm` (the entry point), :class:`MaskLLMOptions`, the mask pieces
(:func:`candidates`, :func:`attach_masks`, :func:`hard_masks`, :func:`detach_masks`), priors
(:func:`apply_prior`, :func:`oneshot_prior`); the loop itself is :mod:`llmprune.train`. Masks are plain
``{weight name: bool tensor}`` dicts.
"""

from llmprune.maskllm.api import MaskLLMResult, maskllm
from llmprune.maskllm.candidates import candidates, parse_nm
from llmprune.maskllm.gumbel import (
           LearnableNMMask,
           NoiseSource,
           attach_masks,
           detach_masks,
           hard_masks,
)
from llmprune.maskllm.options import MaskLLMOptions
from llmprune.maskllm.prior import apply_prior, oneshot_prior
from llmprune.maskllm.schedule import MaskSchedule

__all__ = ["LearnableNMMask", "MaskLLMOptions", "MaskLLMResult", "MaskSchedule", "NoiseSource",
           "apply_prior", "attach_masks", "candidates", "detach_masks", "hard_masks",
           "maskllm", "oneshot_prior", "parse_nm"]
