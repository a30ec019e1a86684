"""Pruning speed against its floor, peak RSS, and where one layer's time goes (issue #12).

For each method (magnitude, Wanda, SparseGPT, ADMM-Grad) × setting (50 %, 2:4), in one process
on the bundled SmolLM2-135M:

- **floor**, measured here in the same run: one forward of the calibration tokens through all
  decoder layers, plus the statistics the method needs (XᵀX, or Σx² per column for Wanda;
  none for magnitude, which reads no data: its ratio can be below 1). One timed pass per
  kind of statistics, with the engine's own hooks and batch size; the hooks' time is the
  statistics part, the rest the forward.
- **ours**: ``run_sequential`` on the dense weights (restored before every run), its ratio to
  the floor, and the peak RSS during it (VmHWM, reset before each run) with its rise over the
  RSS at the run's start. The process also holds a dense copy of the weights (to restore
  them) and whatever the allocator kept from earlier runs: for the RSS of one run alone, as
  a user sees it, run one method and setting per process (``--methods``, ``--settings``).
- **profile**: torch.profiler over one decoder layer's pruning as the engine does it
  (statistics forward, prune, propagation), op self-time grouped into forward matmuls,
  attention, elementwise, XᵀX/Σx² (the statistics hooks), solve (Cholesky / inverse /
  triangular), the method's other work (mask selection, weight updates) and copies.
- **modes** (``--modes exact,true-sequential``): the exact two-pass engine (default) and the
  one-forward true-sequential one (``--true-sequential``), whose masks differ: ``--ppl`` adds
  each run's WikiText-2 PPL so the table shows what the speed costs (or gains).
- **llm-compressor**'s time and peak RSS where it has the method, when its venv
  ``.venv-bench`` exists (as ``bench/oneshot.py`` sets it up); skipped otherwise, and with
  ``--layers`` (it would prune the whole model).

Writes ``OUT.json`` and ``OUT.md`` (default ``bench/out/speed``) and prints the table. Full run
(nothing else on the CPU)::

    LLMPRUNE_DATA_DIR=/work/shared/data PYTHONPATH=src python bench/speed.py

Smoke test::

    ... python bench/speed.py --nsamples 2 --seqlen 128 --layers 2 --out /tmp/speed
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import llmprune  # noqa: E402
import llmprune.engine.sequential as seq  # noqa: E402
from llmprune.data.sources import load_corpus  # noqa: E402
from llmprune.data.tokens import eval_token_stream  # noqa: E402
from llmprune.engine.capture import capture_inputs  # noqa: E402
from llmprune.engine.memory import return_big_frees_to_os  # noqa: E402
from llmprune.engine.stats import LayerStats  # noqa: E402
from llmprune.eval.perplexity import perplexity  # noqa: E402
from llmprune.eval.sparsity import measure_sparsity  # noqa: E402
from llmprune.jobs.header import versions  # noqa: E402
from llmprune.models.adapter import per_expert_linears  # noqa: E402
from llmprune.models.layers import decoder_layers, linear_layers  # noqa: E402
from llmprune.sparsity.methods import required_stats  # noqa: E402
from llmprune.sparsity.patterns import Target  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"
BENCH_PY = REPO / ".venv-bench" / "bin" / "python"
sys.path.insert(0, str(HERE))
from common import calibration_ids  # noqa: E402

METHODS = "magnitude,wanda,sparsegpt,admm-grad"
MODES = ("exact", "true-sequential")
SETTINGS = "0.5,2:4"
LLMC_METHODS = {"magnitude", "wanda", "sparsegpt"}
CATEGORIES = ("forward matmuls", "attention", "elementwise", "statistics (XᵀX / Σx²)",
              "solve (cholesky/inverse/triangular)", "method other (masks, updates)", "copies")
SOLVE_OPS = ("cholesky", "inverse", "triangular", "aten::linalg_")  # substrings of op names
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::matmul", "aten::linear", "aten::bmm", "aten::baddbmm"}
COPY_OPS = {"aten::copy_", "aten::clone", "aten::to", "aten::_to_copy", "aten::contiguous",
            "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::zeros", "aten::zero_",
            "aten::fill_", "aten::cat", "aten::index", "aten::index_put_", "aten::slice_scatter"}
ATTENTION_OPS = ("scaled_dot_product", "softmax", "flash_attention", "aten::bmm", "aten::baddbmm")


# ---- memory -------------------------------------------------------------------------------

def _status(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window (Linux: VmHWM := VmRSS); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak RSS since the last :func:`reset_peak_rss` (or of the process), in MiB."""
    hwm = _status("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---- model --------------------------------------------------------------------------------

def keep_layers(model: nn.Module, n: int) -> None:
    """Keep the first ``n`` decoder layers (smoke runs); the model stays runnable."""
    layers = decoder_layers(model)
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is layers:
                setattr(parent, name, nn.ModuleList(list(layers)[:n]))
                model.config.num_hidden_layers = n
                if getattr(model.config, "layer_types", None):
                    model.config.layer_types = model.config.layer_types[:n]
                return
    raise SystemExit(f"--layers: cannot find the decoder ModuleList of {type(model).__name__}")


def parse_setting(s: str) -> Target:
    return Target.parse(s, None) if ":" in s else Target.unstructured(float(s))


# ---- floor --------------------------------------------------------------------------------

@contextmanager
def timed_hooks(acc: list[float], device: str):
    """Time every ``LayerStats._accumulate`` call (the statistics part of a forward)."""
    real = LayerStats._accumulate

    def timed(self, name, x):
        sync(device)
        t0 = time.perf_counter()
        real(self, name, x)
        sync(device)
        acc[0] += time.perf_counter() - t0

    LayerStats._accumulate = timed
    try:
        yield
    finally:
        LayerStats._accumulate = real


@torch.no_grad()
def measure_floor(model: nn.Module, ids: torch.Tensor, needs: frozenset[str], device: str) -> dict:
    """One forward of ``ids`` through every decoder layer (dense outputs propagated in place)
    with the engine's hooks gathering ``needs``: seconds of forward and of statistics."""
    layers = decoder_layers(model)
    t0 = time.perf_counter()
    inps, kwargs = capture_inputs(model, layers, ids, device)
    capture_s = time.perf_counter() - t0
    stats_s, total = [0.0], 0.0
    with timed_hooks(stats_s, device):
        for i, layer in enumerate(layers):
            home = next(layer.parameters()).device
            layer.to(device)
            with per_expert_linears(layer):
                stats = LayerStats(linear_layers(layer), needs) if needs else None
                sync(device)
                t0 = time.perf_counter()
                seq.run_layer(layer, inps, kwargs[i], inps, stats)
                sync(device)
                total += time.perf_counter() - t0
                if stats is not None:
                    stats.remove()
                del stats
            layer.to(home)
    del inps
    return {"forward_s": total - stats_s[0], "stats_s": stats_s[0], "capture_s": capture_s}


# ---- profile ------------------------------------------------------------------------------

def _attention_modules(layer: nn.Module) -> list[nn.Module]:
    return [m for n, m in layer.named_modules() if n and "attention" in type(m).__name__.lower()
            and not any(c for c in m.children() if "attention" in type(c).__name__.lower())]


@contextmanager
def scoped(modules: list[nn.Module], label: str):
    """A profiler scope ``label`` around every forward of ``modules``."""
    handles, open_ = [], []
    for m in modules:
        def pre(*_):
            rf = torch.profiler.record_function(label)
            rf.__enter__()
            open_.append(rf)

        def post(*_):
            open_.pop().__exit__(None, None, None)
        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _scope_of(event) -> set[str]:
    names, e = set(), event.cpu_parent
    while e is not None:
        names.add(e.name)
        e = e.cpu_parent
    return names


def categorize(name: str, scopes: set[str]) -> str:
    if any(s in name for s in SOLVE_OPS):
        return CATEGORIES[4]
    if "bench:stats" in scopes:
        return CATEGORIES[3]
    if name in COPY_OPS:
        return CATEGORIES[6]
    if "bench:prune" in scopes:
        return CATEGORIES[5]
    if "bench:attention" in scopes and (any(s in name for s in ATTENTION_OPS)):
        return CATEGORIES[1]
    if name in MATMUL_OPS:
        return CATEGORIES[0]
    return CATEGORIES[2]


@torch.no_grad()
def profile_layer(model: nn.Module, ids: torch.Tensor, plan: seq.LayerPlan, index: int, device: str) -> dict:
    """Op self-time by category over layer ``index``'s pruning as the engine runs it: the
    statistics forward, prune_layer, the pruned forward that feeds the next layer. The layer's
    weights are restored afterwards."""
    layers = decoder_layers(model)
    inps, kwargs = capture_inputs(model, layers, ids, device)
    home = next(model.parameters()).device
    for i in range(index):  # the dense inputs of layer ``index``
        layers[i].to(device)
        seq.run_layer(layers[i], inps, kwargs[i], inps)
        layers[i].to(home)
    layer = layers[index]
    saved = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.to(device)
    needs = required_stats(plan.method, plan.solver, plan.recon_error)
    real_acc, real_prune = LayerStats._accumulate, seq.prune_weight

    def acc(self, name, x):
        with torch.profiler.record_function("bench:stats"):
            real_acc(self, name, x)

    def prune(*a, **k):
        with torch.profiler.record_function("bench:prune"):
            return real_prune(*a, **k)

    LayerStats._accumulate, seq.prune_weight = acc, prune
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    try:
        with per_expert_linears(layer), scoped(_attention_modules(layer), "bench:attention"):
            with torch.profiler.profile(activities=activities) as prof:
                t0 = time.perf_counter()
                stats = LayerStats(linear_layers(layer), needs) if needs else None
                if stats is not None:
                    seq.run_layer(layer, inps, kwargs[index], None, stats)
                    stats.remove()
                seq.prune_layer(layer, plan, plan.targets[index], stats)
                del stats
                seq.run_layer(layer, inps, kwargs[index], inps)
                sync(device)
                wall = time.perf_counter() - t0
    finally:
        LayerStats._accumulate, seq.prune_weight = real_acc, real_prune
        layer.to(home)
        layer.load_state_dict(saved)
    by_cat: dict[str, float] = defaultdict(float)
    by_op: dict[tuple[str, str], float] = defaultdict(float)
    cuda = device.startswith("cuda")
    for e in prof.events():
        if e.name.startswith("bench:"):
            continue
        t = (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e6
        if t <= 0:
            continue
        cat = categorize(e.name, _scope_of(e))
        by_cat[cat] += t
        by_op[(cat, e.name)] += t
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:12]
    return {"layer": index, "wall_s": wall, "clock": "device" if cuda else "cpu self time",
            "by_category_s": {c: round(by_cat.get(c, 0.0), 4) for c in CATEGORIES},
            "top_ops": [{"category": c, "op": n, "s": round(t, 4)} for (c, n), t in top]}


# ---- llm-compressor -----------------------------------------------------------------------

def llmcompressor(method: str, setting: str, ids: torch.Tensor, work: Path) -> dict:
    """llm-compressor's prune time and peak RSS on the same model and calibration windows."""
    import numpy as np

    from llmprune.models.loading import model_source

    calib = work / f"calib-{ids.shape[0]}x{ids.shape[1]}.npy"
    if not calib.exists():
        np.save(calib, ids.numpy().astype("int64"))
    tag = f"{method}-{setting.replace(':', 'of')}"
    res, out = work / f"llmc-{tag}.json", work / f"llmc-{tag}"
    flag = ["--pattern", setting] if ":" in setting else ["--sparsity", setting]
    cmd = [str(BENCH_PY), str(HERE / "llmcompressor_run.py"), "--model-dir", str(model_source("smollm2-135m")),
           "--calib-ids", str(calib), "--method", method, *flag, "--out", str(out), "--json", str(res),
           "--threads", str(torch.get_num_threads())]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    r = json.loads(res.read_text())
    return {k: r[k] for k in ("prune_seconds", "peak_rss_mb", "error") if k in r}


# ---- report -------------------------------------------------------------------------------

def markdown(result: dict) -> str:
    c = result["config"]
    lines = [
        f"{c['model']}{' (first ' + str(c['layers']) + ' layers)' if c['layers'] else ''}, calibration "
        f"{c['nsamples']}×{c['seqlen']} C4 seed {c['seed']}, {result['device']}. Floor = one forward of "
        "the calibration tokens through the decoder layers + the statistics the method needs."
        + (f" Dense WikiText-2 PPL {result['dense_ppl']:.2f}." if "dense_ppl" in result else ""),
        "",
        "| method | target | mode | floor s (fwd + stats) | ours s | ours / floor | peak RSS MiB (+ over start) | "
        "WikiText-2 PPL | llm-compressor s | its peak RSS MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        f = result["floor"][r["needs"]]
        lc = r.get("llmcompressor") or {}
        lc_cells = ([f"n/a ({lc['error'][:30]})", ""] if "error" in lc else
                    [f"{lc['prune_seconds']:.1f}", f"{lc['peak_rss_mb']:.0f}"] if lc else
                    [r.get("llmcompressor_skipped", ""), ""])
        ppl = f"{r['ppl']:.2f}" if "ppl" in r else ""
        lines.append(f"| {r['method']} | {r['setting']} | {r.get('mode', 'exact')} | {f['total_s']:.1f} "
                     f"({f['forward_s']:.1f} + {f['stats_s']:.1f}) | {r['prune_s']:.1f} | {r['ratio']:.2f} | "
                     f"{r['peak_rss_mb']:.0f} (+{r['peak_rss_mb'] - r['rss_before_mb']:.0f}) | {ppl} | "
                     + " | ".join(lc_cells) + " |")
    lines += ["", f"Profile of layer {c['profile_layer']} (seconds of op self time by category):", "",
              "| method | target | wall s | " + " | ".join(CATEGORIES) + " |",
              "|---|---|---:|" + "---:|" * len(CATEGORIES)]
    for r in result["runs"]:
        p = r.get("profile")
        if p:
            lines.append(f"| {r['method']} | {r['setting']} | {p['wall_s']:.2f} | "
                         + " | ".join(f"{p['by_category_s'][k]:.3f}" for k in CATEGORIES) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default=METHODS)
    p.add_argument("--settings", default=SETTINGS)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers (smoke)")
    p.add_argument("--profile-layer", type=int, default=0, help="decoder layer to profile")
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--no-llmcompressor", dest="llmc", action="store_false")
    p.add_argument("--modes", default="exact", help="exact (dense statistics, two forwards a layer) and/or "
                   "true-sequential (one forward; later linears see the pruned earlier ones)")
    p.add_argument("--ppl", action="store_true", help="WikiText-2 test PPL of every run (1024, first 40 windows)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=str(OUT / "speed"), help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    unknown = set(args.methods.split(",")) - set(METHODS.split(","))
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    if set(args.modes.split(",")) - set(MODES):
        p.error(f"--modes: choose from {', '.join(MODES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    return_big_frees_to_os()  # as run_sequential does: the floor passes run under the same allocator
    model, tok = llmprune.load_model(args.model)
    if args.layers:
        keep_layers(model, args.layers)
    n_layers = len(decoder_layers(model))
    if not 0 <= args.profile_layer < n_layers:
        raise SystemExit(f"--profile-layer must be in [0, {n_layers})")
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ids = calibration_ids(tok, args.nsamples, args.seqlen, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "config": {**vars(args), "calib": "c4"},
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)",
        "versions": versions(),
        "floor": {}, "runs": [],
    }
    llmc_skip = ("--layers set" if args.layers else "disabled" if not args.llmc
                 else f"no {BENCH_PY.relative_to(REPO)}" if not BENCH_PY.exists() else None)
    if llmc_skip:
        print(f"llm-compressor: skipped ({llmc_skip})", flush=True)

    plans = [(m, s, mode) for m in args.methods.split(",") for s in args.settings.split(",") if s.strip()
             for mode in args.modes.split(",") if mode != "true-sequential" or required_stats(m, None)]
    test_ids = eval_token_stream(load_corpus("wikitext2", "test"), tok, 1024) if args.ppl else None
    if args.ppl:
        result["dense_ppl"] = perplexity(model, test_ids, 1024, 40, progress=False)["ppl"]
    for method, _, _ in plans:  # one floor pass per kind of statistics
        needs = required_stats(method, None)
        key = ",".join(sorted(needs)) or "none"
        if key not in result["floor"]:
            f = measure_floor(model, ids, needs, device)
            f["total_s"] = f["forward_s"] + f["stats_s"]
            result["floor"][key] = f
            print(f"floor [{key}]: forward {f['forward_s']:.1f}s + statistics {f['stats_s']:.1f}s", flush=True)

    for method, setting, mode in plans:
        target = parse_setting(setting)
        plan = seq.LayerPlan(method, [target] * n_layers, true_sequential=mode == "true-sequential")
        needs = ",".join(sorted(required_stats(method, None))) or "none"
        model.load_state_dict(dense)
        start_rss = _status("VmRSS") or 0.0
        reset_peak_rss()
        sync(device)
        t0 = time.perf_counter()
        seq.run_sequential(model, ids, plan, device, progress=False)
        sync(device)
        prune_s = time.perf_counter() - t0
        run = {"method": method, "setting": setting, "mode": mode, "needs": needs, "prune_s": prune_s,
               "ratio": prune_s / result["floor"][needs]["total_s"], "peak_rss_mb": peak_rss_mb(),
               "rss_before_mb": start_rss, "sparsity": measure_sparsity(model)["overall"]}
        if args.ppl:
            run["ppl"] = perplexity(model, test_ids, 1024, 40, progress=False)["ppl"]
        model.load_state_dict(dense)
        if args.profile and mode == "exact":  # the profile cuts the exact mode's passes apart
            run["profile"] = profile_layer(model, ids, plan, args.profile_layer, device)
        if llmc_skip:
            run["llmcompressor_skipped"] = llmc_skip
        elif method in LLMC_METHODS and mode == "exact":
            run["llmcompressor"] = llmcompressor(method, setting, ids, out.parent)
        result["runs"].append(run)
        print(f"{method:>10} {setting:>4} {mode:>15}: {prune_s:7.1f}s  ({run['ratio']:.2f}× floor)  "
              f"peak RSS {run['peak_rss_mb']:.0f} MiB" + (f"  PPL {run['ppl']:.2f}" if args.ppl else ""), flush=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    out.with_suffix(".md").write_text(table)
    print(json.dumps([{k: r.get(k) for k in ("method", "setting", "mode", "prune_s", "ratio", "peak_rss_mb", "ppl")}
                      | {"profile": r.get("profile", {}).get("by_category_s")} for r in result["runs"]], indent=2))
    print()
    print(table)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
