"""What the benchmark scripts share: cached calibration windows and result files that a re-run
of the same protocol continues."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llmprune.data.calibration import calibration_windows
from llmprune.data.sources import load_corpus

OUT = Path(__file__).resolve().parent / "out"


def calibration_ids(tokenizer, nsamples: int, seqlen: int, seed: int, calib: str = "c4") -> torch.Tensor:
    """``(nsamples, seqlen)`` calibration windows, drawn once and cached in bench/out/ (safetensors)."""
    path = OUT / f"calib_{calib}_{nsamples}x{seqlen}_seed{seed}.safetensors"
    if path.is_file():
        return load_file(path)["ids"]
    ids = calibration_windows(load_corpus(calib, "train"), tokenizer, nsamples, seqlen, seed)
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({"ids": ids.contiguous()}, tmp)
    os.replace(tmp, path)
    return ids


def resume_results(out: Path, result: dict, protocol_keys: Iterable[str], fresh: bool = False,
                   keep: Iterable[str] = ("dense",)) -> None:
    """Take ``results`` (and the ``keep`` fields) of an earlier run from ``OUT.json`` when its
    config has the same ``protocol_keys`` (and ``fresh`` is off): a re-run measures only what is
    missing."""
    path = out.with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    if fresh or not path.is_file():
        return
    old = json.loads(path.read_text())
    if all(old["config"].get(k) == result["config"][k] for k in protocol_keys):
        result["results"] = old["results"]
        result.update({k: old[k] for k in keep if k in old})


def save_results(out: Path, result: dict, markdown: Callable[[dict], str]) -> None:
    """``OUT.json`` (replaced atomically) and its table ``OUT.md``."""
    tmp = out.with_name(f".{out.name}.json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out.with_suffix(".json"))
    out.with_suffix(".md").write_text(markdown(result) + "\n")
