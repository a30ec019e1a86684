"""MoE expert removal benchmark (issue #23): REAP against the frequency and random baselines on
small *trained* mixture-of-experts models, and what the router's softmax over the kept experts
does (no real MoE checkpoint is reachable offline, so the models are trained here).

Protocol (defaults):
- Two tiny MoE models of standard families, trained from scratch on the first 800 C4-train
  documents with a byte-level BPE of 2048 tokens trained on the same documents (tied embeddings,
  4 layers, hidden 128, 8 routed experts of width 256, top-2, the family's load-balancing loss
  at 0.01; AdamW 3e-3 one-cycle, ``--steps`` of 16 x 128 tokens, seed 0), saved once under
  ``bench/out/experts/``:
  ``mixtral`` (top-2 renormalised) and ``qwen2_moe`` (``norm_topk_prob=False``, a shared expert).
- Calibration: 32 C4-train windows x 256 tokens, seed 0 (the same for every criterion).
- Expert removal at 25 % and 50 % of the experts of every layer by ``reap``, ``output`` (the
  greedy block-output criterion), ``frequency`` and ``random`` (seeds 0-4: mean ± std).
- Measured: the calibration loss (mean KL of the pruned model's next-token distribution to the
  dense one, on the calibration windows), WikiText-2 test perplexity (first 40 windows of 256
  tokens) and C4-validation perplexity (first 40 windows of 256 tokens).
- The router change: for ``qwen2_moe`` (no top-k renormalisation) the REAP-pruned model is also
  evaluated with the removed experts' probability *not* redistributed (softmax over all experts,
  removed ones dropped) - a model transformers cannot express - to measure what the standard
  config's softmax over the kept experts costs or gains. For ``mixtral`` the two are identical.

Writes ``bench/out/experts.json`` and ``.md`` and prints the table::

    LLMPRUNE_DATA_DIR=/work/shared/data PYTHONPATH=src python bench/experts.py

Smoke test::

    ... python bench/experts.py --steps 20 --families mixtral --ratios 0.5 --seeds 1 --max-windows 2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from llmprune.data.calibration import calibration_windows  # noqa: E402
from llmprune.data.sources import load_corpus  # noqa: E402
from llmprune.data.tokens import eval_token_stream  # noqa: E402
from llmprune.eval.perplexity import perplexity  # noqa: E402
from llmprune.models.adapter import decoder_layers  # noqa: E402
from llmprune.structured import structured  # noqa: E402
from llmprune.structured.api import count_params  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
BASE = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, tie_word_embeddings=True, output_router_logits=True,
            router_aux_loss_coef=0.01, num_experts_per_tok=2)
FAMILIES = {
    "mixtral": dict(num_local_experts=8, intermediate_size=256),
    "qwen2_moe": dict(num_experts=8, moe_intermediate_size=256, shared_expert_intermediate_size=256,
                      intermediate_size=256, norm_topk_prob=False),
}


def tokenizer(out: Path, vocab: int = 2048):
    """A byte-level BPE trained on the training documents (a small vocabulary keeps the LM head,
    which dominates a tiny model's cost, cheap); saved once."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    d = out / f"bpe{vocab}"
    if (d / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(d)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(train_docs(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(d)
    return fast


def train_docs() -> list[str]:
    return load_corpus("c4", "train").pieces[:800]


def train(family: str, tok, steps: int, seed: int, out: Path) -> Path:
    """Train a tiny MoE of ``family`` from scratch on C4-train; saved once, reused after."""
    d = out / f"{family}-{steps}steps-seed{seed}"
    if (d / "config.json").is_file():
        return d
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                  **BASE, **FAMILIES[family])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    ids = tok("\n\n".join(train_docs()), return_tensors="pt").input_ids[0]
    seqlen, batch = 128, 16
    n = ids.numel() // seqlen
    windows = ids[: n * seqlen].reshape(n, seqlen)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=max(0.05, 2 / steps))
    g = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.time()
    for step in range(steps):
        rows = windows[torch.randint(0, n, (batch,), generator=g)]
        out_ = model(rows, labels=rows)
        out_.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            print(f"  {family} step {step}: loss {out_.loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    model.config.output_router_logits = False
    tmp = d.with_name(d.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, d)
    return d


@torch.no_grad()
def kl_to_dense(dense_logits: list[torch.Tensor], model, ids: torch.Tensor, batch: int = 8) -> float:
    """Mean per-token KL(dense ‖ model) on the calibration windows."""
    total, tokens = 0.0, 0
    for j, p in zip(range(0, ids.shape[0], batch), dense_logits, strict=True):
        q = F.log_softmax(model(ids[j : j + batch]).logits.float(), -1)
        total += float(F.kl_div(q, p, log_target=True, reduction="sum"))
        tokens += q.shape[0] * q.shape[1]
    return total / tokens


def evaluate(model, ids, dense_logits, evals, seqlen, windows) -> dict:
    r = {"calib_kl": kl_to_dense(dense_logits, model, ids)}
    for name, stream in evals.items():
        r[f"ppl_{name}"] = perplexity(model, stream, seqlen, max_windows=windows, progress=False)["ppl"]
    return r


def keep_dense_denominator(model, kept_per_layer: list[list[int]]) -> None:
    """Qwen2-MoE routers that drop the removed experts *without* redistributing their
    probability (softmax over all experts, removed ones masked out, no renormalisation)."""
    for layer, kept in zip(decoder_layers(model), kept_per_layer, strict=True):
        router = layer.mlp.gate
        removed = sorted(set(range(router.weight.shape[0])) - set(kept))

        def forward(h, router=router, removed=removed):
            logits = F.linear(h.reshape(-1, router.hidden_dim), router.weight)
            probs = torch.softmax(logits, dtype=torch.float, dim=-1)
            probs[:, removed] = 0.0
            top, idx = torch.topk(probs, router.top_k, dim=-1)
            return logits, top.to(logits.dtype), idx

        router.forward = forward


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1)) ** 0.5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--ratios", default="0.25,0.5")
    p.add_argument("--seeds", type=int, default=5, help="random-removal seeds")
    p.add_argument("--steps", type=int, default=600, help="training steps of the tiny MoE models")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(OUT / "experts"), help="writes OUT.json and OUT.md; models in OUT/")
    p.add_argument("--inside", type=float, default=None, metavar="R",
                   help="instead of the table: at (about) the parameters of removing 50%% of the experts, REAP 50%% "
                        "against REAP 25%% + OSSCAR removing R of every kept expert's channels (and its score-only "
                        "baseline); writes OUT-inside.json / .md")
    p.add_argument("--round-to", type=int, default=32, help="--inside: expert widths are multiples of this")
    return p.parse_args(argv)


def inside_rows(args, base, calib, dense_logits, evals) -> dict:
    """REAP 50 % against REAP 25 % + OSSCAR inside the kept experts, at (about) equal parameters."""
    rows = {"reap 50%": dict(ratio=0.5),
            f"reap 25% + OSSCAR {args.inside:.1%} inside": dict(ratio=0.25, expert_mlp_ratio=args.inside),
            f"reap 25% + score-only {args.inside:.1%} inside": dict(ratio=0.25, expert_mlp_ratio=args.inside,
                                                                    greedy=False, local_search=False, refit=False)}
    out = {}
    for name, kw in rows.items():
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        rep = structured(model, ids=calib, method="experts", nsamples=args.nsamples, seqlen=args.seqlen,
                         round_to=args.round_to, progress=False, **kw).report
        r = evaluate(model, calib, dense_logits, evals, args.seqlen, args.max_windows)
        inside = rep["experts"].get("expert_mlp")
        r.update(prune_s=time.perf_counter() - t0, params=rep["params"]["after"],
                 removed_share=rep["params"]["removed_share"], output_error=rep["experts"]["mean_output_error"],
                 width=inside["width"]["after"] if inside else None,
                 inside_recon_error=inside["mean_recon_error"] if inside else None)
        out[name] = r
        print(f"  {name}: {r}", flush=True)
    return out


def inside_markdown(results: dict) -> str:
    c = results["config"]
    lines = [f"OSSCAR inside the kept experts, tiny trained MoE models ({c['steps']} steps), calibration "
             f"{c['nsamples']} x {c['seqlen']} C4 tokens; PPL on the first {c['max_windows']} windows of "
             f"{c['seqlen']} tokens.", "",
             "| model | rows | params | removed | expert width | inside error | calib KL | WikiText-2 PPL | C4 PPL "
             "| prune s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for family, res in results["models"].items():
        d = res["dense"]
        lines.append(f"| {family} | dense | {res['params'] / 1e6:.3f} M | 0 | | | 0 | {d['ppl_wikitext2']:.2f} | "
                     f"{d['ppl_c4']:.2f} | |")
        for name, r in res["inside"].items():
            err = f"{r['inside_recon_error']:.4f}" if r["inside_recon_error"] is not None else ""
            lines.append(f"| {family} | {name} | {r['params'] / 1e6:.3f} M | {r['removed_share']:.1%} | "
                         f"{r['width'] or ''} | {err} | {r['calib_kl']:.4f} | {r['ppl_wikitext2']:.2f} | "
                         f"{r['ppl_c4']:.2f} | {r['prune_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer(out)
    calib = calibration_windows(load_corpus("c4", "train"), tok, args.nsamples, args.seqlen, 0)
    evals = {"wikitext2": eval_token_stream(load_corpus("wikitext2", "test"), tok, args.seqlen),
             "c4": eval_token_stream(load_corpus("c4", "validation"), tok, args.seqlen)}
    ratios = [float(r) for r in args.ratios.split(",")]
    stem = f"{out}-inside" if args.inside is not None else str(out)
    results = {"config": {**vars(args), "date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.machine(),
                          "load_start": os.getloadavg()[0], "torch": torch.__version__}, "models": {}}
    for family in args.families.split(","):
        d = train(family, tok, args.steps, 0, out)
        base = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        with torch.no_grad():
            dense_logits = [F.log_softmax(base(calib[j : j + 8]).logits.float(), -1)
                            for j in range(0, calib.shape[0], 8)]
        res = {"dir": str(d), "params": count_params(base), "dense": evaluate(base, calib, dense_logits, evals,
                                                                              args.seqlen, args.max_windows)}
        print(f"{family}: dense {res['dense']}", flush=True)
        if args.inside is not None:
            res["inside"] = inside_rows(args, base, calib, dense_logits, evals)
            results["models"][family] = res
            continue
        for ratio in ratios:
            cell = {}
            runs = [("reap", 0), ("output", 0), ("frequency", 0)] + [("random", s) for s in range(args.seeds)]
            for score, seed in runs:
                model = copy.deepcopy(base)
                t0 = time.perf_counter()
                rep = structured(model, ids=calib, method="experts", ratio=ratio, expert_score=score, seed=seed,
                                 nsamples=args.nsamples, seqlen=args.seqlen, progress=False).report
                r = evaluate(model, calib, dense_logits, evals, args.seqlen, args.max_windows)
                r.update(prune_s=time.perf_counter() - t0, params=rep["params"]["after"],
                         rerouted_share=rep["experts"]["mean_rerouted_share"],
                         output_error=rep["experts"]["mean_output_error"],
                         routed_weight_kept=rep["experts"]["mean_routed_weight_kept"])
                cell.setdefault(score, []).append(r)
                if score == "reap" and family == "qwen2_moe":
                    alt = copy.deepcopy(base)
                    keep_dense_denominator(alt, [e["kept"] for e in rep["experts"]["layers"]])
                    cell["reap_dense_denominator"] = [evaluate(alt, calib, dense_logits, evals, args.seqlen,
                                                               args.max_windows)]
                print(f"{family} {ratio:g} {score} {seed}: {r}", flush=True)
            res[f"{ratio:g}"] = cell
        results["models"][family] = res
        Path(f"{stem}.json").write_text(json.dumps(results, indent=1))
    results["config"]["load_end"] = os.getloadavg()[0]
    table = inside_markdown(results) if args.inside is not None else markdown(results)
    Path(f"{stem}.json").write_text(json.dumps(results, indent=1))
    Path(f"{stem}.md").write_text(table + "\n")
    print(table)


def markdown(results: dict) -> str:
    c = results["config"]
    lines = [f"Expert removal on tiny trained MoE models ({c['steps']} steps), calibration {c['nsamples']} x "
             f"{c['seqlen']} C4 tokens; PPL on the first {c['max_windows']} windows of {c['seqlen']} tokens; random: "
             f"mean ± std over {c['seeds']} seeds.", "",
             "| model | removed | criterion | block output error | calib KL | WikiText-2 PPL | C4 PPL | re-routed tokens "
             "| routed weight kept |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]

    def fmt(rs, key, digits):
        m, s = mean_std([r[key] for r in rs])
        return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if len(rs) > 1 else "")

    for family, res in results["models"].items():
        d = res["dense"]
        lines.append(f"| {family} ({res['params'] / 1e6:.2f} M) | 0 | dense | 0 | 0 | {d['ppl_wikitext2']:.2f} | "
                     f"{d['ppl_c4']:.2f} | | |")
        for ratio in [k for k in res if k not in ("dir", "params", "dense")]:
            for score, rs in res[ratio].items():
                reroute = fmt(rs, "rerouted_share", 3) if "rerouted_share" in rs[0] else ""
                kept = fmt(rs, "routed_weight_kept", 3) if "routed_weight_kept" in rs[0] else ""
                err = fmt(rs, "output_error", 4) if "output_error" in rs[0] else ""
                label = "reap, removed mass not redistributed" if score == "reap_dense_denominator" else score
                lines.append(f"| {family} | {float(ratio):.0%} | {label} | {err} | {fmt(rs, 'calib_kl', 4)} | "
                             f"{fmt(rs, 'ppl_wikitext2', 2)} | {fmt(rs, 'ppl_c4', 2)} | {reroute} | {kept} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
