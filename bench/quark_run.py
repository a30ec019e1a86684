"""AMD Quark OSSCAR runner, for side-by-side comparison with ``llmprune structured``.

This script is NOT part of the llmprune package. It drives AMD Quark (PyPI ``amd-quark`` 0.13)
and must run with its own virtualenv (Quark pins its own transformers range)::

    python3 -m venv .venv-quark
    .venv-quark/bin/pip install torch==2.13.0 transformers==5.17.0 safetensors accelerate amd-quark==0.13
    .venv-quark/bin/python bench/quark_run.py --model-dir DIR --calib-ids calib.npy \\
        --ratio 0.1 --out OUTDIR --json RESULT.json

``bench/structured.py --quark`` calls it once per ratio with the exact calibration windows
llmprune used (``--calib-ids``: an int64 ``.npy`` of shape ``(nsamples, seqlen)``), then
evaluates ``OUTDIR`` (fp32 safetensors plus tokenizer, loadable by plain transformers) with the
project's protocol, like its own models. ``RESULT.json``::

    {"ratio", "intermediate_size", "prune_seconds", "peak_rss_mb", "params_before",
     "params_after", "quark_version", "nsamples", "seqlen"}

How Quark is configured: its Llama OSSCAR recipe as in its own example and tests —
``OSSCARConfig`` with ``inside_layer_modules`` = the seven linears, ``mlp_pruning_modules =
["mlp.down_proj"]``, ``mlp_scaling_layers = {"mlp.down_proj": ["mlp.up_proj",
"mlp.gate_proj"]}``, ``mlp_intermediate_size_name = "intermediate_size"``, ``model_decoder_layers
= "model.layers"``, defaults otherwise (``damp_percent=0.01``, ``true_sequential=True``), no
blockwise tuning (pruning only, as llmprune's). Quark rounds the kept width to a multiple of 128.
Calibration: a DataLoader of the ``(1, seqlen)`` windows, one per batch. ``prune_seconds`` is the
wall time of ``ModelPruner.pruning_model`` only.
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
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

LINEARS = ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.o_proj",
           "mlp.up_proj", "mlp.gate_proj", "mlp.down_proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True, type=Path)
    p.add_argument("--calib-ids", required=True, type=Path)
    p.add_argument("--ratio", required=True, type=float, help="mlp_pruning_ratio: share of MLP channels")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--json", required=True, type=Path)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if not 0 < args.ratio < 1:
        p.error("--ratio must be in (0, 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        import quark
        from quark.torch import ModelPruner
        from quark.torch.pruning.config import OSSCARConfig, PConfig
    except ImportError as exc:  # wrong interpreter
        raise SystemExit(f"quark_run.py needs amd-quark: run it with .venv-quark/bin/python, not {sys.executable}") from exc
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = np.load(args.calib_ids, allow_pickle=False)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise SystemExit(f"--calib-ids: want a 2-D integer array, got {ids.shape} {ids.dtype}")
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    params_before = sum(p.numel() for p in model.parameters())

    config = PConfig()
    config.algo_config = OSSCARConfig(
        inside_layer_modules=list(LINEARS), mlp_pruning_modules=["mlp.down_proj"],
        mlp_scaling_layers={"mlp.down_proj": ["mlp.up_proj", "mlp.gate_proj"]},
        mlp_pruning_ratio=args.ratio, mlp_intermediate_size_name="intermediate_size",
        model_decoder_layers="model.layers")
    config.blockwise_tuning_config = None
    loader = DataLoader(torch.from_numpy(ids.astype(np.int64)), batch_size=1, shuffle=False)

    t0 = time.perf_counter()
    with torch.no_grad():
        model = ModelPruner(config).pruning_model(model, loader)
    prune_s = time.perf_counter() - t0

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    result = {"ratio": args.ratio, "intermediate_size": model.config.intermediate_size,
              "prune_seconds": prune_s, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "params_before": params_before, "params_after": sum(p.numel() for p in model.parameters()),
              "quark_version": getattr(quark, "__version__", "?"), "torch": torch.__version__,
              "nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1])}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
