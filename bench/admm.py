"""ADMM benchmark: WikiText-2 perplexity and pruning time of ADMM1 / ADMM-Grad against Wanda and
SparseGPT on the bundled SmolLM2-135M (issue #5).

Protocol (defaults): calibration 32 windows × 1024 C4 tokens, seed 0, drawn once and cached in
bench/out/; WikiText-2 test perplexity with 1024-token windows, the first 40 windows; targets
50 %, 60 %, 70 %, 80 % unstructured and 2:4. Every run starts from the same dense weights,
restored from a CPU copy of the state dict. Writes bench/out/admm.json and admm.md and prints
the table; finished cells are kept there, so a re-run (same protocol) only runs what is missing.
Wanda and SparseGPT cells that ``bench/oneshot.py`` or ``bench/owl.py`` already measured with the
same protocol are adopted (each says where it came from) rather than run again. Full protocol::

    LLMPRUNE_DATA_DIR=/work/shared/data PYTHONPATH=src python bench/admm.py

Smoke test::

    ... python bench/admm.py --nsamples 2 --seqlen 128 --max-windows 2 --settings 0.5
"""

from __future__ import annotations

import argparse
import json
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
from llmprune.sparsity.admm import ADMMOptions  # noqa: E402
from llmprune.sparsity.patterns import Target  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import oneshot  # noqa: E402
from common import OUT, calibration_ids, resume_results, save_results  # noqa: E402

# name → (method, solver, label in the table)
RUNS = {
    "wanda": ("wanda", None, "Wanda"),
    "sparsegpt": ("sparsegpt", None, "SparseGPT"),
    "wanda+sparsegpt": ("wanda", "sparsegpt", "Wanda + SparseGPT update"),
    "admm1": ("wanda", "admm", "ADMM1 (Wanda mask + ADMM)"),
    "admm-grad": ("admm-grad", None, "ADMM-Grad"),
}
SETTINGS = "0.5,0.6,0.7,0.8,2:4"


def parse_setting(s: str) -> Target:
    return Target.parse(s, None) if ":" in s else Target.unstructured(float(s))


PROTOCOL_KEYS = ("model", "nsamples", "seqlen", "seed", "ppl_seqlen", "max_windows",
                 "admm_iters", "admm_ks", "admm_rho", "admm_damp")


def adopted_cells(config: dict) -> dict[str, dict[str, dict]]:
    """Dense, Wanda and SparseGPT cells already measured by the other benchmarks (their protocol only)."""
    if any(config[k] != v for k, v in oneshot.PROTOCOL.items()):
        return {}
    cells: dict[str, dict[str, dict]] = {}
    for r in oneshot.finished_rows():
        if r["method"] == "dense":
            cells.setdefault("dense", {})["-"] = {"ppl": r["ppl"], "source": r["source"]}
        elif r["method"] in ("wanda", "sparsegpt"):
            cells.setdefault(r["method"], {})[r["setting"]] = {
                "ppl": r["ppl"], "prune_s": r["prune_s"], "sparsity": r["sparsity"], "source": r["source"]}
    owl = OUT / "owl.json"
    if owl.is_file():
        for r in json.loads(owl.read_text())["runs"].values():
            if (r["allocation"] == "uniform" and r["method"] in ("wanda", "sparsegpt") and "prune_s" in r
                    and r["target"] in SETTINGS.split(",")
                    and r["protocol"]["dtype"] == "float32" and "source" not in r):
                cells.setdefault(r["method"], {}).setdefault(r["target"], {
                    "ppl": r["ppl"], "prune_s": r["prune_s"], "sparsity": r["sparsity"], "source": "bench/owl.py"})
    return cells


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    p.add_argument("--settings", default=SETTINGS, help="comma-separated sparsities and/or N:M patterns")
    p.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ppl-seqlen", type=int, default=1024)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--admm-iters", type=int, default=20)
    p.add_argument("--admm-ks", type=int, default=15)
    p.add_argument("--admm-rho", type=float, default=1.0)
    p.add_argument("--admm-damp", type=float, default=0.1)
    p.add_argument("--recon-error", action="store_true",
                   help="also report mean ‖WX−ŴX‖²/‖WX‖² (collects XᵀX for every run: slower Wanda)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=str(OUT / "admm"), help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    unknown = set(args.runs.split(",")) - set(RUNS)
    if unknown:
        p.error(f"unknown runs {sorted(unknown)}; choose from {','.join(RUNS)}")
    return args


def markdown(result: dict) -> str:
    """Rows: methods; columns: settings; cells: PPL (prune seconds[, recon error])."""
    present = {s for by_s in result["results"].values() for s in by_s}
    settings = [s for s in SETTINGS.split(",") if s in present] + sorted(present - set(SETTINGS.split(",")))
    head = "| method | " + " | ".join(settings) + " |"
    lines = [head, "|" + "---|" * (len(settings) + 1)]
    if "dense" in result:
        lines.append("| dense | " + " | ".join(f"{result['dense']['ppl']:.2f}" for _ in settings) + " |")
    for name in (n for n in RUNS if n in result["results"]):
        cells = []
        for s in settings:
            r = result["results"].get(name, {}).get(s)
            if r is None:
                cells.append("-")
                continue
            cell = f"{r['ppl']:.2f} ({r['prune_s']:.0f} s{'*' if 'source' in r else ''}"
            cell += f", err {r['recon_error_mean']:.3f})" if "recon_error_mean" in r else ")"
            cells.append(cell)
        lines.append(f"| {RUNS[name][2]} | " + " | ".join(cells) + " |")
    c = result["config"]
    with_err = any("recon_error_mean" in r for by_s in result["results"].values() for r in by_s.values())
    lines.append("")
    lines.append(f"WikiText-2 test PPL ({c['ppl_seqlen']}-token windows, first {c['max_windows']}), "
                 f"(prune seconds{', err = mean ‖WX−ŴX‖²/‖WX‖² over linears' if with_err else ''}); "
                 f"{c['model']}, calibration {c['nsamples']}×{c['seqlen']} C4 seed {c['seed']}, "
                 f"{result['device']}; ADMM k={c['admm_iters']}, ks={c['admm_ks']}, "
                 f"ρ={c['admm_rho']}, λ={c['admm_damp']}. * adopted from another benchmark "
                 "(same protocol; see each cell's `source` in the JSON).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    t0 = time.perf_counter()
    model, tok = llmprune.load_model(args.model, device=device)
    model.to(device)  # 135M parameters: the whole model fits, so PPL runs there too
    load_s = time.perf_counter() - t0
    dense = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    ids = calibration_ids(tok, args.nsamples, args.seqlen, args.seed)
    test_ids = eval_token_stream(load_corpus("wikitext2", "test"), tok, args.ppl_seqlen)
    runs = args.runs.split(",")
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    admm = ADMMOptions(admm_iters=args.admm_iters, admm_ks=args.admm_ks,
                       admm_rho=args.admm_rho, admm_damp=args.admm_damp)
    options = {ADMMOptions: admm}
    result: dict = {
        "config": {**vars(args), "calib": "c4"}, "device": torch.cuda.get_device_name() if device == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)", "versions": versions(),
        "load_s": load_s, "runs": runs, "settings": settings, "results": {},
    }
    out = Path(args.out)
    resume_results(out, result, PROTOCOL_KEYS)
    adopted = adopted_cells(result["config"])
    for name in ("wanda", "sparsegpt"):
        for s, cell in adopted.get(name, {}).items():
            result["results"].setdefault(name, {}).setdefault(s, cell)
    if "-" in adopted.get("dense", {}):
        result.setdefault("dense", adopted["dense"]["-"])

    def save() -> None:
        save_results(out, result, markdown)

    def ppl() -> float:
        return perplexity(model, test_ids, args.ppl_seqlen, args.max_windows, progress=False)["ppl"]

    if not args.no_dense and "dense" not in result:
        result["dense"] = {"ppl": ppl()}
        print(f"dense: PPL {result['dense']['ppl']:.3f}", flush=True)
    n_layers = len(decoder_layers(model))
    for s in settings:
        target = parse_setting(s)
        for name in runs:
            method, solver, label = RUNS[name]
            if s in result["results"].get(name, {}):
                continue
            model.load_state_dict(dense)
            plan = LayerPlan(method, [target] * n_layers, solver, options=options,
                             recon_error=args.recon_error)
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            layers = run_sequential(model, ids, plan, device, progress=False)
            if device == "cuda":
                torch.cuda.synchronize()
            prune_s = time.perf_counter() - t0
            r = {"ppl": ppl(), "prune_s": prune_s, "sparsity": measure_sparsity(model)["overall"]}
            errs = [e["recon_error"] for L in layers for e in L["linears"].values() if "recon_error" in e]
            if errs:
                r["recon_error_mean"] = sum(errs) / len(errs)
            result["results"].setdefault(name, {})[s] = r
            print(f"{s:>5} {label:<28} PPL {r['ppl']:9.3f}  prune {prune_s:7.1f}s  "
                  f"sparsity {r['sparsity']:.4f}" + (f"  err {r['recon_error_mean']:.4f}" if errs else ""),
                  flush=True)
            save()
    save()
    print()
    print(markdown(result))
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
