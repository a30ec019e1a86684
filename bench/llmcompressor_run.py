"""llm-compressor one-shot pruning runner, for side-by-side comparison with llmprune.

This script is NOT part of the llmprune package. It drives llm-compressor
(PyPI ``llmcompressor`` 0.14.x) and must be run only with the separate
benchmark virtualenv, which has llm-compressor and its own torch/transformers::

    /work/main/.venv-bench/bin/python bench/llmcompressor_run.py \\
        --model-dir ~/.cache/llmprune/smollm2-135m \\
        --calib-ids calib.npy \\
        --method {magnitude,wanda,sparsegpt} \\
        (--sparsity 0.5 | --pattern 2:4) \\
        --out OUTDIR --json RESULT.json

The main benchmark calls it once per (method, sparsity/pattern), giving it the
exact calibration windows llmprune used (``--calib-ids``: an int64 ``.npy`` of
shape ``(nsamples, seqlen)``), then evaluates ``OUTDIR`` (dense fp32
safetensors plus tokenizer, loadable by plain transformers) the same way as
llmprune's own output, and reads ``RESULT.json``::

    {"method", "sparsity", "pattern", "prune_seconds", "peak_rss_mb",
     "llmcompressor_version", "nsamples", "seqlen", "actual_sparsity",
     "pipeline", ...}

``prune_seconds`` is the wall time of the ``oneshot(...)`` call only (pruning
including its calibration forward passes); model loading and saving are not
timed. ``peak_rss_mb`` is the process's peak resident memory, read at the end.
``actual_sparsity`` is the fraction of zeros over all ``nn.Linear`` weights
inside the decoder layers (``model.model.layers``).

How llm-compressor is configured:

* wanda / sparsegpt: ``WandaPruningModifier`` / ``SparseGPTModifier`` with the
  library defaults (SparseGPT: ``block_size=128``, ``dampening_frac=0.01``),
  ``targets=[r"re:model\\.layers\\.\\d+$"]`` (every decoder layer; the modifier
  prunes every Linear inside a target, as in llm-compressor's own 2:4
  examples), ``ignore=["re:.*lm_head"]``. Unstructured: ``sparsity=X,
  mask_structure="0:0"``. N:M (our convention: N *kept* of every M along the
  input dim) maps to llm-compressor's ``mask_structure`` convention
  (``"n:m"`` = n *pruned* of every m): ``mask_structure=f"{M-N}:{M}"``,
  ``sparsity=(M-N)/M``; for 2:4 both conventions give ``"2:4"``, 0.5.
  Calibration uses the ``"sequential"`` pipeline (traced per
  ``LlamaDecoderLayer``, with error propagation: each layer is pruned, then
  the calibration data is re-propagated through the pruned layer), which is
  what ``oneshot``'s default ``"independent"`` pipeline picks for these
  modifiers; it runs fine on CPU. For N:M runs the json also has
  ``nm_violations``: groups of M input-dim weights with more than N nonzeros
  (0 means the pattern holds everywhere).
* magnitude: ``MagnitudePruningModifier`` is a training-time (scheduled)
  modifier. Under ``oneshot`` it only builds the masks: weights are masked on
  ``OPTIM_POST_STEP`` events (never sent by ``oneshot``) or by forward hooks
  whose registration crashes in 0.14.0.1, and the masks are dropped at
  finalize, so the model comes back dense. Its mask factory also has no N:M
  structure. For this method the script therefore writes
  ``{"error": "..."}`` to the json and exits 0 (nothing is saved).

The calibration windows are given to ``oneshot`` as a pre-tokenized
``datasets.Dataset`` (``input_ids`` and ``attention_mask`` columns), with
``num_calibration_samples=nsamples``, ``max_seq_length=seqlen``,
``shuffle_calibration_samples=False`` and ``batch_size=1``, so nothing is
re-tokenized, truncated or sampled. (With equal lengths llm-compressor's
length-sorted sampler may visit the windows in a different order; Wanda and
SparseGPT statistics are sums, order-independent up to float rounding.)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

DECODER_TARGETS = [r"re:model\.layers\.\d+$"]
IGNORE = ["re:.*lm_head"]

MAGNITUDE_ERROR = (
    "llm-compressor's MagnitudePruningModifier cannot be run one-shot: it is a "
    "training-time modifier whose masks are only applied to the weights on "
    "OPTIM_POST_STEP events (never emitted by oneshot) or via forward hooks "
    "(whose registration raises AttributeError 'register__hook' in "
    "llmcompressor 0.14.0.1), and the masks are deleted at finalize; "
    "oneshot(start=0, end=1, init_sparsity=final_sparsity=X) therefore returns "
    "the dense model. It also has no N:M mask structure "
    "(only unstructured/channel/filter/block_*)."
)


def parse_pattern(pattern: str) -> tuple[int, int]:
    """Parse ``"N:M"`` (N kept of every M) into ``(N, M)``."""
    try:
        n_str, m_str = pattern.split(":")
        n, m = int(n_str), int(m_str)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad --pattern {pattern!r}") from exc
    if not 0 < n < m:
        raise argparse.ArgumentTypeError(f"--pattern needs 0 < N < M, got {pattern!r}")
    return n, m


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True, type=Path)
    p.add_argument("--calib-ids", required=True, type=Path)
    p.add_argument("--method", required=True, choices=["magnitude", "wanda", "sparsegpt"])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--sparsity", type=float)
    g.add_argument("--pattern", type=str, help="N:M, N kept of every M (e.g. 2:4)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--json", required=True, type=Path)
    p.add_argument(
        "--pipeline",
        default="sequential",
        help="llm-compressor calibration pipeline (default: sequential)",
    )
    p.add_argument(
        "--sequential-targets",
        nargs="*",
        default=None,
        help="sequential pipeline targets (default: the model's no-split "
        "modules, i.e. LlamaDecoderLayer)",
    )
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.pattern is not None:
        args.nm = parse_pattern(args.pattern)
    else:
        args.nm = None
        if not 0.0 < args.sparsity < 1.0:
            p.error("--sparsity must be in (0, 1)")
    return args


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {
        f"model.layers.{name}": mod
        for name, mod in model.model.layers.named_modules()
        if isinstance(mod, torch.nn.Linear)
    }


def measure_sparsity(model: torch.nn.Module) -> float:
    zeros = total = 0
    for mod in decoder_linears(model).values():
        w = mod.weight.detach()
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total


def nm_violations(model: torch.nn.Module, n_keep: int, m: int) -> int:
    """Groups of M consecutive input-dim weights with more than N nonzeros."""
    bad = 0
    for mod in decoder_linears(model).values():
        w = mod.weight.detach()
        if w.shape[1] % m:
            bad += 1
            continue
        nonzero = (w.reshape(w.shape[0], -1, m) != 0).sum(dim=-1)
        bad += int((nonzero > n_keep).sum())
    return bad


def build_modifier(method: str, sparsity: float, mask_structure: str):
    if method == "wanda":
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        return WandaPruningModifier(
            sparsity=sparsity,
            mask_structure=mask_structure,
            targets=DECODER_TARGETS,
            ignore=IGNORE,
        )
    if method == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        # library defaults: block_size=128, dampening_frac=0.01
        return SparseGPTModifier(
            sparsity=sparsity,
            mask_structure=mask_structure,
            targets=DECODER_TARGETS,
            ignore=IGNORE,
        )
    raise ValueError(method)


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)

    try:
        import llmcompressor
    except ImportError as exc:  # wrong interpreter
        raise SystemExit(
            "llmcompressor_run.py needs llm-compressor: run it with the benchmark "
            f"venv's python (/work/main/.venv-bench/bin/python), not {sys.executable}"
        ) from exc

    if args.nm is not None:
        n_keep, m = args.nm
        sparsity = (m - n_keep) / m
        mask_structure = f"{m - n_keep}:{m}"  # llm-compressor: n PRUNED of m
        pattern = args.pattern
    else:
        sparsity = float(args.sparsity)
        mask_structure = "0:0"  # unstructured
        pattern = None

    ids = np.load(args.calib_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise SystemExit(f"--calib-ids: want 2-D integer array, got {ids.shape} {ids.dtype}")
    nsamples, seqlen = (int(x) for x in ids.shape)

    result: dict = {
        "method": args.method,
        "sparsity": sparsity,
        "pattern": pattern,
        "llmcompressor_version": llmcompressor.__version__,
        "nsamples": nsamples,
        "seqlen": seqlen,
    }

    if args.method == "magnitude":
        # Not runnable one-shot (see module docstring / MAGNITUDE_ERROR).
        result["error"] = MAGNITUDE_ERROR
        write_json(args.json, result)
        print(f"[llmcompressor_run] magnitude unsupported, wrote {args.json}")
        return 0

    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)

    calib = Dataset.from_dict(
        {
            "input_ids": ids.astype(np.int64).tolist(),
            "attention_mask": np.ones_like(ids, dtype=np.int64).tolist(),
        }
    )
    modifier = build_modifier(args.method, sparsity, mask_structure)

    t0 = time.perf_counter()
    oneshot(
        model=model,
        processor=tokenizer,
        recipe=[modifier],
        dataset=calib,
        num_calibration_samples=nsamples,
        max_seq_length=seqlen,
        shuffle_calibration_samples=False,
        batch_size=1,
        pipeline=args.pipeline,
        sequential_targets=args.sequential_targets,
        save_compressed=False,
        output_dir=None,
    )
    prune_seconds = time.perf_counter() - t0

    actual = measure_sparsity(model)
    result.update(
        {
            "prune_seconds": round(prune_seconds, 3),
            "actual_sparsity": actual,
            "pipeline": args.pipeline,
            "sequential_targets": args.sequential_targets
            or list(getattr(model, "_no_split_modules", None) or []),
            "modifier": {
                "class": type(modifier).__name__,
                "sparsity": sparsity,
                "mask_structure": mask_structure,
                "targets": DECODER_TARGETS,
                "ignore": IGNORE,
                **(
                    {
                        "block_size": modifier.block_size,
                        "dampening_frac": modifier.dampening_frac,
                    }
                    if args.method == "sparsegpt"
                    else {}
                ),
            },
            "torch_threads": torch.get_num_threads(),
        }
    )
    if args.nm is not None:
        result["nm_violations"] = nm_violations(model, *args.nm)

    # Plain dense safetensors (no compressed-tensors sparse format) + tokenizer.
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(args.out), save_compressed=False)
    tokenizer.save_pretrained(str(args.out))
    _strip_compression_config(args.out / "config.json")

    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    write_json(args.json, result)
    print(json.dumps(result, indent=2))
    return 0


def _strip_compression_config(config_path: Path) -> None:
    """Drop llm-compressor's compression metadata so plain transformers loads
    the (dense, already-pruned) weights without compressed-tensors."""
    cfg = json.loads(config_path.read_text())
    changed = False
    for key in ("quantization_config", "compression_config", "sparsity_config"):
        if key in cfg:
            cfg.pop(key)
            changed = True
    if changed:
        config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    sys.exit(main())
