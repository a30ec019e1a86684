"""The ``llmprune`` command: prune, eval, report."""

from __future__ import annotations

import argparse
import json
import sys

from llmprune.config import PruneConfig
from llmprune.errors import LLMPruneError


def _prune_parser(sub) -> None:
    p = sub.add_parser("prune", help="prune a model layer by layer with calibration data",
                       argument_default=argparse.SUPPRESS)
    p.add_argument("model", nargs="?", help="bundled name (smollm2-135m), local HF dir, .gguf file or hub id")
    p.add_argument("--recipe", help="YAML recipe; flags given here override it")
    p.add_argument("--method", help="magnitude | wanda | sparsegpt | admm-grad")
    p.add_argument("--sparsity", type=float, help="unstructured sparsity in [0, 1), e.g. 0.5")
    p.add_argument("--pattern", help="N:M (N kept of every M inputs), e.g. 2:4; or 'unstructured'")
    p.add_argument("--solver", help="weight update after the mask: none | sparsegpt | admm")
    p.add_argument("--no-update", dest="no_update", action="store_true",
                   help="keep the original weights under the mask (SparseGPT mask-only)")
    p.add_argument("--calib", help="calibration data: c4 (default) | wikitext2 | FILE (.txt/.jsonl)")
    p.add_argument("--nsamples", type=int, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, help="tokens per calibration window (default 2048)")
    p.add_argument("--seed", type=int, help="calibration sampling seed (default 0)")
    p.add_argument("--blocksize", type=int, help="SparseGPT block size (default 128)")
    p.add_argument("--percdamp", type=float, help="SparseGPT damping, fraction of mean diag(H) (default 0.01)")
    p.add_argument("--allocation", help="layer-wise sparsity: uniform (default) | owl | explicit")
    p.add_argument("--owl-m", dest="owl_m", type=float, help="OWL outlier threshold M (default 7)")
    p.add_argument("--owl-lambda", dest="owl_lambda", type=float, help="OWL ratio spread lambda (default 0.12)")
    p.add_argument("--layer-ratios", dest="layer_ratios", type=lambda s: [float(x) for x in s.split(",")],
                   help="explicit per-layer sparsity, comma-separated (with --allocation explicit)")
    p.add_argument("--admm-iters", dest="admm_iters", type=int, help="ADMM iterations k (default 20)")
    p.add_argument("--admm-ks", dest="admm_ks", type=int, help="ADMM-Grad sparsification steps (default 15)")
    p.add_argument("--admm-rho", dest="admm_rho", type=float, help="ADMM penalty rho (default 1)")
    p.add_argument("--admm-damp", dest="admm_damp", type=float, help="ADMM dampening, x mean diag(XᵀX) (default 0.1)")
    p.add_argument("--recon-error", dest="recon_error", action="store_true",
                   help="report each linear's reconstruction error ‖WX−ŴX‖²/‖WX‖² (collects XᵀX)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (one layer at a time goes there)")
    p.add_argument("--dtype", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--ppl", type=lambda s: [x for x in s.split(",") if x],
                   help="also measure perplexity before and after, e.g. wikitext2,c4")
    p.add_argument("--ppl-seqlen", dest="ppl_seqlen", type=int, help="perplexity window (default: --seqlen)")
    p.add_argument("--max-windows", dest="max_windows", type=int, help="evaluate only the first K windows")
    p.add_argument("--out", help="save the pruned model here (HF directory + pruning.json)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _cmd_prune(args: argparse.Namespace) -> int:
    from llmprune.pipeline import prune
    from llmprune.report import summary

    opts = vars(args)
    opts.pop("command")
    quiet = opts.pop("quiet", False)
    recipe = opts.pop("recipe", None)
    config = PruneConfig.from_yaml(recipe) if recipe else PruneConfig()
    if opts.pop("no_update", False):
        opts["solver"] = "none"
    if "pattern" in opts and "sparsity" not in opts:
        config.sparsity = None  # an N:M pattern on the command line replaces a recipe's ratio
    if "sparsity" in opts and "pattern" not in opts:
        config.pattern = None
    for k, v in opts.items():
        setattr(config, k, v)
    result = prune(config=config, progress=not quiet)
    print(summary(result.report))
    if config.out:
        print(f"saved to {config.out} (report: {config.out}/pruning.json)")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import os
    import tempfile
    from pathlib import Path

    from llmprune.pipeline import evaluate

    out = Path(args.json).expanduser() if args.json else None
    if out is not None:
        # Fail now, not after an hour of evaluation: open (or create) the file, and remove it
        # again if this created it, so a failed run leaves nothing behind.
        existed = out.exists()
        if out.is_dir():
            raise LLMPruneError(f"--json {out} is a directory; give a file path")
        try:
            out.open("a").close()
        except OSError as e:
            raise LLMPruneError(f"cannot write --json {out}: {e.strerror or e}") from None
        if not existed:
            out.unlink()
    res = evaluate(args.model, ppl=args.ppl, seqlen=args.seqlen, max_windows=args.max_windows,
                   device=args.device, dtype=args.dtype, progress=not args.quiet,
                   trust_remote_code=args.trust_remote_code)
    sparsity = res.pop("_sparsity")
    for name, r in res.items():
        print(f"{name}: PPL {r['ppl']:.3f}  ({r['label']}, {r['windows']} x {r['seqlen']} tokens, {r['seconds']:.1f}s)")
    print(f"sparsity of decoder linears: {sparsity:.4f}")
    if out is not None:
        # Write beside the target and rename: never a half-written JSON file.
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"model": args.model, "sparsity": sparsity, "ppl": res}, f, indent=2)
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
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
    e.add_argument("--trust-remote-code", dest="trust_remote_code", action="store_true",
                   help="run the model repository's own Python code (auto_map); only for code you trust")
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


if __name__ == "__main__":
    sys.exit(main())
