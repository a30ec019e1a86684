"""Prefill and decode tokens/s of a causal LM, measured the same way for every model.

Greedy decoding with the model's own KV cache, token by token, from random prompt ids; no
sampling, no early stop, so every model does exactly the same number of forwards.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from llmprune.eval.placement import model_device


def sync(device: torch.device) -> None:
    """Wait for the device's queued work: CUDA kernels run asynchronously, so a clock read
    without this measures only the launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_speed(model: nn.Module, prompt_len: int = 128, new_tokens: int = 32, batch_size: int = 1,
                  repeats: int = 3, seed: int = 0, warmup: int = 1) -> dict:
    """Median tokens/s of the prefill (``batch_size x prompt_len`` tokens in one forward) and of
    the decode (one token per row per forward, with the cache), over ``repeats`` timed runs after
    ``warmup`` untimed ones (allocators, kernel selection, caches)."""
    device = model_device(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, prompt_len), generator=g).to(device)
    prefill, decode = [], []
    for r in range(warmup + repeats):
        sync(device)
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        sync(device)
        t1 = time.perf_counter()
        # transformers 5 names the cache ``cache`` (``past_key_values`` before)
        key = "cache" if "cache" in out else "past_key_values"
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            out = model(tok, use_cache=True, **{key: out[key]})
            tok = out.logits[:, -1:].argmax(-1)
        sync(device)
        t2 = time.perf_counter()
        if r >= warmup:
            prefill.append(batch_size * prompt_len / (t1 - t0))
            decode.append(batch_size * new_tokens / (t2 - t1) if new_tokens else 0.0)
    return {"prefill_tok_s": statistics.median(prefill), "decode_tok_s": statistics.median(decode),
            "prefill_runs": prefill, "decode_runs": decode,
            "prompt_len": prompt_len, "new_tokens": new_tokens, "batch_size": batch_size,
            "repeats": repeats, "warmup": warmup, "threads": torch.get_num_threads()}
