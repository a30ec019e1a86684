"""Block-wise reconstruction benchmark (issue 24): WikiText-2 perplexity and pruning time of
one-shot pruning with and without ``--reconstruct blockwise`` on the bundled SmolLM2-135M, and
of the structured methods (OSSCAR 30 % MLP, depth k = 4) with and without it.

Protocol (as the other benchmarks): calibration 32 windows × 1024 C4-train tokens, seed 0, drawn
once and cached in bench/out/; WikiText-2 test perplexity with 1024-token windows, the first 40.
Every row starts from the same dense weights (restored from a CPU copy) in this one process, and
each blockwise row runs right after its plain row, so their time ratio is measured under the
same conditions (the machine is shared: note the load printed with each row).

Rows (``--rows``): ``METHOD:SETTING`` for ``llmprune prune`` (e.g. ``sparsegpt:2:4``,
``admm-grad:2:4``, ``sparsegpt:0.5``), ``osscar:RATIO`` and ``depth:K`` for ``llmprune
structured`` (depth ranks the windows by the cosine score on all calibration rows: on this model
it picks the same window as the ppl score, layers 12–15). ``--mode`` is the one-shot engine mode.
Results merge into ``bench/out/blockwise.json`` (keyed by row, mode and settings; a re-run skips
what is there unless ``--fresh``), the table into ``bench/out/blockwise.md``::

    LLMPRUNE_DATA_DIR=/work/shared/data PYTHONPATH=src python bench/blockwise.py

Smoke test::

    ... python bench/blockwise.py --nsamples 2 --seqlen 64 --max-windows 1 --rows sparsegpt:2:4 \\
        --steps 2 --out bench/out/blockwise-smoke.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import llmprune  # noqa: E402
from llmprune.data.sources import load_corpus  # noqa: E402
from llmprune.data.tokens import eval_token_stream  # noqa: E402
from llmprune.engine.blockwise import BlockwiseOptions  # noqa: E402
from llmprune.eval.perplexity import perplexity  # noqa: E402
from llmprune.jobs.header import versions  # noqa: E402
from llmprune.masks import MaskSet  # noqa: E402
from llmprune.masks.checks import group_counts  # noqa: E402
from llmprune.structured.api import structured  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
sys.path.insert(0, str(OUT.parent))
from common import calibration_ids  # noqa: E402

ROWS = "sparsegpt:2:4,admm-grad:2:4,sparsegpt:0.5,sparsegpt:0.7,osscar:0.3,depth:4"


def args_parser() -> argparse.ArgumentParser:
    d = BlockwiseOptions()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=ROWS)
    p.add_argument("--mode", choices=("exact", "true-sequential"), default="true-sequential")
    p.add_argument("--steps", type=int, default=d.recon_steps)
    p.add_argument("--lr", type=float, default=d.recon_lr)
    p.add_argument("--batch", type=int, default=d.recon_batch)
    p.add_argument("--target", choices=("dense", "local"), default=d.recon_target)
    p.add_argument("--norms", action="store_true")
    p.add_argument("--loss", choices=("token", "mse"), default=d.recon_loss)
    p.add_argument("--no-plain", action="store_true", help="only the blockwise rows (plain ones from the JSON)")
    p.add_argument("--plain-exact", action="store_true", help="also run each one-shot row plain in the exact "
                   "mode (the mode of the one-shot table), for the ratio to it")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--ppl-seqlen", type=int, default=1024)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--fresh", action="store_true", help="re-run rows already in the JSON")
    p.add_argument("--out", default=str(OUT / "blockwise.json"))
    return p


def load_avg() -> float:
    return os.getloadavg()[0]


def pattern_kept(model, setting: str) -> bool:
    """Every decoder linear keeps the pattern: ≤ N nonzeros per group of M (a kept weight may be
    an exact zero), or at least the target share of zeros."""
    masks = dict(MaskSet.from_model(model))
    if ":" in setting:
        n, m = map(int, setting.split(":"))
        return all(bool((group_counts(k, m) <= n).all()) for k in masks.values())
    return all(1 - k.float().mean().item() >= float(setting) - 1e-6 for k in masks.values())


def main() -> None:
    args = args_parser().parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    model, tok = llmprune.load_model("smollm2-135m", dtype="float32")
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    ids = calibration_ids(tok, args.nsamples, args.seqlen, 0)
    test_ids = eval_token_stream(load_corpus("wikitext2", "test"), tok, args.ppl_seqlen)
    bw = dict(reconstruct="blockwise", recon_steps=args.steps, recon_lr=args.lr, recon_batch=args.batch,
              recon_target=args.target, recon_norms=args.norms, recon_loss=args.loss)
    protocol = {"model": "smollm2-135m", "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0,
                "ppl_seqlen": args.ppl_seqlen, "max_windows": args.max_windows}

    def ppl(m) -> float:
        return perplexity(m, test_ids, args.ppl_seqlen, args.max_windows, progress=False)["ppl"]

    result = json.loads(out.read_text()) if out.is_file() else {}
    if result.get("protocol") != protocol:
        result = {"protocol": protocol, "rows": {}}
    result.update(threads=torch.get_num_threads(), cpu=platform.processor() or platform.machine(),
                  versions=versions())
    if "dense" not in result:
        result["dense"] = ppl(model)
    print(f"dense PPL {result['dense']:.2f}", flush=True)

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        out.with_suffix(".md").write_text(table(result) + "\n")

    def run(row: str, blockwise: bool, mode: str) -> dict:
        """One row from the dense weights; the time is the engine's (one-shot: the run stage,
        calibration windows given; structured: the pruning call)."""
        kind, setting = row.split(":", 1)
        model.load_state_dict(dense)
        extra = bw if blockwise else {}
        load = load_avg()
        if kind in ("osscar", "depth"):
            m = copy.deepcopy(model)  # both change shapes: work on a copy, the shared model stays whole
            opts = (dict(ratio=float(setting), round_to=64) if kind == "osscar"
                    else dict(method="depth", layers=int(setting), score="cosine"))
            t0, cpu0 = time.perf_counter(), time.process_time()
            rep = structured(m, tok, dict(nsamples=args.nsamples, seqlen=args.seqlen, **opts, **extra), ids=ids,
                             progress=False).report
            seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            entry = {"seconds": seconds, "cpu_seconds": cpu, "params_removed": rep["params"]["removed_share"],
                     "blockwise": rep[kind].get("blockwise"), "ppl": ppl(m)}
            if kind == "depth":
                entry["removed_layers"] = rep["depth"]["removed_layers"]
            if entry["blockwise"]:
                entry["blockwise"] = {k: v for k, v in entry["blockwise"].items() if k != "tuned_layers"}
            del m
        else:
            target = {"pattern": setting} if ":" in setting else {"sparsity": float(setting)}
            cfg = llmprune.PruneConfig(method=kind, nsamples=args.nsamples, seqlen=args.seqlen, calib="c4",
                                       true_sequential=mode == "true-sequential", **target, **extra)
            cpu0 = time.process_time()
            rep = llmprune.prune(model, cfg, tokenizer=tok, calib_ids=ids, progress=False).report
            entry = {"seconds": rep["timings"]["run_s"], "cpu_seconds": time.process_time() - cpu0, "mode": rep["mode"], "sparsity": rep["sparsity"],
                     "pattern_kept": pattern_kept(model, setting), "blockwise": rep.get("blockwise"),
                     "ppl": ppl(model)}
        entry.update(load_before=load, load_after=load_avg())
        return entry

    for row in args.rows.split(","):
        kind = row.split(":", 1)[0]
        mode = "structured" if kind in ("osscar", "depth") else args.mode
        plain_key = f"{row} {mode} plain"
        bw_key = (f"{row} {mode} blockwise steps={args.steps} lr={args.lr:g} batch={args.batch} "
                  f"target={args.target} loss={args.loss}{' norms' if args.norms else ''}")
        rows = result["rows"]
        exact_key = f"{row} exact plain"
        plains = [(plain_key, mode)] + ([(exact_key, "exact")] if args.plain_exact and mode == "true-sequential" else [])
        for key, m in plains:
            if not args.no_plain and (args.fresh or key not in rows):
                rows[key] = run(row, False, m)
                save()
                print(f"{key}: PPL {rows[key]['ppl']:.2f} in {rows[key]['seconds']:.1f}s "
                      f"(load {rows[key]['load_before']:.1f})", flush=True)
        if args.fresh or bw_key not in rows:
            rows[bw_key] = run(row, True, mode)
            if plain_key in rows:
                rows[bw_key]["time_ratio"] = rows[bw_key]["seconds"] / rows[plain_key]["seconds"]
                rows[bw_key]["cpu_ratio"] = rows[bw_key]["cpu_seconds"] / rows[plain_key]["cpu_seconds"]
            if mode != "exact" and exact_key in rows:
                rows[bw_key]["time_ratio_exact"] = rows[bw_key]["seconds"] / rows[exact_key]["seconds"]
                rows[bw_key]["cpu_ratio_exact"] = rows[bw_key]["cpu_seconds"] / rows[exact_key]["cpu_seconds"]
            save()
            b = rows[bw_key]
            print(f"{bw_key}: PPL {b['ppl']:.2f} in {b['seconds']:.1f}s "
                  f"(x{b.get('time_ratio', float('nan')):.2f} of plain; load {b['load_before']:.1f}); block error "
                  f"{b['blockwise']['error_before_mean']:.4g} -> {b['blockwise']['error_after_mean']:.4g}", flush=True)
    print(table(result))


def table(result: dict) -> str:
    p = result["protocol"]
    lines = [f"WikiText-2 PPL ({p['model']}, first {p['max_windows']} windows of {p['ppl_seqlen']}; dense "
             f"{result['dense']:.2f}); calibration {p['nsamples']}×{p['seqlen']} C4 seed {p['seed']}; "
             "seconds = the pruning run in this process, wall and CPU (all threads); × plain = the ratio to the "
             "plain row of the same mode, measured just before it (load = 1-min load average of the 2-core "
             "machine when the row started)", "",
             "| row | mode | variant | PPL | wall s | CPU s | × plain (wall / CPU) | × plain exact (wall / CPU) | "
             "block error before → after | load |",
             "|---|---|---|---:|---:|---:|---|---|---|---:|"]
    for key, r in result["rows"].items():
        row, mode, variant = key.split(" ", 2)
        b = r.get("blockwise")
        err = f"{b['error_before_mean']:.4f} → {b['error_after_mean']:.4f}" if b else ""
        ratio = f"{r['time_ratio']:.2f} / {r['cpu_ratio']:.2f}" if "time_ratio" in r else ""
        vs_exact = f"{r['time_ratio_exact']:.2f} / {r['cpu_ratio_exact']:.2f}" if "time_ratio_exact" in r else ""
        lines.append(f"| {row} | {mode} | {variant} | {r['ppl']:.2f} | {r['seconds']:.0f} | {r['cpu_seconds']:.0f} | "
                     f"{ratio} | {vs_exact} | {err} | {r['load_before']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
