"""Structured pruning benchmark (issue #11): OSSCAR MLP-width pruning and depth pruning of the
bundled SmolLM2-135M on CPU.

Protocol (defaults, as the other benchmarks): calibration 32 windows x 1024 C4-train tokens,
seed 0, drawn once and cached in bench/out/ (safetensors); WikiText-2 test perplexity with
1024-token windows, the first 40. Every run starts from a fresh copy of the dense model.

- OSSCAR at 10/20/30 % of MLP channels (width rounded to 64), eight variants: the baseline
  (channel score ‖W‖·‖X‖, no re-fit), greedy only, greedy + re-fit (what AMD Quark
  implements), greedy + local search, the full OSSCAR (greedy + local search + re-fit), the
  full OSSCAR fitted to the dense model's outputs (``dense_target``), the channel score +
  re-fit, and the full OSSCAR on the plain XᵀX (``shrink=0``, the paper's objective; every
  other variant uses the default shrink toward the diagonal, docs/structured.md).
- Depth k ∈ {2, 4, 6}: every window scored by calibration PPL (on ``--depth-nsamples`` rows),
  cosine and angular distance; the block each score chooses vs removing the last k layers.
- Every model: parameters, WikiText-2 PPL, CPU prefill and decode tokens/s (greedy decode with
  the KV cache, measured in this process like the dense model's).
- ``--quark``: AMD Quark's own OSSCAR (``bench/quark_run.py`` in its venv ``.venv-quark``, see
  its docstring) at each ratio on the very same calibration windows; its saved model is measured
  here like ours. Quark keeps a multiple of 128 channels, so its widths may differ from ours:
  compare the relative PPL rise per share of parameters removed.

Results merge into ``bench/out/structured.json`` after every run (keyed by their settings), so
an interrupted invocation keeps what it did and a re-run only does what is missing; the
Markdown tables (``bench/out/structured.md``, also printed) are built from everything there
that matches the protocol. Full protocol (about two hours on 2 CPU cores)::

    LLMPRUNE_DATA_DIR=/work/shared/data PYTHONPATH=src python bench/structured.py

Smoke test::

    ... python bench/structured.py --nsamples 2 --seqlen 128 --max-windows 2 --ratios 0.2 \\
        --variants baseline,osscar --depth-k 2 --depth-nsamples 2 --out bench/out/structured-smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import llmprune  # noqa: E402
from llmprune.data.sources import load_corpus  # noqa: E402
from llmprune.data.tokens import eval_token_stream  # noqa: E402
from llmprune.eval.perplexity import perplexity  # noqa: E402
from llmprune.jobs.header import versions  # noqa: E402
from llmprune.models.layers import decoder_layers  # noqa: E402
from llmprune.structured import structured  # noqa: E402
from llmprune.structured.api import count_params  # noqa: E402
from llmprune.structured.depth import rank_agreement  # noqa: E402
from llmprune.structured.shrink import drop_layers  # noqa: E402
from llmprune.structured.speed import measure_speed  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, calibration_ids, resume_results, save_results  # noqa: E402

QUARK_PY = OUT.parent.parent / ".venv-quark" / "bin" / "python"
# name → (options, label)
VARIANTS = {
    "baseline": (dict(greedy=False, local_search=False, refit=False), "channel score ‖W‖·‖X‖, no re-fit"),
    "greedy": (dict(greedy=True, local_search=False, refit=False), "greedy"),
    "greedy+refit": (dict(greedy=True, local_search=False, refit=True), "greedy + re-fit (the steps Quark implements)"),
    "greedy+ls": (dict(greedy=True, local_search=True, refit=False), "greedy + local search"),
    "osscar": (dict(greedy=True, local_search=True, refit=True), "OSSCAR: greedy + local search + re-fit"),
    "osscar-dense": (dict(greedy=True, local_search=True, refit=True, dense_target=True),
                     "OSSCAR fitted to the dense model's outputs"),
    "score+refit": (dict(greedy=False, local_search=False, refit=True), "channel score + re-fit"),
    "osscar-plain": (dict(greedy=True, local_search=True, refit=True, shrink=0.0),
                     "OSSCAR on the plain XᵀX (no shrink, as the paper)"),
}
RATIOS = "0.1,0.2,0.3"
DEPTH_K = "2,4,6"
PROTOCOL_KEYS = ("model", "nsamples", "seqlen", "seed", "ppl_seqlen", "max_windows", "round_to",
                 "depth_nsamples", "prompt_len", "new_tokens")
# AMD Quark's Llama-2-7b OSSCAR row: WikiText-2 PPL 5.47 → 6.25 at 6.72 % of parameters removed.
QUARK_RISE_PER_SHARE = (6.25 / 5.47 - 1) / 0.0672


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratios", default=RATIOS, help="OSSCAR shares of MLP channels (comma-separated)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--depth-k", default=DEPTH_K, help="depth: layers removed (comma-separated; '' skips)")
    p.add_argument("--depth-nsamples", type=int, default=8,
                   help="calibration rows for the ppl window score (one PPL per window)")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--round-to", type=int, default=64)
    p.add_argument("--ppl-seqlen", type=int, default=1024)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--prompt-len", type=int, default=128, help="speed: prompt tokens")
    p.add_argument("--new-tokens", type=int, default=64, help="speed: decoded tokens")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quark", action="store_true", help="also run AMD Quark's OSSCAR at each ratio (needs "
                   f"{QUARK_PY.relative_to(OUT.parent.parent)}, see bench/quark_run.py)")
    p.add_argument("--fresh", action="store_true", help="forget earlier results")
    p.add_argument("--out", default=str(OUT / "structured"), help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {','.join(VARIANTS)}")
    if args.depth_nsamples > args.nsamples:
        p.error("--depth-nsamples must be at most --nsamples")
    return args


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _speedup(run: dict, key: str, speed: dict | None = None) -> float:
    """Pruned / dense tokens per second, the dense one measured right before the run."""
    return (speed or run["speed"])[key] / run["dense_speed"][key]


def markdown(result: dict) -> str:
    dense = result.get("dense")
    lines = []
    if dense:
        lines += [f"Dense: PPL {dense['ppl']:.2f}, {dense['params'] / 1e6:.1f} M parameters, prefill "
                  f"{dense['speed']['prefill_tok_s']:.0f} tok/s, decode {dense['speed']['decode_tok_s']:.1f} tok/s.", ""]
    os_runs = result["results"].get("osscar", {})
    ratios = sorted({r["ratio"] for r in os_runs.values()})
    if os_runs:
        lines += ["### OSSCAR (MLP channels)", "",
                  "| variant | " + " | ".join(f"{_pct(r)} of channels" for r in ratios) + " |",
                  "|---|" + "---|" * len(ratios)]
        for v, (_, label) in VARIANTS.items():
            cells = []
            for ratio in ratios:
                r = os_runs.get(f"{v}@{ratio:g}")
                if r is None:
                    cells.append("-")
                    continue
                cell = f"{r['ppl']:.2f} (−{_pct(r['removed_share'])} params, err {r['recon_error']:.4f}"
                if dense:
                    cell += f", decode ×{_speedup(r, 'decode_tok_s'):.2f}"
                    cell += f", rise/share {(r['ppl'] / dense['ppl'] - 1) / r['removed_share']:.2f}"
                cells.append(cell + ")")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        quark = result["results"].get("quark", {})
        if quark:
            cells = []
            for ratio in ratios:
                q = quark.get(f"{ratio:g}")
                cells.append("-" if q is None else
                             f"{q['ppl']:.2f} (width {q['width']}, −{_pct(q['removed_share'])} params"
                             + (f", decode ×{_speedup(q, 'decode_tok_s'):.2f}, rise/share "
                                f"{(q['ppl'] / dense['ppl'] - 1) / q['removed_share']:.2f}" if dense else "") + ")")
            lines.append(f"| AMD Quark {next(iter(quark.values()))['quark_version']} OSSCAR, its own run | "
                         + " | ".join(cells) + " |")
        lines += ["", "Cell: WikiText-2 PPL (share of all parameters removed, mean per-layer reconstruction "
                  "error ‖XW − X_SŴ_S‖²/‖XW‖², CPU decode speed-up over dense, relative PPL rise per share "
                  f"of parameters removed; Quark's Llama-2-7b row: {QUARK_RISE_PER_SHARE:.2f})."]
        speed_rows = [(k, r) for k, r in os_runs.items() if k.startswith("osscar@")]
        if speed_rows and dense:
            lines += ["", "| model | params | prefill tok/s (dense) | decode tok/s (dense) | prefill × | decode × |",
                      "|---|---|---|---|---|---|"]
            for k, r in sorted(speed_rows):
                s, d = r["speed"], r["dense_speed"]
                lines.append(f"| {k} | {r['params'] / 1e6:.1f} M | {s['prefill_tok_s']:.0f} "
                             f"({d['prefill_tok_s']:.0f}) | {s['decode_tok_s']:.1f} ({d['decode_tok_s']:.1f}) | "
                             f"{_speedup(r, 'prefill_tok_s'):.2f} | {_speedup(r, 'decode_tok_s'):.2f} |")
    depth = result["results"].get("depth", {})
    if depth:
        lines += ["", "### Depth (k consecutive layers)", "",
                  "| k | by ppl | by cosine | by angular | last k | rank agreement (Spearman) |",
                  "|---|---|---|---|---|---|"]
        for key in sorted(depth, key=lambda s: int(s[1:])):
            d = depth[key]
            cells = []
            for by in ("ppl", "cosine", "angular", "last"):
                start = d["blocks"].get(by)
                cells.append("-" if start is None else
                             f"{d['ppl'][str(start)]:.2f} (layers {start}–{start + d['k'] - 1})")
            agree = ", ".join(f"{a} {v:.2f}" for a, v in d["rank_agreement"].items() if v is not None)
            lines.append(f"| {d['k']} | " + " | ".join(cells) + f" | {agree} |")
        lines += ["", "Cell: WikiText-2 PPL without the block each score chooses (which layers)."]
        for key in sorted(depth, key=lambda s: int(s[1:])):
            d = depth[key]
            if d.get("speed"):
                start = str(d["blocks"]["ppl"])
                s, ds = d["speed"][start], d["dense_speed"][start]
                lines.append(f"k={d['k']}: {d['params'] / 1e6:.1f} M params, prefill "
                             f"{s['prefill_tok_s']:.0f} tok/s (×{s['prefill_tok_s'] / ds['prefill_tok_s']:.2f}), "
                             f"decode {s['decode_tok_s']:.1f} tok/s (×{s['decode_tok_s'] / ds['decode_tok_s']:.2f}).")
    c = result["config"]
    lines += ["", f"{c['model']}, calibration {c['nsamples']}×{c['seqlen']} C4 seed {c['seed']} "
              f"(ppl window score on the first {c['depth_nsamples']} rows), WikiText-2 test "
              f"{c['ppl_seqlen']}-token windows (first {c['max_windows']}), width multiple "
              f"{c['round_to']}, speed: {c['prompt_len']}-token prompt + {c['new_tokens']} decoded "
              f"tokens, batch 1, {result['device']}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    dense_model, tok = llmprune.load_model(args.model, device="cpu", dtype="float32")
    load_s = time.perf_counter() - t0
    ids = calibration_ids(tok, args.nsamples, args.seqlen, args.seed)
    test_ids = eval_token_stream(load_corpus("wikitext2", "test"), tok, args.ppl_seqlen)
    result: dict = {
        "config": vars(args), "device": f"cpu ({torch.get_num_threads()} threads)",
        "versions": versions(),
        "load_s": load_s, "results": {},
    }
    out = Path(args.out)
    resume_results(out, result, PROTOCOL_KEYS, args.fresh)

    def save() -> None:
        save_results(out, result, markdown)

    def speed(model) -> dict:
        return measure_speed(model, args.prompt_len, args.new_tokens)

    def measure(model) -> dict:
        """PPL, parameters and speed; the dense model's speed is measured again right before,
        so a speed-up compares two measurements under the same machine load."""
        return {"ppl": perplexity(model, test_ids, args.ppl_seqlen, args.max_windows, progress=False)["ppl"],
                "params": count_params(model), "dense_speed": speed(dense_model), "speed": speed(model)}

    if "dense" not in result:
        result["dense"] = {"ppl": perplexity(dense_model, test_ids, args.ppl_seqlen, args.max_windows,
                                             progress=False)["ppl"],
                           "params": count_params(dense_model), "speed": speed(dense_model)}
        print(f"dense: PPL {result['dense']['ppl']:.3f}", flush=True)
        save()
    dense_params = result["dense"]["params"]

    os_runs = result["results"].setdefault("osscar", {})
    for ratio in [float(r) for r in args.ratios.split(",") if r.strip()]:
        for v in args.variants.split(","):
            key = f"{v}@{ratio:g}"
            if key in os_runs:
                continue
            model = copy.deepcopy(dense_model)
            t0 = time.perf_counter()
            rep = structured(model, tok, dict(ratio=ratio, round_to=args.round_to, nsamples=args.nsamples,
                                              seqlen=args.seqlen, seed=args.seed, **VARIANTS[v][0]),
                             ids=ids, progress=False).report
            prune_s = time.perf_counter() - t0
            m = measure(model)
            layers = rep["osscar"]["layers"]
            os_runs[key] = {"variant": v, "ratio": ratio, **m, "prune_s": prune_s,
                            "removed_share": 1 - m["params"] / dense_params,
                            "width": rep["osscar"]["intermediate_size"]["after"],
                            "recon_error": rep["osscar"]["mean_recon_error"],
                            "swaps": [e["swaps"] for e in layers],
                            "recon_errors": [e["recon_error"] for e in layers]}
            print(f"{key:<20} PPL {m['ppl']:9.3f}  params −{_pct(os_runs[key]['removed_share'])}  "
                  f"err {os_runs[key]['recon_error']:.4f}  decode {m['speed']['decode_tok_s']:.1f} tok/s  "
                  f"prune {prune_s:.0f}s", flush=True)
            save()
            del model

    if args.quark:
        run_quark(args, ids, result, measure, save)

    depth = result["results"].setdefault("depth", {})
    for k in [int(x) for x in args.depth_k.split(",") if x.strip()]:
        key = f"k{k}"
        if key in depth:
            continue
        model = copy.deepcopy(dense_model)
        n_layers = len(decoder_layers(model))
        t0 = time.perf_counter()
        # ppl window search on the first depth_nsamples rows; the cheap scores on all of them
        few = ids[: args.depth_nsamples]
        rep = structured(model, tok, dict(method="depth", layers=k, score="ppl", compare_scores=True,
                                          nsamples=few.shape[0], seqlen=args.seqlen), ids=few,
                         progress=False).report["depth"]
        cheap = structured(copy.deepcopy(dense_model), tok, dict(method="depth", layers=k, score="cosine",
                                                                 nsamples=args.nsamples, seqlen=args.seqlen),
                           ids=ids, progress=False).report["depth"]
        score_s = time.perf_counter() - t0
        scores = {"ppl": rep["window_scores"]["ppl"], "cosine": cheap["window_scores"]["cosine"],
                  "angular": cheap["window_scores"]["angular"]}
        blocks = {"ppl": rep["chosen_by_each"]["ppl"], "cosine": cheap["chosen_by_each"]["cosine"],
                  "angular": cheap["chosen_by_each"]["angular"], "last": n_layers - k}
        d = {"k": k, "window_scores": scores, "blocks": blocks, "score_s": score_s,
             "rank_agreement": rank_agreement(scores), "ppl": {}, "speed": {}}
        for start in sorted(set(blocks.values())):
            m_k = copy.deepcopy(dense_model)
            drop_layers(m_k, range(start, start + k))
            m = measure(m_k)
            d["ppl"][str(start)] = m["ppl"]
            d["speed"][str(start)] = m["speed"]
            d.setdefault("dense_speed", {})[str(start)] = m["dense_speed"]
            d["params"] = m["params"]
            print(f"depth k={k} layers {start}–{start + k - 1}: PPL {m['ppl']:.3f}  decode "
                  f"{m['speed']['decode_tok_s']:.1f} tok/s", flush=True)
            del m_k
        depth[key] = d
        save()
        del model
    save()
    print()
    print(markdown(result))
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


def run_quark(args: argparse.Namespace, ids: torch.Tensor, result: dict, measure, save) -> None:
    """AMD Quark's OSSCAR at each ratio on ``ids``, in its own venv; its model measured here."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from llmprune.models.loading import model_source

    if not QUARK_PY.is_file():
        raise SystemExit(f"--quark needs {QUARK_PY}: set it up as bench/quark_run.py says")
    quark = result["results"].setdefault("quark", {})
    calib = OUT / f"calib_c4_{args.nsamples}x{args.seqlen}_seed{args.seed}.npy"
    if not calib.is_file():
        np.save(calib, ids.numpy().astype("int64"))
    for ratio in [float(r) for r in args.ratios.split(",") if r.strip()]:
        key = f"{ratio:g}"
        if key in quark:
            continue
        with tempfile.TemporaryDirectory(prefix="quark-", dir=OUT) as tmp:
            res_json = Path(tmp) / "result.json"
            cmd = [str(QUARK_PY), str(Path(__file__).with_name("quark_run.py")), "--model-dir",
                   str(model_source(args.model)), "--calib-ids", str(calib), "--ratio", str(ratio),
                   "--out", str(Path(tmp) / "model"), "--json", str(res_json),
                   "--threads", str(torch.get_num_threads())]
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            run = json.loads(res_json.read_text())
            model = AutoModelForCausalLM.from_pretrained(Path(tmp) / "model", dtype=torch.float32).eval()
        m = measure(model)
        quark[key] = {**run, **m, "width": run["intermediate_size"],
                      "removed_share": 1 - m["params"] / result["dense"]["params"]}
        print(f"quark@{key:<14} PPL {m['ppl']:9.3f}  params −{_pct(quark[key]['removed_share'])}  width "
              f"{run['intermediate_size']}  prune {run['prune_seconds']:.0f}s", flush=True)
        save()
        del model


if __name__ == "__main__":
    sys.exit(main())
