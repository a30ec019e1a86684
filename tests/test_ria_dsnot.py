"""The wider method slot: RIA (a score with options), DSnoT (a refiner), the ``col_mean``
statistic, and one namespace of option names without collisions."""

from __future__ import annotations

import json
import math
from contextlib import ExitStack

import pytest
import torch
from conftest import family_model, tiny_model
from pydantic import Field

import llmprune
import llmprune.engine.sequential as seq
from llmprune.cli import main
from llmprune.config import PRUNE_OWNERS, PruneConfig
from llmprune.engine.sequential import LayerPlan, run_sequential
from llmprune.engine.stats import STATISTICS, LayerStats
from llmprune.errors import LLMPruneError
from llmprune.maskllm.api import ONESHOT_PRIORS
from llmprune.models.adapter import per_expert_linears
from llmprune.models.layers import decoder_layers, linear_layers
from llmprune.options import Options, check_distinct_fields
from llmprune.sparsity.admm import ADMMOptions
from llmprune.sparsity.allocation import OWLAllocator, OWLOptions
from llmprune.sparsity.dsnot import (
    REFERENCE_WINDOW,
    DSnoTOptions,
    dsnot,
    expected_error,
    input_variance,
)
from llmprune.sparsity.methods import METHODS, REFINERS, SOLVERS, prune_weight, required_stats
from llmprune.sparsity.patterns import Target
from llmprune.sparsity.ria import RIAOptions, ria_score
from llmprune.sparsity.sparsegpt import SparseGPTOptions


def calib_stats(tokens=512, cols=32, seed=0, shift=0.5):
    """Inputs with a non-zero mean per column (as after a norm layer), and their statistics."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, cols, generator=g) * torch.linspace(0.2, 2, cols) + shift * torch.randn(cols, generator=g)
    return X, {"col_sq": (X * X).sum(0), "col_mean": X.mean(0), "xtx": X.T @ X,
               "tokens": torch.tensor(float(tokens))}


# --- RIA --------------------------------------------------------------------------------------
def test_ria_score_is_the_hand_computation():
    W = torch.tensor([[1.0, -2.0, 0.5], [0.0, 4.0, -1.5]])
    col_sq = torch.tensor([4.0, 1.0, 9.0])
    got = ria_score(W, col_sq, a=0.5)
    for i in range(2):
        for j in range(3):
            w = abs(W[i, j].item())
            col = sum(abs(W[k, j].item()) for k in range(2))  # every output reading input j
            row = sum(abs(W[i, k].item()) for k in range(3))  # every input of output i
            expect = (w / col + w / row) * math.sqrt(col_sq[j].item()) ** 0.5
            assert got[i, j].item() == pytest.approx(expect, rel=1e-6)
    assert torch.equal(ria_score(torch.zeros(2, 3), col_sq), torch.zeros(2, 3))  # no 0/0


def test_ria_unstructured_compares_the_whole_matrix():
    torch.manual_seed(0)
    W = torch.randn(8, 32) * torch.linspace(0.1, 3, 8).unsqueeze(1)  # rows of very different scale
    _, stats = calib_stats()
    [(W_new, keep)] = prune_weight("ria", [W], stats, Target.unstructured(0.5))
    score = ria_score(W, stats["col_sq"]).flatten()
    expect = torch.ones(256, dtype=torch.bool)
    expect[score.argsort()[:128]] = False
    assert torch.equal(keep.flatten(), expect)
    assert len(set(keep.sum(1).tolist())) > 1  # not per row
    assert torch.equal(W_new, W * keep)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_ria_nm_is_exact(n, m):
    torch.manual_seed(1)
    W = torch.randn(16, 32)
    _, stats = calib_stats()
    o = RIAOptions(ria_exponent=0.0)  # options reach the score: a = 0 is RI alone
    [(_, keep)] = prune_weight("ria", [W], stats, Target.nm(n, m), options={RIAOptions: o})
    groups = keep.reshape(16, -1, m)
    assert (groups.sum(-1) == n).all()
    score = ria_score(W, stats["col_sq"], a=0.0).reshape(16, -1, m)
    kept_min = torch.where(groups, score, torch.inf).amin(-1)
    pruned_max = torch.where(groups, -torch.inf, score).amax(-1)
    assert (kept_min > pruned_max).all()
    [(_, keep_a)] = prune_weight("ria", [W], stats, Target.nm(n, m))  # a = 0.5 by default
    assert not torch.equal(keep, keep_a)


# --- DSnoT ------------------------------------------------------------------------------------
def dsnot_by_rows(W, keep, mean, var, col_sq, target, cycles=50, threshold=0.1, p=1.0):
    """DSnoT as the paper states it, one row and one swap at a time in plain Python."""
    K = keep.clone()
    rows, cols = W.shape
    for r in range(rows):
        D = [float(W[r, j] * mean[j]) for j in range(cols)]
        S = [abs(float(W[r, j])) * float(col_sq[j]) ** 0.5 for j in range(cols)]
        K0 = [bool(keep[r, j]) for j in range(cols)]
        eps = sum(D[j] for j in range(cols) if not K0[j])
        sign0, grown, cut = math.copysign(1, eps), set(), set()
        for _ in range(cycles):
            if abs(eps) * REFERENCE_WINDOW <= threshold:
                break
            grow = [j for j in range(cols) if not K0[j] and j not in grown and D[j] * eps > 0]
            if not grow:
                break
            g = max(grow, key=lambda j: abs(D[j]) / float(var[j]) ** p)
            if target.is_nm:
                start = g - g % target.m
                pool = [j for j in range(start, start + target.m) if K0[j] and j not in cut]
            else:
                pool = [j for j in range(cols) if K0[j] and j not in cut and D[j] * eps < 0]
            if not pool:
                break
            q = min(pool, key=lambda j: S[j])
            after = eps + D[q] - D[g]
            if after == 0 or math.copysign(1, after) != sign0:
                break
            grown.add(g)
            cut.add(q)
            K[r, g], K[r, q], eps = True, False, after
    return K


def dsnot_case(target, seed=0, rows=12, cols=32):
    torch.manual_seed(seed)
    W = torch.randn(rows, cols)
    _, stats = calib_stats(cols=cols, seed=seed)
    [(_, keep)] = prune_weight("wanda", [W], stats, target)
    var = input_variance(stats["col_sq"], stats["col_mean"], stats["tokens"])
    return W, keep, stats, var


@pytest.mark.parametrize("target", [Target.unstructured(0.5), Target.unstructured(0.7), Target.nm(2, 4),
                                    Target.nm(4, 8)], ids=str)
def test_dsnot_equals_the_rowwise_algorithm_and_keeps_the_pattern(target):
    W, keep, stats, var = dsnot_case(target)
    got = dsnot(W, keep, stats["col_mean"], var, stats["col_sq"], target, threshold=1e-3)
    expect = dsnot_by_rows(W, keep, stats["col_mean"], var, stats["col_sq"], target, threshold=1e-3)
    assert torch.equal(got, expect)
    assert (got != keep).any()  # it did swap
    assert torch.equal(got.sum(1), keep.sum(1))  # per-row counts
    if target.is_nm:
        assert (got.reshape(W.shape[0], -1, target.m).sum(-1) == target.n).all()
    else:
        assert (got.sum(1) == W.shape[1] - int(W.shape[1] * target.sparsity)).all()


def test_dsnot_only_shrinks_the_expected_error():
    """|ε_r| = |Σ_{pruned} W_rj·E[x_j]| never grows in any row (the swap that would flip its sign
    is refused), and shrinks overall."""
    target = Target.unstructured(0.6)
    W, keep, stats, var = dsnot_case(target, seed=3, rows=64, cols=64)
    refined = dsnot(W, keep, stats["col_mean"], var, stats["col_sq"], target, threshold=0.0)
    before = expected_error(W, keep, stats["col_mean"]).abs()
    after = expected_error(W, refined, stats["col_mean"]).abs()
    assert (after <= before + 1e-6).all()
    assert after.sum() < 0.5 * before.sum()
    free = dsnot(W, keep, stats["col_mean"], var, stats["col_sq"], target, threshold=0.0, same_sign=False)
    assert (expected_error(W, free, stats["col_mean"]).abs() > before + 1e-6).any()  # what the rule prevents


def test_dsnot_leaves_a_mask_with_nothing_to_improve():
    target = Target.unstructured(0.5)
    W, keep, stats, var = dsnot_case(target)
    zero_mean = torch.zeros_like(stats["col_mean"])  # centred inputs: no expected error at all
    assert torch.equal(dsnot(W, keep, zero_mean, var, stats["col_sq"], target), keep)
    eps = expected_error(W, keep, stats["col_mean"]).abs().max().item()
    high = eps * REFERENCE_WINDOW * 1.01  # every row already within the threshold
    assert torch.equal(dsnot(W, keep, stats["col_mean"], var, stats["col_sq"], target, threshold=high), keep)
    assert not torch.equal(dsnot(W, keep, stats["col_mean"], var, stats["col_sq"], target, threshold=0.0), keep)


def test_refine_runs_after_any_method_and_before_the_solver():
    torch.manual_seed(0)
    Ws = [torch.randn(16, 32), torch.randn(8, 32)]  # a group sharing one input, like q/k
    _, stats = calib_stats()
    target = Target.unstructured(0.5)
    for method in METHODS:
        record: dict = {}
        out = prune_weight(method, Ws, stats, target, refine="dsnot", record=record,
                           options={DSnoTOptions: DSnoTOptions(dsnot_threshold=0.0)})
        plain = prune_weight(method, Ws, stats, target)
        assert len(record["refine_swaps"]) == 2 and sum(record["refine_swaps"]) > 0, method
        for (W_new, keep), (_, keep0), W in zip(out, plain, Ws, strict=True):
            assert torch.equal(keep.sum(1), keep0.sum(1)), method
            assert (W_new[~keep] == 0).all()
            if METHODS[method].default_solver == "none":
                assert torch.equal(W_new, W * keep)
            else:  # the method's own update, on the refined mask
                assert not torch.equal(W_new, W * keep)
    record = {}
    [(W_new, keep)] = prune_weight("wanda", Ws[:1], stats, target, solver="sparsegpt", refine="dsnot",
                                   record=record, options={DSnoTOptions: DSnoTOptions(dsnot_threshold=0.0)})
    from llmprune.sparsity.methods import solve

    assert torch.allclose(W_new, solve("sparsegpt", Ws[0], keep, stats))


# --- col_mean ---------------------------------------------------------------------------------
def calib_ids(n=4, seqlen=32, seed=0):
    return torch.randint(3, 512, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def whole_model_means(model, ids, only_layer=None) -> dict[tuple[int, str], torch.Tensor]:
    """E[x] per input column of every linear, from hooks on one whole-model forward."""
    acc: dict = {}
    with ExitStack() as stack:
        handles = []
        for i, layer in enumerate(decoder_layers(model)):
            if only_layer is not None and i != only_layer:
                continue
            stack.enter_context(per_expert_linears(layer))
            for name, lin in linear_layers(layer).items():
                def hook(_m, args, key=(i, name)):
                    x = args[0].reshape(-1, args[0].shape[-1]).double()
                    s, n = acc.get(key, (0, 0))
                    acc[key] = (s + x.sum(0), n + x.shape[0])
                handles.append(lin.register_forward_pre_hook(hook))
        try:
            model(ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
    return {k: (s / n).float() for k, (s, n) in acc.items()}


def spy_stats(monkeypatch, model) -> dict[tuple[int, str], dict]:
    """The statistics each linear was pruned with, by (layer, name)."""
    where = {lin.weight.data_ptr(): (i, name) for i, layer in enumerate(decoder_layers(model))
             for name, lin in linear_layers(layer).items()}
    seen = {}
    real = seq.prune_group

    def spy(linears, names, leader, plan, target, stats, *a, **kw):
        s = stats.get(leader)
        for n in names:
            seen[where.get(linears[n].weight.data_ptr(), (0, n))] = {k: v.clone() for k, v in s.items()}
        return real(linears, names, leader, plan, target, stats, *a, **kw)

    monkeypatch.setattr(seq, "prune_group", spy)
    return seen


@pytest.mark.parametrize("true_sequential", [False, True], ids=["exact", "true-sequential"])
def test_col_mean_is_the_mean_of_a_whole_forward(monkeypatch, true_sequential):
    """What each linear is pruned with equals the mean of its input in a forward of the pruned
    model — for the exact mode the first linear of a layer (the later ones saw the dense layer),
    for the true-sequential mode every linear."""
    model = tiny_model(layers=2)
    ids = calib_ids()
    seen = spy_stats(monkeypatch, model)
    plan = LayerPlan("wanda", [Target.unstructured(0.5)] * 2, refine="dsnot", true_sequential=true_sequential)
    report = run_sequential(model, ids, plan, progress=False)
    assert report[1]["true_sequential"] is true_sequential
    means = whole_model_means(model, ids)
    names = linear_layers(decoder_layers(model)[1]) if true_sequential else ["self_attn.q_proj"]
    for name in names:
        got = seen[(1, name)]
        torch.testing.assert_close(got["col_mean"], means[(1, name)], rtol=1e-4, atol=1e-5)
        assert got["tokens"].item() == ids.numel()
    assert any(e["refine_swaps"] for e in report[1]["linears"].values())


def test_col_mean_of_moe_experts_counts_their_routed_tokens(monkeypatch):
    model = family_model("mixtral", layers=1)
    ids = calib_ids(seqlen=64)
    means = whole_model_means(model, ids)
    seen = spy_stats(monkeypatch, model)
    run_sequential(model, ids, LayerPlan("ria", [Target.nm(2, 4)], refine="dsnot"), progress=False)
    experts = [k for k in means if ".experts." in k[1]]
    assert experts
    for key in experts:
        torch.testing.assert_close(seen[key]["col_mean"], means[key], rtol=1e-4, atol=1e-5)
    tokens = {seen[k]["tokens"].item() for k in experts}
    assert max(tokens) < ids.numel() and len(tokens) > 1  # each its own routed share


def test_statistics_are_declared_by_name():
    for entry in [*METHODS.values(), *REFINERS.values(), *SOLVERS.values(), OWLAllocator]:
        assert set(entry.needs) <= set(STATISTICS), entry
    assert required_stats("wanda", None, refine="dsnot") == {"col_sq", "col_mean", "tokens"}
    assert required_stats("ria", "admm") == {"col_sq", "xtx"}
    with pytest.raises(ValueError, match="unknown statistics"):
        LayerStats({}, frozenset({"col_cube"}))


# --- options: one namespace ---------------------------------------------------------------------
def test_option_names_of_different_owners_do_not_collide():
    owners = {SparseGPTOptions, ADMMOptions, RIAOptions, DSnoTOptions, OWLOptions}
    assert owners <= set(PRUNE_OWNERS)
    check_distinct_fields(PRUNE_OWNERS)  # what PruneConfig is built from
    fields = [f for o in PRUNE_OWNERS[1:] for f in o.model_fields]
    assert len(fields) == len(set(fields)) and not set(fields) & set(PRUNE_OWNERS[0].model_fields)

    class Clash(Options):
        percdamp: float = Field(0.5, description="a second owner of SparseGPT's name")

    with pytest.raises(TypeError, match="'percdamp' is declared by both SparseGPTOptions and Clash"):
        check_distinct_fields([*PRUNE_OWNERS, Clash])

    class Shared(Options):  # one field two owners inherit from one base is the same field
        common: int = 1

    class A(Shared):
        a: int = 1

    class B(Shared):
        b: int = 1

    check_distinct_fields([A, B])


def test_other_entry_points_merge_distinct_options():
    from llmprune.maskllm.job import MaskLLMConfig
    from llmprune.recover.job import RecoverConfig
    from llmprune.structured.job import StructuredConfig

    for config in (MaskLLMConfig, RecoverConfig, StructuredConfig):
        check_distinct_fields(config.__bases__)


def test_every_method_is_a_prior_and_a_chain_stage():
    assert set(ONESHOT_PRIORS) == set(METHODS) and ONESHOT_PRIORS[0] == "sparsegpt"
    from llmprune.chain.recipe import parse_recipe, plan_stages

    recipe = parse_recipe({"model": "smollm2-135m",
                           "stages": [{"prune": {"method": "ria", "pattern": "2:4", "refine": "dsnot"}},
                                      {"maskllm": {"steps": 2}}]})
    plans = plan_stages(recipe, "/tmp/unused-chain-out")
    assert plans[0].config.method == "ria" and plans[0].config.refine == "dsnot"


# --- end to end ---------------------------------------------------------------------------------
def test_cli_maskllm_with_the_ria_prior(tiny_dirs, tmp_path, capsys, monkeypatch):
    import llmprune.maskllm.api as api

    priors = []
    real = api.oneshot_prior

    def spy(model, tokenizer, pattern, method, **kw):
        priors.append(method)
        return real(model, tokenizer, pattern, method, **kw)

    monkeypatch.setattr(api, "oneshot_prior", spy)
    out = tmp_path / "learned"
    rc = main(["maskllm", str(tiny_dirs["llama"]), "--pattern", "2:4", "--prior", "ria", "--steps", "1",
               "--seqlen", "32", "--prior-nsamples", "2", "--out", str(out), "-q"])
    assert rc == 0, capsys.readouterr().err
    assert priors == ["ria"]
    assert json.loads((out / "pruning.json").read_text())["maskllm"]["prior"] == "ria"


def test_cli_ria_with_dsnot(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "ria"
    rc = main(["prune", str(tiny_dirs["llama"]), "--method", "ria", "--pattern", "2:4", "--refine", "dsnot",
               "--dsnot-threshold", "0", "--solver", "sparsegpt", "--nsamples", "4", "--seqlen", "32",
               "--out", str(out), "-q"])
    assert rc == 0
    assert "method ria + refine dsnot + solver sparsegpt" in capsys.readouterr().out
    report = json.loads((out / "pruning.json").read_text())
    assert report["recipe"]["refine"] == "dsnot" and report["recipe"]["ria_exponent"] == 0.5
    assert report["sparsity"] == pytest.approx(0.5)
    swaps = [e["refine_swaps"] for layer in report["layers"] for e in layer["linears"].values()]
    assert len(swaps) == 14 and sum(swaps) > 0
    model, _ = llmprune.load_model(str(out))
    for layer in decoder_layers(model):
        for lin in linear_layers(layer).values():
            assert ((lin.weight != 0).reshape(lin.weight.shape[0], -1, 4).sum(-1) <= 2).all()


def test_refine_only_the_linears_named(tiny_dirs, tmp_path):
    config = PruneConfig(method="wanda", sparsity=0.6, refine="dsnot", refine_linears="self_attn.*",
                         dsnot_threshold=0.0, nsamples=4, seqlen=32, true_sequential=False)
    model, tok = llmprune.load_model(str(tiny_dirs["llama"]))
    report = llmprune.prune(model, config, tokenizer=tok, progress=False).report
    entries = report["layers"][0]["linears"]
    assert all("refine_swaps" in e for n, e in entries.items() if n.startswith("self_attn."))
    assert sum(e["refine_swaps"] for e in entries.values() if "refine_swaps" in e) > 0
    assert not any("refine_swaps" in e for n, e in entries.items() if n.startswith("mlp."))
    assert seq.refines("self_attn.*, mlp.down_proj", ["mlp.down_proj"])
    assert not seq.refines("self_attn.*", ["self_attn.q_proj", "mlp.up_proj"])


@pytest.mark.parametrize("flags,msg", [
    (["--refine", "dsnot", "--dsnot-cycles", "0"], "dsnot_cycles must be a positive integer, got 0"),
    (["--refine", "dsnot", "--dsnot-threshold", "-1"], "dsnot_threshold must be a finite number ≥ 0, got -1.0"),
    (["--refine", "dsnot", "--dsnot-var-power", "nan"], "dsnot_var_power must be a finite number ≥ 0"),
    (["--refine", "dnsot"], "unknown refine 'dnsot'; choose from none, dsnot"),
    (["--method", "ria", "--ria-exponent", "-0.5"], "ria_exponent must be a finite number ≥ 0"),
    (["--refine-linears", "self_attn.*"], "--refine-linears chooses which linears a refiner refines; give --refine"),
    (["--refine", "dsnot", "--refine-linears", "attn.*"], "--refine-linears 'attn.*' matches no linear of the model"),
])
def test_bad_refine_options_are_one_line(tiny_dirs, tmp_path, capsys, flags, msg):
    out = tmp_path / "o"
    rc = main(["prune", str(tiny_dirs["llama"]), "--sparsity", "0.5", "--seqlen", "32", *flags,
               "--out", str(out), "-q"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert rc == 2 and len(lines) == 1 and msg in lines[0], err
    assert not out.exists()
    with pytest.raises(LLMPruneError):
        PruneConfig(sparsity=0.5, refine="dsnot", dsnot_cycles=0)
