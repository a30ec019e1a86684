"""Structured pruning: OSSCAR's math on small exact problems, width and depth pruning of tiny
Llama / Mistral / Qwen2 models, generation with the KV cache, saved models in plain
transformers, and the bad inputs."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import FAMILIES, assert_reloads_in_plain_transformers, family_model, tiny_model

from llmprune.errors import LLMPruneError
from llmprune.export.save import save_pruned
from llmprune.models.adapter import decoder_layers, mlp_triplet
from llmprune.structured import StructuredOptions, plan_structured, structured
from llmprune.structured import depth as D
from llmprune.structured import osscar as O
from llmprune.structured.shrink import drop_layers, layers_removed, shrink_mlp
from llmprune.structured.speed import measure_speed

NS, SL = 8, 32  # calibration rows x tokens for the tiny models


def calib(n: int = NS, seqlen: int = SL, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def problem(seed: int, n: int = 8, d: int = 3, tokens: int = 30):
    """A small least-squares problem with ``n`` correlated channels: ``(X, H, W (n, d))``."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    W = torch.randn(n, d, generator=g, dtype=torch.float64)
    return X, X.T @ X, W


def removed_mask(n: int, idx) -> torch.Tensor:
    return torch.isin(torch.arange(n), torch.tensor(list(idx), dtype=torch.long))


# --- OSSCAR math ------------------------------------------------------------------------------
@pytest.mark.parametrize(("inter", "ratio", "round_to", "width"),
                         [(1536, 0.2, 64, 1216), (11008, 0.1, 128, 9856), (128, 0.25, 16, 96), (128, 0.5, 1, 64)])
def test_mlp_width_rounds_to_the_multiple(inter, ratio, round_to, width):
    assert O.mlp_width(inter, ratio, round_to) == width  # 11008 / 0.1 / 128 is Quark's Llama-2 row


@pytest.mark.parametrize(("ratio", "msg"), [(0.99, "leaves no MLP channel"), (0.01, "removes no MLP channel"),
                                            (0.0, "in \\(0, 1\\)"), (1.0, "in \\(0, 1\\)")])
def test_mlp_width_errors(ratio, msg):
    with pytest.raises(LLMPruneError, match=msg):
        O.mlp_width(128, ratio, 16)


def test_objective_is_the_damped_output_error_of_the_refit():
    X, H, W = problem(1, n=10)
    Hd, P, damp = O.damped(H, 0.01)
    lam = damp * torch.diagonal(H).mean()
    removed = removed_mask(10, [0, 3, 7])
    keep = (~removed).nonzero().squeeze(1)
    W_hat = torch.zeros_like(W)
    W_hat[keep] = O.refit(W, Hd, keep)
    direct = ((X @ (W - W_hat)) ** 2).sum() + lam * ((W - W_hat) ** 2).sum()
    assert O.objective(W, P, removed) == pytest.approx(float(direct), rel=1e-9)
    # the re-fit is the least-squares optimum: any perturbation of the kept rows is worse
    W_bad = W_hat.clone()
    W_bad[keep[0]] += 0.01
    worse = ((X @ (W - W_bad)) ** 2).sum() + lam * ((W - W_bad) ** 2).sum()
    assert worse > direct


def test_nothing_pruned_is_exact():
    _, H, W = problem(2, n=12)
    res = O.osscar_prune(W.T.float(), H.float(), 12)
    assert torch.equal(res.keep, torch.arange(12))
    assert torch.equal(res.down, W.T.float())
    assert res.recon_error == 0.0


def test_greedy_step_removes_the_cheapest_channel_exactly():
    _, H, W = problem(3, n=10)
    _, P, _ = O.damped(H, 0.01)
    first = int(O.greedy_remove(W, P, 1).nonzero())
    exact = [O.objective(W, P, removed_mask(10, [j])) for j in range(10)]
    assert first == int(np.argmin(exact))
    # a block step removes as many channels as asked, and keeps the bookkeeping exact
    assert int(O.greedy_remove(W, P, 5, block=2).sum()) == 5


def _brute_refit_error(X: torch.Tensor, W: torch.Tensor, lam: float, removed: torch.Tensor) -> float:
    """min over Ŵ (Ŵ_R = 0) of ‖X(W − Ŵ)‖² + λ‖W − Ŵ‖², by plain least squares on [X; √λ I]."""
    n = W.shape[0]
    A = torch.cat([X, lam**0.5 * torch.eye(n, dtype=X.dtype)])
    B = A @ W
    keep = (~removed).nonzero().squeeze(1)
    if keep.numel() == 0:
        return float((B * B).sum())
    sol = torch.linalg.lstsq(A[:, keep], B).solution
    return float(((B - A[:, keep] @ sol) ** 2).sum())


@pytest.mark.parametrize("block", [1, 2, 3])
def test_greedy_objective_is_the_exact_refit_error_after_every_step(block):
    for seed in range(5):
        X, H, W = problem(seed, n=12, d=4, tokens=40)
        _, P, damp = O.damped(H, 0.01)
        lam = float(damp * torch.diagonal(H).mean())
        trace: list[float] = []
        final = O.greedy_remove(W, P, 9, block=block, trace=trace)
        assert len(trace) == -(-9 // block)
        for t, E_tracked in enumerate(trace):
            # greedy is deterministic, so the first t+1 blocks are greedy_remove with fewer channels
            removed = O.greedy_remove(W, P, min((t + 1) * block, 9), block=block)
            assert (removed & ~final).sum() == 0  # a prefix of the final removal
            exact = _brute_refit_error(X, W, lam, removed)
            assert E_tracked == pytest.approx(exact, rel=1e-8)
            assert O.objective(W, P, removed) == pytest.approx(exact, rel=1e-8)


def test_shrink_toward_the_diagonal():
    X, H, W = problem(6, n=16, d=4, tokens=60)
    Hs = O.shrunk(H, 0.3)
    torch.testing.assert_close(torch.diagonal(Hs), torch.diagonal(H))  # each channel's energy kept
    off = ~torch.eye(16, dtype=torch.bool)
    torch.testing.assert_close(Hs[off], 0.7 * H[off])
    assert O.shrunk(H, 0.0) is H
    # shrink → 1 makes the greedy cost ‖W_i‖²·H_ii: the channel score's choice
    res = O.osscar_prune(W.T.float(), H.float(), 8, shrink=1 - 1e-9, percdamp=0.0, local_search_swaps=0)
    score = torch.topk(O.channel_scores(W, H), 8).indices.sort().values
    assert torch.equal(res.keep, score)
    # the steps optimise the shrunk objective, the report gives the plain error ‖XW − X_SŴ_S‖²/‖XW‖²
    res = O.osscar_prune(W.T.float(), H.float(), 8, shrink=0.3)
    W_new = torch.zeros_like(W)
    W_new[res.keep] = res.down.T.double()
    direct = ((X @ (W - W_new)) ** 2).sum() / ((X @ W) ** 2).sum()
    assert res.recon_error == pytest.approx(float(direct), rel=1e-4)
    assert res.errors["local_search"] <= res.errors["greedy"]
    with pytest.raises(ValueError, match="shrink"):
        O.osscar_prune(W.T.float(), H.float(), 8, shrink=1.0)
    with pytest.raises(LLMPruneError, match="shrink"):
        StructuredOptions(ratio=0.2, shrink=1.0)


def test_shrink_regularises_the_refit_on_few_tokens():
    """Few tokens of correlated channels: the plain fit chases the sample, the shrunk one less."""
    g = torch.Generator().manual_seed(0)
    n, d = 48, 8
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5 + torch.eye(n, dtype=torch.float64)
    W = torch.randn(n, d, generator=g, dtype=torch.float64)

    def draw(tokens):
        return torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix

    held = draw(20000)
    Hh = held.T @ held
    err = {0.0: [], 0.3: []}
    for _ in range(8):
        X = draw(64)
        for shrink in err:
            res = O.osscar_prune(W.T.float(), (X.T @ X).float(), 32, shrink=shrink)
            D = W.clone()
            D[res.keep] -= res.down.T.double()
            err[shrink].append(float((D * (Hh @ D)).sum() / (W * (Hh @ W)).sum()))
    assert np.mean(err[0.3]) < np.mean(err[0.0])


def test_local_search_never_increases_and_can_strictly_improve():
    improved = []
    for seed in range(40):
        _, H, W = problem(seed)
        _, P, _ = O.damped(H, 0.01)
        greedy = O.greedy_remove(W, P, 4)
        after, swaps = O.local_search(W, P, greedy)
        e_greedy, e_after = O.objective(W, P, greedy), O.objective(W, P, after)
        assert e_after <= e_greedy
        assert int(after.sum()) == 4
        if swaps:
            assert e_after < e_greedy * (1 - 1e-9)
            improved.append(seed)
        # no single swap from the result lowers the objective (checked exhaustively)
        R, S = after.nonzero().squeeze(1).tolist(), (~after).nonzero().squeeze(1).tolist()
        best = min(O.objective(W, P, removed_mask(8, [*(set(R) - {j}), i])) for i in S for j in R)
        assert best >= e_after * (1 - 1e-9)
    assert improved  # greedy is not always optimal; the swaps then find better sets
    # and on such a case the whole pipeline reports the drop
    _, H, W = problem(improved[0])
    res = O.osscar_prune(W.T.float(), H.float(), 4, shrink=0.0)  # the same P as above
    assert res.swaps > 0 and res.errors["local_search"] < res.errors["greedy"]


def test_refit_beats_no_refit_and_greedy_beats_the_channel_score():
    X, H, W = problem(4, n=32, d=6, tokens=200)
    on = O.osscar_prune(W.T.float(), H.float(), 16)
    off = O.osscar_prune(W.T.float(), H.float(), 16, refit_down=False)
    assert torch.equal(on.keep, off.keep)
    assert on.recon_error < off.recon_error
    # the reported error is ‖X W − X_S Ŵ_S‖² / ‖X W‖², computed here from X itself
    W_new = torch.zeros_like(W)
    W_new[on.keep] = on.down.T.double()
    direct = ((X @ (W - W_new)) ** 2).sum() / ((X @ W) ** 2).sum()
    assert on.recon_error == pytest.approx(float(direct), rel=1e-4)
    baseline = O.osscar_prune(W.T.float(), H.float(), 16, greedy=False, local_search_swaps=0, refit_down=False)
    assert on.recon_error < baseline.recon_error


def test_dense_target_fits_another_output():
    X, H, W = problem(5, n=16, d=4, tokens=80)
    # the same target as the default path: the same channels and weights
    same = O.osscar_prune(W.T.float(), H.float(), 8, XtY=H @ W, YtY=float((W * (H @ W)).sum()))
    ref = O.osscar_prune(W.T.float(), H.float(), 8)
    assert torch.equal(same.keep, ref.keep)
    torch.testing.assert_close(same.down, ref.down, rtol=1e-4, atol=1e-5)
    # another target Y (the dense model's stream): the reported error is ‖Y − X_S Ŵ_S‖² / ‖Y‖²
    Xd = X + 0.3 * torch.randn(X.shape, generator=torch.Generator().manual_seed(9), dtype=X.dtype)
    Y = Xd @ W
    res = O.osscar_prune(W.T.float(), H.float(), 8, XtY=X.T @ Y, YtY=float((Y * Y).sum()), shrink=0.0)
    direct = ((Y - X[:, res.keep] @ res.down.T.double()) ** 2).sum() / (Y * Y).sum()
    assert res.recon_error == pytest.approx(float(direct), rel=1e-3)
    # and it fits Y better than the weights fitted to X W do (in-sample: the plain XᵀX, no shrink)
    ref = O.osscar_prune(W.T.float(), H.float(), 8, shrink=0.0)
    other = ((Y - X[:, ref.keep] @ ref.down.T.double()) ** 2).sum() / (Y * Y).sum()
    assert res.recon_error < float(other)


def test_spearman_and_ranks():
    assert D.ranks([3.0, 1.0, 2.0, 1.0]) == [4.0, 1.5, 3.0, 1.5]
    assert D.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert D.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert D.spearman([1, 1], [1, 2]) is None
    assert D.best_window([3.0, float("nan"), 1.0, 1.0]) == 2


# --- width pruning of whole models ------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_osscar_model_shapes_config_and_report(family):
    model = tiny_model(family, layers=3)
    ids = calib()
    before = sum(p.numel() for p in model.parameters())
    r = structured(model, config={"ratio": 0.25, "round_to": 16, "nsamples": NS, "seqlen": SL},
                   ids=ids, progress=False)
    assert model.config.intermediate_size == 96
    for layer in decoder_layers(model):
        mlp = layer.mlp
        assert mlp.gate_proj.weight.shape == (96, 64) and mlp.up_proj.weight.shape == (96, 64)
        assert mlp.down_proj.weight.shape == (64, 96) and mlp.down_proj.in_features == 96
    rep = r.report
    assert rep["params"]["before"] == before
    assert before - rep["params"]["after"] == 3 * 32 * 3 * 64  # layers x channels x (gate, up, down) x hidden
    layers = rep["osscar"]["layers"]
    assert [e["width"] for e in layers] == [96] * 3 and all(len(e["removed"]) == 32 for e in layers)
    assert all(0 < e["recon_error"] < 1 for e in layers)
    assert all(e["objective"]["local_search"] <= e["objective"]["greedy"] for e in layers)
    assert torch.isfinite(model(ids[:2]).logits).all()
    json.dumps(rep)  # the report is plain JSON


def test_osscar_beats_the_channel_score_baseline_per_layer():
    ids = calib()
    runs = {}
    for name, opts in {"osscar": {}, "baseline": dict(greedy=False, local_search=False, refit=False)}.items():
        model = tiny_model("llama", layers=2)
        runs[name] = structured(model, ids=ids, ratio=0.5, round_to=8, nsamples=NS, seqlen=SL,
                                progress=False, **opts).report["osscar"]["layers"]
    # layer 0 sees the same inputs in both runs: a like-for-like comparison
    assert runs["osscar"][0]["recon_error"] < runs["baseline"][0]["recon_error"]


def test_osscar_dense_target_runs_a_dense_stream():
    ids = calib()
    runs = {}
    for dense_target in (False, True):
        model = tiny_model("mistral", layers=2)
        runs[dense_target] = structured(model, ids=ids, ratio=0.5, round_to=8, nsamples=NS, seqlen=SL,
                                        dense_target=dense_target, progress=False).report["osscar"]["layers"]
    # layer 0 sees the same inputs on both streams: the same choice
    assert runs[True][0]["removed"] == runs[False][0]["removed"]
    assert runs[True][0]["recon_error"] == pytest.approx(runs[False][0]["recon_error"], rel=1e-3)
    assert 0 < runs[True][1]["recon_error"] < 1
    assert torch.isfinite(model(ids[:1]).logits).all() and model.config.intermediate_size == 64


def test_osscar_statistics_come_from_the_pruned_previous_layers(monkeypatch):
    model = tiny_model("llama", layers=2)
    dense = copy.deepcopy(model)
    seen = []
    real = O.osscar_prune

    def spy(W_down, H, width, **kw):
        seen.append(H.clone())
        return real(W_down, H, width, **kw)

    monkeypatch.setattr("llmprune.structured.api.osscar_prune", spy)
    ids = calib()
    structured(model, ids=ids, ratio=0.5, round_to=8, nsamples=NS, seqlen=SL, progress=False)
    # layer 1's XᵀX must be that of the dense layer 1 fed by the *pruned* layer 0
    decoder_layers(dense)[0] = decoder_layers(model)[0]
    X = []
    h = decoder_layers(dense)[1].mlp.down_proj.register_forward_pre_hook(lambda _m, a: X.append(a[0].reshape(-1, 128)))
    dense(ids, use_cache=False)
    h.remove()
    X = torch.cat(X)
    torch.testing.assert_close(seen[1], X.T @ X, rtol=1e-4, atol=1e-3)


def test_shrink_keeping_every_channel_changes_nothing():
    model = tiny_model("qwen2", layers=2)
    ids = calib(2)
    ref = model(ids).logits
    for layer in decoder_layers(model):
        shrink_mlp(layer, mlp_triplet(layer), torch.arange(128))
    torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)


def test_osscar_fused_gate_up_phi3():
    model = family_model("phi3", layers=2)
    structured(model, ids=calib(), ratio=0.5, round_to=16, nsamples=NS, seqlen=SL, progress=False)
    mlp = decoder_layers(model)[0].mlp
    assert mlp.gate_up_proj.weight.shape == (128, 64) and mlp.down_proj.weight.shape == (64, 64)
    assert model.config.intermediate_size == 64
    assert torch.isfinite(model(calib(1)).logits).all()


def test_param_ratio_removes_that_share_of_parameters():
    model = tiny_model("llama", layers=2)
    plan = plan_structured(model, StructuredOptions(param_ratio=0.1, round_to=1, seqlen=SL))
    total = sum(p.numel() for p in model.parameters())
    removed = 2 * (128 - plan.width) * 3 * 64
    assert abs(removed / total - 0.1) < 3 * 64 * 2 / total  # within one channel per layer
    depth = plan_structured(model, StructuredOptions(method="depth", param_ratio=0.2, seqlen=SL))
    assert depth.k == 1


# --- depth pruning ----------------------------------------------------------------------------
def greedy_no_cache(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("family", [*FAMILIES, "qwen2_swa"])
def test_depth_removes_a_block_and_generation_with_cache_works(family):
    model = tiny_model(family, layers=4) if family in FAMILIES else family_model(family, layers=4)
    types_before = list(getattr(model.config, "layer_types", None) or [])
    r = structured(model, ids=calib(), method="depth", layers=2, score="cosine", nsamples=NS, seqlen=SL,
                   progress=False)
    dep = r.report["depth"]
    removed = dep["removed_layers"]
    assert len(removed) == 2 and removed[1] == removed[0] + 1
    assert dep["removed_layers"][0] == int(np.argmin(dep["window_scores"]["cosine"]))
    assert model.config.num_hidden_layers == 2 and len(decoder_layers(model)) == 2
    assert [layer.self_attn.layer_idx for layer in decoder_layers(model)] == [0, 1]
    if types_before:
        assert model.config.layer_types == [t for i, t in enumerate(types_before) if i not in removed]
    prompt = calib(1, 6, seed=3)
    cached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True,
                            pad_token_id=0, eos_token_id=None)
    assert torch.equal(cached, greedy_no_cache(model, prompt, 10))


def test_depth_qwen2_max_window_layers_recounted():
    model = family_model("qwen2_swa", layers=4)  # layers 2, 3 slide (max_window_layers 2)
    drop_layers(model, [0])
    assert model.config.max_window_layers == 1
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]


def test_depth_ppl_search_restores_the_model_between_windows():
    model = tiny_model("llama", layers=4)
    ids = calib()
    ref = model(ids[:2]).logits
    scores = D.ppl_window_scores(model, ids, 2, progress=False)
    torch.testing.assert_close(model(ids[:2]).logits, ref, rtol=0, atol=0)
    assert len(scores) == 3
    # each score is the perplexity of the model without that window
    with layers_removed(model, [1, 2]), torch.no_grad():
        logits = model(ids, use_cache=False).logits
    nll = torch.stack([torch.nn.functional.cross_entropy(logits[j, :-1], ids[j, 1:]) for j in range(NS)]).mean()
    assert scores[1] == pytest.approx(float(nll.exp()), rel=1e-4)
    r = structured(model, ids=ids, method="depth", layers=2, compare_scores=False, nsamples=NS, seqlen=SL,
                   progress=False)
    assert r.report["depth"]["removed_layers"][0] == int(np.argmin(scores))
    assert set(r.report["depth"]["rank_agreement"]) == {"angular~cosine", "angular~ppl", "cosine~ppl"}


def test_similarity_matches_hidden_states():
    model = tiny_model("llama", layers=3)
    ids = calib(2)
    sim = D.similarity_matrices(model, ids, progress=False)
    hs = model(ids, output_hidden_states=True).hidden_states  # inputs of layers 0..2 are exact
    cos = torch.nn.functional.cosine_similarity(hs[0], hs[2], dim=-1)
    assert float(sim["cosine"][0, 2]) == pytest.approx(float(cos.mean()), abs=1e-5)
    assert float(sim["angular"][2, 0]) == pytest.approx(float((torch.arccos(cos.clamp(-1, 1)) / torch.pi).mean()), abs=1e-5)
    torch.testing.assert_close(torch.diagonal(sim["cosine"]), torch.ones(4, dtype=torch.float64))


# --- saved models in plain transformers -------------------------------------------------------


def test_saved_models_reload_in_plain_transformers(tmp_path):
    ids = calib()
    cases = {}
    width = tiny_model("llama", layers=2)
    r = structured(width, ids=ids, ratio=0.25, round_to=16, nsamples=NS, seqlen=SL, progress=False)
    cases["osscar"] = (width, r.report)
    deep = family_model("qwen2_swa", layers=4)
    r = structured(deep, ids=ids, method="depth", layers=2, score="angular", nsamples=NS, seqlen=SL,
                   progress=False)
    cases["depth"] = (deep, r.report)
    saved = {}
    for name, (model, report) in cases.items():
        save_pruned(model, None, tmp_path / name, report)
        saved[name] = (model, tmp_path / name)
    config = assert_reloads_in_plain_transformers(saved, ids, tmp_path)
    assert config["osscar"]["intermediate_size"] == 96 and config["depth"]["num_hidden_layers"] == 2


def test_speed_measure_smoke():
    s = measure_speed(tiny_model("llama", layers=2), prompt_len=8, new_tokens=3, repeats=1)
    assert s["prefill_tok_s"] > 0 and s["decode_tok_s"] > 0


# --- bad input: clear errors before any calibration or change ---------------------------------
def _untouched(model, snapshot) -> bool:
    return all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), snapshot, strict=True))


@pytest.mark.parametrize(("model_fn", "opts", "msg"), [
    (lambda: tiny_model("llama", layers=2), dict(ratio=0.0), "ratio must be in \\(0, 1\\)"),
    (lambda: tiny_model("llama", layers=2), dict(ratio=1.0), "ratio must be in \\(0, 1\\)"),
    (lambda: tiny_model("llama", layers=2), dict(param_ratio=1.5), "param_ratio must be in \\(0, 1\\)"),
    (lambda: tiny_model("llama", layers=2), dict(ratio=0.99, round_to=16), "leaves no MLP channel"),
    (lambda: tiny_model("llama", layers=2), dict(ratio=0.2), "removes no MLP channel"),  # 128 → 102 → 128
    (lambda: tiny_model("llama", layers=2), dict(param_ratio=0.95, round_to=1), "more than all 128 MLP channels"),
    (lambda: tiny_model("llama", layers=3), dict(method="depth", layers=3), "k must be below 3"),
    (lambda: tiny_model("llama", layers=3), dict(method="depth", layers=5), "k must be below 3"),
    (lambda: tiny_model("llama", layers=3), dict(method="depth", param_ratio=0.001), "less than one layer"),
    (lambda: tiny_model("llama", layers=2), dict(method="depth", ratio=0.2), "does not apply"),
    (lambda: tiny_model("llama", layers=2), dict(), "exactly one of --ratio and --param-ratio"),
    (lambda: tiny_model("llama", layers=2), dict(ratio=0.5, seqlen=4096), "longer than the model's context"),
    (lambda: family_model("opt", layers=2), dict(ratio=0.5, round_to=16),
     "no recognised gated MLP: expected one module with gate_proj \\+ up_proj \\+ down_proj"),
    (lambda: family_model("mixtral", layers=2), dict(ratio=0.5, round_to=16), "mixture-of-experts"),
])
def test_bad_input_is_one_clear_error_before_any_work(model_fn, opts, msg, no_calibration_data):
    model = model_fn()
    snapshot = [t.clone() for t in model.state_dict().values()]

    with pytest.raises(LLMPruneError, match=msg):
        structured(model, tokenizer=None, config={"seqlen": SL, **opts}, progress=False)
    assert _untouched(model, snapshot)


def test_ids_shape_must_match_the_options():
    with pytest.raises(LLMPruneError, match="ids has shape"):
        structured(tiny_model("llama", layers=2), ids=calib(4), ratio=0.5, round_to=16, nsamples=NS, seqlen=SL)


# --- the whole job ----------------------------------------------------------------------------
def test_structured_job_saves_and_reports(tiny_dirs, shared_data, tmp_path):
    from llmprune.structured.job import structured_job

    text = tmp_path / "text.txt"
    text.write_text("\n".join((shared_data / "wikitext-2-raw" / "wiki.valid.raw").read_text().splitlines()[:300]))
    out = tmp_path / "out"
    r = structured_job(str(tiny_dirs["llama"]), ratio=0.25, round_to=16, calib=str(text), nsamples=4,
                       seqlen=SL, ppl=[str(text)], max_windows=2, speed=True, out=str(out),
                       device="cpu", progress=False)
    saved = json.loads((out / "pruning.json").read_text())
    assert saved["ppl"]["before"] and saved["ppl"]["after"] and saved["speed"]["after"]["decode_tok_s"] > 0
    assert saved["params"]["after"] < saved["params"]["before"] == r.report["params"]["before"]
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 96
    assert (out / "recipe.yaml").is_file() and (out / "tokenizer.json").is_file()
    # a foreign non-empty directory is refused before the model loads
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(LLMPruneError, match="did not write"):
        structured_job("/nonexistent/model", ratio=0.25, calib=str(text), out=str(foreign), device="cpu")
