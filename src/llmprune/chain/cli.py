"""``llmprune run``: the chained-recipe subcommand (registered by :mod:`llmprune.cli`)."""

from __future__ import annotations

import argparse


def add_run_parser(sub) -> None:
    from llmprune.chain.recipe import stage_kinds

    p = sub.add_parser("run", help=f"run a chained recipe of stages ({', '.join(stage_kinds())}); re-running "
                                   "continues after the last finished stage")
    p.add_argument("recipe", help="YAML recipe: shared options at the top, 'stages:' a list of "
                                  f"{{kind: {{options}}}} with kind one of {', '.join(stage_kinds())} (docs/recipes.md)")
    p.add_argument("--out", required=True, help="output directory: stages/NN-kind/ per stage, final/ "
                                                "(the final model), pruning.json, recipe.yaml")
    p.add_argument("--overwrite", action="store_true", help="re-run from the first stage the recipe "
                   "changed (default: refuse a recipe that differs from the finished stages in --out)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def cmd_run(args: argparse.Namespace) -> int:
    from llmprune.chain.run import run_chain
    from llmprune.report import summary

    result = run_chain(args.recipe, args.out, overwrite=args.overwrite, progress=not args.quiet)
    print(summary(result.report))
    kept = [r["index"] for r in result.report["stages"] if r["index"] not in result.ran]
    print(f"this run: ran stages {result.ran or 'none'}" + (f", kept {kept} (finished before)" if kept else ""))
    where = f"final model in {result.final}, " if result.final else ""
    print(f"saved to {result.out} ({where}report: {result.out}/pruning.json)")
    return 0
