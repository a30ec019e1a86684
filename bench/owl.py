"""OWL benchmark (issue #4): uniform vs OWL layer-wise sparsity on the bundled SmolLM2-135M.

Protocol: calibration 32 x 1024 C4 tokens, seed 0 (drawn once, shared by every run);
WikiText-2 test perplexity at seqlen 1024 on the first 40 windows. Table at 50/60/70/80%
unstructured and 5:8 (uniform 5:8 vs OWL mixed N:8 with mean N = 5), uniform vs OWL
(the library's defaults, M = 7, λ = 0.12, chosen by the sweep) for wanda, sparsegpt and magnitude, plus the dense model; then a sweep
M ∈ {3, 5, 7} x λ ∈ {0.04, 0.08, 0.12} at 70% for Wanda.

    PYTHONPATH=src python bench/owl.py                      # everything (about an hour on CPU)
    PYTHONPATH=src python bench/owl.py --methods wanda --sparsities 0.7 --no-sweep

Every finished run is merged into ``bench/out/owl.json`` at once (keyed by its settings), so
an interrupted or partial invocation keeps what it did and a later one only runs what is
missing (``--fresh`` starts over). OWL's dense pass (outlier ratios for every M) runs once and
is cached in ``bench/out/owl_outlier_ratios.json``; the
Markdown tables (``bench/out/owl.md``, also printed) are built from everything in the JSON
that matches the current protocol (model, nsamples, seqlen, windows, seed, dtype).
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
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from llmprune import PruneConfig, load_model, prune  # noqa: E402
from llmprune.config import resolve_device  # noqa: E402
from llmprune.data.calibration import calibration_windows  # noqa: E402
from llmprune.data.sources import load_corpus  # noqa: E402
from llmprune.data.tokens import eval_token_stream  # noqa: E402
from llmprune.engine.sequential import layer_params, measure_layers  # noqa: E402
from llmprune.eval.perplexity import perplexity  # noqa: E402
from llmprune.models.layers import decoder_layers  # noqa: E402
from llmprune.sparsity.allocation import OWLAllocator, layer_outlier_ratio  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import oneshot  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
METHODS = ("wanda", "sparsegpt", "magnitude")
SPARSITIES = ("0.5", "0.6", "0.7", "0.8", "5:8")
SWEEP_M = (3.0, 5.0, 7.0)
SWEEP_LAMBDA = (0.04, 0.08, 0.12)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--sparsities", default=",".join(SPARSITIES),
                   help="comma-separated unstructured ratios and/or N:M patterns (default %(default)s)")
    p.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the M x λ sweep (wanda, --sweep-sparsity)")
    p.add_argument("--sweep-sparsity", type=float, default=0.7)
    p.add_argument("--owl-m", type=float, default=PruneConfig.model_fields["owl_m"].default,
                   help="OWL M for the main table (default: the library's, %(default)s)")
    p.add_argument("--owl-lambda", type=float, default=PruneConfig.model_fields["owl_lambda"].default,
                   help="OWL λ for the main table, N:M too (default: the library's, %(default)s)")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=1024, help="calibration and evaluation window")
    p.add_argument("--max-windows", type=int, default=40, help="first K WikiText-2 test windows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto = bf16 on CUDA, fp32 on CPU")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--fresh", action="store_true", help="ignore earlier results in the JSON")
    p.add_argument("--oneshot-results", type=Path, default=oneshot.OUT,
                   help="adopt dense / uniform rows bench/oneshot.py measured with the same protocol")
    return p.parse_args(argv)


class ManyM:
    """An allocator for the dense pass only: the outlier ratio of each layer for several M at once.

    The dense pass depends on neither M, λ, the method nor the target, so one pass serves every
    OWL run of the benchmark; ``allocate`` is never called.
    """

    needs = OWLAllocator.needs
    measure_name = OWLAllocator.measure_name

    def __init__(self, ms: list[float]):
        self.ms = ms
        self.lods: dict[float, list[float]] = {m: [] for m in ms}

    def measure(self, weights, stats) -> float:
        for m in self.ms:
            self.lods[m].append(layer_outlier_ratio(weights, stats, m))
        return 0.0


def run_key(method: str, target: str, allocation: str, m: float | None, lam: float | None) -> str:
    return f"{method}|{target}|{allocation}" + (f"|M={m:g}|lambda={lam:g}" if allocation == "owl" else "")


class Bench:
    """The dense model and its weights, the shared calibration ids and evaluation stream."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = resolve_device(args.device)
        t0 = time.perf_counter()
        self.model, self.tok = load_model(args.model, device=self.device, dtype=args.dtype)
        # The whole 135M model fits on any device: keep it there, the engine then moves nothing.
        self.model.to(self.device)
        self.dtype = str(next(self.model.parameters()).dtype).replace("torch.", "")
        # A CPU copy of the dense weights: load_state_dict per run is much faster than reloading.
        self.dense = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        print(f"loaded {args.model} ({self.dtype}) on {self.device} in {time.perf_counter() - t0:.1f}s",
              flush=True)
        t0 = time.perf_counter()
        self.calib = calibration_windows(load_corpus("c4", "train"), self.tok, args.nsamples, args.seqlen, args.seed)
        self.eval_ids = eval_token_stream(load_corpus("wikitext2", "test"), self.tok, args.seqlen)
        print(f"calibration {tuple(self.calib.shape)} and evaluation stream {self.eval_ids.shape[1]} tokens "
              f"in {time.perf_counter() - t0:.1f}s", flush=True)
        self.protocol = {"model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen,
                         "max_windows": args.max_windows, "seed": args.seed, "dtype": self.dtype,
                         "calib": "c4", "eval": "wikitext2 test"}

        self.lods: dict[float, list[float]] = {}
        self.dense_pass_s = 0.0

    def outlier_ratios(self, m: float) -> list[float]:
        """Per-layer LODs of the dense model for threshold ``m`` (one dense pass, cached)."""
        cache = self.args.out / "owl_outlier_ratios.json"
        if not self.lods and cache.is_file():
            saved = json.loads(cache.read_text())
            if saved["protocol"] == self.protocol:
                self.lods = {float(k): v for k, v in saved["lods"].items()}
                self.dense_pass_s = saved["dense_pass_s"]
        if m not in self.lods:
            ms = sorted(set(SWEEP_M) | {m, self.args.owl_m})
            self.reset()
            many = ManyM(ms)
            t0 = time.perf_counter()
            measure_layers(self.model, self.calib, many, self.device, progress=False)
            self.dense_pass_s = time.perf_counter() - t0
            self.lods = many.lods
            self.args.out.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({"protocol": self.protocol, "dense_pass_s": self.dense_pass_s,
                                         "lods": {str(k): v for k, v in self.lods.items()}}))
            print(f"dense pass (outlier ratios for M in {ms}) in {self.dense_pass_s:.1f}s", flush=True)
        return self.lods[m]

    def reset(self) -> None:
        self.model.load_state_dict(self.dense)

    def ppl(self) -> float:
        return perplexity(self.model, self.eval_ids, self.args.seqlen, self.args.max_windows, progress=False)["ppl"]

    def run(self, method: str, target: str, allocation: str, m: float | None = None,
            lam: float | None = None) -> dict:
        cfg = PruneConfig(model=self.args.model, method=method, allocation=allocation,
                          nsamples=self.args.nsamples, seqlen=self.args.seqlen, seed=self.args.seed,
                          device=self.device, calib="c4", true_sequential=False)  # as the OWL code
        if ":" in target:
            cfg.pattern = target
        else:
            cfg.sparsity = float(target)
        lods = None
        if allocation == "owl":
            # Exactly what `--allocation owl` does (dense pass → OWLAllocator.allocate → prune
            # with those targets), with the dense pass shared by all runs instead of repeated.
            lods = self.outlier_ratios(m)
            targets = OWLAllocator(cfg.target, m, lam).allocate(lods, [layer_params(layer) for layer in decoder_layers(self.model)])
            cfg.allocation, cfg.layer_ratios = "explicit", [t.sparsity for t in targets]
        self.reset()
        t0 = time.perf_counter()
        rep = prune(self.model, cfg, tokenizer=self.tok, calib_ids=self.calib, progress=False).report
        prune_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ppl = self.ppl()
        alloc = rep["allocation"]
        return {"method": method, "target": target, "allocation": allocation, "owl_m": m, "owl_lambda": lam,
                "ppl": ppl, "sparsity": rep["sparsity"], "prune_s": prune_s,
                "dense_pass_s": self.dense_pass_s if lods else None,
                "ppl_s": time.perf_counter() - t0, "layer_targets": alloc["targets"],
                "layer_ratios": alloc["ratios"], "outlier_ratios": lods,
                "weighted_mean": alloc["weighted_mean"], "protocol": self.protocol}


def import_oneshot(runs: dict, protocol: dict, folder: Path) -> None:
    """Adopt the dense and uniform unstructured rows ``bench/oneshot.py`` already measured.

    Where its protocol is this one the computation is the same, so re-running those rows would
    only repeat them; each adopted row says where it came from.
    """
    if protocol["dtype"] != "float32" or any(protocol[k] != oneshot.PROTOCOL[k]
                                             for k in ("model", "nsamples", "seqlen", "max_windows", "seed")):
        return
    for r in oneshot.finished_rows(folder):
        common = {"ppl": r["ppl"], "sparsity": r["sparsity"], "protocol": protocol, "source": r["source"]}
        if r["method"] == "dense":
            runs.setdefault("dense", {"method": "dense", "target": "dense", "allocation": "-", **common})
        elif ":" not in r["setting"]:
            runs.setdefault(run_key(r["method"], r["setting"], "uniform", None, None), {
                "method": r["method"], "target": r["setting"], "allocation": "uniform", "owl_m": None,
                "owl_lambda": None, "prune_s": r["prune_s"], **common})


def load_results(path: Path, fresh: bool) -> dict:
    if fresh or not path.is_file():
        return {}
    return json.loads(path.read_text()).get("runs", {})


def save_results(path: Path, runs: dict, protocol: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"protocol": protocol, "runs": runs}, indent=1) + "\n")
    os.replace(tmp, path)  # never leave a half-written JSON behind


def fmt(r: dict | None) -> str:
    return "-" if r is None else f"{r['ppl']:.2f}"


def tables(runs: dict, protocol: dict, args: argparse.Namespace) -> str:
    """The main table (methods x targets, uniform vs OWL) and the M x λ sweep, as Markdown."""
    same = {k: r for k, r in runs.items() if r.get("protocol") == protocol}
    targets = [t for t in SPARSITIES if any(r["target"] == t for r in same.values())]
    targets += sorted({r["target"] for r in same.values() if r["target"] not in SPARSITIES and r["target"] != "dense"})
    m, lam = args.owl_m, args.owl_lambda
    lines = [f"WikiText-2 test PPL ({protocol['model']}, {protocol['dtype']}, seqlen {protocol['seqlen']}, "
             f"first {protocol['max_windows']} windows; calibration {protocol['nsamples']} x "
             f"{protocol['seqlen']} C4 tokens, seed {protocol['seed']}; OWL M={m:g}, λ={lam:g}; "
             "N:M = mixed N:M with the same mean N under OWL)", ""]
    head = "| method | allocation | " + " | ".join(f"{float(t):.0%}" if ":" not in t else t for t in targets) + " |"
    lines += [head, "|---|---|" + "---:|" * len(targets)]
    dense = same.get("dense")
    if dense:
        lines.append("| dense | - | " + " | ".join(fmt(dense) for _ in targets) + " |")
    for method in METHODS:
        for alloc in ("uniform", "owl"):
            cells = [fmt(same.get(run_key(method, t, alloc, m, lam))) for t in targets]
            if any(c != "-" for c in cells):
                lines.append(f"| {method} | {'OWL' if alloc == 'owl' else 'uniform'} | " + " | ".join(cells) + " |")
    t = f"{args.sweep_sparsity:g}"
    sweep = [run_key("wanda", t, "owl", sm, sl) for sm in SWEEP_M for sl in SWEEP_LAMBDA]
    if sum(k in same for k in sweep) > 1:  # more than the main table's own cell
        base = same.get(run_key("wanda", t, "uniform", None, None))
        lines += ["", f"Wanda at {float(t):.0%}: OWL sweep (uniform: {fmt(base)})", "",
                  "| M \\ λ | " + " | ".join(f"{sl:g}" for sl in SWEEP_LAMBDA) + " |",
                  "|---|" + "---:|" * len(SWEEP_LAMBDA)]
        for sm in SWEEP_M:
            lines.append(f"| {sm:g} | " + " | ".join(fmt(same.get(run_key("wanda", t, "owl", sm, sl)))
                                                      for sl in SWEEP_LAMBDA) + " |")
    nm = [r for r in same.values() if r["allocation"] == "owl" and ":" in r["target"]]
    if nm:
        lines += ["", "OWL mixed N:M, layers per N:"]
        for r in nm:
            counts: dict[str, int] = {}
            for x in r["layer_targets"]:
                counts[x] = counts.get(x, 0) + 1
            lines.append(f"- {r['method']} {r['target']}: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    methods = [x for x in args.methods.split(",") if x]
    bad = sorted(set(methods) - set(METHODS))
    if bad:
        sys.exit(f"unknown methods {bad}; choose from {', '.join(METHODS)}")
    targets = [x.strip() for x in args.sparsities.split(",") if x.strip()]
    bench = Bench(args)
    path = args.out / "owl.json"
    runs = load_results(path, args.fresh)
    import_oneshot(runs, bench.protocol, args.oneshot_results)

    plan: list[tuple[str, str, str, float | None, float | None]] = []
    for t in targets:  # target-major: a partial run still fills whole columns of the table
        for method in methods:
            plan.append((method, t, "uniform", None, None))
            plan.append((method, t, "owl", args.owl_m, args.owl_lambda))
    if args.sweep:
        t = f"{args.sweep_sparsity:g}"
        plan.append(("wanda", t, "uniform", None, None))
        plan += [("wanda", t, "owl", sm, sl) for sm in SWEEP_M for sl in SWEEP_LAMBDA]

    if runs.get("dense", {}).get("protocol") != bench.protocol:
        t0 = time.perf_counter()
        bench.reset()
        runs["dense"] = {"method": "dense", "target": "dense", "allocation": "-", "ppl": bench.ppl(),
                         "sparsity": 0.0, "ppl_s": time.perf_counter() - t0, "protocol": bench.protocol}
        save_results(path, runs, bench.protocol)
    print(f"dense: PPL {runs['dense']['ppl']:.3f}", flush=True)
    done = set()
    for method, t, alloc, m, lam in plan:
        key = run_key(method, t, alloc, m, lam)
        if not args.fresh:  # another invocation may be filling the same JSON
            runs = {**runs, **load_results(path, False)}
        if key in done or runs.get(key, {}).get("protocol") == bench.protocol:
            continue  # finished earlier (this invocation or a previous one)
        done.add(key)
        r = bench.run(method, t, alloc, m, lam)
        runs = {**runs, **load_results(path, False), key: r}
        save_results(path, runs, bench.protocol)
        if ":" in t:
            ns = sorted(r["layer_targets"], key=lambda x: int(x.split(":")[0]))
            spread = f" layers {ns[0]}..{ns[-1]}"
        else:
            spread = f" layers {min(r['layer_ratios']):.4f}..{max(r['layer_ratios']):.4f}"
        print(f"{key}: PPL {r['ppl']:.3f} sparsity {r['sparsity']:.4f}{spread} "
              f"(prune {r['prune_s']:.1f}s, ppl {r['ppl_s']:.1f}s)", flush=True)

    md = tables(runs, bench.protocol, args)
    (args.out / "owl.md").write_text(md + "\n")
    print()
    print(md)
    print(f"\nwrote {path} and {args.out / 'owl.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
