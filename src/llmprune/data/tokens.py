"""Evaluation token streams, as in the seed papers' perplexity protocol."""

from __future__ import annotations

import torch

from llmprune.data.sources import C4_EVAL_DOCS, Corpus


def eval_token_stream(corpus: Corpus, tokenizer, seqlen: int) -> torch.Tensor:
    """One long ``(1, T)`` id tensor: WikiText joined with "\\n\\n"; C4's first 1100 docs joined
    with " " and capped at 256·seqlen tokens (SparseGPT's ``c4`` evaluation)."""
    if corpus.kind == "lines":
        return tokenizer("\n\n".join(corpus.pieces), return_tensors="pt").input_ids
    ids = tokenizer(" ".join(corpus.pieces[:C4_EVAL_DOCS]), return_tensors="pt").input_ids
    return ids[:, : 256 * seqlen]
