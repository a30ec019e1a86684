"""GPU checks, one script for one short lease of the `device` machine (issues #10, #12, #13).

1. ``layer``: SparseGPT and Wanda (50 %) per decoder layer at LLaMA-2-7B shapes (randomly
   initialised 4096-hidden / 11008-MLP Llama layers, bf16 weights, fp32 statistics, 128 × 2048
   random calibration tokens) through ``llmprune.prune`` with ``--device cuda`` (the model stays
   on the CPU, one layer on the GPU), and llm-compressor's ``oneshot`` on the same model when it
   is importable; wall time per layer and peak CUDA memory.
2. ``sparse24``: prefill / decode time of the seven linears of a 7B-shaped layer, dense bf16
   vs 2:4 semi-structured (``torch.sparse.to_sparse_semi_structured``, the kernel torchao wraps).
3. ``maskllm``: MaskLLM 2:4 training throughput (tokens/s, peak CUDA memory) on a randomly
   initialised model of SmolLM2-135M's shape (the real checkpoint does not fit the device
   tool's 64 MiB transfer), bf16 weights, fp32 logits.

Writes one JSON (``--out``). ``--tiny`` shrinks every shape for a CPU smoke run::

    PYTHONPATH=src python bench/gpu.py --tiny --out /tmp/gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cuda_peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def cuda_peak_mb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def llama_7b_config(layers: int, tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=4,
                           num_hidden_layers=layers, vocab_size=49152, max_position_embeddings=4096)
    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                       num_hidden_layers=layers, vocab_size=49152, max_position_embeddings=4096)


def build_model(cfg, dtype, seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def layer_bench(args, device: str) -> dict:
    """Our SparseGPT / Wanda vs llm-compressor's, per 7B-shaped decoder layer."""
    import llmprune
    from llmprune.config import PruneConfig

    cfg = llama_7b_config(args.layers, args.tiny)
    n, L = (4, 64) if args.tiny else (128, 2048)
    ids = torch.randint(0, cfg.vocab_size, (n, L), generator=torch.Generator().manual_seed(0))
    out = {"layers": args.layers, "nsamples": n, "seqlen": L, "hidden": cfg.hidden_size,
           "intermediate": cfg.intermediate_size, "ours": {}, "llmcompressor": {}}
    for method in args.methods.split(","):
        model = build_model(cfg, torch.bfloat16)
        cuda_peak_reset()
        t0 = time.perf_counter()
        prune_cfg = PruneConfig(method=method, sparsity=0.5, nsamples=n, seqlen=L, device=device,
                                true_sequential=False)  # as llm-compressor
        res = llmprune.prune(model, prune_cfg, calib_ids=ids, progress=False)
        sync()
        wall = time.perf_counter() - t0
        rep = res.report
        out["ours"][method] = {"wall_s": wall, "per_layer_s": wall / args.layers,
                               "stage_s": rep.get("timings") or {k: v for k, v in rep.items() if k.endswith("_s")},
                               "peak_cuda_mb": cuda_peak_mb()}
        print(f"ours {method}: {wall / args.layers:.2f} s/layer, peak CUDA {cuda_peak_mb()} MiB", flush=True)
        del model, res
        args.save("layer", out)
    try:
        import llmcompressor  # noqa: F401
    except ImportError as e:
        out["llmcompressor"] = {"skipped": f"not importable: {e}"}
        return out
    out["llmcompressor_version"] = llmcompressor.__version__
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor_run import build_modifier
    from transformers import AutoTokenizer

    tok_dir = args.tokenizer
    tokenizer = AutoTokenizer.from_pretrained(tok_dir) if tok_dir else None
    calib = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    for method in args.methods.split(","):
        try:
            # from a saved folder: oneshot resolves the model's name_or_path, empty for a model
            # built from a config (the first H200 lease failed on exactly that)
            from transformers import AutoModelForCausalLM

            saved = Path(tempfile.mkdtemp()) / "model"
            build_model(cfg, torch.bfloat16).save_pretrained(saved)
            if tokenizer is not None:
                tokenizer.save_pretrained(saved)
            model = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.bfloat16).eval()
            if device.startswith("cuda"):
                model.to(device)  # llm-compressor's examples load the model on the GPU
            cuda_peak_reset()
            t0 = time.perf_counter()
            oneshot(model=model, processor=tokenizer, recipe=[build_modifier(method, 0.5, "0:0")], dataset=calib,
                    num_calibration_samples=n, max_seq_length=L, shuffle_calibration_samples=False, batch_size=1,
                    save_compressed=False, output_dir=None)
            sync()
            wall = time.perf_counter() - t0
            out["llmcompressor"][method] = {"wall_s": wall, "per_layer_s": wall / args.layers,
                                            "peak_cuda_mb": cuda_peak_mb()}
            print(f"llm-compressor {method}: {wall / args.layers:.2f} s/layer", flush=True)
            del model
            args.save("layer", out)
        except Exception as e:  # keep the other measurements
            out["llmcompressor"][method] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            traceback.print_exc()
    return out


def timed(fn, reps: int) -> float:
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


def sparse24_bench(args, device: str) -> dict:
    """Dense vs 2:4 semi-structured matmuls of one 7B-shaped layer's linears."""
    if not device.startswith("cuda"):
        return {"skipped": "2:4 kernels need a CUDA GPU of compute capability >= 8.0"}
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    h, f = (4096, 11008)
    shapes = {"q/k/v/o (x4)": (h, h, 4), "gate/up (x2)": (f, h, 2), "down": (h, f, 1)}
    out = {"device_name": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability())}
    for backend, (tokens) in [(b, t) for b in ("cusparselt", "cutlass") for t in (16, 2048, 8192)]:
        SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
        dense_t = sparse_t = 0.0
        for o, i, count in shapes.values():
            W = torch.randn(o, i, device=device, dtype=torch.bfloat16)
            W = W * torch.tensor([1, 1, 0, 0], device=device, dtype=W.dtype).repeat(o, i // 4)  # 2:4
            S = to_sparse_semi_structured(W)
            x = torch.randn(tokens, i, device=device, dtype=torch.bfloat16)
            reps = 50
            td = timed(lambda x=x, W=W: torch.nn.functional.linear(x, W), reps)
            try:
                ts = timed(lambda x=x, S=S: torch.nn.functional.linear(x, S), reps)
            except Exception as e:
                out[f"error_{tokens}"] = f"{type(e).__name__}: {e}"[:500]
                ts = float("nan")
            dense_t += td * count
            sparse_t += ts * count
        out[f"{backend}_tokens_{tokens}"] = {"dense_ms": dense_t * 1e3, "sparse24_ms": sparse_t * 1e3,
                                   "speedup": dense_t / sparse_t}
        print(f"2:4 linears ({backend}), {tokens} tokens: dense {dense_t * 1e3:.3f} ms, 2:4 {sparse_t * 1e3:.3f} ms "
              f"({dense_t / sparse_t:.2f}x)", flush=True)
    return out


def maskllm_bench(args, device: str) -> dict:
    """MaskLLM training throughput on a random model of SmolLM2-135M's shape."""
    from transformers import AutoTokenizer, LlamaConfig

    from llmprune.data.sources import Corpus
    from llmprune.maskllm import maskllm

    if args.tiny:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                          num_hidden_layers=2, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)
        seqlen, batch, steps = 64, 2, 3
    else:  # SmolLM2-135M's config
        cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                          num_hidden_layers=30, vocab_size=49152, max_position_embeddings=8192,
                          tie_word_embeddings=True, rope_theta=100000)
        seqlen, batch, steps = 2048, 8, args.maskllm_steps
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    g = torch.Generator().manual_seed(0)
    words = [f"w{i}" for i in range(5000)]
    docs = [" ".join(words[j] for j in torch.randint(0, len(words), (600,), generator=g).tolist()) for _ in range(400)]
    corpus = Corpus(docs, "docs", "synthetic", "synthetic")
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        model = build_model(cfg, dtype).to(device)
        cuda_peak_reset()
        with tempfile.TemporaryDirectory() as work:
            res = maskllm(model, tokenizer, corpus=corpus, steps=steps, seqlen=seqlen, batch_size=batch,
                          checkpoint_every=0, log_every=max(1, steps // 4), progress=False, work_dir=work)
        rep = res.report
        key = str(dtype).removeprefix("torch.")
        out[key] = {"steps": steps, "seqlen": seqlen, "batch": batch, "train_s": rep["train_seconds"],
                    "tokens_per_s": rep["tokens"] / rep["train_seconds"], "peak_cuda_mb": cuda_peak_mb(),
                    "log": res.log}
        print(f"maskllm {key}: {out[key]['tokens_per_s']:.0f} tokens/s, peak CUDA {cuda_peak_mb()} MiB", flush=True)
        del model, res
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--parts", default="sparse24,layer,maskllm")
    p.add_argument("--layers", type=int, default=2, help="7B-shaped decoder layers in the layer bench")
    p.add_argument("--maskllm-steps", type=int, default=20)
    p.add_argument("--tokenizer", default=None, help="a tokenizer folder (SmolLM2's)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, for a CPU smoke run")
    p.add_argument("--methods", default="sparsegpt,wanda", help="one-shot methods of the layer bench")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
              "torch": torch.__version__, "python": platform.python_version(), "tiny": args.tiny}
    import transformers

    result["transformers"] = transformers.__version__
    def save(part: str, value: dict) -> None:  # partial results survive a time-out
        result[part] = value
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))

    args.save = save
    parts = {"sparse24": sparse24_bench, "layer": layer_bench, "maskllm": maskllm_bench}
    for name in args.parts.split(","):
        t0 = time.perf_counter()
        try:
            result[name] = parts[name](args, device)
        except Exception as e:  # one part's failure keeps the others' numbers
            traceback.print_exc()
            result[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        result[name]["part_s"] = time.perf_counter() - t0
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=1, default=str)[:6000])


if __name__ == "__main__":
    main()
