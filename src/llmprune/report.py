"""Human-readable summaries of a pruning run's ``pruning.json``."""

from __future__ import annotations

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


def summary(report: dict) -> str:
    """The end-of-run summary: what was done, how sparse, how long, PPL before/after."""
    r = report["recipe"]
    t = report["timings"]
    lines = [
        f"model {report['model']['name']} ({report['model']['class']}, {report['model']['layers']} layers)",
        f"method {r['method']}" + (f" + solver {r['solver']}" if r.get("solver") else "")
        + f", target {report['target']}, calib {r['calib']} {r['nsamples']}x{r['seqlen']} seed {r['seed']}",
        f"sparsity of decoder linears: {report['sparsity']:.4f}",
        "timings: " + ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in t.items()),
        f"peak RSS {report['peak_rss_mb']:.0f} MiB on {report['device']}",
    ]
    lines += format_recon(report.get("layers", []))
    lines += format_ppl(report.get("ppl", {}))
    return "\n".join(lines)


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
    """Per-layer table: target, achieved sparsity of each linear, mean reconstruction error of
    the layer's linears (when measured), seconds."""
    names = list(report["layers"][0]["linears"]) if report["layers"] else []
    with_recon = any(recon_errors(L) for L in report["layers"])
    head = f"{'layer':>5} {'target':>7} " + " ".join(f"{n.split('.')[-1]:>9}" for n in names)
    head += f" {'recon':>9}" if with_recon else ""
    rows = [head + f" {'sec':>6}"]
    for L in report["layers"]:
        cells = " ".join(f"{L['linears'][n]['sparsity']:>9.4f}" for n in names)
        if with_recon:
            errs = list(recon_errors(L).values())
            cells += f" {sum(errs) / len(errs):>9.4g}" if errs else f" {'-':>9}"
        rows.append(f"{L['index']:>5} {L['target']:>7} {cells} {L['seconds']:>6.1f}")
    return "\n".join(rows)
