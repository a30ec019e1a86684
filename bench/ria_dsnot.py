"""RIA and DSnoT benchmark: WikiText-2 perplexity of RIA masks and DSnoT-refined masks against
Wanda's, alone and under the SparseGPT / ADMM weight updates, on the bundled SmolLM2-135M.

Protocol: that of ``bench/oneshot.py`` (calibration 32 windows × 1024 C4 tokens, seed 0, drawn
once and cached in bench/out/; WikiText-2 test perplexity with 1024-token windows, the first 40),
the exact two-pass engine mode pinned (dense statistics per layer, as the papers' code and
``bench/admm.py``). Targets 50 %, 60 %, 70 % unstructured and 2:4. Every run starts from the
same dense weights (restored from a CPU copy) and the baselines (Wanda, Wanda + SparseGPT update,
Wanda + ADMM update, SparseGPT mask-only) are measured in the same process as the new rows.
Writes bench/out/ria_dsnot.json and .md; finished cells are kept, so a re-run only runs what is
missing (``--fresh`` re-runs). Full protocol::

    LLMPRUNE_DATA_DIR=/work/shared/data PYTHONPATH=src python bench/ria_dsnot.py

Smoke test::

    ... python bench/ria_dsnot.py --nsamples 2 --seqlen 128 --max-windows 2 --settings 2:4 --runs wanda,ria
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

import llmprune  # noqa: E402
from llmprune.data.sources import load_corpus  # noqa: E402
from llmprune.data.tokens import eval_token_stream  # noqa: E402
from llmprune.engine.sequential import LayerPlan, run_sequential  # noqa: E402
from llmprune.eval.perplexity import perplexity  # noqa: E402
from llmprune.eval.sparsity import measure_sparsity  # noqa: E402
from llmprune.jobs.header import versions  # noqa: E402
from llmprune.models.layers import decoder_layers  # noqa: E402
from llmprune.sparsity.dsnot import DSnoTOptions  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import admm  # noqa: E402  (its setting parser)
from common import OUT, calibration_ids, resume_results, save_results  # noqa: E402

# name → (method, refine, solver, DSnoT option overrides (and refine_linears), label in the table)
RUNS = {
    "wanda": ("wanda", "none", None, {}, "Wanda"),
    "wanda+dsnot": ("wanda", "dsnot", None, {}, "Wanda + DSnoT"),
    "ria": ("ria", "none", None, {}, "RIA"),
    "sparsegpt-mask": ("sparsegpt", "none", "none", {}, "SparseGPT mask-only"),
    "wanda+sparsegpt": ("wanda", "none", "sparsegpt", {}, "Wanda + SparseGPT update"),
    "wanda+dsnot+sparsegpt": ("wanda", "dsnot", "sparsegpt", {}, "Wanda + DSnoT + SparseGPT update"),
    "ria+sparsegpt": ("ria", "none", "sparsegpt", {}, "RIA + SparseGPT update"),
    "wanda+admm": ("wanda", "none", "admm", {}, "Wanda + ADMM update"),
    "wanda+dsnot+admm": ("wanda", "dsnot", "admm", {}, "Wanda + DSnoT + ADMM update"),
    "ria+admm": ("ria", "none", "admm", {}, "RIA + ADMM update"),
    # variants: without the sign rule; the reference's current defaults (no sign rule, attention
    # linears only: --skip_layer mlp); DSnoT after RIA
    "wanda+dsnot-nosign": ("wanda", "dsnot", None, {"dsnot_same_sign": False}, "Wanda + DSnoT, no sign rule"),
    "wanda+dsnot-refdefault": ("wanda", "dsnot", None, {"dsnot_same_sign": False, "refine_linears": "self_attn.*"},
                               "Wanda + DSnoT, reference defaults"),
    "ria+dsnot": ("ria", "dsnot", None, {}, "RIA + DSnoT"),
}
VARIANTS = ("wanda+dsnot-nosign", "wanda+dsnot-refdefault", "ria+dsnot")
DEFAULT_RUNS = ",".join(n for n in RUNS if n not in VARIANTS)
SETTINGS = "0.5,0.6,0.7,2:4"
PROTOCOL_KEYS = ("model", "nsamples", "seqlen", "seed", "ppl_seqlen", "max_windows")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--runs", default=DEFAULT_RUNS, help=f"comma-separated subset of {','.join(RUNS)}")
    p.add_argument("--settings", default=SETTINGS, help="comma-separated sparsities and/or N:M patterns")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ppl-seqlen", type=int, default=1024)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--fresh", action="store_true", help="re-run cells already in the output")
    p.add_argument("--out", default=str(OUT / "ria_dsnot"), help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    unknown = set(args.runs.split(",")) - set(RUNS)
    if unknown:
        p.error(f"unknown runs {sorted(unknown)}; choose from {','.join(RUNS)}")
    return args


def markdown(result: dict) -> str:
    """Rows: runs; columns: settings; cells: PPL (prune seconds)."""
    present = {s for by_s in result["results"].values() for s in by_s}
    settings = [s for s in SETTINGS.split(",") if s in present] + sorted(present - set(SETTINGS.split(",")))
    lines = ["| method | " + " | ".join(settings) + " |", "|" + "---|" * (len(settings) + 1)]
    if "dense" in result:
        lines.append("| dense | " + " | ".join(f"{result['dense']['ppl']:.2f}" for _ in settings) + " |")
    for name in (n for n in RUNS if n in result["results"]):
        cells = []
        for s in settings:
            r = result["results"][name].get(s)
            cells.append("-" if r is None else f"{r['ppl']:.2f} ({r['prune_s']:.0f} s)")
        lines.append(f"| {RUNS[name][4]} | " + " | ".join(cells) + " |")
    c = result["config"]
    lines += ["", f"WikiText-2 test PPL ({c['ppl_seqlen']}-token windows, first {c['max_windows']}) "
              f"(prune seconds, {result['device']}, load average {result.get('load', '?')}); {c['model']}, "
              f"calibration {c['nsamples']}×{c['seqlen']} C4 seed {c['seed']}, exact mode; RIA a=0.5, "
              "DSnoT defaults (50 cycles, threshold 0.1, variance power 1, sign rule on)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = llmprune.load_model(args.model, device="cpu")
    load_s = time.perf_counter() - t0
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ids = calibration_ids(tok, args.nsamples, args.seqlen, args.seed)
    test_ids = eval_token_stream(load_corpus("wikitext2", "test"), tok, args.ppl_seqlen)
    runs, settings = args.runs.split(","), [s.strip() for s in args.settings.split(",") if s.strip()]
    result: dict = {
        "config": {**vars(args), "calib": "c4", "mode": "exact"},
        "device": f"cpu ({torch.get_num_threads()} threads)",
        "versions": versions(),
        "load_s": load_s, "results": {},
    }
    out = Path(args.out)
    resume_results(out, result, PROTOCOL_KEYS, args.fresh, keep=("dense", "load"))

    def save() -> None:
        result["load"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
        save_results(out, result, markdown)

    def ppl() -> float:
        return perplexity(model, test_ids, args.ppl_seqlen, args.max_windows, progress=False)["ppl"]

    if "dense" not in result:
        result["dense"] = {"ppl": ppl()}
        print(f"dense: PPL {result['dense']['ppl']:.3f}", flush=True)
    n_layers = len(decoder_layers(model))
    for s in settings:
        target = admm.parse_setting(s)
        for name in runs:
            method, refine, solver, dsnot_opts, label = RUNS[name]
            if s in result["results"].get(name, {}):
                continue
            model.load_state_dict(dense)
            dsnot_opts = dict(dsnot_opts)
            plan = LayerPlan(method, [target] * n_layers, solver, refine=refine,
                             refine_linears=dsnot_opts.pop("refine_linears", None),
                             options={DSnoTOptions: DSnoTOptions(**dsnot_opts)}, true_sequential=False)
            t1 = time.perf_counter()
            layers = run_sequential(model, ids, plan, "cpu", progress=False)
            prune_s = time.perf_counter() - t1
            r = {"ppl": ppl(), "prune_s": prune_s, "sparsity": measure_sparsity(model)["overall"],
                 "load": " ".join(f"{x:.1f}" for x in os.getloadavg())}
            swaps = [e["refine_swaps"] for L in layers for e in L["linears"].values() if "refine_swaps" in e]
            if swaps:  # pairs DSnoT swapped, as a share of all prunable weights
                params = sum(e["shape"][0] * e["shape"][1] for L in layers for e in L["linears"].values())
                r["refine_swapped_share"] = sum(swaps) / params
            result["results"].setdefault(name, {})[s] = r
            print(f"{s:>5} {label:<34} PPL {r['ppl']:9.3f}  prune {prune_s:7.1f}s  sparsity {r['sparsity']:.4f}"
                  + (f"  swapped {r['refine_swapped_share']:.4%}" if swaps else ""), flush=True)
            save()
    save()
    print()
    print(markdown(result))
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
