"""The ``llmprune`` command: prune, eval, report."""

from __future__ import annotations

import argparse
import json
import sys

from pydantic import BaseModel

from llmprune.chain.cli import add_run_parser, cmd_run
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
        if f.annotation in (bool, bool | None):  # a switch; on by default or automatic: also --no-...
            action = argparse.BooleanOptionalAction if default is not False else "store_true"
            p.add_argument(flag, dest=name, action=action, help=f.description)
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


def _training_parser(sub, name: str, config_cls: type, help: str, model_help: str) -> None:
    """A training command (maskllm, recover): flags from its config, ``--calib`` = ``--train-data``."""
    p = sub.add_parser(name, help=help, argument_default=argparse.SUPPRESS)
    p.add_argument("model", nargs="?", help=model_help)
    p.add_argument("--calib", dest="train_data", help="same as --train-data")
    add_option_flags(p, config_cls, skip=("model",))
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _maskllm_parser(sub) -> None:
    from llmprune.maskllm.job import MaskLLMConfig

    _training_parser(sub, "maskllm", MaskLLMConfig, "learn N:M masks end to end (MaskLLM) and apply them",
                     "bundled name (smollm2-135m), local HF dir, .gguf file or hub id")


def _recover_parser(sub) -> None:
    from llmprune.recover.job import RecoverConfig

    _training_parser(sub, "recover", RecoverConfig,
                     "fine-tune a pruned model with its mask fixed (masked or LoRA)",
                     "pruned directory (its zeros are the mask), local HF dir, .gguf file or hub id")


def _run_training(args: argparse.Namespace, config_cls: type, run, saved: str) -> int:
    from llmprune.report import summary

    opts = vars(args)
    opts.pop("command")
    quiet = opts.pop("quiet", False)
    config = config_cls(**opts)
    job = run(config, progress=not quiet)
    print(summary(job.report))
    if config.out:
        print(f"saved to {config.out} ({saved.format(out=config.out)})")
    return 0


def _cmd_maskllm(args: argparse.Namespace) -> int:
    from llmprune.maskllm.job import MaskLLMConfig, run_maskllm

    return _run_training(args, MaskLLMConfig, run_maskllm, "masks: {out}/masks.npz, report: {out}/pruning.json")


def _cmd_recover(args: argparse.Namespace) -> int:
    from llmprune.recover.job import RecoverConfig, run_recover

    return _run_training(args, RecoverConfig, run_recover, "report: {out}/pruning.json")


def _structured_parser(sub) -> None:
    from llmprune.structured.job import StructuredConfig

    p = sub.add_parser("structured", help="make the model physically smaller: OSSCAR MLP width, depth or MoE experts",
                       argument_default=argparse.SUPPRESS)
    p.add_argument("model", nargs="?", help="bundled name (smollm2-135m), local HF dir, .gguf file or hub id")
    add_option_flags(p, StructuredConfig, skip=("model",))
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _cmd_structured(args: argparse.Namespace) -> int:
    from llmprune.structured.job import structured_job

    opts = vars(args)
    opts.pop("command")
    quiet = opts.pop("quiet", False)
    report = structured_job(opts.pop("model", "smollm2-135m"), progress=not quiet, **opts).report
    params = report["params"]
    print(f"{report['method']}: parameters {params['before']:,} -> {params['after']:,} "
          f"({100 * params['removed_share']:.2f}% removed)")
    for name, r in report["ppl"].get("after", {}).items():
        print(f"  PPL {r['label']}: {report['ppl']['before'][name]['ppl']:.3f} -> {r['ppl']:.3f}")
    speed = report.get("speed") or {}
    if "decode_speedup" in speed:
        print(f"  CPU decode x{speed['decode_speedup']:.2f}, prefill x{speed['prefill_speedup']:.2f}")
    if opts.get("out"):
        print(f"saved to {opts['out']} (report: {opts['out']}/pruning.json)")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:

    from llmprune.eval.zeroshot import TaskOptions, format_tasks
    from llmprune.export.save import check_json_path, write_json
    from llmprune.options import validated
    from llmprune.pipeline import evaluate

    out = check_json_path(args.json) if args.json else None
    given = {k: v for k in TaskOptions.model_fields if (v := getattr(args, k, None)) is not None}
    tasks = validated(TaskOptions, given)  # bad values: one line, as for the other commands
    # Perplexity on WikiText-2 unless only tasks were asked for.
    ppl = args.ppl if args.ppl is not None else ([] if tasks.tasks else "wikitext2")
    res = evaluate(args.model, ppl=ppl, seqlen=args.seqlen, max_windows=args.max_windows,
                   device=args.device, dtype=args.dtype, progress=not args.quiet,
                   trust_remote_code=args.trust_remote_code, **tasks.model_dump())
    sparsity = res.pop("_sparsity")
    task_results = res.pop("_tasks", None)
    for name, r in res.items():
        print(f"{name}: PPL {r['ppl']:.3f}  ({r['label']}, {r['windows']} x {r['seqlen']} tokens, {r['seconds']:.1f}s)")
    for line in format_tasks(task_results or {}):
        print(line)
    print(f"sparsity of decoder linears: {sparsity:.4f}")
    if out is not None:
        tasks_part = {"tasks": task_results} if task_results is not None else {}
        write_json(out, {"model": args.model, "sparsity": sparsity, "ppl": res, **tasks_part})  # atomic
    return 0


def _task_flags(p: argparse.ArgumentParser) -> None:
    from llmprune.eval.zeroshot import TaskOptions

    g = p.add_argument_group("zero-shot tasks (lm-eval)")
    add_option_flags(g, TaskOptions)


def _cmd_report(args: argparse.Namespace) -> int:
    from llmprune.report import layer_table, load_report, summary

    report = load_report(args.dir)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(summary(report))
        if report.get("kind") != "chain":  # a chain's layers are in its stages' own reports
            print()
            print(layer_table(report))
    return 0


def _masks_parser(sub) -> None:
    p = sub.add_parser("masks", help="export, apply or inspect mask files (MaskLLM's .npz layout)")
    ms = p.add_subparsers(dest="masks_command", required=True)
    e = ms.add_parser("export", help="write the nonzero pattern of a (pruned) model's linears")
    e.add_argument("model", help="pruned directory, local HF dir, .gguf file or hub id")
    e.add_argument("--out", required=True, help="mask file to write, e.g. masks.npz")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    a = ms.add_parser("apply", help="zero a model's weights where a mask file prunes them; save it")
    a.add_argument("model", help="bundled name, local HF dir, .gguf file or hub id")
    a.add_argument("masks", help="mask file (.npz, MaskLLM layout)")
    a.add_argument("--out", required=True, help="directory for the masked model (HF dir + pruning.json)")
    a.add_argument("--overwrite", action="store_true", help="replace a previous llmprune output at --out")
    i = ms.add_parser("inspect", help="sparsity, N:M check and agreement of a mask file (exit 1 when a mask breaks --pattern)")
    i.add_argument("masks", help="mask file (.npz, MaskLLM layout)")
    i.add_argument("--model", help="model (dir or hub id) whose config gives the shapes; nothing is loaded")
    i.add_argument("--against", help="another mask file to compare with")
    i.add_argument("--pattern", help="check every mask: N:M (e.g. 2:4) or a sparsity (e.g. 0.5)")
    i.add_argument("--tol", type=float, default=0.01, help="tolerance of a sparsity check (default 0.01)")
    i.add_argument("--json", action="store_true", help="print the full result as JSON")


def _cmd_masks(args: argparse.Namespace) -> int:
    from llmprune.masks import commands

    if args.masks_command == "export":
        res = commands.export_masks(args.model, args.out, args.overwrite)
        print(f"wrote {res['masks']} masks to {res['file']}: sparsity {res['sparsity']:.4f}"
              + (f", every mask {res['nm']}" if res["nm"] else ""))
        return 0
    if args.masks_command == "apply":
        report = commands.apply_masks(args.model, args.masks, args.out, args.overwrite)
        shown = {**report, "masks": {k: v for k, v in report["masks"].items() if k != "per_key"}}
        print(json.dumps(shown, indent=2))
        print(f"saved to {args.out} (per-mask summary in {args.out}/pruning.json)", file=sys.stderr)
        return 0
    res = commands.inspect_masks(args.masks, args.model, args.against, args.pattern, args.tol)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    check = res.get("check") or {}
    bad = check.get("violations") or {}
    against = (res.get("against") or {}).get("per_key", {})
    for name, r in res["per_key"].items():
        if res["shapes_known"]:
            line = f"{name}  {tuple(r['shape'])}  sparsity {r['sparsity']:.4f}  N:M {r['nm'] or '-'}"
        else:
            line = f"{name}  {r['packed_bytes']} bytes  kept {r['kept']}  sparsity ~{r['sparsity_approx']:.4f}"
        if check:
            line += f"  {check['target']}: {'FAIL ' + bad[name] if name in bad else 'ok' if check.get('ok') is not None else '?'}"
        if name in against:
            a = against[name]
            line += f"  agreement {a.get('agreement', a.get('agreement_approx')):.4f}"
        print(line)
    if res["shapes_known"]:
        print(f"{res['masks']} masks, sparsity {res['sparsity']:.4f}, N:M {res['nm'] or '-'}")
    else:
        print(f"{res['masks']} masks, sparsity ~{res['sparsity_approx']:.4f} (shapes unknown: pass --model)")
    if check:
        print(f"check {check['target']}: " + (check["note"] if check.get("ok") is None else
                                               "ok" if check["ok"] else f"{len(bad)} masks violate it"))
    if "against" in res:
        a = res["against"]
        agree = a.get("agreement", a.get("agreement_approx"))
        print(f"against {a['file']}: {a['common']} common masks, agreement {agree:.4f}, Hamming {a['hamming']}")
    return 0 if check.get("ok") is not False else 1


def _bench_speed_parser(sub) -> None:
    from llmprune.speed.bench import SpeedOptions

    p = sub.add_parser("bench-speed", help="prefill/decode tokens/s, dense and (CUDA >= 8.0) as 2:4 sparse",
                       argument_default=argparse.SUPPRESS)
    p.add_argument("model", help="pruned directory, local HF dir, .gguf file or hub id")
    add_option_flags(p, SpeedOptions)
    p.add_argument("--json", help="also write the report to this JSON file (atomically)")


def _cmd_bench_speed(args: argparse.Namespace) -> int:
    from llmprune.export.save import check_json_path, write_json
    from llmprune.options import validated
    from llmprune.speed.bench import SpeedOptions, bench_speed, format_report

    opts = vars(args)
    opts.pop("command")
    model, out = opts.pop("model"), opts.pop("json", None)
    options = validated(SpeedOptions, opts)  # bad values: one line, before the model loads
    out = check_json_path(out) if out else None
    report = bench_speed(model, options)
    for line in format_report(report):
        print(line)
    if out is not None:
        write_json(out, report)  # atomic
        print(f"report written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _prune_parser(sub)
    _maskllm_parser(sub)
    _structured_parser(sub)
    _recover_parser(sub)
    e = sub.add_parser("eval", help="perplexity and zero-shot tasks of a model or a pruned directory")
    e.add_argument("model", help="bundled name, local HF dir (e.g. a pruned --out), .gguf file or hub id")
    e.add_argument("--ppl", default=None, help="comma-separated: wikitext2,c4,FILE (default wikitext2, "
                   "none when only --tasks is given)")
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--max-windows", dest="max_windows", type=int, default=None)
    e.add_argument("--device", default="auto")
    e.add_argument("--dtype", default="auto")
    e.add_argument("--json", help="also write the results to this JSON file")
    e.add_argument("--trust-remote-code", dest="trust_remote_code", action="store_true",
                   help="run the model repository's own Python code (auto_map); only for code you trust")
    _task_flags(e)
    e.add_argument("-q", "--quiet", action="store_true")
    r = sub.add_parser("report", help="summarise a pruned directory's pruning.json")
    r.add_argument("dir")
    r.add_argument("--json", action="store_true", help="print the raw JSON")
    _masks_parser(sub)
    _bench_speed_parser(sub)
    add_run_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = {"prune": _cmd_prune, "maskllm": _cmd_maskllm, "structured": _cmd_structured,
                    "recover": _cmd_recover, "bench-speed": _cmd_bench_speed, "run": cmd_run,
                    "eval": _cmd_eval, "report": _cmd_report, "masks": _cmd_masks}
        return commands[args.command](args)
    except LLMPruneError as e:
        print(f"llmprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # what was being written is already removed (atomic output); no traceback for Ctrl-C
        print("llmprune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
