"""Perplexity with the seed papers' protocol: non-overlapping ``seqlen`` windows of one token
stream, exp(mean per-window NLL)."""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from llmprune.data.sources import check_available, load_corpus
from llmprune.data.tokens import eval_token_stream
from llmprune.errors import LLMPruneError

EVAL_SPLIT = {"wikitext2": "test", "c4": "validation"}


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seqlen: int, max_windows: int | None = None,
               progress: bool = True, desc: str = "ppl", batch_size: int = 4) -> dict:
    """PPL of ``model`` on ``ids (1, T)`` cut into ``T // seqlen`` windows (or the first K)."""
    n = ids.shape[1] // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise LLMPruneError(f"only {ids.shape[1]} evaluation tokens, fewer than seqlen {seqlen}")
    device = model.get_input_embeddings().weight.device
    windows = ids[:, : n * seqlen].reshape(n, seqlen)
    nll = 0.0
    bar = tqdm(total=n, desc=desc, unit="win", disable=not progress)
    for i in range(0, n, batch_size):
        batch = windows[i : i + batch_size].to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        loss = nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
        nll += loss.mean(dim=1).sum().item()  # mean NLL per window, as the papers average
        bar.update(batch.shape[0])
    bar.close()
    ppl = math.exp(nll / n)
    if not math.isfinite(ppl):
        ppl = float("inf")
    return {"ppl": ppl, "windows": n, "seqlen": seqlen, "tokens": n * seqlen}


def check_eval_data(names: list[str]) -> None:
    for name in names:
        check_available(name, EVAL_SPLIT.get(name, "test"))


def evaluate(model: nn.Module, tokenizer, datasets: list[str] | str = ("wikitext2",),
             seqlen: int = 2048, max_windows: int | None = None, progress: bool = True) -> dict:
    """Perplexity on each dataset (``wikitext2``, ``c4`` or a text/jsonl file path).

    Returns ``{name: {"ppl", "label", "windows", "seqlen", "tokens", "seconds"}}``; the label
    says when the data is not the standard set (e.g. the 1000-document C4 sample).
    """
    if isinstance(datasets, str):
        datasets = [d for d in datasets.split(",") if d]
    out = {}
    for name in datasets:
        t0 = time.perf_counter()
        corpus = load_corpus(name, EVAL_SPLIT.get(name, "test"))
        ids = eval_token_stream(corpus, tokenizer, seqlen)
        r = perplexity(model, ids, seqlen, max_windows, progress, desc=f"ppl {name}")
        r["label"] = corpus.label + (f", first {r['windows']} windows" if max_windows else "")
        r["seconds"] = time.perf_counter() - t0
        out[name] = r
    return out
