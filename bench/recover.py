"""Recovery benchmark (issues #13, #24): WikiText-2 perplexity of a pruned SmolLM2-135M before
and after recovery, with the share of the gap to dense that recovery closes, and a check that
a 2:4 pattern survived exactly.

Sources (``--sources``): ``sparsegpt`` (one-shot SparseGPT 2:4 with its weight update, on the
one-shot table's 32 × 1024 C4 windows), ``maskllm`` (a learned MaskLLM mask file given with
``--maskllm-masks``, applied to the dense weights), and any structured output directory named
with ``--inputs NAME=DIR`` (e.g. made by ``llmprune structured smollm2-135m --method osscar
--ratio 0.3 --nsamples 32 --seqlen 1024 --out DIR``): dense and smaller, every weight trains;
or a saved pruned directory (its zeros are the mask), e.g. the ``sparsegpt`` source saved once by
``llmprune prune smollm2-135m --method sparsegpt --pattern 2:4 --nsamples 32 --seqlen 1024
--no-true-sequential --out DIR`` (the same model the in-bench source makes, without re-pruning it
for every run).

Rows (``--modes``): ``masked`` (next-token loss on the kept weights), ``lora`` (merged and
re-masked), ``distill`` (logit KL to the dense model, on the kept weights) and
``distill+hidden`` (plus SquareHead's hidden-state term, weight ``--hidden-weight``). Every
row of a run trains the same tokens and steps; ``--tag`` names a tuning variant (its row key is
``MODE@TAG``). Results: bench/out/recover.json and .md; a run replaces only the rows it measures,
and each row records its settings, the machine's load and its time::

    LLMPRUNE_DATA_DIR=/work/shared/data PYTHONPATH=src python bench/recover.py \\
        --modes masked,distill,distill+hidden --batch-size 1 --grad-accum 4

Smoke test::

    ... python bench/recover.py --steps 2 --seqlen 64 --batch-size 1 --max-windows 1 --modes masked,distill
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
from llmprune.masks import MaskSet  # noqa: E402
from llmprune.masks.checks import group_counts  # noqa: E402
from llmprune.recover.api import merge_adapter, model_masks, recover, remask_result  # noqa: E402
from llmprune.recover.distill import lineage_layer_map  # noqa: E402
from llmprune.recover.job import input_report  # noqa: E402
from llmprune.report import optional_report  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
sys.path.insert(0, str(OUT.parent))
from common import calibration_ids  # noqa: E402

MODES = ("masked", "lora", "distill", "distill+hidden")


def args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sources", default="sparsegpt")
    p.add_argument("--maskllm-masks", default=None, help="a MaskLLM .npz of this model (source maskllm)")
    p.add_argument("--inputs", default="", help="NAME=DIR,... structured outputs usable as sources")
    p.add_argument("--modes", default="masked,lora")
    p.add_argument("--tag", default="", help="row key suffix of a tuning variant (MODE@TAG)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (global batch = "
                                                            "batch-size × grad-accum)")
    p.add_argument("--masked-lr", type=float, default=None, help="default: the library's (5e-5)")
    p.add_argument("--lora-lr", type=float, default=None, help="default: the library's (1e-4)")
    p.add_argument("--distill-lr", type=float, default=None, help="default: the library's (5e-5)")
    p.add_argument("--kd-temperature", type=float, default=1.0)
    p.add_argument("--kd-topk", type=int, default=0)
    p.add_argument("--hidden-weight", type=float, default=1.0, help="SquareHead weight of distill+hidden")
    p.add_argument("--loss", default="kd", choices=("kd", "kd+ce"), help="the distill rows' loss")
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
    if not x:
        return "-"
    return f"{x['ppl']:.2f} ({x['gap_closed']:.0%})" if x["gap_closed"] is not None else f"{x['ppl']:.2f}"


def gap_closed(after: float, before: float, dense: float) -> float | None:
    """Share of the gap to dense closed; None for the dense model itself (no gap: a ceiling row)."""
    return (before - after) / (before - dense) if before != dense else None


def save(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


def load_avg() -> float:
    return os.getloadavg()[0]


def cpu_seconds() -> float:
    """User + system CPU time of this process so far: a cost that other load on a shared
    machine stretches much less than the wall time."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def row_options(args, mode: str) -> dict:
    """The ``recover`` keywords of one row."""
    if mode in ("masked", "lora"):
        lr = args.masked_lr if mode == "masked" else args.lora_lr
        return {"mode": mode, **({"lr": lr} if lr else {})}
    kd = {"mode": "distill", "loss": args.loss, "kd_temperature": args.kd_temperature, "kd_topk": args.kd_topk,
          **({"lr": args.distill_lr} if args.distill_lr else {})}
    if mode == "distill+hidden":
        kd["kd_hidden_weight"] = args.hidden_weight
    return kd


def main() -> None:
    args = args_parser().parse_args()
    for mode in args.modes.split(","):
        if mode not in MODES:
            sys.exit(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
    inputs = dict(kv.split("=", 1) for kv in args.inputs.split(",") if kv)
    out = Path(args.out)
    model, tok = llmprune.load_model("smollm2-135m", dtype="float32")
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    teacher = None
    if any(m.startswith("distill") for m in args.modes.split(",")):
        teacher, _ = llmprune.load_model("smollm2-135m", dtype="float32")  # frozen, separate from the student
    test_ids = eval_token_stream(load_corpus("wikitext2", "test"), tok, args.ppl_seqlen)
    corpus = load_corpus("c4", "train")

    def ppl(m) -> float:
        return perplexity(m, test_ids, args.ppl_seqlen, args.max_windows, progress=False)["ppl"]

    # Rows of earlier runs (other sources, modes or settings) are kept; each row says its settings.
    result = json.loads(out.read_text()) if out.is_file() else {"sources": {}}
    same_eval = all(result.get("protocol", {}).get(k) == getattr(args, k) for k in ("ppl_seqlen", "max_windows"))
    result.update(protocol={k: v for k, v in vars(args).items() if k != "out"},
                  threads=torch.get_num_threads(),
                  versions=versions(),
                  dense=result["dense"] if same_eval and "dense" in result else ppl(model))
    print(f"dense PPL {result['dense']:.2f}", flush=True)
    for source in args.sources.split(","):
        masks, layer_map, student = None, None, model
        if source in inputs:  # a saved output: a pruned one's zeros are its mask; a structured one trains all
            student, _ = llmprune.load_model(inputs[source], dtype="float32")
            if (input_report(inputs[source]) or {}).get("dense"):
                masks = {n: torch.ones_like(m) for n, m in model_masks(student).items()}
            report = optional_report(inputs[source]) or {}
            if len(student.model.layers) != len(model.model.layers):
                layer_map = lineage_layer_map([report], len(model.model.layers))
        else:
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
                sys.exit(f"unknown source {source!r} (structured outputs: --inputs {source}=DIR)")
        start = {k: v.clone() for k, v in student.state_dict().items()}
        before = ppl(student)
        params = sum(p.numel() for p in student.parameters())
        rows = {**result["sources"].get(source, {}), "before": before, "params": params,
                "is_2_4": is_2_4(student) if masks is None else None,
                "input": inputs.get(source)}
        print(f"{source}: PPL {before:.2f} ({params / 1e6:.1f} M parameters)", flush=True)
        for mode in args.modes.split(","):
            student.load_state_dict(start)
            opts = row_options(args, mode)
            load0, t0, c0 = load_avg(), time.perf_counter(), cpu_seconds()
            res = recover(student, tok, steps=args.steps, seqlen=args.seqlen, batch_size=args.batch_size,
                          grad_accum=args.grad_accum, checkpoint_every=0, log_every=10, corpus=corpus,
                          masks=masks, finish=False, progress=False,
                          **({"teacher": teacher, "layer_map": layer_map} if mode.startswith("distill") else {}),
                          **opts)
            row = {"steps": args.steps, "train_s": time.perf_counter() - t0, "train_cpu_s": cpu_seconds() - c0,
                   "tokens": res.report["tokens"],
                   "tokens_per_s": res.report["tokens"] / res.report["train_seconds"],
                   "global_batch": args.batch_size * args.grad_accum, "seqlen": args.seqlen,
                   "lr": res.report["options"]["lr"], "peak_rss_mb": res.report["peak_rss_mb"],
                   "load_avg": [load0, load_avg()], "final": res.report["final"],
                   **({"distill": res.report["distill"]} if "distill" in res.report else {})}
            trained = res.model
            if mode == "lora":
                merge_adapter(res)
                row["merged_no_remask"] = ppl(res.model)
                row["update_outside_mask"] = res.report["remask"]["update_outside_mask"]
                remask_result(res)
                trained = res.model
            if source not in inputs:
                model = trained
            row["ppl"] = ppl(trained)
            row["pruned_nonzero"] = res.report["pruned_nonzero"]
            row["is_2_4"] = is_2_4(trained) if masks is None else None
            row["gap_closed"] = gap_closed(row["ppl"], before, result["dense"])
            key = f"{mode}@{args.tag}" if args.tag else mode
            rows[key] = row
            result["sources"][source] = rows
            save(out, result)
            print(f"{source} + {key}: PPL (gap closed) {cell(row)}; "
                  f"{row['tokens_per_s']:.0f} tok/s, load {row['load_avg'][0]:.1f}-{row['load_avg'][1]:.1f}",
                  flush=True)
        result["sources"][source] = rows
        save(out, result)
    lines = ["| source | before | row | PPL (gap closed) | LR | tokens/s |", "|---|---:|---|---:|---:|---:|"]
    for source, r in result["sources"].items():
        for key, x in r.items():
            if isinstance(x, dict) and "ppl" in x:
                lines.append(f"| {source} | {r['before']:.2f} | {key} | {cell(x)} | {x['lr']:g} | "
                             f"{x['tokens_per_s']:.0f} |")
    md = "\n".join([f"dense {result['dense']:.2f}; PPL (share of the gap to dense closed)", "", *lines])
    out.with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
