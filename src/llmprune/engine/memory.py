"""How much memory the layer-by-layer pass will take, checked before it starts."""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from typing import TYPE_CHECKING

import torch
from torch import nn

from llmprune.errors import LLMPruneError
from llmprune.models.layers import decoder_layers, linear_layers

if TYPE_CHECKING:
    from llmprune.engine.blockwise import BlockwiseOptions

GiB = 1024**3

# glibc serves allocations above this size by mmap, so a freed block goes straight back to
# the OS. Its default threshold grows to 32 MiB as big blocks are freed, after which the
# 5-30 MB activations of a layer's forward come from the heap and freed ones stay there
# (fragmentation): ~150 MB more peak RSS when pruning SmolLM2-135M. The engine fixes it: to
# this for evaluation and the true-sequential mode, just above one call's blocks for the
# exact mode's layer calls (reuse_one_call_blocks).
MiB = 1 << 20
MMAP_THRESHOLD = MiB
_MAX_MMAP_THRESHOLD = 32 * MiB  # glibc refuses more on 64-bit (HEAP_MAX_SIZE / 2)
_M_MMAP_THRESHOLD = -3  # mallopt parameter number, from glibc's malloc.h
_mmap_threshold: int | None = None  # what this process last set


def set_mmap_threshold(nbytes: int) -> bool:
    """Make glibc serve blocks of ≥ ``nbytes`` (clamped to 1–32 MiB, whole MiB) by ``mmap``:
    freeing such a block returns it to the OS at once, while smaller ones are reused from the
    heap without page faults. No effect on the values computed; False where the C library is
    not glibc. Fixing the threshold also stops glibc's own growth of it."""
    global _mmap_threshold
    nbytes = min(_MAX_MMAP_THRESHOLD, max(MMAP_THRESHOLD, -(-nbytes // MiB) * MiB))
    if _mmap_threshold == nbytes:
        return True
    mallopt = _glibc_mallopt()
    if mallopt is None or not mallopt(_M_MMAP_THRESHOLD, nbytes):
        return False
    _mmap_threshold = nbytes
    return True


@functools.cache
def _glibc_mallopt():
    """glibc's ``mallopt``, or None elsewhere; looked up once (the run sets it per layer)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


def return_big_frees_to_os() -> bool:
    """Make glibc hand every freed block of ≥ 1 MiB back to the OS at once (mallopt
    ``M_MMAP_THRESHOLD``): the setting for evaluation and for the true-sequential mode, whose
    waiting threads allocate from many arenas. False where the C library is not glibc."""
    return set_mmap_threshold(MMAP_THRESHOLD)


def reuse_one_call_blocks(layer: nn.Module, rows: int, seqlen: int) -> bool:
    """Let the heap serve every activation block of one ``rows``-row call through ``layer``
    (the widest linear's output or input, plus 1 MiB) and map bigger ones. One call's blocks
    are then reused by the next call instead of being mapped and faulted in anew each time:
    SparseGPT 50 % of SmolLM2-135M in the exact mode took 176 s instead of 199–203 s (1-row
    calls, 7 MiB), the same peak RSS (1081–1097 vs 1082 MiB) and bit-identical weights. Not for
    the true-sequential mode: there, the waiting threads' arenas kept +131 MiB for 4 %."""
    linears = linear_layers(layer).values()
    widest = max((max(lin.in_features, lin.out_features) for lin in linears), default=0)
    elt = next(layer.parameters()).element_size()
    return set_mmap_threshold(rows * seqlen * widest * elt + MiB)


def available_bytes(device: str | torch.device) -> int | None:
    """Memory free for new allocations on ``device`` (None where it cannot be known)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    if dev.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    return None


# Activations of one layer call (hidden states, q/k/v, the MLP's intermediates) stay near
# this on the CPU. More rows per call bought little speed on a 2-core CPU (32 rows of 1024
# tokens through a SmolLM2-135M layer with XᵀX: 4.0 / 3.8 / 3.7 / 3.6 s at 1 / 2 / 4 / 8 rows
# per call) and raised the peak RSS (+46 / +99 / +180 MiB at 2 / 4 / 8 rows). On CUDA the
# budget is a share of the free memory instead.
CALL_BYTES = 64 << 20
MAX_ROWS_PER_CALL = 8
_CUDA_SHARE = 16  # of the free device memory, per call


def token_bytes(layer: nn.Module) -> int:
    """Activation bytes per token of one forward through ``layer``: the output of every linear
    plus two tensors as wide as its widest input (the MLP's activation and product, the
    residual stream), in the layer's dtype. An estimate, on the high side for SmolLM2-135M
    (33 KB per token; 8 rows × 1024 measured 23); attention that materialises its scores,
    as eager attention does, takes more."""
    linears = linear_layers(layer).values()
    param = next(layer.parameters())
    width = max((lin.in_features for lin in linears), default=0)
    return param.element_size() * (sum(lin.out_features for lin in linears) + 2 * width)


def rows_per_call(layer: nn.Module, seqlen: int, device: str | torch.device) -> int:
    """Calibration rows run through ``layer`` per call: as many as keep one call's activations
    within the budget (``CALL_BYTES`` on the CPU, 1/16 of the free memory on CUDA), at
    least 1 and at most ``MAX_ROWS_PER_CALL``. Results depend on it only through the order
    of floating-point sums."""
    budget = CALL_BYTES
    if torch.device(device).type == "cuda":
        budget = max(budget, (available_bytes(device) or 0) // _CUDA_SHARE)
    per_row = max(1, token_bytes(layer) * seqlen)
    return max(1, min(MAX_ROWS_PER_CALL, budget // per_row))


def estimate_bytes(model: nn.Module, nsamples: int, seqlen: int, needs: frozenset[str],
                   true_sequential: bool = False, blockwise: BlockwiseOptions | None = None) -> dict[str, int]:
    """Peak extra memory of the pass on the compute device, by part.

    ``activations``: the inputs and outputs of one layer for every calibration row (in the
    model's dtype); ``statistics``: fp32 XᵀX per linear (an upper bound: linears that share an
    input share one) plus a solver's working copies of the largest one, and Σx² / E[x] vectors;
    ``layer``: one decoder layer's weights, moved to the device. With ``true_sequential`` also
    ``held``: what every row keeps alive while the rows wait at a linear — at down_proj its
    input, the MLP's input, the residual stream and the attention output, i.e. the widest linear
    input plus three hidden widths per token — and ``call``: the running batch's activations
    (``MAX_ROWS_PER_CALL`` rows). For 32 × 1024 tokens on SmolLM2-135M: 408 + 264 MiB estimated,
    +640 MiB measured over the exact mode's peak.

    With ``blockwise`` (block-wise reconstruction on) also ``target``: the dense stream, one
    more activation buffer like ``activations``' half; and ``tuning``: the gradient and Adam's
    two moments of one layer's parameters, the keep-masks (a byte per weight), and one step's
    activations held for the backward, taken as 4× a forward call of ``recon_batch`` rows.
    """
    layer = max(decoder_layers(model), key=lambda L: sum(p.numel() for p in L.parameters()))
    param = next(model.parameters())
    width = model.get_input_embeddings().weight.shape[1]
    ins = [lin.in_features for lin in linear_layers(layer).values()]
    stats = 0
    if "xtx" in needs and ins:
        stats = 4 * (sum(i * i for i in ins) + 3 * max(ins) ** 2)
    vectors = needs & ({"col_mean"} if "xtx" in needs else {"col_sq", "col_mean"})  # col_sq: XᵀX's diagonal
    stats += 4 * sum(ins) * len(vectors)
    tokens, elt = nsamples * seqlen, param.element_size()
    parts = {"activations": 2 * tokens * width * elt, "statistics": stats,
             "layer": sum(p.numel() * p.element_size() for p in layer.parameters())}
    if true_sequential:
        parts["held"] = tokens * elt * (max(ins, default=width) + 3 * width)
        parts["call"] = min(nsamples, MAX_ROWS_PER_CALL) * seqlen * token_bytes(layer)
    if blockwise is not None and blockwise.enabled:
        params = sum(p.numel() for p in layer.parameters())
        masks = sum(lin.weight.numel() for lin in linear_layers(layer).values())
        rows = min(blockwise.recon_batch, nsamples)
        parts["target"] = tokens * width * elt
        parts["tuning"] = 3 * params * elt + masks + 4 * rows * seqlen * token_bytes(layer)
    return parts


def check_fits(parts: dict[str, int], device: str | torch.device, what: str, hint: str) -> None:
    """Refuse, with the numbers, work whose estimated ``parts`` (bytes by name) exceed 90 % of
    what is free on ``device``; ``hint`` says which settings to lower."""
    free = available_bytes(device)
    total = sum(parts.values())
    if free is not None and total > 0.9 * free:
        detail = ", ".join(f"{k} {v / GiB:.2f}" for k, v in parts.items() if v)
        raise LLMPruneError(f"{what} needs about {total / GiB:.2f} GiB more on {device} ({detail} GiB) but only "
                            f"{free / GiB:.2f} GiB is free; {hint}")
