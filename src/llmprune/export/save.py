"""Save a pruned model as a plain HF directory, atomically: write a temp dir, then rename."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPORT_FILE = "pruning.json"
RECIPE_FILE = "recipe.yaml"
ALLOCATION_PLOT = "allocation.png"


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside ``out``; on success it becomes ``out``, on failure it vanishes."""
    out = Path(out).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            if not overwrite and (not out.is_dir() or any(out.iterdir())):
                raise FileExistsError(f"{out} exists and is not empty; pass overwrite")
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def save_pruned(model, tokenizer, out: str | Path, report: dict, recipe_yaml: str | None = None,
                overwrite: bool = False, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write safetensors + config + tokenizer + ``pruning.json`` (+ ``recipe.yaml``) to ``out``.

    ``extra_files`` (name → bytes, e.g. the allocation plot) land in the same atomic write.
    """
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if recipe_yaml is not None:
            (tmp / RECIPE_FILE).write_text(recipe_yaml)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        write_json(tmp / REPORT_FILE, report)
    return Path(out)


# TEMP shims until the masks branch lands
def check_output_dir(out, overwrite, inputs=()):
    from llmprune.errors import LLMPruneError
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise LLMPruneError(f"output {out} exists and is not empty; pass --overwrite or choose another --out")


@contextlib.contextmanager
def output_lock(out):
    yield


def update_report(out, report):
    write_json(Path(out) / REPORT_FILE, report)
