"""Decoder linears as 2:4 semi-structured sparse tensors, for timing on a GPU.

The decisions are plain functions of their inputs (the device, its compute capability, the
installed packages, the weights) so they are tested without a GPU; only :func:`convert_24`
needs the real kernels. Nothing here assumes the sparse path is faster: the caller measures.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from collections.abc import Callable

import torch
from torch import nn

from llmprune.errors import LLMPruneError
from llmprune.masks.checks import group_counts
from llmprune.models.adapter import decoder_layers, linear_layers

BACKENDS = ("auto", "torchao", "torch")
MIN_CAPABILITY = (8, 0)  # sparse tensor cores came with Ampere
CPU_NOTE = ("2:4 sparsity gives no speed on CPUs: there are no 2:4 sparse kernels for them, so a 2:4 "
            "model runs exactly like the dense one. For a faster model on CPU, remove whole MLP channels "
            "or layers with structured pruning: `llmprune structured`")


def capability(device: torch.device) -> tuple[int, int] | None:
    """The CUDA compute capability of ``device`` (None off CUDA)."""
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))


def unsupported_reason(device: torch.device, cap: tuple[int, int] | None) -> str | None:
    """Why the 2:4 kernels cannot run on ``device`` (compute capability ``cap``); None if they can."""
    if device.type == "cpu":
        return CPU_NOTE
    if device.type != "cuda":
        return f"2:4 semi-structured kernels exist only on CUDA GPUs, not on {device.type}"
    if cap is None or tuple(cap) < MIN_CAPABILITY:
        shown = ".".join(map(str, cap)) if cap else "unknown"
        return (f"2:4 semi-structured kernels need a CUDA GPU of compute capability >= 8.0 (Ampere or "
                f"newer); {device} has {shown}")
    return None


def torchao_available() -> bool:
    """Whether the installed torchao still has its 2:4 path: ``torchao.sparsity`` with
    ``sparsify_`` and a semi-sparse weight config. torchao deleted ``torchao.sparsity`` in August
    2026 (pytorch/ao #4728; 0.18.0 has none); PyTorch core's semi-structured tensors remain."""
    if importlib.util.find_spec("torchao") is None:
        return False
    try:
        ts = importlib.import_module("torchao.sparsity")
    except ImportError:
        return False
    return hasattr(ts, "sparsify_") and (hasattr(ts, "SemiSparseWeightConfig") or hasattr(ts, "semi_sparse_weight"))


def choose_backend(wanted: str = "auto", has_torchao: bool | None = None) -> str:
    """``"torchao"`` (``sparsify_`` with a semi-sparse weight config) when asked for or, with
    ``auto``, when the installed torchao still has it; else ``"torch"`` (PyTorch core's
    ``torch.sparse.to_sparse_semi_structured``). The report names the backend that ran."""
    if wanted not in BACKENDS:
        raise LLMPruneError(f"unknown 2:4 backend {wanted!r}; use {', '.join(BACKENDS)}")
    has = torchao_available() if has_torchao is None else has_torchao
    if wanted == "torchao" and not has:
        if importlib.util.find_spec("torchao") is not None:
            raise LLMPruneError(f"--backend torchao asked for, but torchao {backend_version('torchao')} has no 2:4 path "
                                "(torchao.sparsity was removed in August 2026, pytorch/ao #4728); use --backend "
                                "torch (PyTorch core's semi-structured tensors)")
        raise LLMPruneError("--backend torchao asked for, but torchao is not installed: pip install torchao "
                            "(or use --backend torch)")
    if wanted == "auto":
        return "torchao" if has else "torch"
    return wanted


def backend_version(backend: str) -> str:
    """Version of the package that provides ``backend``."""
    if backend == "torchao":
        try:
            return importlib.metadata.version("torchao")
        except importlib.metadata.PackageNotFoundError:
            return "unknown"
    return torch.__version__


def sparse_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The decoder linears to convert, by their full module name. Real ``nn.Linear`` modules only:
    fused MoE expert weights have no linear module a sparse weight could replace, and the head
    and embeddings are not pruned."""
    modules = {id(m): n for n, m in model.named_modules()}
    out = {}
    for layer in decoder_layers(model):
        for lin in linear_layers(layer).values():
            if id(lin) in modules:  # per-expert views of fused experts are not in the model's tree
                out[modules[id(lin)]] = lin
    return out


def not_24(weight: torch.Tensor) -> str | None:
    """Why ``weight`` cannot be stored as 2:4 (more than 2 nonzeros in a group of 4 consecutive
    inputs, or inputs not a multiple of 4); None if it can. Fewer nonzeros are fine."""
    counts = group_counts(weight != 0, 4)
    if counts is None:
        return f"its {weight.shape[-1]} inputs are not a multiple of 4"
    bad = (counts > 2).nonzero()
    if not bad.numel():
        return None
    g = int(bad[0])
    row, col = divmod(g * 4, weight.shape[-1])
    return (f"row {row}, inputs {col}..{col + 3} hold {int(counts[g])} nonzeros (2:4 allows 2); "
            f"{bad.numel()} of {counts.numel()} groups break 2:4")


def check_24(linears: dict[str, nn.Linear]) -> None:
    """One line naming the first linear whose weight is not 2:4, before anything is converted."""
    if not linears:
        raise LLMPruneError("the model has no decoder linear (nn.Linear) to convert to 2:4")
    for name, lin in linears.items():
        why = not_24(lin.weight.detach())
        if why:
            raise LLMPruneError(f"{name} is not 2:4 sparse: {why}. Prune it first (llmprune prune --pattern "
                                f"2:4), or pass --dense-only to time the dense kernels alone")


def _torchao_config():
    """torchao's 2:4 weight config: ``SemiSparseWeightConfig`` (newer) or ``semi_sparse_weight()``."""
    import torchao.sparsity as ts

    cls = getattr(ts, "SemiSparseWeightConfig", None)
    return cls() if cls is not None else ts.semi_sparse_weight()


def convert_24(model: nn.Module, linears: dict[str, nn.Linear], backend: str) -> str:
    """Replace the weights of ``linears`` (names in ``model``) by 2:4 semi-structured tensors, in
    place; return the tensor class used (which kernel family torch picked)."""
    names = set(linears)
    if backend == "torchao":
        from torchao.sparsity import sparsify_

        sparsify_(model, _torchao_config(), filter_fn=lambda mod, fqn: fqn in names)
    else:
        from torch.sparse import to_sparse_semi_structured

        for lin in linears.values():
            lin.weight = nn.Parameter(to_sparse_semi_structured(lin.weight.detach()), requires_grad=False)
    kinds = set()
    for name in linears:
        w = model.get_submodule(name).weight
        if type(w) in (torch.Tensor, nn.Parameter):  # a silent no-op would time the dense model twice
            raise RuntimeError(f"the {backend} backend left {name} dense")
        kinds.add(type(w).__name__)
    return ",".join(sorted(kinds))


def try_sparse(model: nn.Module, linears: dict[str, nn.Linear], backend: str,
               measure: Callable[[nn.Module], dict], convert: Callable = convert_24) -> dict:
    """Convert and time the 2:4 model; an error of either step (unsupported GPU, kernel refusal,
    out of memory) is returned as ``{"error", "stage"}`` instead of raised, so the dense numbers
    already measured still reach the report."""
    out: dict = {"backend": backend, "backend_version": backend_version(backend), "linears": len(linears)}
    try:
        out["tensor"] = convert(model, linears, backend)
    except Exception as e:  # noqa: BLE001 -- any kernel/library refusal is a measurement outcome
        return {**out, "stage": "convert", "error": _one_line(e)}
    try:
        out.update(measure(model))
    except Exception as e:  # noqa: BLE001
        return {**out, "stage": "measure", "error": _one_line(e)}
    return out


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]
