"""Mask files in MaskLLM's published layout (NVlabs/MaskLLM ``compress_mask.py``).

One ``numpy.savez_compressed`` archive; per weight the key ``<parameter name>.mask`` holds
``numpy.packbits`` (default big bit order) of the flattened boolean keep-mask. The shape is not
stored, so unpacking needs the expected shapes (from the model or its config).
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from llmprune.errors import LLMPruneError
from llmprune.export.save import atomic_file

SUFFIX = ".mask"
MASK_FILE = "masks.npz"  # the mask an output directory keeps beside its weights


def _numel(shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64)) if len(shape) else 1


def pack(mask: np.ndarray) -> np.ndarray:
    """The stored form of one keep-mask: packbits of its flattened booleans (uint8, 1-D)."""
    return np.packbits(np.asarray(mask, dtype=bool).reshape(-1))


def write_packed(path: str | Path, masks: Mapping[str, np.ndarray]) -> Path:
    """Write ``{parameter name: bool array}`` to ``path`` atomically (temp file + ``os.replace``)."""
    return write_bits(path, {name: pack(m) for name, m in masks.items()})


def write_bits(path: str | Path, bits: Mapping[str, np.ndarray]) -> Path:
    """Write ``{parameter name: packed bits}`` (:func:`pack`'s form) to ``path`` atomically."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise LLMPruneError(f"mask file {path} is a directory; give a file name such as masks.npz")
    if not path.parent.is_dir():
        raise LLMPruneError(f"directory {path.parent} of mask file {path.name} does not exist")
    with atomic_file(path, "wb") as f:  # a file object: numpy must not append ".npz" to the name
        np.savez_compressed(f, **{name + SUFFIX: b for name, b in bits.items()})
    return path


def read_packed(path: str | Path) -> dict[str, np.ndarray]:
    """``{parameter name: packed uint8 bits}`` from a MaskLLM mask file; never unpickles.

    Refuses, naming the first bad key, an entry that is not ``<name>.mask`` or not a 1-D uint8
    array (e.g. a pickled object array).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise LLMPruneError(f"mask file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(6)
    if head == b"\x93NUMPY":
        raise LLMPruneError(f"{path} is a single .npy array, not a .npz mask file (one key per weight)")
    # numpy guesses a pickle for anything that is neither zip nor .npy: never let it try
    if not zipfile.is_zipfile(path):
        what = "empty" if not head else "truncated or not a zip archive" if head.startswith(b"PK") else "not a zip archive"
        raise LLMPruneError(f"{path} is not a .npz mask file ({what}); give a mask file written by "
                            "'llmprune masks export' or MaskLLM")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise LLMPruneError(f"{path} is not a readable .npz mask file ({type(e).__name__})") from e
    out = {}
    with archive:
        for key in archive.files:
            if not key.endswith(SUFFIX) or key == SUFFIX:
                raise LLMPruneError(f"{path}: key {key!r} is not '<parameter name>{SUFFIX}' (MaskLLM layout)")
            try:
                arr = archive[key]
            except ValueError as e:  # object arrays need pickle, which we never allow
                raise LLMPruneError(f"{path}: key {key!r} holds pickled objects, not packed bits; refusing to load it") from e
            except (OSError, zipfile.BadZipFile, EOFError) as e:
                raise LLMPruneError(f"{path}: key {key!r} is unreadable: {e}") from e
            if arr.dtype != np.uint8 or arr.ndim != 1:
                raise LLMPruneError(f"{path}: key {key!r} is {arr.dtype} with shape {arr.shape}, "
                                    f"not 1-D uint8 packed bits (numpy.packbits of the flattened mask)")
            out[key[: -len(SUFFIX)]] = arr
    if not out:
        raise LLMPruneError(f"{path} holds no masks")
    return out


def unpack(packed: Mapping[str, np.ndarray], shapes: Mapping[str, Sequence[int]],
           source: str = "mask file") -> dict[str, np.ndarray]:
    """Boolean masks of the given ``shapes`` from packed bits; refuses (naming the first bad key)
    a name that is not in ``shapes`` or a packed length that does not fit the shape."""
    out = {}
    for name, bits in packed.items():
        if name not in shapes:
            raise LLMPruneError(f"{source}: key {name + SUFFIX!r} names no parameter of the model "
                                f"(is the file for another model?)")
        shape = tuple(int(s) for s in shapes[name])
        numel = _numel(shape)
        if bits.size != (numel + 7) // 8:
            raise LLMPruneError(f"{source}: key {name + SUFFIX!r} has {bits.size} packed bytes, but "
                                f"{name} has shape {shape} = {numel} weights, i.e. {(numel + 7) // 8} bytes")
        out[name] = np.unpackbits(bits, count=numel).astype(bool).reshape(shape)
    return out


def packed_stats(packed: Mapping[str, np.ndarray]) -> dict[str, dict]:
    """What the bits alone say, without shapes: kept count and sparsity out of ``8 * bytes``
    (packbits pads with zero bits, so the true size lies within 7 below that)."""
    out = {}
    for name, bits in packed.items():
        kept = int(np.unpackbits(bits).sum())
        bound = 8 * bits.size
        out[name] = {"packed_bytes": int(bits.size), "kept": kept, "numel_max": bound,
                     "sparsity_approx": 1 - kept / bound if bound else 0.0}
    return out
