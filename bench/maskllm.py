"""MaskLLM benchmark (issue #10): WikiText-2 perplexity vs training tokens of learned 2:4 masks on
the bundled SmolLM2-135M, beside the one-shot 2:4 results and dense.

Runs (``--runs``): ``sparsegpt-prior`` (the reference's default: SparseGPT mask-only prior,
calibrated on the one-shot table's 32 × 1024 C4 windows), ``no-prior`` (random logits), and
``train-weights`` (SparseGPT prior, kept weights trained too) and ``sparsegpt-prior-lr10x`` (the
prior run with 10x the reference's logit learning rate, for budgets far below its 2B tokens). Each run trains ``--steps``
optimiser steps in chunks of ``--eval-every``: after each chunk the hard mask is applied to a
copy of the dense weights and evaluated (WikiText-2 test, 1024-token windows, first 40 — the
project's protocol), then training resumes from the run's checkpoint (bit-identical to an
uninterrupted run). One-shot 2:4 baselines are measured here with the same calibration windows
(``--oneshot``), or adopted from bench/out/admm.json when that protocol matches.
Results go to bench/out/maskllm.json (resumable: finished chunks are kept) and maskllm.md, each run's latest
hard mask to <work>/<run>/masks.npz (MaskLLM's layout: the prior of bench/recover.py --maskllm-masks),
plus a PPL-vs-tokens plot, docs/img/maskllm.png with ``--plot``::

    LLMPRUNE_DATA_DIR=/work/shared/data PYTHONPATH=src python bench/maskllm.py

Smoke test::

    ... python bench/maskllm.py --steps 2 --eval-every 1 --seqlen 64 --max-windows 1 --runs no-prior --no-oneshot
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

import torch  # noqa: E402

import llmprune  # noqa: E402
from llmprune.data.sources import load_corpus  # noqa: E402
from llmprune.data.tokens import eval_token_stream  # noqa: E402
from llmprune.eval.perplexity import perplexity  # noqa: E402
from llmprune.jobs.header import versions  # noqa: E402
from llmprune.maskllm import MaskLLMOptions, maskllm  # noqa: E402
from llmprune.masks import MaskSet  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
sys.path.insert(0, str(OUT.parent))
from common import calibration_ids  # noqa: E402

RUNS = {  # name → (prior, option overrides)
    "sparsegpt-prior": ("sparsegpt", {}),
    "no-prior": (None, {}),
    "train-weights": ("sparsegpt", {"train_weights": True}),
    # the reference's logit LR (5e-4) is tuned for 2B tokens; a CPU budget is ~1000x smaller
    "sparsegpt-prior-lr10x": ("sparsegpt", {"logit_lr_mult": 100.0}),
}
ONESHOT = {  # label → prune() settings, all 2:4 on the same calibration windows
    "magnitude": {"method": "magnitude"},
    "Wanda": {"method": "wanda"},
    "SparseGPT (mask only)": {"method": "sparsegpt", "solver": "none"},
    "SparseGPT": {"method": "sparsegpt"},
    "ADMM-Grad": {"method": "admm-grad"},
}


def args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="sparsegpt-prior,no-prior")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seqlen", type=int, default=512, help="training window")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--logit-lr-mult", type=float, default=10.0)
    p.add_argument("--tau-start", type=float, default=4.0)
    p.add_argument("--prior-strength", type=float, default=3.0)
    p.add_argument("--nsamples", type=int, default=32, help="one-shot / prior calibration windows")
    p.add_argument("--calib-seqlen", type=int, default=1024)
    p.add_argument("--ppl-seqlen", type=int, default=1024)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--no-oneshot", action="store_true", help="skip the one-shot baselines")
    p.add_argument("--plot", action="store_true", help="also write docs/img/maskllm.png")
    p.add_argument("--plot-to", default=None, help="also write the plot to this file (e.g. docs/img/maskllm_cpu.png)")
    p.add_argument("--out", default=str(OUT / "maskllm.json"))
    p.add_argument("--model", default="smollm2-135m", help="the bundled name, or its .gguf file")
    p.add_argument("--device", default="cpu", help="cpu | cuda: where training and evaluation run (the recipe "
                                                  "is the same; a GPU only runs it faster)")
    p.add_argument("--work", default=str(OUT / "maskllm"), help="checkpoint folder of the runs")
    return p


def load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def save_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def gap_closed(ppl: float, dense: float, ref: float) -> float:
    """Share of the reference → dense perplexity gap a result closes (1 = dense)."""
    return (ref - ppl) / (ref - dense)


def markdown(result: dict) -> str:
    dense = result.get("dense")
    ref = result.get("oneshot", {}).get("SparseGPT", {}).get("ppl")
    lines = ["| result | tokens | PPL | gap to dense closed vs SparseGPT |", "|---|---:|---:|---:|"]
    if dense:
        lines.append(f"| dense | - | {dense:.2f} | 1.00 |")
    for label, r in result.get("oneshot", {}).items():
        closed = f"{gap_closed(r['ppl'], dense, ref):.2f}" if dense and ref else ""
        lines.append(f"| {label} 2:4 (one-shot) | - | {r['ppl']:.2f} | {closed} |")
    for name, run in result.get("runs", {}).items():
        for pt in run["points"]:
            closed = f"{gap_closed(pt['ppl'], dense, ref):.2f}" if dense and ref else ""
            lines.append(f"| MaskLLM {name} step {pt['step']} | {pt['tokens']} | {pt['ppl']:.2f} | {closed} |")
    speed = [f"{name}: {run['points'][-1]['tokens_per_s']:.0f} tokens/s, peak RSS {run['peak_rss_mb']:.0f} MiB"
             for name, run in result.get("runs", {}).items() if run["points"]]
    return "\n".join(lines + ([""] + speed if speed else []))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, run in result.get("runs", {}).items():
        pts = run["points"]
        ax.plot([p["tokens"] / 1e6 for p in pts], [p["ppl"] for p in pts], marker="o", label=f"MaskLLM {name}")
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"][3:])
    for label, r in result.get("oneshot", {}).items():
        if r["ppl"] < 1000:
            ax.axhline(r["ppl"], ls="--", lw=1, color=next(colors), label=f"{label} 2:4")
    if result.get("dense"):
        ax.axhline(result["dense"], color="k", lw=1, label="dense")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("WikiText-2 PPL (1024, first 40 windows)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    where = "run on a GPU" if str(result.get("device", "cpu")).startswith("cuda") else "CPU"
    ax.set_title(f"SmolLM2-135M, 2:4, learned masks vs one-shot ({where})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    args = args_parser().parse_args()
    out = Path(args.out)
    result = load_json(out)
    protocol = {k: getattr(args, k) for k in ("steps", "eval_every", "seqlen", "batch_size", "grad_accum", "lr",
                                              "logit_lr_mult", "tau_start", "prior_strength", "nsamples",
                                              "calib_seqlen", "ppl_seqlen", "max_windows")}
    if result.get("protocol") not in (None, protocol):
        print(f"{out} holds another protocol; remove it or pass --out", file=sys.stderr)
        sys.exit(2)
    result.update(protocol=protocol, threads=torch.get_num_threads(), device=args.device,
                  versions=versions())
    result.setdefault("runs", {})
    result.setdefault("oneshot", {})
    model, tok = llmprune.load_model(args.model, dtype="float32")
    model.to(args.device)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    test_ids = eval_token_stream(load_corpus("wikitext2", "test"), tok, args.ppl_seqlen)
    calib = calibration_ids(tok, args.nsamples, args.calib_seqlen, 0)
    corpus = load_corpus("c4", "train")

    def ppl() -> float:
        return perplexity(model, test_ids, args.ppl_seqlen, args.max_windows, progress=False)["ppl"]

    if "dense" not in result:
        result["dense"] = ppl()
        save_json(out, result)
    print(f"dense PPL {result['dense']:.2f}", flush=True)

    if not args.no_oneshot:
        for label, kw in ONESHOT.items():
            if label in result["oneshot"]:
                continue
            model.load_state_dict(dense)
            t0 = time.perf_counter()
            try:
                llmprune.prune(model, llmprune.PruneConfig(pattern="2:4", nsamples=args.nsamples,
                                                           seqlen=args.calib_seqlen, device=args.device,
                                                           true_sequential=False, **kw),
                               calib_ids=calib, progress=False)
            except Exception as e:  # keep the other rows
                print(f"{label} 2:4 failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                continue
            result["oneshot"][label] = {"ppl": ppl(), "prune_s": time.perf_counter() - t0}
            print(f"{label} 2:4: PPL {result['oneshot'][label]['ppl']:.2f}", flush=True)
            save_json(out, result)

    for name in args.runs.split(","):
        prior, extra = RUNS[name]
        run = result["runs"].setdefault(name, {"points": [], "train_s": 0.0, "peak_rss_mb": 0.0})
        work = Path(args.work) / name
        opts = MaskLLMOptions(steps=args.steps, seqlen=args.seqlen, batch_size=args.batch_size,
                              grad_accum=args.grad_accum, lr=args.lr, logit_lr_mult=args.logit_lr_mult,
                              tau_start=args.tau_start, prior_strength=args.prior_strength,
                              checkpoint_every=0, log_every=10).model_copy(update=extra)
        done = run["points"][-1]["step"] if run["points"] else 0
        while done < args.steps:
            until = min(done + args.eval_every, args.steps)
            model.load_state_dict(dense)  # mask-only training needs the dense weights back
            t0 = time.perf_counter()
            res = maskllm(model, tok, opts, prior=prior, corpus=corpus, work_dir=work,
                          resume=work if done else None, until=until,
                          prior_options={"nsamples": args.nsamples, "seqlen": args.calib_seqlen,
                                         "calib": "c4", "device": args.device})
            dt = time.perf_counter() - t0
            run["train_s"] += res.report["train_seconds"]
            run["prior_s"] = run.get("prior_s") or res.report["prior_seconds"]
            run["peak_rss_mb"] = max(run["peak_rss_mb"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            tokens = res.report["tokens"]
            point = {"step": until, "tokens": tokens, "ppl": ppl(), "train_s": run["train_s"],
                     "tokens_per_s": (tokens - (run["points"][-1]["tokens"] if run["points"] else 0))
                     / res.report["train_seconds"], "chunk_s": dt,
                     "ce": (res.report["final"] or {}).get("ce")}
            run["points"].append(point)
            run["masks"] = str(MaskSet({n: m.cpu() for n, m in res.masks.items()}).save(work / "masks.npz"))  # the hard mask so far (MaskLLM layout)
            done = until
            print(f"{name} step {until}: PPL {point['ppl']:.2f} ({tokens} tokens, "
                  f"{point['tokens_per_s']:.0f} tok/s)", flush=True)
            save_json(out, result)
    out.with_suffix(".md").write_text(markdown(result) + "\n")
    if args.plot:
        plot(result, Path(__file__).resolve().parents[1] / "docs" / "img" / "maskllm.png")
    if args.plot_to:
        plot(result, Path(args.plot_to))
    print(markdown(result))


if __name__ == "__main__":
    main()
