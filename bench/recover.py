"""Recovery benchmark (issue #13): WikiText-2 perplexity of a 2:4 model before and after
masked fine-tuning and LoRA (merged + re-masked), on the bundled SmolLM2-135M, with the share
of the gap to dense that recovery closes and a check that the 2:4 pattern survived exactly.

Sources (``--sources``): ``sparsegpt`` (one-shot SparseGPT 2:4 with its weight update, on the
one-shot table's 32 × 1024 C4 windows) and ``maskllm`` (a learned MaskLLM mask file given with
``--maskllm-masks``, applied to the dense weights). Results: bench/out/recover.json and .md; a run
replaces only the rows (source × mode) it measures, and each row records its learning rate::

    LLMPRUNE_DATA_DIR=/work/shared/data PYTHONPATH=src python bench/recover.py

Smoke test::

    ... python bench/recover.py --steps 2 --seqlen 64 --batch-size 1 --max-windows 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
from llmprune.masks import MaskSet  # noqa: E402
from llmprune.masks.checks import group_counts  # noqa: E402
from llmprune.recover.api import merge_adapter, recover, remask_result  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
sys.path.insert(0, str(OUT.parent))
from admm import calibration_ids  # noqa: E402


def args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sources", default="sparsegpt")
    p.add_argument("--maskllm-masks", default=None, help="a MaskLLM .npz of this model (source maskllm)")
    p.add_argument("--modes", default="masked,lora")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--masked-lr", type=float, default=None, help="default: the library's (2e-5)")
    p.add_argument("--lora-lr", type=float, default=None, help="default: the library's (1e-4)")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=1024)
    p.add_argument("--ppl-seqlen", type=int, default=1024)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--out", default=str(OUT / "recover.json"))
    return p


def is_2_4(model) -> bool:
    """Every decoder linear 2:4: at most 2 nonzeros in every group of 4 inputs (a kept weight
    may be exactly 0, so "exactly 2" is too strict)."""
    return all(bool((group_counts(m, 4) <= 2).all()) for m in dict(MaskSet.from_model(model)).values())


def cell(x: dict) -> str:
    return f"{x['ppl']:.2f} ({x['gap_closed']:.0%}, LR {x['lr']:g})" if x else "-"


def gap_closed(after: float, before: float, dense: float) -> float:
    return (before - after) / (before - dense)


def save(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


def main() -> None:
    args = args_parser().parse_args()
    out = Path(args.out)
    model, tok = llmprune.load_model("smollm2-135m", dtype="float32")
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    test_ids = eval_token_stream(load_corpus("wikitext2", "test"), tok, args.ppl_seqlen)
    corpus = load_corpus("c4", "train")

    def ppl() -> float:
        return perplexity(model, test_ids, args.ppl_seqlen, args.max_windows, progress=False)["ppl"]

    # Rows of earlier runs (other sources, modes or learning rates) are kept; each row says its LR.
    result = json.loads(out.read_text()) if out.is_file() else {"sources": {}}
    same_eval = all(result.get("protocol", {}).get(k) == getattr(args, k) for k in ("ppl_seqlen", "max_windows"))
    result.update(protocol={k: v for k, v in vars(args).items() if k != "out"},
                  threads=torch.get_num_threads(),
                  versions={"torch": torch.__version__, "python": platform.python_version()},
                  dense=result["dense"] if same_eval and "dense" in result else ppl())
    print(f"dense PPL {result['dense']:.2f}", flush=True)
    for source in args.sources.split(","):
        model.load_state_dict(dense)
        if source == "sparsegpt":
            llmprune.prune(model, llmprune.PruneConfig(method="sparsegpt", pattern="2:4", nsamples=args.nsamples,
                                                       seqlen=args.calib_seqlen, true_sequential=False),
                           calib_ids=calibration_ids(tok, args.nsamples, args.calib_seqlen, 0), progress=False)
        elif source == "maskllm":
            if not args.maskllm_masks:
                sys.exit("source maskllm needs --maskllm-masks FILE")
            MaskSet.load(args.maskllm_masks, model).apply(model)
        else:
            sys.exit(f"unknown source {source!r}")
        pruned = {k: v.clone() for k, v in model.state_dict().items()}
        before = ppl()
        rows = {**result["sources"].get(source, {}), "before": before, "is_2_4": is_2_4(model)}
        print(f"{source} 2:4: PPL {before:.2f}", flush=True)
        for mode in args.modes.split(","):
            model.load_state_dict(pruned)
            lr = args.masked_lr if mode == "masked" else args.lora_lr
            t0 = time.perf_counter()
            res = recover(model, tok, mode=mode, steps=args.steps, seqlen=args.seqlen,
                          batch_size=args.batch_size, checkpoint_every=0, log_every=10, corpus=corpus,
                          finish=False, progress=False, **({"lr": lr} if lr else {}))
            row = {"steps": args.steps, "train_s": time.perf_counter() - t0, "tokens": res.report["tokens"],
                   "tokens_per_s": res.report["tokens"] / res.report["train_seconds"],
                   "lr": res.report["options"]["lr"], "peak_rss_mb": res.report["peak_rss_mb"]}
            if mode == "lora":
                merge_adapter(res)
                model = res.model
                row["merged_no_remask"] = ppl()
                row["update_outside_mask"] = res.report["remask"]["update_outside_mask"]
                remask_result(res)
                model = res.model
            row["ppl"] = ppl()
            row["pruned_nonzero"] = res.report["pruned_nonzero"]
            row["is_2_4"] = is_2_4(model)
            row["gap_closed"] = gap_closed(row["ppl"], before, result["dense"])
            rows[mode] = row
            result["sources"][source] = rows
            save(out, result)
            print(f"{source} + {mode}: PPL {row['ppl']:.2f} (gap closed {row['gap_closed']:.2f}, "
                  f"2:4 kept: {row['is_2_4']}, {row['tokens_per_s']:.0f} tok/s)", flush=True)
        result["sources"][source] = rows
        save(out, result)
    lines = ["| source | before | masked FT | LoRA merged (no re-mask) | LoRA merged + re-masked |",
             "|---|---:|---:|---:|---:|"]
    for source, r in result["sources"].items():
        m, lo = r.get("masked", {}), r.get("lora", {})
        lines.append(f"| {source} 2:4 | {r['before']:.2f} | {cell(m)} | "
                     f"{lo.get('merged_no_remask', float('nan')):.2f} | {cell(lo)} |")
    md = "\n".join([f"dense {result['dense']:.2f}; PPL (share of the gap to dense closed)", "", *lines])
    out.with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
