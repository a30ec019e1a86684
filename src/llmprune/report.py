"""Human-readable summaries of a pruning run's ``pruning.json``."""

from __future__ import annotations

import io
import json
from pathlib import Path

from llmprune.errors import LLMPruneError
from llmprune.export.save import REPORT_FILE


def load_report(path: str | Path) -> dict:
    p = Path(path)
    f = p / REPORT_FILE if p.is_dir() else p
    if not f.is_file():
        raise LLMPruneError(f"no {REPORT_FILE} in {p}; is it a directory written by 'llmprune prune --out'?")
    return json.loads(f.read_text())


def format_ppl(ppl: dict) -> list[str]:
    lines = []
    before, after = ppl.get("before", {}), ppl.get("after", {})
    for name in after or before:
        b, a = before.get(name, {}), after.get(name, {})
        label = (a or b).get("label", name)
        bs = f"{b['ppl']:.3f}" if b else "-"
        as_ = f"{a['ppl']:.3f}" if a else "-"
        lines.append(f"  PPL {label} (seqlen {(a or b)['seqlen']}): dense {bs} -> pruned {as_}")
    return lines


def format_tasks(tasks: dict) -> list[str]:
    """One line per zero-shot task and metric (stderr aside): dense -> pruned."""
    lines = []
    before, after = tasks.get("before", {}), tasks.get("after", {})
    for name in after or before:
        b, a = before.get(name, {}), after.get(name, {})
        r = a or b
        for metric in r["metrics"]:
            if "_stderr" in metric:
                continue
            shown = [f"{x['metrics'][metric]:.4f}" if x.get("metrics", {}).get(metric) is not None else "-"
                     for x in (b, a)]
            lines.append(f"  {name} {metric} (v{r['version']}, {r['samples']} examples): "
                         f"dense {shown[0]} -> pruned {shown[1]}")
    return lines


def summary(report: dict) -> str:
    """The end-of-run summary: what was done, how sparse, how long, PPL before/after."""
    if report.get("kind") == "masks":  # written by 'llmprune masks apply'
        m = report["masks"]
        return "\n".join([f"model {report['model']['name']} ({report['model']['class']}) with masks from {m['file']}",
                          f"sparsity of decoder linears: {report['sparsity']:.4f}"])
    if report.get("kind") == "maskllm":
        m = report["maskllm"]
        final = m.get("final") or {}
        lines = [f"model {report['model']['name']} ({report['model']['class']})",
                 f"maskllm {report['target']}, prior {m['prior']}, {m['steps']} steps, {m['tokens']} tokens "
                 f"of {m['data']}" + (f", final loss {final['loss']:.4f}" if "loss" in final else ""),
                 f"sparsity of decoder linears: {report['sparsity']:.4f}",
                 "timings: " + ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in report["timings"].items()),
                 f"peak RSS {report['peak_rss_mb']:.0f} MiB on {report['device']}"]
        return "\n".join(lines + format_ppl(report.get("ppl", {})) + format_tasks(report.get("tasks", {})))
    if report.get("kind") == "recover":
        return recover_summary(report)
    if report.get("kind") in ("chain", "eval"):  # 'llmprune run' and its eval stages
        from llmprune.chain.cli import summary as chain_summary

        return chain_summary(report)
    r = report["recipe"]
    t = report["timings"]
    lines = [
        f"model {report['model']['name']} ({report['model']['class']}, {report['model']['layers']} layers)",
        f"method {r['method']}" + (f" + solver {r['solver']}" if r.get("solver") else "")
        + f", target {report['target']}, calib {r['calib']} {r['nsamples']}x{r['seqlen']} seed {r['seed']}"
        + (f", {report['mode']} mode" if report.get("mode") else ""),
        f"sparsity of decoder linears: {report['sparsity']:.4f}",
        "timings: " + ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in t.items()),
        f"peak RSS {report['peak_rss_mb']:.0f} MiB on {report['device']}",
    ]
    alloc = format_allocation(report.get("allocation"))
    if alloc:
        lines.insert(2, alloc)
    lines += format_recon(report.get("layers", []))
    lines += format_ppl(report.get("ppl", {}))
    lines += format_tasks(report.get("tasks", {}))
    return "\n".join(lines)


def recover_summary(report: dict) -> str:
    """Recovery: mode, steps, pattern kept, PPL before / after (and what re-masking cost)."""
    r = report["recover"]
    final = r.get("final") or {}
    mode = r["mode"] + (f" r={r['lora']['rank']}" if "lora" in r else "")
    kept = r.get("pruned_nonzero")
    lines = [f"model {report['model']['name']} ({report['model']['class']})",
             f"recover {mode}, {r['steps']} steps, {r['tokens']} tokens of {r['data']}"
             + (f", final loss {final['ce']:.4f}" if "ce" in final else ""),
             f"sparsity of decoder linears: {report['sparsity']:.4f} (mask {report['target']}"
             + ("" if kept is None else ", kept exactly" if kept == 0 else f", {kept} pruned weights nonzero") + ")"]
    if "distill" in r:
        d = r["distill"]
        lines.append(f"distilled from {d['teacher']}: logit KL at T={d['temperature']:g} "
                     + (f"on its top-{d['topk']} tokens" if d["topk"] else "on the full vocabulary")
                     + (f" + {d['hidden_weight']:g} × hidden-state MSE over {len(d['layer_map'])} layers"
                        if d["hidden_weight"] else "") + (" + cross-entropy" if d["loss"] == "kd+ce" else "")
                     + (f", final KL {final['kd']:.4f}" if "kd" in final else ""))
    if report.get("adapter"):
        lines.append(f"adapter saved in {report['adapter']}/ beside the untouched sparse base")
    if "remask" in r:
        lines.append(f"re-masking dropped {r['remask']['update_outside_mask']:.1%} of the LoRA update (‖ΔW‖²)")
    lines += ["timings: " + ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in report["timings"].items()),
              f"peak RSS {report['peak_rss_mb']:.0f} MiB on {report['device']}"]
    ppl = report.get("ppl", {})
    before, after, merged = ppl.get("before", {}), ppl.get("after", {}), ppl.get("merged", {})
    for name in after or before:
        b, a = before.get(name), after.get(name)
        line = (f"  PPL {(a or b)['label']} (seqlen {(a or b)['seqlen']}): before {b['ppl'] if b else float('nan'):.3f}"
                f" -> recovered {a['ppl'] if a else float('nan'):.3f}")
        if name in merged:
            line += f" (merged, not re-masked: {merged[name]['ppl']:.3f})"
        lines.append(line)
    return "\n".join(lines)


def format_allocation(alloc: dict | None) -> str | None:
    """One line on the layer-wise allocation: its kind, the spread and the weighted mean."""
    if not alloc:
        return None
    kind = alloc["kind"]
    ratios = alloc.get("ratios") or []
    line = f"allocation {kind}"
    if kind == "owl":
        line += f" (M={alloc['owl_m']:g}, lambda={alloc['owl_lambda']:g}, dense statistics)"
    if ratios and kind != "uniform":
        targets = alloc.get("targets") or []
        if targets and ":" in targets[0]:
            ns = sorted(set(targets), key=lambda t: int(t.split(":")[0]))
            line += f": layers {ns[0]}..{ns[-1]}"
        else:
            line += f": layer sparsity {min(ratios):.4f}..{max(ratios):.4f}"
        if alloc.get("weighted_mean") is not None:
            line += f", parameter-weighted mean {alloc['weighted_mean']:.6f}"
    lod = alloc.get("outlier_ratios")
    if lod:
        line += f"; outlier ratio {100 * min(lod):.2f}%..{100 * max(lod):.2f}%"
    return line


def allocation_plot(alloc: dict, title: str = "") -> bytes | None:
    """PNG of the per-layer sparsity (and OWL's outlier ratio) across depth, like the OWL
    paper's figure; None when matplotlib is not installed (it is an optional dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed; safe on servers
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ratios = alloc["ratios"]
    x = list(range(len(ratios)))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(x, ratios, "o-", color="tab:blue", label="layer sparsity")
    if alloc.get("weighted_mean") is not None:
        ax.axhline(alloc["weighted_mean"], color="tab:blue", ls=":", lw=1, label="weighted mean")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("sparsity", color="tab:blue")
    handles, labels = ax.get_legend_handles_labels()
    lod = alloc.get("outlier_ratios")
    if lod:
        ax2 = ax.twinx()
        ax2.plot(x, [100 * v for v in lod], "s--", color="tab:red", ms=4, label="outlier ratio (LOD)")
        ax2.set_ylabel("outlier ratio (%)", color="tab:red")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    head = f"{alloc['kind']} allocation"
    if alloc["kind"] == "owl":
        head += f" (M={alloc['owl_m']:g}, λ={alloc['owl_lambda']:g})"
    ax.set_title(f"{title} {head}".strip(), fontsize=10)
    # below the axes, so it never hides a layer's point
    ax.legend(handles, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3,
              frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def recon_errors(layer: dict) -> dict[str, float]:
    """Per-linear relative reconstruction errors of one layer entry (empty if not measured)."""
    return {n: e["recon_error"] for n, e in layer["linears"].items() if "recon_error" in e}


def format_recon(layers: list[dict]) -> list[str]:
    """One summary line: mean and worst ‖WX − ŴX‖²/‖WX‖² over all measured linears."""
    errs = [(e, f"layer {L['index']} {n}") for L in layers for n, e in recon_errors(L).items()]
    if not errs:
        return []
    worst, where = max(errs)
    mean = sum(e for e, _ in errs) / len(errs)
    return [f"reconstruction error ‖WX-ŴX‖²/‖WX‖²: mean {mean:.4g} over {len(errs)} linears, "
            f"worst {worst:.4g} ({where})"]


def layer_table(report: dict) -> str:
    """Per-layer table: target, OWL outlier ratio if any, achieved sparsity of each linear,
    mean reconstruction error of the layer's linears (when measured), seconds."""
    if not report.get("layers"):
        return "(no per-layer record: the masks were applied, not computed)"
    names = list(report["layers"][0]["linears"])
    lod = bool(report["layers"]) and "outlier_ratio" in report["layers"][0]
    with_recon = any(recon_errors(L) for L in report["layers"])
    head = (f"{'layer':>5} {'target':>7} " + (f"{'outlier%':>8} " if lod else "")
            + " ".join(f"{n.split('.')[-1]:>9}" for n in names))
    head += f" {'recon':>9}" if with_recon else ""
    rows = [head + f" {'sec':>6}"]
    for L in report["layers"]:
        cells = " ".join(f"{L['linears'][n]['sparsity']:>9.4f}" for n in names)
        if with_recon:
            errs = list(recon_errors(L).values())
            cells += f" {sum(errs) / len(errs):>9.4g}" if errs else f" {'-':>9}"
        target = L["target"] if ":" in L["target"] else f"{float(L['target']):.4f}"
        extra = f"{100 * L['outlier_ratio']:>8.3f} " if lod else ""
        rows.append(f"{L['index']:>5} {target:>7} {extra}{cells} {L['seconds']:>6.1f}")
    return "\n".join(rows)
