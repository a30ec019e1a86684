"""Calibration windows as in the SparseGPT / Wanda code: ``nsamples`` random ``seqlen`` windows."""

from __future__ import annotations

import random

import torch

from llmprune.data.sources import Corpus
from llmprune.errors import LLMPruneError


def calibration_windows(corpus: Corpus, tokenizer, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``(nsamples, seqlen)`` token ids, reproducible for a given seed.

    Documents (C4): draw a random document until one is longer than ``seqlen`` tokens, then a
    random window inside it. Lines (WikiText, plain text): tokenise the whole text once and
    draw random windows from it.
    """
    rng = random.Random(seed)
    if corpus.kind == "lines":
        ids = tokenizer(" ".join(corpus.pieces), return_tensors="pt").input_ids[0]
        if ids.numel() <= seqlen:
            raise LLMPruneError(f"{corpus.label}: {ids.numel()} tokens, too few for seqlen {seqlen}")
        starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
        return torch.stack([ids[s : s + seqlen] for s in starts])

    encoded: dict[int, torch.Tensor] = {}

    def enc(i: int) -> torch.Tensor:
        if i not in encoded:
            encoded[i] = tokenizer(corpus.pieces[i], return_tensors="pt").input_ids[0]
        return encoded[i]

    out = []
    for _ in range(nsamples):
        # Tokenised documents are cached, so redrawing short ones costs only the RNG call.
        for _attempt in range(50 * len(corpus.pieces)):
            ids = enc(rng.randint(0, len(corpus.pieces) - 1))
            if ids.numel() > seqlen:
                break
        else:
            raise LLMPruneError(f"{corpus.label}: no document longer than {seqlen} tokens; lower --seqlen")
        s = rng.randint(0, ids.numel() - seqlen - 1)
        out.append(ids[s : s + seqlen])
    return torch.stack(out)
