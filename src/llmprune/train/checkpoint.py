"""Resumable checkpoints: one ``safetensors`` file of tensors plus one JSON file, no pickle.

``ROOT/step-00000040/{state.safetensors,state.json}`` is written in a temp directory and
renamed into place; ``ROOT/latest`` (replaced atomically) names the newest complete one, so an
interrupted write never leaves a checkpoint that looks whole.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llmprune import jsonfile
from llmprune.errors import LLMPruneError
from llmprune.export.save import follow_umask
from llmprune.models.loading import check_safetensors

TENSORS, META, LATEST = "state.safetensors", "state.json", "latest"


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(root: str | Path, step: int, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write checkpoint ``step`` under ``root``, point ``latest`` at it, drop older ones."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final, tmp = root / name, root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / TENSORS)
        (tmp / META).write_text(json.dumps(meta, indent=1))
        for f in (TENSORS, META):
            _fsync(tmp / f)
        follow_umask(tmp)  # safetensors writes 0600
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = root / f".{LATEST}.tmp-{os.getpid()}"
    pointer.write_text(name)
    _fsync(pointer)
    os.replace(pointer, root / LATEST)
    for old in root.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | Path) -> Path:
    """The newest complete checkpoint under ``root`` (a run's directory or its ``checkpoints``),
    or ``root`` itself when it is a checkpoint."""
    root = Path(root).expanduser()
    if (root / TENSORS).is_file() and (root / META).is_file():
        check_safetensors(root / TENSORS)
        return root
    for cand in (root, root / "checkpoints"):
        pointer = cand / LATEST
        if pointer.is_file():
            try:
                name = pointer.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError):
                name = ""
            if not re.fullmatch(r"step-\d{8}", name):  # never a path out of the checkpoint folder
                raise LLMPruneError(f"{pointer} does not name a checkpoint (step-NNNNNNNN); it is damaged")
            path = cand / name
            if (path / TENSORS).is_file() and (path / META).is_file():
                check_safetensors(path / TENSORS)
                return path
            raise LLMPruneError(f"{pointer} names {path.name}, which is incomplete or missing")
    raise LLMPruneError(f"{root} holds no training checkpoint (no {LATEST} file in it or in {root / 'checkpoints'})")


def read_meta(path: str | Path) -> dict:
    """The JSON half of a checkpoint directory (cheap: for checks before any heavy work)."""
    try:
        meta = jsonfile.loads((Path(path) / META).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LLMPruneError(f"cannot read checkpoint {path}: {META} is not valid JSON ({type(e).__name__})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("fingerprint", {}), dict) \
            or not isinstance(meta.get("options", {}), dict):
        raise LLMPruneError(f"cannot read checkpoint {path}: {META} is not a checkpoint record; it is damaged")
    return meta


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(Path(path) / TENSORS), read_meta(path)


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as flat tensors (``optim.<param index>.<key>``) plus JSON meta."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, idx, k = key.split(".", 2)
            state.setdefault(int(idx), {})[k] = v
    for key, v in meta["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
