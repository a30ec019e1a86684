"""ADMM weight update and ADMM-Grad against direct least-squares references; engine end to end."""

import json

import pytest
import torch

import llmprune
from llmprune.cli import main
from llmprune.config import PruneConfig
from llmprune.errors import LLMPruneError
from llmprune.report import layer_table, summary
from llmprune.sparsity.admm import (
    ADMMOptions,
    admm_gradual,
    admm_update,
    cubic_sparsity,
    drop_lowest,
    kth_smallest,
)
from llmprune.sparsity.methods import prune_weight, required_stats
from llmprune.sparsity.patterns import Target, unstructured_mask
from llmprune.sparsity.recon import relative_recon_error
from llmprune.sparsity.sparsegpt import sparsegpt


@pytest.fixture(autouse=True)
def one_thread():
    """These matrices are tiny: on a busy machine, waking a second thread costs more than the
    arithmetic (seconds instead of milliseconds for 1000 small ADMM iterations)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def calib(tokens=256, cols=32, seed=0, dtype=torch.float64):
    """Correlated inputs of very different scales, as real activations are."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, cols, generator=g, dtype=dtype) * torch.linspace(0.1, 3, cols, dtype=dtype)
    X = X @ (torch.eye(cols, dtype=dtype) + torch.randn(cols, cols, generator=g, dtype=dtype) / cols**0.5)
    return X, X.T @ X


def masked_lstsq(W, X, mask, damp):
    """Row by row: min ‖X(w₀ − w)‖² + λ Σ_j H_jj (w₀_j − w_j)² over w supported on the kept columns.

    That is ADMM's damped objective written in the original coordinates (λ = damp, since the
    preconditioned H has unit diagonal), solved as an ordinary stacked least-squares problem.
    """
    H_diag = (X * X).sum(0)
    out = torch.zeros_like(W)
    for i in range(W.shape[0]):
        S = mask[i].nonzero().flatten()
        reg = torch.diag((damp * H_diag[S]).sqrt())
        A = torch.cat([X[:, S], reg])
        b = torch.cat([X @ W[i], reg @ W[i, S]])
        out[i, S] = torch.linalg.lstsq(A, b.unsqueeze(1)).solution.squeeze(1)
    return out


@pytest.mark.parametrize("damp,iters", [(0.1, 400), (0.0, 3000)])
def test_fixed_mask_converges_to_masked_lstsq(damp, iters):
    torch.manual_seed(0)
    X, H = calib(tokens=256, cols=32, seed=1)
    W = torch.randn(6, 32, dtype=torch.float64)
    mask = torch.rand(6, 32) > 0.5
    ref = masked_lstsq(W, X, mask, damp)
    W_new = admm_update(W, H, mask, iters=iters, damp=damp)  # undamped converges slower
    assert W_new.dtype == torch.float64
    torch.testing.assert_close(W_new, ref, rtol=1e-8, atol=1e-9)
    # and the paper's 20 iterations already get close in the objective
    W20 = admm_update(W.float(), H.float(), mask, iters=20, damp=damp)
    assert relative_recon_error(W, W20, H) <= 1.05 * relative_recon_error(W, ref, H)


def test_mask_respected_exactly():
    torch.manual_seed(1)
    _, H = calib(cols=64, seed=2, dtype=torch.float32)
    W = torch.randn(16, 64)
    mask = torch.rand(16, 64) > 0.6
    W_new = admm_update(W, H, mask, iters=3)
    assert W_new.dtype == torch.float32 and W_new.shape == W.shape
    assert (W_new[~mask] == 0).all()
    assert (W_new[mask] != 0).all()  # ADMM moves kept weights; none lands exactly on zero


def test_cubic_schedule():
    s, ks = 0.6, 15
    steps = [cubic_sparsity(s, t, ks) for t in range(ks)]
    assert steps[-1] == s
    assert all(a < b for a, b in zip(steps, steps[1:], strict=False))
    assert steps[0] == pytest.approx(s * (1 - (14 / 15) ** 3))
    # front-loaded: half of the final sparsity within the first fifth of the steps
    assert steps[ks // 5] > s / 2


def test_drop_lowest_matches_topk_and_counts_ties():
    torch.manual_seed(9)
    score = torch.rand(7, 40)
    for k in (0, 1, 100, 279, 280):
        keep = drop_lowest(score, k)
        assert (~keep).sum() == k
        assert torch.equal(keep, unstructured_mask(score, k / 280 + 1e-9, per="matrix"))
    score[:, :5] = 0  # 35 tied zeros (dead inputs), and ties at the threshold itself
    score[3, 10:20] = 0.5
    for k in (10, 35, 36, 60):
        keep = drop_lowest(score, k)
        assert (~keep).sum() == k
        assert score[~keep].max() <= score[keep].min()


def test_kth_smallest_equals_kthvalue_with_ties_zeros_inf_and_fallbacks():
    torch.manual_seed(3)
    x = torch.rand(5000) * torch.rand(5000)
    x[:700] = 0  # dead inputs
    x[700:900] = float("inf")  # N:M survivors
    x[900:1200] = x[1200]  # ties
    x[1300:1400] = 2.0 ** -140  # subnormals
    for k in (1, 2, 350, 700, 701, 1000, 2500, 4800, 4801, 5000):
        assert torch.equal(kth_smallest(x, k), x.kthvalue(k).values), k
    neg, dbl = torch.randn(999), torch.rand(999, dtype=torch.float64)  # fall back to kthvalue
    for t in (neg, dbl):
        assert torch.equal(kth_smallest(t, 400), t.kthvalue(400).values)


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.33])
@pytest.mark.parametrize("per", ["matrix", "row"])
def test_gradual_hits_unstructured_target_exactly(sparsity, per):
    torch.manual_seed(2)
    _, H = calib(cols=64, seed=3, dtype=torch.float32)
    W = torch.randn(10, 64)
    W_new, keep = admm_gradual(W, H, Target.unstructured(sparsity), per=per)
    if per == "matrix":
        assert (~keep).sum() == int(W.numel() * sparsity)
    else:
        assert ((~keep).sum(1) == int(64 * sparsity)).all()
    assert (W_new[~keep] == 0).all() and torch.isfinite(W_new).all()


# 4:5 — int(size·(1 − 4/5)) falls one short in floating point: the N:M mask must be exact anyway
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (1, 3), (4, 5)])
def test_gradual_hits_every_nm_group_exactly(n, m):
    torch.manual_seed(3)
    _, H = calib(cols=120, seed=4, dtype=torch.float32)
    W = torch.randn(12, 120)
    W_new, keep = admm_gradual(W, H, Target.nm(n, m), iters=10, ks=7)
    assert (keep.reshape(12, -1, m).sum(-1) == n).all()
    assert (W_new[~keep] == 0).all()


def test_gradual_stacked_group_equals_separate_calls():
    torch.manual_seed(4)
    _, H = calib(cols=32, seed=5, dtype=torch.float64)
    Ws = [torch.randn(r, 32, dtype=torch.float64) for r in (8, 4, 4)]
    stacked = prune_weight("admm-grad", Ws, {"xtx": H}, Target.unstructured(0.6))
    for W, (W_s, k_s) in zip(Ws, stacked, strict=True):
        [(W_1, k_1)] = prune_weight("admm-grad", [W], {"xtx": H}, Target.unstructured(0.6))
        assert torch.equal(k_s, k_1)
        assert (~k_s).sum() == int(W.numel() * 0.6)  # each matrix meets the target on its own
        torch.testing.assert_close(W_s, W_1, rtol=1e-4, atol=1e-5)


def test_ill_conditioned_and_rank_deficient_give_finite_weights():
    torch.manual_seed(5)
    X = torch.randn(4, 32)  # 4 tokens for 32 inputs: rank 4
    X[:, 5] = 0  # a dead input
    X[:, 7] *= 1e4  # and wildly different input scales
    X[:, 9] *= 1e-4
    H = X.T @ X
    W = torch.randn(8, 32)
    mask = torch.rand(8, 32) > 0.5
    for damp in (0.0, 0.1):
        W_new = admm_update(W, H, mask, damp=damp, rho=1e-3)
        assert torch.isfinite(W_new).all() and (W_new[~mask] == 0).all()
    W_new, keep = admm_gradual(W, H, Target.unstructured(0.5), damp=0.0)
    assert torch.isfinite(W_new).all()
    assert not keep[:, 5].any()  # a dead input scores zero: pruned before anything that fires
    # exactly collinear inputs (a duplicated column)
    X2 = torch.randn(64, 16)
    X2[:, 1] = X2[:, 0]
    W_new, keep = admm_gradual(torch.randn(4, 16), X2.T @ X2, Target.nm(2, 4), damp=0.0)
    assert torch.isfinite(W_new).all() and (keep.reshape(4, -1, 4).sum(-1) == 2).all()


def test_recon_error_matches_outputs():
    torch.manual_seed(6)
    X, H = calib(cols=32, seed=6)
    W = torch.randn(5, 32, dtype=torch.float64)
    W_new = W * (torch.rand(5, 32) > 0.5)
    direct = ((X @ W.T - X @ W_new.T) ** 2).sum() / ((X @ W.T) ** 2).sum()
    assert relative_recon_error(W, W_new, H.float()) == pytest.approx(direct.item(), rel=1e-4)
    assert relative_recon_error(W, W, H) == 0


@pytest.mark.parametrize("target", [Target.unstructured(0.5), Target.unstructured(0.7), Target.nm(2, 4)])
def test_admm1_beats_sparsegpt_update_on_same_mask(target):
    torch.manual_seed(7)
    X, H = calib(tokens=512, cols=64, seed=7, dtype=torch.float32)
    W = torch.randn(32, 64)
    stats = {"col_sq": torch.diagonal(H), "xtx": H}
    [(W_admm, k1)] = prune_weight("wanda", [W], stats, target, solver="admm")
    [(W_sgpt, k2)] = prune_weight("wanda", [W], stats, target, solver="sparsegpt")
    [(W_none, _)] = prune_weight("wanda", [W], stats, target)
    assert torch.equal(k1, k2)
    e_admm, e_sgpt = relative_recon_error(W, W_admm, H), relative_recon_error(W, W_sgpt, H)
    assert e_admm <= e_sgpt < relative_recon_error(W, W_none, H)
    # ADMM-Grad chooses a better mask than Wanda's, though per matrix it prunes int(size·s),
    # at least Wanda's per-row Σ int(cols·s)
    [(W_grad, k_grad)] = prune_weight("admm-grad", [W], {"xtx": H}, target)
    assert (~k_grad).sum() >= (~k1).sum()
    assert relative_recon_error(W, W_grad, H) < e_admm


def test_admm_solver_after_sparsegpt_and_magnitude_masks():
    torch.manual_seed(8)
    _, H = calib(cols=32, seed=8, dtype=torch.float32)
    W = torch.randn(8, 32)
    [(W_s, keep_s)] = prune_weight("sparsegpt", [W], {"xtx": H}, Target.unstructured(0.5), solver="admm")
    _, keep_ref = sparsegpt(W, H, target=Target.unstructured(0.5))
    assert torch.equal(keep_s, keep_ref) and (W_s[~keep_s] == 0).all()
    [(W_m, keep_m)] = prune_weight("magnitude", [W], {"xtx": H}, Target.nm(2, 4), solver="admm")
    assert (W_m[~keep_m] == 0).all()
    assert relative_recon_error(W, W_m, H) < relative_recon_error(W, W * keep_m, H)
    # admm-grad's mask alone (solver none) keeps the original weights
    [(W_g, keep_g)] = prune_weight("admm-grad", [W], {"xtx": H}, Target.unstructured(0.5), solver="none")
    assert torch.equal(W_g, W * keep_g)


def test_registries_and_config_validation():
    assert required_stats("admm-grad", None) == {"xtx"}
    assert required_stats("wanda", "admm") == {"col_sq", "xtx"}
    assert required_stats("magnitude", None) == frozenset()
    assert required_stats("magnitude", None, recon_error=True) == {"xtx"}
    PruneConfig(method="admm-grad", sparsity=0.5).validate()
    with pytest.raises(LLMPruneError, match="admm_ks"):
        PruneConfig(method="admm-grad", sparsity=0.5, admm_iters=10, admm_ks=15).validate()
    with pytest.raises(LLMPruneError, match="admm_rho"):
        PruneConfig(method="wanda", solver="admm", sparsity=0.5, admm_rho=0).validate()
    with pytest.raises(ValueError, match="ks"):
        admm_gradual(torch.randn(2, 8), torch.eye(8), Target.unstructured(0.5), iters=5, ks=6)


# --- engine end to end on a tiny model -------------------------------------------------------

FAST = dict(nsamples=4, seqlen=32)


def _prune(tiny_dirs, **kw):
    model, tok = llmprune.load_model(str(tiny_dirs["llama"]))
    return llmprune.prune(model, PruneConfig(**FAST, **kw), tokenizer=tok, progress=False).report


def _errors(report):
    return [e["recon_error"] for L in report["layers"] for e in L["linears"].values()]


@pytest.mark.parametrize("kw", [dict(method="admm-grad", sparsity=0.6),
                                dict(method="admm-grad", pattern="2:4"),
                                dict(method="wanda", solver="admm", sparsity=0.5)])
def test_engine_runs_admm_end_to_end(tiny_dirs, kw):
    report = _prune(tiny_dirs, **kw)
    target = 0.6 if kw.get("sparsity") == 0.6 else 0.5
    assert report["sparsity"] == pytest.approx(target, abs=1e-3)
    errs = _errors(report)
    assert len(errs) == 2 * 7 and all(0 < e < 1 for e in errs)


def test_admm_solver_lowers_engine_recon_error(tiny_dirs):
    plain = _prune(tiny_dirs, method="wanda", sparsity=0.5, recon_error=True)
    admm = _prune(tiny_dirs, method="wanda", sparsity=0.5, solver="admm")
    # first layer: same inputs, same Wanda mask, so only the update differs
    for n, e in admm["layers"][0]["linears"].items():
        assert e["recon_error"] < plain["layers"][0]["linears"][n]["recon_error"]


def test_recon_error_only_where_xtx_is_collected(tiny_dirs):
    assert not any("recon_error" in e for L in _prune(tiny_dirs, method="wanda", sparsity=0.5)["layers"]
                   for e in L["linears"].values())
    report = _prune(tiny_dirs, method="magnitude", sparsity=0.5, recon_error=True)
    assert len(_errors(report)) == 14
    assert "reconstruction error" in summary(report)
    assert "recon" in layer_table(report).splitlines()[0]


def test_cli_admm_grad_and_report(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "admm"
    rc = main(["prune", str(tiny_dirs["qwen2"]), "--method", "admm-grad", "--sparsity", "0.5",
               "--admm-iters", "8", "--admm-ks", "5", "--nsamples", "4", "--seqlen", "32",
               "--out", str(out), "-q"])
    assert rc == 0
    assert "reconstruction error" in capsys.readouterr().out
    report = json.loads((out / "pruning.json").read_text())
    assert report["recipe"]["admm_iters"] == 8 and report["recipe"]["method"] == "admm-grad"
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "recon" in printed and "reconstruction error" in printed
    assert main(["prune", str(tiny_dirs["qwen2"]), "--method", "admm-grad", "--sparsity", "0.5",
                 "--admm-iters", "4", "--admm-ks", "5", "-q"]) == 2


def test_admm_grad_with_owl_mixed_nm():
    """ADMM-Grad takes OWL's per-layer N:M targets: every group of every layer exact."""
    from conftest import tiny_model

    from llmprune.engine.sequential import LayerPlan, run_sequential
    from llmprune.models.layers import decoder_layers, linear_layers
    from llmprune.sparsity.allocation import OWLAllocator

    model = tiny_model(layers=4)
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    plan = LayerPlan("admm-grad", allocator=OWLAllocator(Target.nm(5, 8), 5.0, 0.125),
                     options={ADMMOptions: ADMMOptions(admm_iters=6, admm_ks=3, admm_rho=1.0, admm_damp=0.1)})
    report = run_sequential(model, ids, plan, progress=False)
    for L, layer in zip(report, decoder_layers(model), strict=True):
        n = int(L["target"].split(":")[0])
        for lin in linear_layers(layer).values():
            W = lin.weight
            assert ((W != 0).reshape(W.shape[0], -1, 8).sum(-1) <= n).all()
    assert sum(int(L["target"].split(":")[0]) for L in report) == 5 * 4
