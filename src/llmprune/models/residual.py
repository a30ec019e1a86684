"""Who reads and who writes the residual stream, asked of the model itself.

Hidden-size pruning removes residual-stream channels everywhere at once, so it must know every
module that touches the stream. The families spell the same roles differently (Llama's
``post_attention_layernorm`` reads the stream before the MLP; Gemma2's normalises the
attention's output before it is added), so instead of a table of names one tiny forward
(8 tokens) with hooks on the first decoder layer answers it:

- a **read**: an RMSNorm whose output feeds linears (q/k/v, gate/up; the final norm feeds the
  LM head) — its *consumers*;
- a **writer**: a linear whose output is added to the stream (o_proj, down_proj), possibly
  through a **writer norm** (Gemma2/3's post-attention / post-feedforward norms);
- the embedding, and whether the model scales it (Gemma: by √hidden_size, from the config).

The layout is then *checked* on the probe: the layer's output must equal its input plus the
writers' (normed) outputs, and every norm must compute ``(offset + weight) · x / rms(x)``
(offset 0: Llama's RMSNorm; 1: Gemma's). Anything else — LayerNorm with a bias or mean
centring, a parallel residual, mixture-of-experts routers reading the stream — is one clear
error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from llmprune.errors import LLMPruneError
from llmprune.models.adapter import decoder_layers, has_experts, text_config


@dataclass(frozen=True)
class Read:
    """An RMSNorm reading the stream and the linears that read its output (names within the
    decoder layer, or within the model for the final norm). ``gain = offset + weight``."""

    norm: str
    offset: float
    consumers: tuple[str, ...]


@dataclass(frozen=True)
class Writer:
    """A linear whose output is added to the stream, through ``norm`` if not None."""

    linear: str
    norm: str | None = None
    offset: float = 0.0


@dataclass(frozen=True)
class ResidualLayout:
    """Every module of a model that reads or writes its residual stream."""

    hidden: int
    embed: str  # the input embedding, by module name
    embed_scale: float  # the model multiplies the embedding rows by this (√hidden_size in Gemma), else 1
    reads: tuple[Read, ...]  # within each decoder layer
    writers: tuple[Writer, ...]  # within each decoder layer
    final: Read  # the final norm (by module name) and the LM head
    tied: bool  # the LM head is the embedding matrix


def _norm_candidates(module: nn.Module, d: int) -> dict[str, nn.Module]:
    """Modules with a 1-D ``weight`` of ``d`` entries and no submodules: normalisations."""
    out = {}
    for name, m in module.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, nn.Parameter) and w.dim() == 1 and w.numel() == d and not list(m.children()) \
                and not isinstance(m, nn.Linear | nn.Embedding):
            out[name] = m
    return out


@torch.no_grad()
def rms_offset(name: str, norm: nn.Module) -> float:
    """0 if ``norm(x) = w · x / rms(x)``, 1 if ``(1 + w) · x / rms(x)``; else an error: hidden
    channels can be removed from an RMSNorm, not from a LayerNorm (its mean and bias)."""
    if getattr(norm, "bias", None) is not None:
        raise LLMPruneError(f"hidden-size pruning needs RMSNorm; {name} ({type(norm).__name__}) has a bias")
    w = norm.weight
    x = torch.randn(3, w.numel(), generator=torch.Generator().manual_seed(0)).to(w) * 10
    unit = x / x.float().pow(2).mean(-1, keepdim=True).sqrt().to(w)
    saved = w.detach().clone()
    try:
        w.zero_()
        y0 = norm(x)
    finally:
        w.copy_(saved)
    offset = 0.0 if float(y0.abs().max()) == 0 else 1.0
    y = norm(x)
    tol = _tol(w.dtype, 1e-3)
    if not torch.allclose(y, (offset + saved) * unit, rtol=tol, atol=tol / 10):
        raise LLMPruneError(f"hidden-size pruning needs RMSNorm; {name} ({type(norm).__name__}) computes "
                            "something else (mean centring?)")
    return offset


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and bool(torch.equal(a, b)))


def _tol(dtype: torch.dtype, floor: float) -> float:
    """A comparison tolerance for computations in ``dtype``: ``floor`` in float32, a few units of
    rounding in bf16 / fp16."""
    return max(floor, 4 * torch.finfo(dtype).eps)


@torch.no_grad()
def residual_layout(model: nn.Module) -> ResidualLayout:
    """Find and check the residual-stream layout with one 8-token forward (see the module doc)."""
    config = text_config(model)
    d = getattr(config, "hidden_size", None)
    if not isinstance(d, int):
        raise LLMPruneError(f"{type(config).__name__} has no integer hidden_size to shrink")
    if has_experts(model):
        raise LLMPruneError("hidden-size pruning of mixture-of-experts models is not supported (every router "
                            "and expert reads the residual stream); prune the experts or the MLP width instead")
    layers = decoder_layers(model)
    layer = layers[0]
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(emb, nn.Embedding) or not isinstance(head, nn.Linear):
        raise LLMPruneError(f"{type(model).__name__}: hidden-size pruning needs an nn.Embedding input and an "
                            "nn.Linear LM head")
    names = {m: n for n, m in model.named_modules()}
    inner = {id(m) for m in layers.modules()}
    finals = {n: m for n, m in _norm_candidates(model, d).items() if id(m) not in inner}
    norms = _norm_candidates(layer, d)
    lins = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    edges: dict[str, torch.Tensor] = {}

    def record(key: str):
        def fn(_m, args, out):
            seen[key] = (args[0], out)
        return fn

    def layer_in(_m, args, kwargs):
        edges["in"] = args[0] if args else kwargs["hidden_states"]

    def layer_out(_m, _a, out):
        edges["out"] = out[0] if isinstance(out, tuple | list) else out

    handles = [m.register_forward_hook(record(n)) for n, m in {**norms, **lins}.items()]
    handles += [m.register_forward_hook(record("final:" + n)) for n, m in finals.items()]
    handles += [emb.register_forward_hook(record("embed")), head.register_forward_hook(record("head")),
                layer.register_forward_pre_hook(layer_in, with_kwargs=True), layer.register_forward_hook(layer_out),
                layers[-1].register_forward_hook(lambda _m, _a, out: edges.__setitem__(
                    "last", out[0] if isinstance(out, tuple | list) else out))]
    ids = torch.arange(3, 11)[None] % emb.num_embeddings
    try:
        model(ids.to(emb.weight.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()

    # the embedding's scale: layer 0's input = c · the embedding rows (Gemma scales inside the module)
    e, x0 = emb.weight[ids.to(emb.weight.device)].float(), edges["in"].float()
    c = float((e * x0).sum() / (e * e).sum())
    tol = _tol(emb.weight.dtype, 1e-3)
    if not torch.allclose(x0, c * e, rtol=tol, atol=tol / 100):
        raise LLMPruneError(f"{type(model).__name__}: the first layer's input is not a multiple of the embedding")
    if abs(c - 1) > tol / 10 and abs(c / math.sqrt(d) - 1) > tol:
        raise LLMPruneError(f"{type(model).__name__} scales its embedding by {c:g}, neither 1 nor √hidden_size")

    reads, consumed = [], set()
    for n, m in norms.items():
        if n not in seen:
            continue
        out = seen[n][1]
        readers = tuple(ln for ln in lins if ln in seen and _same(seen[ln][0], out))
        if readers:
            reads.append(Read(n, rms_offset(n, m), readers))
            consumed |= set(readers)
    writers = []
    for ln, lin in lins.items():
        if ln in consumed or lin.out_features != d or ln not in seen:
            continue
        out = seen[ln][1]
        wn = next((n for n in norms if n in seen and _same(seen[n][0], out)), None)
        writers.append(Writer(ln, wn, rms_offset(wn, norms[wn]) if wn else 0.0))
    used = {r.norm for r in reads} | {w.norm for w in writers if w.norm}
    stray = sorted(n for n in norms if n in seen and n not in used)
    # check: layer output = input + every writer's (normed) output
    expected = edges["in"]
    for w in writers:  # added in the model's order: in bf16 the order of the sums shows
        expected = expected + (seen[w.norm][1] if w.norm else seen[w.linear][1])
    tol = _tol(expected.dtype, 1e-4)
    if stray or not writers or not torch.allclose(edges["out"].float(), expected.float(), rtol=tol, atol=tol):
        raise LLMPruneError(f"{type(layer).__name__}: residual layout not understood (reads "
                            f"{[r.norm for r in reads]}, writers {[w.linear for w in writers]}, other norms "
                            f"{stray}); hidden-size pruning supports pre-norm decoders (Llama, Mistral, Qwen, Gemma)")
    final = [n for n, m in finals.items() if f"final:{n}" in seen and _same(seen[f"final:{n}"][0], edges["last"])]
    if len(final) != 1 or not _same(seen[f"final:{final[0]}"][1][:, -seen["head"][0].shape[1]:], seen["head"][0]):
        raise LLMPruneError(f"{type(model).__name__}: no single final norm between the last layer and the LM head")
    for i, other in enumerate(layers):  # every layer has the same modules (the probe saw layer 0)
        for name in [r.norm for r in reads] + [c for r in reads for c in r.consumers] + \
                    [w.linear for w in writers] + [w.norm for w in writers if w.norm]:
            try:
                other.get_submodule(name)
            except AttributeError:
                raise LLMPruneError(f"layer {i} has no {name} (layer 0 has): layers differ") from None
    tied = head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr()
    return ResidualLayout(d, names[emb], c, tuple(reads), tuple(writers),
                          Read(final[0], rms_offset(final[0], finals[final[0]]), (names[head],)), tied)
