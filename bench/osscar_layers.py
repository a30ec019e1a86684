"""Per-layer OSSCAR diagnostic: the reconstruction error of each selection / re-fit, on the
calibration tokens and on held-out text (issue #11's "greedy chooses worse channels" check).

For a few decoder layers of the *dense* model, XᵀX of down_proj's inputs is collected on the
C4 calibration windows (as ``bench/structured.py`` draws them), on other C4 windows (another
seed) and on WikiText-2 test windows. For each ``shrink`` it prints the relative error
‖XW − X_SŴ_S‖²/‖XW‖² of: the channel score without / with re-fit, greedy without / with re-fit,
greedy + local search + re-fit, and channel score + local search + re-fit. The calibration
column is what the algorithm minimises; the held-out columns are what generalises.

    LLMPRUNE_DATA_DIR=/work/shared/data PYTHONPATH=src OMP_NUM_THREADS=1 \\
        python bench/osscar_layers.py --layers 1,4,10,16,22 --shrink 0,0.2,0.4

(about 5 minutes on one CPU core at the default 32 x 1024 calibration tokens, 5 layers).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import llmprune  # noqa: E402
from llmprune.data.calibration import calibration_windows  # noqa: E402
from llmprune.data.sources import load_corpus  # noqa: E402
from llmprune.data.tokens import eval_token_stream  # noqa: E402
from llmprune.models.adapter import mlp_triplet  # noqa: E402
from llmprune.models.layers import decoder_layers  # noqa: E402
from llmprune.structured import osscar as O  # noqa: E402


@torch.no_grad()
def down_xtx(model, ids: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """XᵀX (float64) of down_proj's inputs in each of ``layers``, over every row of ``ids``."""
    blocks = decoder_layers(model)
    H: dict[int, torch.Tensor] = {}

    def hook(i):
        def f(_m, a):
            x = a[0].reshape(-1, a[0].shape[-1]).double()
            H[i] = H.get(i, 0) + x.T @ x
        return f

    handles = [blocks[i].get_submodule(mlp_triplet(blocks[i]).down).register_forward_pre_hook(hook(i))
               for i in layers]
    try:
        for row in ids:
            model(row[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return H


def rel_error(H: torch.Tensor, W: torch.Tensor, keep: torch.Tensor, W_new: torch.Tensor) -> float:
    """‖X(W − Ŵ)‖² / ‖XW‖² from XᵀX, Ŵ zero outside ``keep``."""
    D = W.clone()
    D[keep] -= W_new
    return float((D * (H @ D)).sum() / (W * (H @ W)).sum())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", default="1,4,10,16,22")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--round-to", type=int, default=64)
    p.add_argument("--shrink", default="0,0.2,0.4", help="comma-separated shares")
    p.add_argument("--percdamp", type=float, default=0.01)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--held-rows", type=int, default=8, help="held-out windows of 512 tokens, each corpus")
    p.add_argument("--swaps", type=int, default=100)
    args = p.parse_args(argv)
    layers = [int(x) for x in args.layers.split(",")]
    model, tok = llmprune.load_model(args.model, device="cpu", dtype="float32")
    c4 = load_corpus("c4", "train")
    wiki = eval_token_stream(load_corpus("wikitext2", "test"), tok, 512)[0]
    sets = {"calib": calibration_windows(c4, tok, args.nsamples, args.seqlen, 0),
            "heldC4": calibration_windows(c4, tok, args.held_rows, 512, 12345),
            "heldWiki": wiki[: args.held_rows * 512].reshape(args.held_rows, 512)}
    Hs = {name: down_xtx(model, ids, layers) for name, ids in sets.items()}
    blocks = decoder_layers(model)
    print(f"{args.model}: calibration {args.nsamples}x{args.seqlen} C4, held-out {args.held_rows}x512 "
          f"C4 (seed 12345) and WikiText-2; ratio {args.ratio}; errors calib / heldC4 / heldWiki")
    means: dict[str, list] = {}
    for i in layers:
        W = blocks[i].get_submodule(mlp_triplet(blocks[i]).down).weight.detach().double().T.contiguous()
        H = Hs["calib"][i]
        inter = W.shape[0]
        width = O.mlp_width(inter, args.ratio, args.round_to)
        score = torch.ones(inter, dtype=torch.bool)
        score[torch.topk(O.channel_scores(W, H), width).indices] = False
        for shrink in [float(s) for s in args.shrink.split(",")]:
            Hd, P, _ = O.damped(O.shrunk(H, shrink), args.percdamp)
            greedy = O.greedy_remove(W, P, inter - width)
            sel = {"score": score, "greedy": greedy,
                   "greedy+ls": O.local_search(W, P, greedy, args.swaps)[0],
                   "score+ls": O.local_search(W, P, score, args.swaps)[0]}
            rows = []
            for name, removed in sel.items():
                keep = (~removed).nonzero().squeeze(1)
                fits = {"+refit": O.refit(W, Hd, keep)}
                if name in ("score", "greedy"):
                    fits = {"": W[keep], **fits}
                for suffix, W_new in fits.items():
                    errs = [rel_error(Hs[s][i], W, keep, W_new) for s in sets]
                    rows.append((name + suffix, O.objective(W, P, removed), errs))
                    means.setdefault(f"{name + suffix} shrink={shrink:g}", []).append(errs)
            for name, obj, errs in rows:
                print(f"layer {i:2d} shrink {shrink:<4g} {name:<16} objective {obj:11.5g}  "
                      + "  ".join(f"{e:.4f}" for e in errs), flush=True)
    print("mean over layers (calib / heldC4 / heldWiki):")
    for key, v in means.items():
        m = torch.tensor(v).mean(0).tolist()
        print(f"  {key:<32} " + "  ".join(f"{e:.4f}" for e in m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
