"""Our DSnoT against the reference's own code, mask for mask, on random matrices.

Needs a checkout of github.com/zyxxmu/DSnoT. The per-matrix part of its ``prune_DSnoT`` (from
``weight_mask = ...`` to the line that zeroes the weights) and its ``return_reorder_indice`` are
read from ``lib/prune.py`` and run unchanged, with the statistics its ``WrappedGPT`` accumulates
(one 2048-token window per ``add_batch``) and the Wanda initial mask; ours gets the same
statistics (E[x] = its ``sum_metric_row`` / 2048, its averaged variance). Rows are wide enough
(512 inputs) that no row runs out of grow/prune candidates within 50 cycles: that is the one
case where the two differ on purpose (docs/ria_dsnot.md, "Exhausted candidates").

    PYTHONPATH=src python bench/dsnot_reference.py --ref /path/to/DSnoT/lib/prune.py
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import types
from pathlib import Path

import torch

from llmprune.sparsity.dsnot import REFERENCE_WINDOW, dsnot
from llmprune.sparsity.patterns import Target, apply_target


def reference_runner(path: Path):
    """A function running the reference's per-matrix mask code on one weight matrix."""
    src = path.read_text()
    lines = src.splitlines()
    start = next(i for i, line in enumerate(lines) if "weight_mask = torch.zeros_like(initial_metric) == 1" in line)
    end = next(i for i in range(start, len(lines)) if "subset[name].weight.data[weight_mask] = 0" in lines[i])
    body = compile(textwrap.dedent("\n".join(lines[start:end])), str(path), "exec")
    helper = src[src.index("def return_reorder_indice"): src.index("def prune_magnitude")]
    helpers: dict = {}
    exec(compile("import torch\n" + helper, str(path), "exec"), helpers)  # noqa: S102 -- the user's checkout

    def run(W, windows, target: Target, threshold: float, cycles: int, same_sign: bool):
        cols = W.shape[1]
        nsamples, scaler, summ, mean, var, ntok = 0, torch.zeros(cols), torch.zeros(cols), None, None, 0
        for x in windows:  # as its WrappedGPT.add_batch, one window (batch of 1) at a time
            inp = x.t()
            m, v, n = inp.mean(1, keepdim=True), inp.var(1, unbiased=False, keepdim=True), inp.shape[1]
            var = v if ntok == 0 else (var * ntok + v * n) / (ntok + n)
            mean = m if ntok == 0 else (mean * ntok + m * n) / (ntok + n)
            ntok += n
            scaler *= nsamples / (nsamples + 1)
            summ *= nsamples / (nsamples + 1)
            nsamples += 1
            scaler += torch.norm(inp, p=2, dim=1) ** 2 / nsamples
            summ += inp.sum(1) / nsamples
        prune_n, prune_m = (target.m - target.n, target.m) if target.is_nm else (0, 0)
        args = types.SimpleNamespace(skip_layer="no_skip", skip_sub_layer="no_skip", without_DSnoT=False,
                                     pow_of_var_regrowing=1.0, max_cycle_time=cycles, update_threshold=threshold,
                                     without_same_sign=not same_sign, sparsity_ratio=target.sparsity)
        linear = types.SimpleNamespace(weight=types.SimpleNamespace(data=W.clone()))
        env = dict(helpers, torch=torch, args=args, name="self_attn.q_proj", prune_n=prune_n, prune_m=prune_m,
                   subset={"self_attn.q_proj": linear},
                   wrapped_layers={"self_attn.q_proj": types.SimpleNamespace(scaler_row=scaler, var=var)},
                   DSnoT_metric=W * summ.reshape(1, -1), initial_metric=W.abs() * scaler.sqrt().reshape(1, -1))
        exec(body, env)  # noqa: S102
        return ~env["weight_mask"], {"mean": summ / REFERENCE_WINDOW, "var": var.flatten(), "col_sq": scaler}

    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref", required=True, type=Path, help="the reference's lib/prune.py")
    p.add_argument("--seeds", type=int, default=4)
    args = p.parse_args(argv)
    run = reference_runner(args.ref)
    cases = [(Target.unstructured(0.6), True), (Target.unstructured(0.6), False), (Target.nm(2, 4), True)]
    total = same = 0
    for seed in range(args.seeds):
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(32, 512, generator=g) * 0.05
        shift = torch.randn(512, generator=g) * 0.05
        windows = [torch.randn(REFERENCE_WINDOW, 512, generator=g) * torch.linspace(0.2, 2, 512) + shift
                   for _ in range(2)]
        for target, same_sign in cases:  # its N:M branch always checks the sign
            for threshold in (0.1, 3.0, 10.0):
                ref_keep, s = run(W, windows, target, threshold, 50, same_sign)
                keep0 = apply_target(W.abs() * s["col_sq"].sqrt(), target)  # Wanda's, as its initial mask
                ours = dsnot(W, keep0, s["mean"], s["var"], s["col_sq"], target, threshold=threshold,
                             same_sign=same_sign)
                ok = torch.equal(ours, ref_keep)
                total, same = total + 1, same + ok
                print(f"seed {seed} {target!s:>4} sign rule {'on ' if same_sign else 'off'} threshold {threshold:4}: "
                      f"{'identical' if ok else 'DIFFERENT'} ({int((ours & ~keep0).sum())} swaps)")
    print(f"{same}/{total} masks identical to the reference's")
    return 0 if same == total else 1


if __name__ == "__main__":
    sys.exit(main())
