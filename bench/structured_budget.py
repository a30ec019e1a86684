"""Structured pruning by target and to a budget (issue #23) on the bundled SmolLM2-135M, CPU.

Protocol (as bench/structured.py): calibration 32 windows x 1024 C4-train tokens, seed 0
(cached in bench/out/), WikiText-2 test perplexity on the first 40 windows of 1024 tokens;
every run starts from a fresh copy of the dense model; speed = CPU prefill / decode tokens/s
(128-token prompt, 64 decoded tokens, batch 1, best of 3), the dense model measured right
before each pruned one.

- **targets** (table A): each target at about 10 / 20 / 30 % of *its own* parameters, OSSCAR
  (the defaults) against its score-only baseline (``greedy=False, local_search=False,
  refit=False``): MLP channels, hidden channels (widths multiples of ``--round-to``, 32), and
  attention heads at the counts a standard config can express on SmolLM2 (9 query heads in 3
  KV groups: one query head per group = 25 % of the attention's parameters, one whole KV group
  = 33 %, two query heads per group = 50 %).
- **budget** (table B): −10 / −20 / −30 % of *all* parameters: ``--method search`` over
  mlp, attention, hidden and depth against each single target at the same budget
  (``--param-ratio``; MLP widths multiples of ``--round-to`` as the search's, so the search's
  MLP-alone allocation is the same model; hidden widths multiples of ``--single-round-to`` = 9,
  the sizes SmolLM2's 9 heads allow; depth by the angular score; attention alone only where
  expressible). The search's ``--holdout`` windows are drawn after the ``nsamples`` (same
  seed), so every run calibrates on the same windows.

Results merge into ``bench/out/structured_budget.json`` after every run (keyed by name), so an
interrupted invocation keeps what it did; the Markdown tables (``.md``, also printed) are
rebuilt from everything there. ``--save-models DIR`` also writes every pruned model (plain HF
directories, e.g. for bench/llamacpp.py). Full protocol (many hours on a shared 2-core CPU)::

    LLMPRUNE_DATA_DIR=/work/shared/data PYTHONPATH=src python bench/structured_budget.py

Smoke test::

    ... python bench/structured_budget.py --nsamples 6 --seqlen 128 --max-windows 2 --budgets 0.2 \\
        --tables budget --out bench/out/structured_budget-smoke
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import llmprune  # noqa: E402
from llmprune.data.sources import load_corpus  # noqa: E402
from llmprune.data.tokens import eval_token_stream  # noqa: E402
from llmprune.errors import LLMPruneError  # noqa: E402
from llmprune.eval.perplexity import perplexity  # noqa: E402
from llmprune.export.save import save_pruned  # noqa: E402
from llmprune.jobs.header import versions  # noqa: E402
from llmprune.structured import structured  # noqa: E402
from llmprune.structured.api import count_params  # noqa: E402
from llmprune.structured.speed import measure_speed  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, calibration_ids, resume_results, save_results  # noqa: E402

BASELINE = dict(greedy=False, local_search=False, refit=False)
PROTOCOL_KEYS = ("model", "nsamples", "seqlen", "seed", "ppl_seqlen", "max_windows", "round_to", "single_round_to",
                 "prompt_len", "new_tokens", "holdout")
# attention levels on SmolLM2 (9 heads, 3 KV groups): (label, share of attention params, options)
ATTENTION = [("1 query head per KV group", 0.25, dict(ratio=1 / 3, attention_unit="heads")),
             ("1 whole KV group", 1 / 3, dict(ratio=1 / 3, attention_unit="groups")),
             ("2 query heads per KV group", 0.50, dict(ratio=2 / 3, attention_unit="heads"))]


def runs(args: argparse.Namespace) -> list[tuple[str, str, dict]]:
    """``(table, name, options)`` in the order they run: the budget table first."""
    out = []
    if "budget" in args.tables:
        for p in [float(x) for x in args.budgets.split(",")]:
            out.append(("budget", f"search@{p:g}", dict(method="search", param_ratio=p, round_to=args.round_to,
                                                         holdout=args.holdout)))
            out.append(("budget", f"mlp@{p:g}", dict(method="osscar", param_ratio=p, round_to=args.round_to)))
            out.append(("budget", f"hidden@{p:g}", dict(method="hidden", param_ratio=p,
                                                         round_to=args.single_round_to)))
            out.append(("budget", f"depth@{p:g}", dict(method="depth", param_ratio=p, score="angular")))
            out.append(("budget", f"attention@{p:g}", dict(method="osscar", target="attention", param_ratio=p)))
    if "targets" in args.tables:
        for r in [float(x) for x in args.ratios.split(",")]:
            for variant, extra in (("osscar", {}), ("baseline", BASELINE)):
                out.append(("targets", f"mlp/{variant}@{r:g}", dict(method="osscar", ratio=r,
                                                                     round_to=args.round_to, **extra)))
                out.append(("targets", f"hidden/{variant}@{r:g}", dict(method="hidden", ratio=r,
                                                                        round_to=args.round_to, **extra)))
            # hidden: Minitron's importance with the re-fit (which half of the gain is the selection)
            out.append(("targets", f"hidden/score+refit@{r:g}", dict(method="hidden", ratio=r, round_to=args.round_to,
                                                                    greedy=False, local_search=False)))
        for _label, share, opts in ATTENTION:
            for variant, extra in (("osscar", {}), ("baseline", BASELINE)):
                out.append(("targets", f"attention/{variant}@{share:.2f}", dict(method="osscar", target="attention",
                                                                                **opts, **extra)))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tables", default="budget,targets", help="budget,targets (comma-separated)")
    p.add_argument("--budgets", default="0.1,0.2,0.3", help="shares of all parameters (table B)")
    p.add_argument("--ratios", default="0.1,0.2,0.3", help="shares of the MLP's / hidden channels (table A)")
    p.add_argument("--only", default="", help="run only the runs whose name contains one of these (comma-sep.)")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout", type=int, default=4, help="search: held-out calibration windows")
    p.add_argument("--round-to", type=int, default=32, help="widths in table A and the search's levels")
    p.add_argument("--single-round-to", type=int, default=9,
                   help="hidden widths of the hidden-only runs in table B (Llama needs a multiple of the 9 heads)")
    p.add_argument("--ppl-seqlen", type=int, default=1024)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--save-models", default=None, help="also save every pruned model under this directory")
    p.add_argument("--fresh", action="store_true", help="forget earlier results")
    p.add_argument("--out", default=str(OUT / "structured_budget"), help="writes OUT.json and OUT.md")
    return p.parse_args(argv)


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _cell(r: dict | None) -> str:
    if r is None:
        return "–"
    if "error" in r:
        return "not expressible"
    return f"{r['ppl']:.2f}"


def _what(r: dict) -> str:
    """What a run removed, from its report."""
    rep = r["report"]
    if "search" in rep:
        return rep["search"]["chosen"]
    if "hidden" in rep:
        h = rep["hidden"]["hidden_size"]
        return f"hidden {h['before']} → {h['after']}"
    if "attention" in rep:
        a = rep["attention"]
        return (f"heads {a['num_attention_heads']['before']} → {a['num_attention_heads']['after']}, KV "
                f"{a['num_key_value_heads']['before']} → {a['num_key_value_heads']['after']}")
    if "depth" in rep:
        layers = rep["depth"]["removed_layers"]
        return f"layers {layers[0]}–{layers[-1]}"
    o = rep["osscar"]["intermediate_size"]
    return f"MLP {o['before']} → {o['after']}"


def markdown(result: dict) -> str:
    dense = result.get("dense")
    res = result["results"]
    lines = []
    if dense:
        lines += [f"Dense: PPL {dense['ppl']:.2f}, {dense['params'] / 1e6:.1f} M parameters, prefill "
                  f"{dense['speed']['prefill_tok_s']:.0f} tok/s, decode {dense['speed']['decode_tok_s']:.1f} tok/s.", ""]
    budgets = sorted({float(k.split("@")[1]) for k in res if "/" not in k})
    if budgets:
        lines += ["### B. To a share of all parameters: the search vs each single target", "",
                  "| budget | run | removed | params | WikiText-2 PPL | prefill tok/s (×) | decode tok/s (×) | prune s |",
                  "|---|---|---|---:|---:|---:|---:|---:|"]
        for p in budgets:
            for name in ("search", "mlp", "hidden", "depth", "attention"):
                r = res.get(f"{name}@{p:g}")
                if r is None:
                    continue
                if "error" in r:
                    lines.append(f"| −{100 * p:.0f} % | {name} only | not expressible: {r['error']} | | | | | |")
                    continue
                s, ds = r["speed"], r["dense_speed"]
                label = "**search**" if name == "search" else f"{name} only"
                lines.append(f"| −{100 * p:.0f} % | {label} | {_what(r)} | {r['params'] / 1e6:.2f} M "
                             f"(−{_pct(r['removed_share'])}) | {r['ppl']:.2f} | {s['prefill_tok_s']:.0f} "
                             f"(×{s['prefill_tok_s'] / ds['prefill_tok_s']:.2f}) | {s['decode_tok_s']:.1f} "
                             f"(×{s['decode_tok_s'] / ds['decode_tok_s']:.2f}) | {r['prune_s']:.0f} |")
        lines.append("")
        for p in budgets:
            r = res.get(f"search@{p:g}")
            if r and "error" not in r:
                s = r["report"]["search"]
                t = s["timings"]
                finals = "; ".join(f"{f['allocation']}: fast {f['kl_fast']:.4f}, full {f['kl_final']:.4f}"
                                   for f in s.get("finals", []))
                lines.append(f"- search −{100 * p:.0f} %: {s['chosen']}; {s['allocations_in_budget']} allocations in "
                             f"the budget, {t['builds_scored']} fast builds scored on {s['holdout_windows']} held-out "
                             f"windows; finals (held-out KL) {finals or s['kl']}; "
                             f"search {t['total_s'] - t['final_s']:.0f} s + final pruning {t['final_s']:.0f} s.")
    targets = [k for k in res if "/" in k]
    if targets:
        lines += ["", "### A. Each target at a share of its own parameters: OSSCAR vs its score-only baseline", "",
                  "| target | kept | removed (all params) | OSSCAR PPL | baseline PPL | score + re-fit PPL | "
                  "OSSCAR prune s |", "|---|---|---:|---:|---:|---:|---:|"]
        keys = sorted({(k.split("/")[0], k.split("@")[1]) for k in targets}, key=lambda x: (x[0], float(x[1])))
        for target, level in keys:
            o, b, sr = (res.get(f"{target}/{v}@{level}") for v in ("osscar", "baseline", "score+refit"))
            ref = next((r for r in (o, b, sr) if r and "error" not in r), None)
            lines.append(f"| {target} | {_what(ref) if ref else ''} | "
                         f"{'−' + _pct(ref['removed_share']) if ref else ''} | {_cell(o)} | {_cell(b)} | "
                         f"{_cell(sr) if sr else ''} | {o['prune_s']:.0f} |" if o and "error" not in o else
                         f"| {target} | | | {_cell(o)} | {_cell(b)} | | |")
    c = result["config"]
    lines += ["", f"{c['model']}, calibration {c['nsamples']}×{c['seqlen']} C4 seed {c['seed']} (search: the last "
              f"{c['holdout']} held out), WikiText-2 test {c['ppl_seqlen']}-token windows (first {c['max_windows']}), "
              f"speed: {c['prompt_len']}-token prompt + {c['new_tokens']} decoded tokens, batch 1, {result['device']}."]
    return "\n".join(lines)


def _compact(report: dict) -> dict:
    """The report without the bulky per-layer lists of the search's steps and the similarity."""
    out = {k: v for k, v in report.items() if k not in ("options",)}
    for key in ("hidden", "attention", "osscar"):
        if key in out:
            out[key] = {k: v for k, v in out[key].items() if k != "layers"} | {
                "layers": [{k: v for k, v in e.items() if k in ("index", "removed", "removed_heads", "removed_kv_heads",
                                                                  "recon_error")} for e in out[key].get("layers", [])]}
    if "depth" in out:
        out["depth"] = {k: v for k, v in out["depth"].items() if k != "similarity"}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dense_model, tok = llmprune.load_model(args.model, device="cpu", dtype="float32")
    # the search's held-out windows come after the nsamples (same seed): every run calibrates on the same ones
    ids = calibration_ids(tok, args.nsamples + args.holdout, args.seqlen, args.seed)
    test_ids = eval_token_stream(load_corpus("wikitext2", "test"), tok, args.ppl_seqlen)
    result: dict = {"config": vars(args), "device": f"cpu ({torch.get_num_threads()} threads)",
                    "versions": versions(), "results": {}}
    out = Path(args.out)
    resume_results(out, result, PROTOCOL_KEYS, args.fresh)

    def save() -> None:
        save_results(out, result, markdown)

    def speed(model) -> dict:
        return measure_speed(model, args.prompt_len, args.new_tokens)

    def ppl(model) -> float:
        return perplexity(model, test_ids, args.ppl_seqlen, args.max_windows, progress=False)["ppl"]

    if not result.get("dense"):
        result["dense"] = {"ppl": ppl(dense_model), "params": count_params(dense_model), "speed": speed(dense_model)}
        print(f"dense: PPL {result['dense']['ppl']:.3f}", flush=True)
        save()
    dense_params = result["dense"]["params"]
    only = [s for s in args.only.split(",") if s]
    for table, name, opts in runs(args):
        if name in result["results"] or (only and not any(s in name for s in only)):
            continue
        model = copy.deepcopy(dense_model)
        t0 = time.perf_counter()
        try:
            run_ids = ids if opts["method"] == "search" else ids[: args.nsamples]
            rep = structured(model, tok, dict(nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, **opts),
                             ids=run_ids, progress=False).report
        except LLMPruneError as e:  # a budget a single target cannot express: a row that says so
            result["results"][name] = {"table": table, "options": opts, "error": str(e)}
            print(f"{name:<28} not expressible: {e}", flush=True)
            save()
            continue
        prune_s = time.perf_counter() - t0
        r = {"table": table, "options": opts, "ppl": ppl(model), "params": count_params(model), "prune_s": prune_s,
             "dense_speed": speed(dense_model), "speed": speed(model), "report": _compact(rep)}
        r["removed_share"] = 1 - r["params"] / dense_params
        result["results"][name] = r
        print(f"{name:<28} PPL {r['ppl']:9.3f}  params −{_pct(r['removed_share'])}  decode "
              f"{r['speed']['decode_tok_s']:.1f} tok/s (dense {r['dense_speed']['decode_tok_s']:.1f})  prune "
              f"{prune_s:.0f}s  {_what(r)}", flush=True)
        if args.save_models:
            save_pruned(model, tok, Path(args.save_models) / name.replace("/", "_").replace("@", "_"), rep)
        save()
        del model
    save()
    print()
    print(markdown(result))
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
