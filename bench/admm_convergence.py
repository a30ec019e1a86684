"""Convergence of the weight update on one layer (the paper's Figure 1): relative reconstruction
error ‖WX − ŴX‖²/‖WX‖² versus iterations for ADMM and for Adam (masked gradient, a few learning
rates), with the SparseGPT update and the exact masked least-squares optimum as lines.

One layer of smollm2-135m (default: layer 10's mlp.down_proj), a Wanda 60 % mask, XᵀX from
32 × 1024 C4 calibration tokens (seed 0) gathered with llmprune's engine pieces: the captured
inputs of layer 0 are run densely through layers 0..L−1, then LayerStats collects XᵀX at layer
L. Writes bench/out/admm_convergence.{png,json}::

    LLMPRUNE_DATA_DIR=/work/shared/data PYTHONPATH=src python bench/admm_convergence.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import llmprune  # noqa: E402
from llmprune.engine.capture import capture_inputs  # noqa: E402
from llmprune.engine.sequential import run_layer  # noqa: E402
from llmprune.engine.stats import LayerStats  # noqa: E402
from llmprune.models.layers import decoder_layers, linear_layers  # noqa: E402
from llmprune.sparsity.admm import admm_gradual, admm_iterate, scaled_problem  # noqa: E402
from llmprune.sparsity.methods import prune_weight  # noqa: E402
from llmprune.sparsity.patterns import Target  # noqa: E402
from llmprune.sparsity.recon import relative_recon_error  # noqa: E402
from llmprune.sparsity.sparsegpt import sparsegpt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, calibration_ids  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layer", type=int, default=10)
    p.add_argument("--linear", default="mlp.down_proj",
                   help="a linear of the layer; matrices sharing its input (q/k/v) come along")
    p.add_argument("--sparsity", type=float, default=0.6)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--admm-iters", type=int, default=100)
    p.add_argument("--admm-rho", type=float, default=1.0)
    p.add_argument("--admm-damps", default="0.1,0.01",
                   help="one ADMM curve per dampening λ (the first is the paper's default)")
    p.add_argument("--adam-steps", type=int, default=250)
    p.add_argument("--adam-lrs", default="1e-4,3e-4,1e-3,3e-3")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(OUT / "admm_convergence"))
    return p.parse_args(argv)


@torch.no_grad()
def layer_xtx(model, ids: torch.Tensor, index: int, linear: str) -> tuple[list[str], torch.Tensor]:
    """(names of the linears reading ``linear``'s input, their XᵀX) at decoder layer ``index``."""
    layers = decoder_layers(model)
    inps, kwargs = capture_inputs(model, layers, ids, "cpu")
    outs = torch.empty_like(inps)
    for i in range(index):  # dense propagation: the inputs layer `index` sees in the dense model
        run_layer(layers[i], inps, kwargs[i], outs)
        inps, outs = outs, inps
    stats = LayerStats(linear_layers(layers[index]), frozenset({"xtx"}))
    run_layer(layers[index], inps, kwargs[index], None, stats)
    stats.remove()
    for leader, names in stats.groups().items():
        if linear in names:
            return names, stats.get(leader)["xtx"]
    raise SystemExit(f"no linear {linear!r} in layer {index}; have {list(linear_layers(layers[index]))}")


def masked_optimum(W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Exact min tr(ΔHΔᵀ) over weights on the mask, row by row (fp64, 1e-8 relative damping
    only to guard against an exactly singular block)."""
    H = H.double()
    H = H + 1e-8 * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    out = torch.zeros_like(W, dtype=torch.float64)
    counts = keep.sum(1)
    for k in counts.unique().tolist():  # rows with equal kept counts are solved as one batch
        rows = (counts == k).nonzero().flatten()
        for r in rows.split(chunk):
            idx = keep[r].nonzero()[:, 1].view(len(r), k)  # kept columns of each row
            Hs = H[idx.unsqueeze(2), idx.unsqueeze(1)]  # (rows, k, k)
            b = torch.gather(W[r].double() @ H, 1, idx)  # (WH)_S
            out[r.unsqueeze(1), idx] = torch.linalg.solve(Hs, b.unsqueeze(2)).squeeze(2)
    return out.float()


def adam_curve(W, H, keep, lr: float, steps: int) -> list[float]:
    """Relative error after each Adam step on Ŵ = keep ⊙ P, P starting at the masked weights."""
    den = float(((W @ H) * W).sum())
    P = (W * keep).clone()
    opt = torch.optim.Adam([P], lr=lr)
    errs = []
    for _ in range(steps):
        D = W - P
        G = D @ H
        errs.append(float((G * D).sum()) / den)  # error of the current iterate, before the step
        P.grad = -2 * G * keep / den
        opt.step()
        P.mul_(keep)
    D = W - P
    errs.append(float(((D @ H) * D).sum()) / den)
    return errs[1:]  # errs[i] = after i+1 steps


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = llmprune.load_model(args.model)
    ids = calibration_ids(tok, args.nsamples, args.seqlen, args.seed)
    cache = OUT / f"xtx_{args.model}_L{args.layer}_{args.linear}_{args.nsamples}x{args.seqlen}_seed{args.seed}.pt"
    cached = cache.is_file()
    if cached:
        names, H = torch.load(cache)  # XᵀX of an earlier run with the same settings
    else:
        names, H = layer_xtx(model, ids, args.layer, args.linear)
        torch.save((names, H), cache)
    layer = decoder_layers(model)[args.layer]
    lins = linear_layers(layer)
    Ws = [lins[n].weight.detach().float() for n in names]
    W = torch.cat(Ws)
    stats_s = time.perf_counter() - t0
    target = Target.unstructured(args.sparsity)
    keep = torch.cat([k for _, k in prune_weight("wanda", Ws, {"col_sq": torch.diagonal(H)}, target)])
    print(f"layer {args.layer} {'+'.join(names)}: W {tuple(W.shape)}, XᵀX from "
          f"{args.nsamples}x{args.seqlen} tokens ({'cached' if cached else f'{stats_s:.0f} s'}); Wanda {args.sparsity:g} mask", flush=True)

    res: dict = {"config": vars(args), "names": names, "shape": list(W.shape)}
    res["wanda_no_update"] = relative_recon_error(W, W * keep, H)
    t0 = time.perf_counter()
    W_sgpt, _ = sparsegpt(W, H, mask=keep)
    res["sparsegpt_s"] = time.perf_counter() - t0
    res["sparsegpt"] = relative_recon_error(W, W_sgpt, H)
    res["optimum"] = relative_recon_error(W, masked_optimum(W, H, keep), H)

    res["admm"] = {}
    for damp in [float(x) for x in args.admm_damps.split(",")]:
        curve: list[float] = []
        P = scaled_problem(W, H, args.admm_rho, damp)
        d = P.d.unsqueeze(0)
        admm_iterate(P, keep, args.admm_iters, args.admm_rho,
                     trace=lambda t, Z, d=d, curve=curve: curve.append(relative_recon_error(W, Z / d, H)))
        res["admm"][str(damp)] = curve
    ends = torch.tensor([w.shape[0] for w in Ws]).cumsum(0).tolist()
    groups = [slice(a, b) for a, b in zip([0, *ends[:-1]], ends, strict=True)]
    W_grad, _ = admm_gradual(W, H, target, row_groups=groups)
    res["admm_grad_own_mask_k20"] = relative_recon_error(W, W_grad, H)

    res["adam"] = {}
    for lr in [float(x) for x in args.adam_lrs.split(",")]:
        t0 = time.perf_counter()
        res["adam"][str(lr)] = adam_curve(W, H, keep, lr, args.adam_steps)
        print(f"  Adam lr {lr:g}: {res['adam'][str(lr)][-1]:.5f} after {args.adam_steps} steps "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    print(f"no update {res['wanda_no_update']:.5f} | SparseGPT update {res['sparsegpt']:.5f} | "
          f"optimum {res['optimum']:.5f} | ADMM-Grad own mask k=20 {res['admm_grad_own_mask_k20']:.5f}")
    for damp, c in res["admm"].items():
        print(f"ADMM λ={damp}: " + ", ".join(f"k={k} {c[k - 1]:.5f}" for k in (1, 2, 5, 10, 20, len(c)) if k <= len(c)))
    best = min(res["adam"], key=lambda lr: res["adam"][lr][-1])
    adam_best = res["adam"][best]
    first_below = next((i + 1 for i, e in enumerate(adam_best) if e <= res["sparsegpt"]), None)
    print(f"best Adam (lr {best}): {adam_best[-1]:.5f} after {len(adam_best)} steps; reaches "
          f"SparseGPT's error after {first_below} steps" if first_below else
          f"best Adam (lr {best}): {adam_best[-1]:.5f} after {len(adam_best)} steps; never reaches SparseGPT's error")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: wrote the JSON only")
        return 0
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for style, (damp, c) in zip(("-", "-."), res["admm"].items(), strict=False):
        ax.plot(range(1, len(c) + 1), c, color="tab:red", ls=style, lw=2,
                label=f"ADMM (ρ={args.admm_rho:g}, λ={float(damp):g})")
    greens = plt.cm.Greens([0.4 + 0.6 * i / max(1, len(res["adam"]) - 1) for i in range(len(res["adam"]))])
    for c, (lr, errs) in zip(greens, res["adam"].items(), strict=True):
        ax.plot(range(1, len(errs) + 1), errs, color=c, label=f"Adam lr {float(lr):g}")
    ax.axhline(res["sparsegpt"], color="black", ls="--", label="SparseGPT update")
    ax.axhline(res["optimum"], color="gray", ls=":", label="exact optimum on the mask")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("iterations / steps")
    ax.set_ylabel("‖WX − ŴX‖² / ‖WX‖²")
    ax.set_title(f"{args.model} layer {args.layer} {'+'.join(n.split('.')[-1] for n in names)}, "
                 f"Wanda {args.sparsity:.0%} mask", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=130)
    print(f"wrote {out.with_suffix('.png')} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
