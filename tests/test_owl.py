"""OWL and explicit layer-wise allocation: pure functions, the engine slot, the pipeline report."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_model

from llmprune import PruneConfig, prune
from llmprune.engine.sequential import LayerPlan, run_sequential
from llmprune.errors import LLMPruneError
from llmprune.models.layers import decoder_layers, linear_layers
from llmprune.pipeline import fixed_targets
from llmprune.report import format_allocation, summary
from llmprune.sparsity import allocation
from llmprune.sparsity.allocation import (
    OWLAllocator,
    explicit_targets,
    layer_outlier_ratio,
    outlier_ratio,
    owl_nm,
    owl_ratios,
    round_nm,
    weighted_mean,
)
from llmprune.sparsity.patterns import Target

ODD_SIZES = [3, 1000, 7, 12345, 55, 1, 999, 4242]


def reference_owl(lod, S, lam):
    """The reference's formula (equal layers): min-max to [0, 2λ], density shifted to mean 1 − S."""
    d = np.asarray(lod, dtype=float)
    d = (d - d.min()) / (d.max() - d.min()) * lam * 2
    d = d - d.mean() + (1 - S)
    return 1 - d


def calib_ids(n=4, seqlen=64, seed=0):
    return torch.randint(0, 512, (n, seqlen), generator=torch.Generator().manual_seed(seed))


# --- outlier ratio ----------------------------------------------------------------------------
def test_outlier_ratio_uses_the_layer_mean_over_all_linears():
    a = torch.ones(2, 2)  # mean 1
    b = torch.full((2, 2), 5.0)  # mean 5; pooled mean 3
    # pooled: threshold 1.5 x 3 = 4.5 → all of b (4 of 8); per-linear means would give 0
    assert outlier_ratio([a, b], 1.5) == 0.5
    assert outlier_ratio([a], 1.5) == 0.0
    assert outlier_ratio([torch.tensor([[1.0, 1.0, 1.0, 9.0]])], 2.0) == 0.25  # mean 3, thr 6


def test_layer_outlier_ratio_is_wanda_score_bruteforce():
    g = torch.Generator().manual_seed(0)
    Ws = {"q": torch.randn(6, 8, generator=g), "up": torch.randn(10, 8, generator=g)}
    col_sq = {"q": torch.rand(8, generator=g) * 10, "up": torch.rand(8, generator=g)}
    col_sq["q"][3] = 400.0  # one outlier channel
    scores = [abs(float(W[i, j])) * float(col_sq[n][j]) ** 0.5
              for n, W in Ws.items() for i in range(W.shape[0]) for j in range(8)]
    mean = sum(scores) / len(scores)
    expect = sum(s > 3 * mean for s in scores) / len(scores)
    got = layer_outlier_ratio(Ws, {n: {"col_sq": c} for n, c in col_sq.items()}, 3.0)
    assert got == pytest.approx(expect, abs=1e-12)
    assert got > 0


# --- unstructured OWL ratios ------------------------------------------------------------------
@pytest.mark.parametrize("S,lam", [(0.5, 0.08), (0.7, 0.12), (0.8, 0.04), (0.6, 0.2)])
def test_owl_ratios_exact_weighted_mean_and_bounds_with_odd_sizes(S, lam):
    rng = np.random.default_rng(1)
    for _ in range(50):
        lod = rng.random(len(ODD_SIZES)) ** 3  # skewed, as real LODs are
        r = owl_ratios(lod, ODD_SIZES, S, lam)
        assert abs(weighted_mean(r, ODD_SIZES) - S) < 1e-12
        assert min(r) >= S - lam - 1e-12 and max(r) <= S + lam + 1e-12
        order = np.argsort(lod)  # more outliers → never more sparsity
        assert all(r[order[i]] >= r[order[i + 1]] - 1e-12 for i in range(len(r) - 1))


def test_owl_ratios_equal_sizes_match_reference_and_clip_when_it_leaves_bounds():
    lod = [0.01, 0.02, 0.03, 0.04, 0.05]  # symmetric: the reference stays in bounds
    np.testing.assert_allclose(owl_ratios(lod, [10] * 5, 0.7, 0.08), reference_owl(lod, 0.7, 0.08), atol=1e-12)
    assert owl_ratios(lod, [10] * 5, 0.7, 0.08)[0] == pytest.approx(0.78)  # fewest outliers: S + λ
    skew = [0.0, 0.0, 0.0, 0.0, 1.0]
    ref = reference_owl(skew, 0.7, 0.08)
    assert ref.min() < 0.7 - 0.08 - 0.04  # the reference would leave [S − λ, S + λ]
    r = owl_ratios(skew, [10] * 5, 0.7, 0.08)
    assert r[-1] == pytest.approx(0.62) and r[0] == pytest.approx(0.72)
    assert abs(np.mean(r) - 0.7) < 1e-12


def test_owl_ratios_degenerate_cases():
    assert owl_ratios([0.1, 0.1, 0.1], [1, 2, 3], 0.6, 0.1) == [0.6] * 3
    assert owl_ratios([0.1, 0.5, 0.3], [1, 2, 3], 0.6, 0.0) == [0.6] * 3
    with pytest.raises(LLMPruneError, match="owl-lambda"):
        owl_ratios([0.1, 0.2], [1, 1], 0.9, 0.12)  # S + λ ≥ 1
    with pytest.raises(LLMPruneError, match="owl-lambda"):
        owl_ratios([0.1, 0.2], [1, 1], 0.05, 0.08)  # S − λ < 0
    with pytest.raises(LLMPruneError):
        owl_ratios([0.1, 0.2], [1, 1], 0.5, -0.01)


# --- mixed N:M --------------------------------------------------------------------------------
def test_round_nm_equal_sizes_is_largest_remainder():
    x = [4.4, 5.7, 5.2, 4.9, 4.8]  # sum 25 = 5 x 5
    assert round_nm(x, [7] * 5, 5, 8) == [4, 6, 5, 5, 5]


def test_round_nm_exact_weighted_mean_with_odd_sizes():
    rng = np.random.default_rng(2)
    for _ in range(30):
        sizes = list(rng.integers(1, 40, size=9))
        x = list(rng.uniform(3.2, 6.8, size=9))
        ns = round_nm(x, sizes, 5, 8)
        assert sum(int(p) * k for p, k in zip(sizes, ns, strict=True)) == 5 * sum(int(p) for p in sizes)
        assert all(1 <= k <= 7 for k in ns)


def test_round_nm_fallback_groups_are_exact(monkeypatch):
    monkeypatch.setattr(allocation, "MAX_DP_STATES", 1)
    sizes = [10, 10, 10, 10, 77, 77, 5]
    x = [4.2, 5.9, 5.6, 4.4, 4.4, 5.7, 6.3]
    ns = round_nm(x, sizes, 5, 8)
    assert sum(p * k for p, k in zip(sizes, ns, strict=True)) == 5 * sum(sizes)
    assert ns[:4] == [4, 6, 6, 4] and ns[4:6] == [4, 6] and ns[6] == 5  # lone size stays at n


def test_owl_nm_spreads_around_n():
    lod = [0.001, 0.002, 0.004, 0.008, 0.003, 0.002]
    ns = owl_nm(lod, [1] * 6, 5, 8, lam=0.125)  # λ = 1/M: one step either way
    assert sum(ns) == 30 and set(ns) <= {4, 5, 6} and len(set(ns)) > 1
    assert ns[0] == 4 and ns[3] == 6  # fewest outliers: pruned most (fewest kept)


# --- the engine slot --------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_engine_mixed_nm_every_group_exact(method):
    model = tiny_model(layers=6)
    plan = LayerPlan(method, allocator=OWLAllocator(Target.nm(5, 8), m=5, lam=0.2))
    rep = run_sequential(model, calib_ids(), plan, progress=False)
    ns, sizes = [], []
    for L, layer in zip(rep, decoder_layers(model), strict=True):
        n, m = map(int, L["target"].split(":"))
        assert m == 8
        ns.append(n)
        size = 0
        for name, lin in linear_layers(layer).items():
            W = lin.weight
            groups = (W != 0).reshape(W.shape[0], -1, 8).sum(-1)
            assert (groups == n).all(), f"layer {L['index']} {name}: not {n}:8 everywhere"
            size += W.numel()
        sizes.append(size)
    assert len(set(ns)) > 1
    assert sum(s * n for s, n in zip(sizes, ns, strict=True)) == 5 * sum(sizes)


@pytest.mark.parametrize("method,solver", [("magnitude", None), ("wanda", None), ("sparsegpt", None),
                                           ("wanda", "sparsegpt")])
def test_engine_owl_unstructured(method, solver):
    model = tiny_model(layers=4)
    plan = LayerPlan(method, solver=solver, allocator=OWLAllocator(Target.unstructured(0.6), m=5, lam=0.1))
    rep = run_sequential(model, calib_ids(), plan, progress=False)
    ratios = [L["target_sparsity"] for L in rep]
    sizes = [sum(np.prod(lin["shape"]) for lin in L["linears"].values()) for L in rep]
    assert abs(weighted_mean(ratios, sizes) - 0.6) < 1e-12
    assert max(ratios) - min(ratios) > 0.05
    for L in rep:  # every linear gets its layer's ratio (up to int() rounding per row / block)
        for lin in L["linears"].values():
            assert lin["sparsity"] == pytest.approx(L["target_sparsity"], abs=0.02)
        assert 0 <= L["outlier_ratio"] <= 1


def test_dense_pass_sees_the_dense_model():
    """The outlier ratios do not depend on the method: they come from the dense model."""
    a = run_sequential(tiny_model(layers=4), calib_ids(), LayerPlan(
        "magnitude", allocator=OWLAllocator(Target.unstructured(0.5))), progress=False)
    b = run_sequential(tiny_model(layers=4), calib_ids(), LayerPlan(
        "sparsegpt", allocator=OWLAllocator(Target.unstructured(0.7))), progress=False)
    assert [L["outlier_ratio"] for L in a] == [L["outlier_ratio"] for L in b]


def test_explicit_targets():
    assert [str(t) for t in explicit_targets([0.1, 0.5], 2, None)] == ["0.1", "0.5"]
    assert [str(t) for t in explicit_targets({1: 0.3}, 3, Target.unstructured(0.5))] == ["0.5", "0.3", "0.5"]
    assert [str(t) for t in explicit_targets([0.25, 0.5], 2, Target.nm(2, 4))] == ["3:4", "2:4"]
    for bad, n in (([0.5] * 3, 2), ([0.5, 1.0], 2), ([0.5, -0.1], 2), ({2: 0.5}, 2), ([], 2), ([0.5, True], 2)):
        with pytest.raises(LLMPruneError):
            explicit_targets(bad, n, Target.unstructured(0.5))
    with pytest.raises(LLMPruneError, match="N:4"):
        explicit_targets([0.3, 0.5], 2, Target.nm(2, 4))
    with pytest.raises(LLMPruneError, match="no entry"):
        explicit_targets({0: 0.5}, 2, None)


# --- config validation ------------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    ({"allocation": "owl", "owl_m": 0}, "owl_m"),
    ({"allocation": "owl", "owl_m": -3}, "owl_m"),
    ({"allocation": "owl", "owl_lambda": -0.01}, "owl_lambda"),
    ({"owl_lambda": -0.01}, "owl_lambda"),
    ({"allocation": "owl", "sparsity": 0.95, "owl_lambda": 0.08}, "owl-lambda"),
    ({"allocation": "bogus"}, "allocation"),
    ({"allocation": "explicit"}, "layer-ratios"),
    ({"allocation": "explicit", "layer_ratios": [0.5, 1.2]}, r"\[0, 1\)"),
    ({"allocation": "explicit", "layer_ratios": [0.5, "x"]}, r"\[0, 1\)"),
    ({"allocation": "explicit", "layer_ratios": {"a": 0.5}}, "indices"),
    ({"allocation": "explicit", "layer_ratios": {0: 0.5}, "sparsity": None}, "map"),
    ({"allocation": "uniform", "layer_ratios": [0.5, 0.5]}, "explicit"),
    ({"allocation": "explicit", "sparsity": None, "pattern": "2:4", "layer_ratios": [0.3]}, "N:4"),
])
def test_config_rejects_bad_allocation(kw, match):
    with pytest.raises(LLMPruneError, match=match):
        PruneConfig(**{"sparsity": 0.5, **kw}).validate()


def test_config_accepts_explicit_without_global_target():
    explicit = PruneConfig(allocation="explicit", sparsity=None, layer_ratios=[0.4, 0.6]).validate()
    assert not explicit.has_target and explicit.layer_ratios == [0.4, 0.6]
    assert fixed_targets(explicit, 2) == [Target.unstructured(0.4), Target.unstructured(0.6)]
    owl = PruneConfig(allocation="owl", pattern="5:8", owl_lambda=0.125).validate()
    assert owl.target == Target.nm(5, 8) and owl.owl_lambda == 0.125 and fixed_targets(owl, 2) is None


def test_explicit_length_checked_before_pruning():
    model = tiny_model(layers=2)
    before = [p.clone() for p in model.parameters()]
    cfg = PruneConfig(method="magnitude", allocation="explicit", sparsity=None, layer_ratios=[0.5] * 3,
                      seqlen=64, device="cpu")
    with pytest.raises(LLMPruneError, match="2 decoder layers"):
        prune(model, cfg, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    res = prune(model, PruneConfig(method="magnitude", allocation="explicit", sparsity=None,
                                   layer_ratios=[0.2, 0.7], seqlen=64, device="cpu"), progress=False)
    assert [L["target"] for L in res.report["layers"]] == ["0.2", "0.7"]
    assert res.report["allocation"]["ratios"] == [0.2, 0.7]
    assert res.report["target"] == "explicit"


# --- pipeline: report, plot, determinism ------------------------------------------------------
def test_pipeline_owl_report_plot_and_determinism(tokenizer, tmp_path):
    cfg = PruneConfig(method="wanda", sparsity=0.6, allocation="owl", owl_m=3, owl_lambda=0.1,
                      calib="c4", nsamples=4, seqlen=64, seed=0, device="cpu", out=str(tmp_path / "a"))
    r1 = prune(tiny_model(layers=4), cfg, tokenizer=tokenizer, progress=False).report
    cfg.out = None
    r2 = prune(tiny_model(layers=4), cfg, tokenizer=tokenizer, progress=False).report
    a1, a2 = r1["allocation"], r2["allocation"]
    assert a1["ratios"] == a2["ratios"] and a1["outlier_ratios"] == a2["outlier_ratios"]
    assert a1["kind"] == "owl" and a1["owl_m"] == 3 and a1["owl_lambda"] == 0.1
    assert len(a1["ratios"]) == 4 and len(set(a1["ratios"])) > 1
    assert abs(a1["weighted_mean"] - 0.6) < 1e-12
    saved = json.loads((tmp_path / "a" / "pruning.json").read_text())
    assert saved["allocation"]["ratios"] == a1["ratios"]
    pytest.importorskip("matplotlib")
    png = (tmp_path / "a" / "allocation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "allocation owl (M=3, lambda=0.1" in summary(saved)


def test_format_allocation_nm():
    line = format_allocation({"kind": "owl", "owl_m": 5, "owl_lambda": 0.125, "ratios": [0.5, 0.375, 0.25],
                              "targets": ["4:8", "5:8", "6:8"], "weighted_mean": 0.375,
                              "outlier_ratios": [0.01, 0.02, 0.03]})
    assert "layers 4:8..6:8" in line and "0.375000" in line and "1.00%..3.00%" in line


def test_cli_owl_prune_and_report(tiny_dirs, tmp_path, capsys):
    from llmprune.cli import main

    out = tmp_path / "owl"
    rc = main(["prune", str(tiny_dirs["llama"]), "--method", "magnitude", "--pattern", "2:4",
               "--allocation", "owl", "--owl-m", "3", "--owl-lambda", "0.25", "--calib", "c4",
               "--nsamples", "2", "--seqlen", "32", "--device", "cpu", "--out", str(out), "-q"])
    assert rc == 0
    saved = json.loads((out / "pruning.json").read_text())
    assert saved["allocation"]["kind"] == "owl" and len(saved["allocation"]["outlier_ratios"]) == 2
    assert sorted(saved["allocation"]["targets"]) == ["1:4", "3:4"]  # λ = 1/M, two layers: one step each way
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "allocation owl (M=3, lambda=0.25" in text and "layers 1:4..3:4" in text
    assert "outlier%" in text
    assert main(["prune", str(tiny_dirs["llama"]), "--method", "magnitude", "--sparsity", "0.5",
                 "--allocation", "owl", "--owl-m", "0", "-q"]) == 2
