"""``llmprune run``: the chained-recipe subcommand (registered by :mod:`llmprune.cli`)."""

from __future__ import annotations

import argparse


def add_run_parser(sub) -> None:
    from llmprune.chain.recipe import KINDS

    p = sub.add_parser("run", help="run a chained recipe of stages (prune, maskllm, recover, structured, "
                                   "eval); re-running continues after the last finished stage")
    p.add_argument("recipe", help="YAML recipe: shared options at the top, 'stages:' a list of "
                                  f"{{kind: {{options}}}} with kind one of {', '.join(KINDS)} (docs/recipes.md)")
    p.add_argument("--out", required=True, help="output directory: stages/NN-kind/ per stage, final/ "
                                                "(the final model), pruning.json, recipe.yaml")
    p.add_argument("--overwrite", action="store_true", help="re-run from the first stage the recipe "
                   "changed (default: refuse a recipe that differs from the finished stages in --out)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _ppl_lines(report: dict) -> list[str]:
    from llmprune.report import format_ppl, format_tasks

    if report.get("kind") == "eval":  # one measurement, no before / after
        ppl = report.get("ppl", {}).get("after", {})
        lines = [f"  PPL {r['label']} (seqlen {r['seqlen']}): {r['ppl']:.3f}" for r in ppl.values()]
        tasks = report.get("tasks", {}).get("after", {})
        return lines + [line.replace(" dense - -> pruned ", " ") for line in format_tasks({"after": tasks})]
    return format_ppl(report.get("ppl", {})) + format_tasks(report.get("tasks", {}))


def summary(report: dict, ran: list[int] | None = None) -> str:
    """A chained run (kind ``chain``): one line per stage (run now, kept, or its status) with its
    numbers, and where the final model is. Also an eval stage's own report (kind ``eval``)."""
    if report.get("kind") == "eval":
        return "\n".join([f"eval of {report['model']['name']}: sparsity of decoder linears "
                          f"{report['sparsity']:.4f}", *_ppl_lines(report)])
    lines = []
    for r in report["stages"]:
        rep = r.get("report") or {}
        state = r["status"] if ran is None or r["status"] != "done" else (
            "ran" if r["index"] in ran else "kept (finished before)")
        head = f"stage {r['index']} {r['kind']} ({r['dir']}): {state}"
        if "seconds" in r:
            head += f", {r['seconds']:.1f}s"
        if rep.get("sparsity") is not None:
            head += f", sparsity {rep['sparsity']:.4f}"
        if rep.get("target"):
            head += f", target {rep['target']}"
        lines += [head, *_ppl_lines(rep)]
    final = report.get("final")
    lines.append(f"final model: {final['dir']}/ (from {final['stage']})" if final else "final model: none yet")
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    from llmprune.chain.run import run_chain

    result = run_chain(args.recipe, args.out, overwrite=args.overwrite, progress=not args.quiet)
    print(summary(result.report, result.ran))
    where = f"final model in {result.final}, " if result.final else ""
    print(f"saved to {result.out} ({where}report: {result.out}/pruning.json)")
    return 0
