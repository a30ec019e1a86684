"""``llmprune bench-speed``: prefill/decode tokens/s of a saved model, dense and as 2:4.

Dense kernels always; on a CUDA GPU of compute capability >= 8.0 also with the decoder linears
converted to 2:4 semi-structured tensors. Every speedup is measured, never assumed: on an H200
(torch 2.11) the cuSPARSELt path was *slower* than dense bf16 at LLaMA-7B shapes, and the CUTLASS
path refuses compute capability 9.x. A failing sparse path is reported, the dense numbers kept.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from llmprune.errors import LLMPruneError
from llmprune.eval.placement import RESERVE, check_device, free_device_memory, module_bytes
from llmprune.options import NonNegativeInt, Options, PositiveInt, validated
from llmprune.speed import sparse24
from llmprune.speed.measure import measure_speed


class SpeedOptions(Options):
    """Settings of ``llmprune bench-speed`` (also its flags)."""

    prompt_len: PositiveInt = Field(128, description="prompt tokens per row, timed as one prefill forward")
    new_tokens: PositiveInt = Field(32, description="tokens decoded one by one with the KV cache")
    batch_size: PositiveInt = Field(1, description="rows per forward")
    repeats: PositiveInt = Field(3, description="timed runs; the median is reported")
    warmup: NonNegativeInt = Field(1, description="untimed runs before timing (allocator, kernel choice)")
    device: str = Field("auto", description="cpu, cuda, cuda:N or auto (cuda when available)")
    dtype: Literal["auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"] = Field("auto", description="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16")
    backend: Literal["auto", "torchao", "torch"] = Field(
        "auto", description="2:4 conversion: torchao's sparsify_ (auto: when installed) or torch's "
                            "to_sparse_semi_structured")
    dense_only: bool = Field(False, description="time the dense kernels only (no 2:4 check or conversion)")
    trust_remote_code: bool = Field(False, description="run the model repository's own Python code "
                                                       "(auto_map); only for code you trust")


def resolve_device(device: str) -> torch.device:
    """``auto`` → the current CUDA device when there is one, else the CPU; others checked."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(check_device(device))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # the CPU model, for comparing reports across machines
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def plan_sparse(device: torch.device, opts: SpeedOptions,
                cap: tuple[int, int] | None = None) -> tuple[str | None, str | None]:
    """``(backend, None)`` when the 2:4 path is to be timed, else ``(None, why not)``. Decided
    before the model is loaded: a missing backend is a one-line error, not a late surprise."""
    if opts.dense_only:
        return None, "--dense-only"
    why = sparse24.unsupported_reason(device, cap)
    if why:
        return None, why
    return sparse24.choose_backend(opts.backend), None


def speedups(dense: dict, sparse: dict) -> dict | None:
    """2:4 tokens/s over dense tokens/s per phase (None when the sparse path gave no numbers)."""
    if "prefill_tok_s" not in sparse:
        return None
    return {phase: sparse[f"{phase}_tok_s"] / dense[f"{phase}_tok_s"] if dense[f"{phase}_tok_s"] else None
            for phase in ("prefill", "decode")}


def bench_model(model: torch.nn.Module, device: torch.device, opts: SpeedOptions, backend: str | None,
                skipped: str | None, measure=measure_speed, convert=sparse24.convert_24) -> dict:
    """Time ``model`` (already on ``device``) dense, then converted to 2:4 when ``backend`` is given.

    The 2:4 check runs before the dense timing, so a model that is not 2:4 fails in one line
    before any work; conversion or kernel errors are captured in the result.
    """
    linears = sparse24.sparse_linears(model) if backend else {}
    if backend:
        sparse24.check_24(linears)

    def timed(m: torch.nn.Module) -> dict:
        return measure(m, prompt_len=opts.prompt_len, new_tokens=opts.new_tokens, batch_size=opts.batch_size,
                       repeats=opts.repeats, warmup=opts.warmup)

    dense = timed(model)
    sparse = sparse24.try_sparse(model, linears, backend, timed, convert) if backend else {"skipped": skipped}
    return {"dense": dense, "sparse24": sparse, "speedup": speedups(dense, sparse)}


def place(model: torch.nn.Module, device: torch.device) -> None:
    """Move the whole model to ``device`` (timing streamed layers would measure the copies),
    after checking it fits there."""
    free = free_device_memory(device)
    need = module_bytes(model) + RESERVE
    if free is not None and need > free:
        raise LLMPruneError(f"the model needs about {need / 2**30:.1f} GiB on {device}, which has "
                            f"{free / 2**30:.1f} GiB free; free memory or use a smaller model")
    model.to(device)


def bench_speed(model_path: str, options: SpeedOptions | dict | None = None) -> dict:
    """Load ``model_path`` and measure it (see :func:`bench_model`); the report as a dict."""
    from llmprune.models.loading import load_model

    opts = options if isinstance(options, SpeedOptions) else validated(SpeedOptions, options or {})
    device = resolve_device(opts.device)
    cap = sparse24.capability(device)
    backend, skipped = plan_sparse(device, opts, cap)
    model, _ = load_model(model_path, device=str(device), dtype=opts.dtype,
                          trust_remote_code=opts.trust_remote_code, need_tokenizer=False)
    place(model, device)
    result = bench_model(model, device, opts, backend, skipped)
    return {"model": str(model_path), "device": str(device), "device_name": device_name(device),
            "capability": list(cap) if cap else None, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "backend": backend, "options": opts.model_dump(), **result}


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"x{v:.2f}"


def format_report(r: dict) -> list[str]:
    """The report as lines for the terminal."""
    cap = f", compute capability {'.'.join(map(str, r['capability']))}" if r.get("capability") else ""
    d, s = r["dense"], r["sparse24"]
    lines = [f"device: {r['device_name']} ({r['device']}{cap}), dtype {r['dtype']}, torch {r['torch']}, "
             f"2:4 backend: {r['backend'] or 'none'}",
             f"dense: prefill {d['prefill_tok_s']:,.1f} tok/s, decode {d['decode_tok_s']:,.1f} tok/s "
             f"(batch {d['batch_size']}, prompt {d['prompt_len']}, {d['new_tokens']} new tokens, "
             f"median of {d['repeats']})"]
    if "skipped" in s:
        if s["skipped"] != "--dense-only":
            lines.append(s["skipped"])
        return lines
    if "error" in s:
        lines.append(f"2:4 ({s['backend']}) failed at {s['stage']}: {s['error']}; only the dense numbers "
                     f"are valid")
        return lines
    sp = r["speedup"]
    lines.append(f"2:4:   prefill {s['prefill_tok_s']:,.1f} tok/s, decode {s['decode_tok_s']:,.1f} tok/s "
                 f"({s['linears']} linears as {s['tensor']}); speedup prefill {_x(sp['prefill'])}, "
                 f"decode {_x(sp['decode'])}")
    slower = [p for p in ("prefill", "decode") if sp[p] is not None and sp[p] < 1]
    if slower:
        lines.append(f"2:4 is SLOWER than dense here ({', '.join(f'{p} {_x(sp[p])}' for p in slower)}): "
                     f"at these shapes and on this GPU the sparse kernels do not pay off; serve it dense")
    return lines

