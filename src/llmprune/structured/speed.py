"""CPU (or any device) prefill and decode speed, measured the same way before and after pruning.

Greedy decoding with the model's own KV cache, token by token, from random prompt ids; no
sampling, no early stop, so every model does exactly the same number of forwards.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from llmprune.eval.placement import model_device


@torch.no_grad()
def measure_speed(model: nn.Module, prompt_len: int = 128, new_tokens: int = 32, batch_size: int = 1,
                  repeats: int = 3, seed: int = 0) -> dict:
    """Median tokens/s of the prefill (``batch_size x prompt_len`` tokens in one forward) and of
    the decode (one token per row per forward, with the cache), after one warm-up run."""
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, prompt_len), generator=g).to(model_device(model))
    prefill, decode = [], []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        t1 = time.perf_counter()
        # transformers 5 names the cache ``cache`` (``past_key_values`` before)
        key = "cache" if "cache" in out else "past_key_values"
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            out = model(tok, use_cache=True, **{key: out[key]})
            tok = out.logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
        if r:  # the first run warms up allocators and kernels
            prefill.append(batch_size * prompt_len / (t1 - t0))
            decode.append(batch_size * new_tokens / (t2 - t1))
    return {"prefill_tok_s": statistics.median(prefill), "decode_tok_s": statistics.median(decode),
            "prompt_len": prompt_len, "new_tokens": new_tokens, "batch_size": batch_size,
            "repeats": repeats, "threads": torch.get_num_threads()}
