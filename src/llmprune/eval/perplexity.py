"""Perplexity with the seed papers' protocol: non-overlapping ``seqlen`` windows of one token
stream, exp(mean per-window NLL)."""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from llmprune.data.sources import Corpus, load_corpus
from llmprune.data.tokens import eval_token_stream
from llmprune.engine.memory import return_big_frees_to_os
from llmprune.errors import LLMPruneError
from llmprune.eval.loss import chunked_window_nlls, plain_window_nlls
from llmprune.eval.placement import choose_placement, model_device, placed

EVAL_SPLIT = {"wikitext2": "test", "c4": "validation"}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_eval_args(seqlen: int, max_windows: int | None = None, batch_size: int = 1) -> None:
    """Window settings that would divide by zero or measure nothing, as one clear error."""
    if not _is_int(seqlen) or seqlen < 2:
        # One token has nothing to predict: the loss of an empty window is NaN.
        raise LLMPruneError(f"seqlen must be an integer ≥ 2 tokens (--seqlen), got {seqlen!r}")
    if max_windows is not None and (not _is_int(max_windows) or max_windows < 1):
        raise LLMPruneError(f"max_windows must be a positive integer (--max-windows), or unset for "
                            f"all windows; got {max_windows!r}")
    if not _is_int(batch_size) or batch_size < 1:
        raise LLMPruneError(f"batch_size must be a positive integer, got {batch_size!r}")


def eval_names(ppl: list[str] | tuple[str, ...] | str) -> list[str]:
    """``"wikitext2,c4"`` or a list → dataset names; an empty list is an error."""
    names = [d.strip() for d in ppl.split(",")] if isinstance(ppl, str) else list(ppl)
    names = [d for d in names if d]
    if not names:
        raise LLMPruneError(f"no evaluation data given (--ppl {ppl!r}); e.g. --ppl wikitext2,c4 or a .txt/.jsonl file")
    return names


def mean_to_ppl(mean_nll: float) -> float:
    """exp(mean NLL), infinite instead of OverflowError beyond a mean loss of ~709.8."""
    try:
        ppl = math.exp(mean_nll)
    except OverflowError:
        return float("inf")
    return ppl if math.isfinite(ppl) else float("inf")


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seqlen: int, max_windows: int | None = None,
               progress: bool = True, desc: str = "ppl", batch_size: int = 4,
               device: str | torch.device | None = None) -> dict:
    """PPL of ``model`` on ``ids (1, T)`` cut into ``T // seqlen`` windows (or the first K).

    ``device``: run the forward there (None: where the model is); the model is back where it
    was afterwards. See :mod:`llmprune.eval.placement`.
    """
    check_eval_args(seqlen, max_windows, batch_size)
    return_big_frees_to_os()  # each batch's activations and logit chunks leave the RSS when freed
    n = ids.shape[1] // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise LLMPruneError(f"only {ids.shape[1]} evaluation tokens, fewer than seqlen {seqlen}")
    windows = ids[:, : n * seqlen].reshape(n, seqlen)
    mode = choose_placement(model, device, batch_size, seqlen)
    nll = 0.0
    bar = tqdm(total=n, desc=desc, unit="win", disable=not progress)
    with placed(model, device, mode):
        dev = model_device(model)
        chunked = True
        for i in range(0, n, batch_size):
            batch = windows[i : i + batch_size].to(dev)
            # The loss a chunk of positions at a time: a batch's logits would be
            # batch×seqlen×vocab (4×1024×49152 fp32 ≈ 0.8 GB for SmolLM2).
            nlls = chunked_window_nlls(model, batch) if chunked else None
            if nlls is None:  # logits the head alone does not reproduce: the model's full forward
                chunked = False
                nlls = plain_window_nlls(model, batch)
            for v in nlls:
                nll += v
            bar.update(batch.shape[0])
    bar.close()
    return {"ppl": mean_to_ppl(nll / n), "windows": n, "seqlen": seqlen, "tokens": n * seqlen}


def check_eval_data(names: list[str] | None) -> dict[str, Corpus]:
    """Read and decode every evaluation corpus now, before a model loads; pass the result to
    :func:`evaluate` as ``corpora`` so nothing is read twice."""
    return {name: load_corpus(name, EVAL_SPLIT.get(name, "test")) for name in names or []}


def evaluate(model: nn.Module, tokenizer, datasets: list[str] | str = ("wikitext2",),
             seqlen: int = 2048, max_windows: int | None = None, progress: bool = True,
             corpora: dict[str, Corpus] | None = None,
             device: str | torch.device | None = None) -> dict:
    """Perplexity on each dataset (``wikitext2``, ``c4`` or a text/jsonl file path).

    Returns ``{name: {"ppl", "label", "windows", "seqlen", "tokens", "seconds"}}``; the label
    says when the data is not the standard set (e.g. the 1000-document C4 sample).
    ``corpora``: corpora already read by :func:`check_eval_data`. ``device``: where the forward
    runs (None: where the model is).
    """
    datasets = eval_names(datasets)
    check_eval_args(seqlen, max_windows)
    if tokenizer is None:
        raise LLMPruneError("perplexity needs the model's tokenizer; pass tokenizer=")
    corpora = corpora or {}
    out = {}
    for name in datasets:
        t0 = time.perf_counter()
        corpus = corpora.get(name) or load_corpus(name, EVAL_SPLIT.get(name, "test"))
        ids = eval_token_stream(corpus, tokenizer, seqlen)
        r = perplexity(model, ids, seqlen, max_windows, progress, desc=f"ppl {name}", device=device)
        r["label"] = corpus.label + (f", first {r['windows']} windows" if max_windows else "")
        r["seconds"] = time.perf_counter() - t0
        out[name] = r
    return out
