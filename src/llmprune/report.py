"""Human-readable summaries of a pruning run's ``pruning.json``."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from llmprune import jsonfile
from llmprune.errors import LLMPruneError
from llmprune.export.save import REPORT_FILE


def load_report(path: str | Path) -> dict:
    """The ``pruning.json`` of an output directory (or that file), or one line saying why not."""
    p = Path(path).expanduser()
    f = p / REPORT_FILE if p.is_dir() else p
    if not f.is_file():
        raise LLMPruneError(f"no {REPORT_FILE} in {p}; is it a directory written by 'llmprune prune --out'?")
    try:
        report = jsonfile.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise LLMPruneError(f"{f} is not valid JSON ({str(e).splitlines()[0]}); it was damaged or edited: "
                            "re-run the job that wrote it") from None
    if not isinstance(report, dict):
        raise LLMPruneError(f"{f} holds a JSON {type(report).__name__}, not a llmprune report (an object)")
    try:
        ReportHeader.model_validate(report)
    except ValidationError as e:
        err = e.errors()[0]
        raise LLMPruneError(f"{f}: field {'.'.join(map(str, err['loc']))!r} {err['msg'].lower()}; the report was "
                            "edited or written by another version: re-run the job that wrote it") from None
    return report


class ReportHeader(BaseModel):
    """The fields every kind's ``pruning.json`` shares, as readers rely on them (each optional:
    older reports lack some). Checked whenever a report is read back."""

    model_config = ConfigDict(extra="allow", strict=True)
    kind: str | None = None
    versions: dict[str, str] | None = None
    recipe: dict[str, Any] | None = None
    model: dict[str, Any] | None = None
    device: str | None = None
    target: str | None = None
    sparsity: float | int | None = None
    timings: dict[str, float | int] | None = None
    ppl: dict[str, dict[str, Any]] | None = None
    peak_rss_mb: float | int | None = None
    layers: list[dict[str, Any]] | None = None


def optional_report(directory: str | Path) -> dict | None:
    """The ``pruning.json`` of ``directory`` if it has one (None: no report there, e.g. a dense
    model or a hub id); a damaged one is one line, as :func:`load_report` says."""
    d = Path(directory).expanduser()
    return load_report(d) if (d / REPORT_FILE).is_file() else None


def unreadable(path: str | Path, e: BaseException) -> LLMPruneError:
    """The one line for a report whose fields are not what this llmprune wrote (edited by hand,
    or another version's): the field that failed, not a traceback."""
    why = f"field {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return LLMPruneError(f"{path}: {REPORT_FILE} is not a report this llmprune can read ({why}); it was edited "
                         "or written by another version: re-run the job that wrote it")


def format_ppl(ppl: dict) -> list[str]:
    """One line per evaluation set: before -> after, or the one measurement there is."""
    lines = []
    before, after = ppl.get("before", {}), ppl.get("after", {})
    for name in after or before:
        b, a = before.get(name, {}), after.get(name, {})
        r = a or b
        head = f"  PPL {r.get('label', name)} (seqlen {r['seqlen']}): "
        lines.append(head + (f"dense {b['ppl']:.3f} -> pruned {a['ppl']:.3f}" if a and b else f"{r['ppl']:.3f}"))
    return lines


def format_tasks(tasks: dict) -> list[str]:
    """One line per zero-shot task and metric (stderr aside): before -> after, or the one there is."""
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
            value = f"dense {shown[0]} -> pruned {shown[1]}" if a and b else shown[1] if a else shown[0]
            lines.append(f"  {name} {metric} (v{r['version']}, {r['samples']} examples): {value}")
    return lines


def summary(report: dict) -> str:
    """The summary of any kind's report: the shared header's first line, the kind's own lines
    (its registered ``summary``), timings and peak memory, then perplexity and zero-shot scores."""
    from llmprune.export.save import report_kind
    from llmprune.jobs import registry
    from llmprune.jobs.header import cost_lines, head_line

    kind = registry.get(report_kind(report))
    return "\n".join([head_line(report), *kind.summary(report), *cost_lines(report),
                      *format_ppl(report.get("ppl") or {}), *format_tasks(report.get("tasks") or {})])


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


def format_blockwise(section: dict | None) -> list[str]:
    """One line on block-wise reconstruction: settings, mean error before -> after, seconds."""
    if not section:
        return []
    o = section["options"]
    line = (f"block-wise reconstruction ({o['recon_target']} target, {o['recon_steps']} steps x "
            f"{o['recon_batch']} rows, lr {o['recon_lr']:g}{', norms' if o['recon_norms'] else ''}): "
            f"block error ‖f(x)-T‖²/‖T‖² mean {section['error_before_mean']:.4g} -> "
            f"{section['error_after_mean']:.4g} over {section['layers']} layers, {section['seconds']:.1f}s")
    if section.get("skipped"):
        line += f", {section['skipped']} already exact"
    if section.get("worse"):
        line += f"; worse after tuning: layers {section['worse']}"
    return [line]


def layer_table(report: dict) -> str:
    """Per-layer table: target, OWL outlier ratio if any, achieved sparsity of each linear,
    mean reconstruction error of the layer's linears (when measured), seconds."""
    if not report.get("layers"):
        return "(no per-layer record: the masks were applied, not computed)"
    names = list(report["layers"][0]["linears"])
    lod = bool(report["layers"]) and "outlier_ratio" in report["layers"][0]
    with_recon = any(recon_errors(L) for L in report["layers"])
    with_bw = any("blockwise" in L for L in report["layers"])
    head = (f"{'layer':>5} {'target':>7} " + (f"{'outlier%':>8} " if lod else "")
            + " ".join(f"{n.split('.')[-1]:>9}" for n in names))
    head += f" {'recon':>9}" if with_recon else ""
    head += f" {'block err before->after':>23}" if with_bw else ""
    rows = [head + f" {'sec':>6}"]
    for L in report["layers"]:
        cells = " ".join(f"{L['linears'][n]['sparsity']:>9.4f}" for n in names)
        if with_recon:
            errs = list(recon_errors(L).values())
            cells += f" {sum(errs) / len(errs):>9.4g}" if errs else f" {'-':>9}"
        if with_bw:
            b = L.get("blockwise")
            cells += f" {b['error_before']:>10.4g} ->{b['error_after']:>10.4g}" if b else f" {'-':>23}"
        target = L["target"] if ":" in L["target"] else f"{float(L['target']):.4f}"
        extra = f"{100 * L['outlier_ratio']:>8.3f} " if lod else ""
        rows.append(f"{L['index']:>5} {target:>7} {extra}{cells} {L['seconds']:>6.1f}")
    return "\n".join(rows)
