"""The ``llmprune`` command: prune, eval, report, ...

Only the standard library is imported at module level: torch and transformers load inside
:func:`main`, so a Ctrl-C while they import is the same one line as a Ctrl-C later.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import TYPE_CHECKING, Literal, get_args, get_origin

from llmprune.errors import user_error

if TYPE_CHECKING:
    from pydantic import BaseModel


def add_option_flags(p: argparse.ArgumentParser, model: type[BaseModel], skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per field of ``model`` (``_`` → ``-``), help and default from its declaration.

    Values reach the model as the strings typed, so pydantic checks flags, recipes and the
    Python API alike; booleans are switches.
    """
    for name, f in model.model_fields.items():
        if name in skip or (get_origin(f.annotation) is Literal and len(get_args(f.annotation)) == 1):
            continue  # a field with one possible value is no choice
        flag = "--" + name.replace("_", "-")
        default = f.get_default(call_default_factory=True)
        shown = "" if default in (None, [], "") else f" (default {','.join(map(str, default)) if isinstance(default, list) else default})"
        if f.annotation in (bool, bool | None):  # a switch; on by default or automatic: also --no-...
            action = argparse.BooleanOptionalAction if default is not False else "store_true"
            p.add_argument(flag, dest=name, action=action, help=f.description)
        else:
            p.add_argument(flag, dest=name, metavar=name.upper(), help=(f.description or "") + shown)


def _job_parser(sub, kind) -> None:
    """A job kind's command: its config's flags (``--calib`` also names ``--train-data``), plus
    whatever flags the kind adds."""
    p = sub.add_parser(kind.name, help=kind.command, argument_default=argparse.SUPPRESS)
    p.add_argument("model", nargs="?", help=kind.model_help)
    if "train_data" in kind.config.model_fields:
        p.add_argument("--calib", dest="train_data", help="same as --train-data")
    if kind.add_flags is not None:
        kind.add_flags(p)
    add_option_flags(p, kind.config, skip=("model",))
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _cmd_job(args: argparse.Namespace) -> int:
    """Run one job of a registered kind from its flags; print its summary."""
    from llmprune.jobs import registry
    from llmprune.report import summary

    opts = vars(args)
    kind = registry.get(opts.pop("command"))
    quiet = opts.pop("quiet", False)
    config = kind.from_flags(opts) if kind.from_flags is not None else kind.config(**opts)
    print(summary(kind.run(config, not quiet)))
    if config.out:
        print(f"saved to {config.out} ({kind.saved_note.format(out=config.out)})")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:

    from llmprune.eval.zeroshot import TaskOptions, format_tasks
    from llmprune.export.save import check_output_file, json_of_kind, write_json
    from llmprune.jobs.header import versions
    from llmprune.models.loading import input_paths
    from llmprune.options import validated
    from llmprune.pipeline import evaluate

    out = None
    if args.json:
        reads = [*input_paths(args.model), *(args.ppl or "").split(","), args.task_dir]
        out = check_output_file(args.json, args.overwrite, [r for r in reads if r], flag="--json",
                                what="an eval report", ours=json_of_kind("eval"))
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
        write_json(out, {"kind": "eval", "versions": versions(), "model": args.model, "sparsity": sparsity,
                         "ppl": res, **tasks_part})  # atomic
    return 0


def _task_flags(p: argparse.ArgumentParser) -> None:
    from llmprune.eval.zeroshot import TaskOptions

    g = p.add_argument_group("zero-shot tasks (lm-eval)")
    add_option_flags(g, TaskOptions)


def _cmd_report(args: argparse.Namespace) -> int:
    from llmprune.export.save import report_kind
    from llmprune.jobs import registry
    from llmprune.report import layer_table, load_report, summary, unreadable

    report = load_report(args.dir)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    try:
        text = summary(report)
        if registry.get(report_kind(report)).layer_table:
            text += "\n\n" + layer_table(report)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise unreadable(args.dir, e) from None
    print(text)
    return 0


def _masks_parser(sub) -> None:
    p = sub.add_parser("masks", help="export, apply or inspect mask files (MaskLLM's .npz layout)")
    ms = p.add_subparsers(dest="masks_command", required=True)
    e = ms.add_parser("export", help="write the nonzero pattern of a (pruned) model's linears")
    e.add_argument("model", help="pruned directory, local HF dir, .gguf file or hub id")
    e.add_argument("--out", required=True, help="mask file to write, e.g. masks.npz")
    e.add_argument("--overwrite", action="store_true", help="replace a mask file llmprune wrote at --out")
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
    for q in (e, a, i):
        q.add_argument("--trust-remote-code", dest="trust_remote_code", action="store_true",
                       help="allow the model repository's own Python code (auto_map); only for code you trust")


def _cmd_masks(args: argparse.Namespace) -> int:
    from llmprune.masks import commands

    if args.masks_command == "export":
        res = commands.export_masks(args.model, args.out, args.overwrite, args.trust_remote_code)
        print(f"wrote {res['masks']} masks to {res['file']}: sparsity {res['sparsity']:.4f}"
              + (f", every mask {res['nm']}" if res["nm"] else ""))
        return 0
    if args.masks_command == "apply":
        report = commands.apply_masks(args.model, args.masks, args.out, args.overwrite, args.trust_remote_code)
        shown = {**report, "masks": {k: v for k, v in report["masks"].items() if k != "per_key"}}
        print(json.dumps(shown, indent=2))
        print(f"saved to {args.out} (per-mask summary in {args.out}/pruning.json)", file=sys.stderr)
        return 0
    res = commands.inspect_masks(args.masks, args.model, args.against, args.pattern, args.tol,
                                 args.trust_remote_code)
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
            line += f"  {check['target']}: {'FAIL ' + bad[name] if name in bad else 'ok'}"
        if name in against:
            a = against[name]
            line += f"  agreement {a.get('agreement', a.get('agreement_approx')):.4f}"
        print(line)
    if res["shapes_known"]:
        print(f"{res['masks']} masks, sparsity {res['sparsity']:.4f}, N:M {res['nm'] or '-'}")
    else:
        print(f"{res['masks']} masks, sparsity ~{res['sparsity_approx']:.4f} (shapes unknown: pass --model)")
    if check:
        print(f"check {check['target']}: " + ("ok" if check["ok"] else f"{len(bad)} masks violate it"))
    if "against" in res:
        a = res["against"]
        agree = a.get("agreement", a.get("agreement_approx"))
        print(f"against {a['file']}: {a['common']} common masks, agreement {agree:.4f}, Hamming {a['hamming']}")
    return 0 if check.get("ok", True) else 1


def _bench_speed_parser(sub) -> None:
    from llmprune.speed.bench import SpeedOptions

    p = sub.add_parser("bench-speed", help="prefill/decode tokens/s, dense and (CUDA >= 8.0) as 2:4 sparse",
                       argument_default=argparse.SUPPRESS)
    p.add_argument("model", help="pruned directory, local HF dir, .gguf file or hub id")
    add_option_flags(p, SpeedOptions)
    p.add_argument("--json", help="also write the report to this JSON file (atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace a --json file an earlier 'llmprune bench-speed' wrote")


def _cmd_bench_speed(args: argparse.Namespace) -> int:
    from llmprune.export.save import check_output_file, json_of_kind, write_json
    from llmprune.jobs.header import versions
    from llmprune.models.loading import input_paths
    from llmprune.options import validated
    from llmprune.speed.bench import SpeedOptions, bench_speed, format_report

    opts = vars(args)
    opts.pop("command")
    model, out, overwrite = opts.pop("model"), opts.pop("json", None), opts.pop("overwrite", False)
    options = validated(SpeedOptions, opts)  # bad values: one line, before the model loads
    if out:
        out = check_output_file(out, overwrite, input_paths(model), flag="--json", what="a speed report",
                                ours=json_of_kind("speed"))
    report = {"kind": "speed", "versions": versions(), **bench_speed(model, options)}
    for line in format_report(report):
        print(line)
    if out is not None:
        write_json(out, report)  # atomic
        print(f"report written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from llmprune.chain.cli import add_run_parser
    from llmprune.jobs import registry

    parser = argparse.ArgumentParser(prog="llmprune", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for kind in registry.kinds().values():
        if kind.command is not None:
            _job_parser(sub, kind)
    e = sub.add_parser("eval", help="perplexity and zero-shot tasks of a model or a pruned directory")
    e.add_argument("model", help="bundled name, local HF dir (e.g. a pruned --out), .gguf file or hub id")
    e.add_argument("--ppl", default=None, help="comma-separated: wikitext2,c4,FILE (default wikitext2, "
                   "none when only --tasks is given)")
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--max-windows", dest="max_windows", type=int, default=None)
    e.add_argument("--device", default="auto")
    e.add_argument("--dtype", default="auto")
    e.add_argument("--json", help="also write the results to this JSON file")
    e.add_argument("--overwrite", action="store_true", help="replace a --json file an earlier 'llmprune eval' wrote")
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


def _cmd_run(args: argparse.Namespace) -> int:
    from llmprune.chain.cli import cmd_run

    return cmd_run(args)


@contextlib.contextmanager
def _library_bars(show: bool):
    """``-q`` also silences transformers' own bars (e.g. "Loading weights"), for this command only."""
    if show:
        yield
        return
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


COMMANDS = {"bench-speed": _cmd_bench_speed, "run": _cmd_run, "eval": _cmd_eval, "report": _cmd_report,
            "masks": _cmd_masks}  # and every job kind with a command: _cmd_job


def main(argv: list[str] | None = None) -> int:
    """The ``llmprune`` command. Exit codes: 0 done, 1 a check failed (``masks inspect``), 2 a
    one-line error, 130 interrupted (Ctrl-C), 141 the reader of our output went away (``| head``)."""
    try:
        args = build_parser().parse_args(argv)
        with _library_bars(not getattr(args, "quiet", False)):
            return COMMANDS.get(args.command, _cmd_job)(args)
    except KeyboardInterrupt:
        # what was being written is already removed (atomic output); no traceback for Ctrl-C
        print("llmprune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # e.g. `llmprune report DIR | head`: stop quietly; the interpreter's last flush must not
        # raise again on the closed pipe
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        err = user_error(e)
        if err is None:
            raise  # not the user's input: a bug of ours, keep its traceback
        print(f"llmprune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
