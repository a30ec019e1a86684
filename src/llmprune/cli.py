"""The ``llmprune`` command: prune, eval, report."""

from __future__ import annotations

import argparse
import json
import sys

from pydantic import BaseModel

from llmprune.config import PruneConfig
from llmprune.errors import LLMPruneError


def add_option_flags(p: argparse.ArgumentParser, model: type[BaseModel], skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per field of ``model`` (``_`` → ``-``), help and default from its declaration.

    Values reach the model as the strings typed, so pydantic checks flags, recipes and the
    Python API alike; booleans are switches.
    """
    for name, f in model.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        default = f.get_default(call_default_factory=True)
        shown = "" if default in (None, [], "") else f" (default {','.join(map(str, default)) if isinstance(default, list) else default})"
        if f.annotation is bool:
            p.add_argument(flag, dest=name, action="store_true", help=(f.description or "") + shown)
        else:
            p.add_argument(flag, dest=name, metavar=name.upper(), help=(f.description or "") + shown)


def _prune_parser(sub) -> None:
    p = sub.add_parser("prune", help="prune a model layer by layer with calibration data",
                       argument_default=argparse.SUPPRESS)
    p.add_argument("model", nargs="?", help="bundled name (smollm2-135m), local HF dir, .gguf file or hub id")
    p.add_argument("--recipe", help="YAML recipe (or a pruned directory holding recipe.yaml); flags given here override it")
    p.add_argument("--no-update", dest="no_update", action="store_true",
                   help="keep the original weights under the mask (SparseGPT mask-only); same as --solver none")
    add_option_flags(p, PruneConfig, skip=("model",))
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def prune_config_from_args(opts: dict) -> PruneConfig:
    """The recipe (if any) overridden by the flags given: one validated ``PruneConfig``."""
    recipe = opts.pop("recipe", None)
    data = PruneConfig.load_recipe(recipe) if recipe else {}
    if opts.pop("no_update", False):
        if opts.get("solver", "none") != "none":
            raise LLMPruneError(f"--no-update keeps the original weights, but --solver {opts['solver']} "
                                "updates them; drop one")
        opts["solver"] = "none"
    if "pattern" in opts and "sparsity" not in opts:
        data.pop("sparsity", None)  # an N:M pattern on the command line replaces a recipe's ratio
    if "sparsity" in opts and "pattern" not in opts:
        data.pop("pattern", None)
    return PruneConfig.from_dict({**data, **opts})


def _cmd_prune(args: argparse.Namespace) -> int:
    from llmprune.pipeline import prune
    from llmprune.report import summary

    opts = vars(args)
    opts.pop("command")
    quiet = opts.pop("quiet", False)
    config = prune_config_from_args(opts)
    result = prune(config=config, progress=not quiet)
    print(summary(result.report))
    if config.out:
        print(f"saved to {config.out} (report: {config.out}/pruning.json)")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from llmprune.pipeline import evaluate

    res = evaluate(args.model, ppl=args.ppl, seqlen=args.seqlen, max_windows=args.max_windows,
                   device=args.device, dtype=args.dtype, progress=not args.quiet)
    sparsity = res.pop("_sparsity")
    for name, r in res.items():
        print(f"{name}: PPL {r['ppl']:.3f}  ({r['label']}, {r['windows']} x {r['seqlen']} tokens, {r['seconds']:.1f}s)")
    print(f"sparsity of decoder linears: {sparsity:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "sparsity": sparsity, "ppl": res}, f, indent=2)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from llmprune.report import layer_table, load_report, summary

    report = load_report(args.dir)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(summary(report))
        print()
        print(layer_table(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _prune_parser(sub)
    e = sub.add_parser("eval", help="perplexity of a model or a pruned directory")
    e.add_argument("model", help="bundled name, local HF dir (e.g. a pruned --out), .gguf file or hub id")
    e.add_argument("--ppl", default="wikitext2", help="comma-separated: wikitext2,c4,FILE")
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--max-windows", dest="max_windows", type=int, default=None)
    e.add_argument("--device", default="auto")
    e.add_argument("--dtype", default="auto")
    e.add_argument("--json", help="also write the results to this JSON file")
    e.add_argument("-q", "--quiet", action="store_true")
    r = sub.add_parser("report", help="summarise a pruned directory's pruning.json")
    r.add_argument("dir")
    r.add_argument("--json", action="store_true", help="print the raw JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"prune": _cmd_prune, "eval": _cmd_eval, "report": _cmd_report}[args.command](args)
    except LLMPruneError as e:
        print(f"llmprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # what was being written is already removed (atomic output); no traceback for Ctrl-C
        print("llmprune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
