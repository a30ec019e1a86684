"""The foundation benchmark: one-shot pruning of the bundled SmolLM2-135M on CPU.

Protocol (as in the Wanda / SparseGPT papers, scaled to this machine): calibration 32 × 1024
C4-train tokens (seed 0; plus one 128 × 1024 row for SparseGPT 50%), WikiText-2 test PPL at
seqlen 1024 on the first 40 windows; {magnitude, wanda, sparsegpt} × {50%, 2:4, 70%} + dense.
llm-compressor's ``oneshot`` runs beside it on the same model and the same calibration windows
(``bench/llmcompressor_run.py`` in its own venv ``.venv-bench``), and its output is evaluated by
the same code.

Every run is a fresh subprocess, so peak RSS is per run. Results go to ``bench/out/oneshot/``:
one JSON per run (re-runs skip finished ones unless ``--fresh``), ``results.json`` and
``results.md``.

    LLMPRUNE_DATA_DIR=../shared/data .venv/bin/python bench/oneshot.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out" / "oneshot"
BENCH_PY = REPO / ".venv-bench" / "bin" / "python"
PPL_SEQLEN, PPL_WINDOWS, SEQLEN, SEED = 1024, 40, 1024, 0
# What a 32-sample run here measures; other benchmarks adopt those rows when theirs is the same.
PROTOCOL = {"model": "smollm2-135m", "nsamples": 32, "seqlen": SEQLEN, "seed": SEED,
            "ppl_seqlen": PPL_SEQLEN, "max_windows": PPL_WINDOWS}


def finished_rows(folder: Path = OUT) -> list[dict]:
    """The dense and llmprune rows already measured with :data:`PROTOCOL`, for other benchmarks.

    Each row: ``method`` ("dense" for the dense model), ``setting`` ("0.5", "2:4"; None for
    dense), ``ppl``, ``prune_s``, ``sparsity`` and ``source`` (the result file).
    """
    rows = []
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        r = json.loads(f.read_text())
        if not isinstance(r, dict) or r.get("nsamples") != PROTOCOL["nsamples"] or "ppl" not in r:
            continue
        if r.get("tool") not in ("dense", "llmprune"):
            continue
        setting = r["setting"]
        if setting is not None and ":" not in setting:
            setting = f"{float(setting):g}"
        rows.append({"method": "dense" if r["tool"] == "dense" else r["method"], "setting": setting,
                     "ppl": r["ppl"], "prune_s": r.get("prune_seconds"), "sparsity": r["sparsity"],
                     "source": f"bench/oneshot.py ({f.name})"})
    return rows


def settings_of(s: str) -> dict:
    return {"pattern": s} if ":" in s else {"sparsity": float(s)}


def evaluate_dir_or_model(model, tok) -> float:
    import llmprune

    r = llmprune.evaluate(model, tok, ppl="wikitext2", seqlen=PPL_SEQLEN, max_windows=PPL_WINDOWS)
    return r["wikitext2"]["ppl"]


def worker(args: argparse.Namespace) -> None:
    """One run in this process: dense eval, llmprune prune + eval, or eval of a saved dir."""
    import torch

    import llmprune
    from llmprune.eval.sparsity import measure_sparsity
    from llmprune.jobs.header import peak_rss_mb

    torch.set_num_threads(2)
    result: dict = {"tool": args.tool, "method": args.method, "setting": args.setting,
                    "nsamples": args.nsamples}
    if args.tool == "dense":
        model, tok = llmprune.load_model("smollm2-135m")
        result.update(ppl=evaluate_dir_or_model(model, tok), sparsity=0.0)
    elif args.tool == "llmprune":
        t0 = time.perf_counter()
        model, tok = llmprune.load_model("smollm2-135m")
        cfg = llmprune.PruneConfig(method=args.method, nsamples=args.nsamples, seqlen=SEQLEN,
                                   seed=SEED, calib="c4", true_sequential=False,  # as llm-compressor
                                   **settings_of(args.setting))
        res = llmprune.prune(model, cfg, tokenizer=tok)
        result.update(prune_seconds=res.report["timings"]["prune_s"],
                      calib_seconds=res.report["timings"]["calib_s"] if "calib_s" in res.report["timings"] else 0.0,
                      total_seconds=time.perf_counter() - t0, peak_rss_mb=peak_rss_mb(),
                      sparsity=res.report["sparsity"])
        result["ppl"] = evaluate_dir_or_model(model, tok)
    else:  # evaluate a directory written by llm-compressor
        model, tok = llmprune.load_model(args.eval_dir)
        result.update(ppl=evaluate_dir_or_model(model, tok), sparsity=measure_sparsity(model)["overall"])
    Path(args.result).write_text(json.dumps(result, indent=2))


def calib_ids_file(nsamples: int) -> Path:
    """Our calibration windows, saved for llm-compressor so both see identical tokens."""
    import numpy as np

    import llmprune
    from llmprune.data.calibration import calibration_windows
    from llmprune.data.sources import load_corpus
    from llmprune.models.loading import model_source

    path = OUT / f"calib-c4-{nsamples}x{SEQLEN}-seed{SEED}.npy"
    if not path.exists():
        _, tok = llmprune.load_model("smollm2-135m")
        ids = calibration_windows(load_corpus("c4", "train"), tok, nsamples, SEQLEN, SEED)
        np.save(path, ids.numpy().astype("int64"))
    model_source("smollm2-135m")  # make sure the converted HF dir exists for llm-compressor
    return path


def run(cmd: list[str], result: Path, fresh: bool) -> dict:
    if result.exists() and not fresh:
        return json.loads(result.read_text())
    t0 = time.perf_counter()
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    print(f"  done in {time.perf_counter() - t0:.0f}s", flush=True)
    return json.loads(result.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    p.add_argument("--settings", default="0.5,2:4,0.7")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--no-128", dest="with_128", action="store_false", help="skip the 128-sample SparseGPT row")
    p.add_argument("--no-llmcompressor", dest="llmc", action="store_false")
    p.add_argument("--llmc-max-nsamples", type=int, default=32,
                   help="run llm-compressor only for rows with at most this many calibration samples "
                        "(its 128-sample SparseGPT run alone takes ~15 min on 2 CPU cores)")
    p.add_argument("--fresh", action="store_true", help="re-run finished rows")
    # worker mode (internal)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tool", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--setting", help=argparse.SUPPRESS)
    p.add_argument("--eval-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    OUT.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    me = [py, str(Path(__file__).resolve()), "--worker"]
    rows = [run(me + ["--tool", "dense", "--result", str(OUT / "dense.json")], OUT / "dense.json", args.fresh)]
    jobs = [(m, s, args.nsamples) for m in args.methods.split(",") for s in args.settings.split(",")]
    if args.with_128:
        jobs.append(("sparsegpt", "0.5", 128))
    for method, setting, n in jobs:
        tag = f"{method}-{setting.replace(':', 'of')}-n{n}"
        res = OUT / f"llmprune-{tag}.json"
        rows.append(run(me + ["--tool", "llmprune", "--method", method, "--setting", setting,
                              "--nsamples", str(n), "--result", str(res)], res, args.fresh))
        if not args.llmc or not BENCH_PY.exists() or n > args.llmc_max_nsamples:
            continue
        lres, ldir = OUT / f"llmc-{tag}.json", OUT / f"llmc-{tag}"
        if not lres.exists() or args.fresh:
            flag = ["--pattern", setting] if ":" in setting else ["--sparsity", setting]
            from llmprune.models.loading import model_source

            run([str(BENCH_PY), str(HERE / "llmcompressor_run.py"), "--model-dir", model_source("smollm2-135m"),
                 "--calib-ids", str(calib_ids_file(n)), "--method", method, *flag,
                 "--out", str(ldir), "--json", str(lres)], lres, True)
        lc = json.loads(lres.read_text())
        lc.update(tool="llmcompressor", method=method, setting=setting, nsamples=n)
        if "error" not in lc:
            eres = OUT / f"llmc-{tag}-eval.json"
            ev = run(me + ["--tool", "eval", "--method", method, "--setting", setting,
                           "--eval-dir", str(ldir), "--result", str(eres)], eres, args.fresh)
            lc["ppl"] = ev["ppl"]
            lc["sparsity"] = ev["sparsity"]
        rows.append(lc)
    (OUT / "results.json").write_text(json.dumps(rows, indent=2))
    table = markdown(rows)
    (OUT / "results.md").write_text(table)
    print(table)


def markdown(rows: list[dict]) -> str:
    dense = next(r for r in rows if r["tool"] == "dense")
    ours = {(r["method"], r["setting"], r["nsamples"]): r for r in rows if r["tool"] == "llmprune"}
    theirs = {(r["method"], r["setting"], r["nsamples"]): r for r in rows if r["tool"] == "llmcompressor"}
    lines = [
        f"Dense WikiText-2 PPL: **{dense['ppl']:.2f}** (seqlen {PPL_SEQLEN}, first {PPL_WINDOWS} windows)",
        "",
        "| method | target | calib | PPL | sparsity | prune s | peak RSS MiB | llm-compressor PPL | its prune s | its peak RSS MiB | time ratio (ours/theirs) | RSS ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, r in ours.items():
        t = theirs.get(key, {})
        if "error" in t:
            lc = ["n/a (" + t["error"].split(":")[0][:40] + ")", "", "", "", ""]
        elif t:
            lc = [f"{t['ppl']:.2f}", f"{t['prune_seconds']:.1f}", f"{t['peak_rss_mb']:.0f}",
                  f"{r['prune_seconds'] / t['prune_seconds']:.2f}", f"{r['peak_rss_mb'] / t['peak_rss_mb']:.2f}"]
        else:
            lc = ["", "", "", "", ""]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]}×{SEQLEN} | {r['ppl']:.2f} | {r['sparsity']:.4f} | "
                     f"{r['prune_seconds']:.1f} | {r['peak_rss_mb']:.0f} | " + " | ".join(lc) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
