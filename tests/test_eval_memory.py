"""Evaluation in bounded memory: the loss a chunk of positions at a time (llmprune.eval.loss)
gives the perplexity of the model's own full forward, and never builds a batch's logits."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from conftest import family_model, tiny_model

import llmprune.eval.loss as loss_mod
from llmprune.data.sources import load_corpus
from llmprune.data.tokens import eval_token_stream

# the module, not the function that llmprune.eval re-exports under the same name
ppl_mod = importlib.import_module("llmprune.eval.perplexity")
SEQLEN = 32


def model_of(name: str):
    if name == "gemma2":
        m = family_model("gemma2", layers=2)
        # A low cap so soft-capping changes the loss a lot: a forgotten cap cannot pass.
        m.config.final_logit_softcapping = 0.5
        return m
    return tiny_model(name)


def hf_window_losses(model, windows: torch.Tensor) -> list[float]:
    """Each window's loss as transformers computes it from the full logits (labels=)."""
    with torch.no_grad():
        return [model(w[None], labels=w[None], use_cache=False).loss.item() for w in windows]


@pytest.fixture(scope="module")
def ids(tokenizer):
    return eval_token_stream(load_corpus("wikitext2", "test"), tokenizer, SEQLEN)


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("chunk", [5, None])  # 5: several chunks and a short last one
def test_chunked_loss_equals_the_models_loss(ids, name, chunk):
    model = model_of(name)
    windows = ids[:, : 3 * SEQLEN].reshape(3, SEQLEN)
    ours = loss_mod.chunked_window_nlls(model, windows, chunk=chunk)
    assert ours is not None  # the head reproduces the logits: no fallback
    assert ours == pytest.approx(hf_window_losses(model, windows), rel=1e-5)


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_perplexity_equals_the_models_loss(ids, name):
    model = model_of(name)
    n = 7  # two batches of 4, the second short
    r = ppl_mod.perplexity(model, ids, SEQLEN, max_windows=n, progress=False)
    ref = hf_window_losses(model, ids[:, : n * SEQLEN].reshape(n, SEQLEN))
    assert r["ppl"] == pytest.approx(math.exp(sum(ref) / n), rel=1e-5)
    assert set(r) == {"ppl", "windows", "seqlen", "tokens"} and r["windows"] == n


def test_no_batch_logits_are_built(ids, monkeypatch):
    model = model_of("llama")
    vocab = model.config.vocab_size
    monkeypatch.setattr(loss_mod, "chunk_positions", lambda v: 8)
    sizes = []
    model.lm_head.register_forward_hook(lambda m, a, out: sizes.append(out.numel()))
    ppl_mod.perplexity(model, ids, SEQLEN, max_windows=4, progress=False)
    # the model's own forward computes only the probe; then chunks of 8 positions
    assert max(sizes) == 8 * vocab and len(sizes) == 2 + 4 * math.ceil((SEQLEN - 1) / 8)


def test_unknown_post_head_transform_falls_back(ids, monkeypatch):
    """A model whose forward changes the head's logits in a way we do not reproduce (here: the
    soft-cap, forgotten) is evaluated by its plain forward, with the same perplexity."""
    model = model_of("gemma2")
    n = 5
    ref = hf_window_losses(model, ids[:, : n * SEQLEN].reshape(n, SEQLEN))
    monkeypatch.setattr(loss_mod, "logit_transform", lambda m: (lambda x: x))
    assert loss_mod.chunked_window_nlls(model, ids[:, :SEQLEN].reshape(1, SEQLEN)) is None
    plain = []
    real = ppl_mod.plain_window_nlls
    monkeypatch.setattr(ppl_mod, "plain_window_nlls", lambda *a: plain.append(1) or real(*a))
    r = ppl_mod.perplexity(model, ids, SEQLEN, max_windows=n, progress=False)
    assert r["ppl"] == pytest.approx(math.exp(sum(ref) / n), rel=1e-5)
    assert len(plain) == 2  # both batches, the probe's failure remembered after the first
    assert not model.lm_head._forward_pre_hooks  # the probe hook is gone


def test_layer_by_layer_placement_same_loss(ids, monkeypatch):
    """Streaming the decoder layers (placement "layers") gives the same chunked loss."""
    model = model_of("qwen2")
    n = 5
    ref = hf_window_losses(model, ids[:, : n * SEQLEN].reshape(n, SEQLEN))
    monkeypatch.setattr(ppl_mod, "choose_placement", lambda *a: "layers")
    r = ppl_mod.perplexity(model, ids, SEQLEN, max_windows=n, progress=False, device="cpu")
    assert r["ppl"] == pytest.approx(math.exp(sum(ref) / n), rel=1e-5)
