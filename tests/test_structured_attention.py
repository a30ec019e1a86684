"""OSSCAR on attention heads: the solver over groups of columns, GQA-aware head removal on
Llama / Mistral / Qwen2 / Qwen3 / Gemma2 shapes (GQA and MHA), and the bad inputs."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from conftest import family_model, tiny_model

from llmprune.errors import LLMPruneError
from llmprune.models.adapter import attention_heads, decoder_layers
from llmprune.structured import osscar as O
from llmprune.structured import structured
from llmprune.structured.attention import shrink_attention

NS, SL = 8, 32
SHAPES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "llama_mha"]


def calib(n: int = NS, seqlen: int = SL, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def shaped_model(name: str, layers: int = 2, seed: int = 0):
    """A tiny model: 4 query heads in 2 KV groups (head_dim 16), or 4 heads of MHA."""
    if name in ("llama", "mistral", "qwen2"):
        return tiny_model(name, layers=layers, seed=seed)
    if name == "llama_mha":
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(seed)
        cfg = AutoConfig.for_model("llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                                   max_position_embeddings=256, tie_word_embeddings=True)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.08)
        model.config.use_cache = False
        return model
    return family_model(name, layers=layers, seed=seed)


def problem(seed: int, heads: int = 6, g: int = 3, d: int = 4, tokens: int = 80):
    gen = torch.Generator().manual_seed(seed)
    n = heads * g
    X = torch.randn(tokens, n, generator=gen, dtype=torch.float64) @ torch.randn(n, n, generator=gen, dtype=torch.float64)
    return X, X.T @ X, torch.randn(n, d, generator=gen, dtype=torch.float64)


def mask_of(heads: int, g: int, removed) -> torch.Tensor:
    m = torch.zeros(heads, dtype=torch.bool)
    m[list(removed)] = True
    return m.repeat_interleave(g)


# --- the solver over groups of columns --------------------------------------------------------
def test_group_greedy_first_step_is_the_exact_cheapest_head():
    for seed in range(5):
        _, H, W = problem(seed)
        _, P, _ = O.damped(H, 0.01)
        first = O.greedy_remove(W, P, 1, group=3)
        exact = [O.objective(W, P, mask_of(6, 3, [h])) for h in range(6)]
        assert torch.equal(first, mask_of(6, 3, [min(range(6), key=exact.__getitem__)]))


def test_group_greedy_tracks_the_exact_refit_error():
    for seed in range(4):
        _, H, W = problem(seed)
        _, P, _ = O.damped(H, 0.01)
        trace: list[float] = []
        final = O.greedy_remove(W, P, 4, group=3, trace=trace)
        assert int(final.sum()) == 12
        for t, tracked in enumerate(trace):
            removed = O.greedy_remove(W, P, t + 1, group=3)
            assert tracked == pytest.approx(O.objective(W, P, removed), rel=1e-8)


def test_group_local_search_reaches_a_swap_optimum_within_buckets():
    buckets = torch.tensor([0, 0, 0, 1, 1, 1])  # 2 KV groups of 3 query heads
    improved = 0
    for seed in range(25):
        _, H, W = problem(seed)
        _, P, _ = O.damped(H, 0.01)
        start = O.greedy_remove(W, P, 2, group=3, buckets=buckets)
        heads_removed = start[::3].nonzero().squeeze(1)
        assert sorted(buckets[heads_removed].tolist()) == [0, 1]  # one per group
        after, swaps = O.local_search(W, P, start, group=3, buckets=buckets)
        e0, e1 = O.objective(W, P, start), O.objective(W, P, after)
        assert e1 <= e0
        improved += swaps > 0
        removed = after[::3].nonzero().squeeze(1).tolist()
        assert sorted(buckets[removed].tolist()) == [0, 1]
        # no single swap within a bucket lowers the objective (exhaustive)
        for j in removed:
            for i in (buckets == buckets[j]).nonzero().squeeze(1).tolist():
                if i in removed:
                    continue
                trial = [h for h in removed if h != j] + [i]
                assert O.objective(W, P, mask_of(6, 3, trial)) >= e1 * (1 - 1e-9)
    assert improved  # greedy is not always swap-optimal


def test_group_local_search_without_buckets_is_exhaustively_optimal_for_single_swaps():
    for seed in range(10):
        _, H, W = problem(seed, heads=5)
        _, P, _ = O.damped(H, 0.01)
        after, _ = O.local_search(W, P, O.greedy_remove(W, P, 2, group=3), group=3)
        removed = after[::3].nonzero().squeeze(1).tolist()
        best = min(O.objective(W, P, mask_of(5, 3, [*(set(removed) - {j}), i]))
                   for j in removed for i in set(range(5)) - set(removed))
        assert best >= O.objective(W, P, after) * (1 - 1e-9)


def test_group_prune_matches_brute_force_on_a_small_problem():
    X, H, W = problem(3)
    res = O.osscar_prune(W.T.float(), H.float(), 9, group=3, shrink=0.0, percdamp=0.01)
    _, P, _ = O.damped(H, 0.01)
    best = min(itertools.combinations(range(6), 3), key=lambda r: O.objective(W, P, mask_of(6, 3, r)))
    kept = sorted(set(range(6)) - set(best))
    assert res.keep[::3].div(3, rounding_mode="floor").tolist() == kept


def test_multi_problem_greedy_sums_the_problems():
    _, H1, W1 = problem(1, heads=8, g=1)
    _, H2, W2 = problem(2, heads=8, g=1)
    _, P1, _ = O.damped(H1, 0.01)
    _, P2, _ = O.damped(H2, 0.01)
    one = O.greedy_remove([W1], [P1], 3)
    assert torch.equal(one, O.greedy_remove(W1, P1, 3))
    both = O.greedy_remove([W1, W2], [P1, P2], 1)
    exact = [O.objective(W1, P1, mask_of(8, 1, [j])) + O.objective(W2, P2, mask_of(8, 1, [j])) for j in range(8)]
    assert int(both.nonzero()) == min(range(8), key=exact.__getitem__)
    after, _ = O.local_search([W1, W2], [P1, P2], O.greedy_remove([W1, W2], [P1, P2], 3))
    assert O.objective([W1, W2], [P1, P2], after) <= O.objective([W1, W2], [P1, P2],
                                                                 O.greedy_remove([W1, W2], [P1, P2], 3))


# --- whole models -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("unit", ["heads", "groups"])
def test_attention_heads_on_every_family(name, unit):
    model = shaped_model(name)
    info = attention_heads(decoder_layers(model)[0])
    before = sum(p.numel() for p in model.parameters())
    ids = calib()
    r = structured(model, ids=ids, target="attention", ratio=0.5, attention_unit=unit, nsamples=NS, seqlen=SL,
                   progress=False)
    rep = r.report["attention"]
    mha = info.heads == info.kv_heads
    kv_after = info.kv_heads // 2 if (unit == "groups" or mha) else info.kv_heads
    assert model.config.num_attention_heads == 2 and model.config.head_dim == info.head_dim
    assert model.config.num_key_value_heads == kv_after
    per_q = 2 * info.head_dim * 64 + (info.head_dim if name == "qwen2" else 0)
    per_kv = 2 * info.head_dim * 64 + (2 * info.head_dim if name == "qwen2" else 0)
    kv_removed = info.kv_heads - model.config.num_key_value_heads
    assert before - r.report["params"]["after"] == 2 * (2 * per_q + kv_removed * per_kv)
    for e, layer in zip(rep["layers"], decoder_layers(model), strict=True):
        new = attention_heads(layer)
        assert (new.heads, new.kv_heads) == (2, model.config.num_key_value_heads)
        assert len(e["removed_heads"]) == 2 and 0 <= e["recon_error"] < 1
        assert e["objective"]["local_search"] <= e["objective"]["greedy"]
        if unit == "heads" and not mha:  # one query head from each KV group
            assert sorted(h // 2 for h in e["removed_heads"]) == [0, 1]
    out = model(ids[:2]).logits
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["llama", "gemma2", "qwen3"])
@pytest.mark.parametrize("unit", ["heads", "groups"])
def test_removed_heads_equal_zeroed_o_proj_columns_without_refit(name, unit):
    """The shrunk model computes exactly what the dense one does with the removed heads'
    o_proj columns zeroed (and their KV heads unused): the head ↔ column ↔ KV mapping is right."""
    model = shaped_model(name, layers=1)
    dense = copy.deepcopy(model)
    ids = calib()
    rep = structured(model, ids=ids, target="attention", ratio=0.5, attention_unit=unit, refit=False,
                     nsamples=NS, seqlen=SL, progress=False).report["attention"]
    hd = attention_heads(decoder_layers(dense)[0]).head_dim
    o = decoder_layers(dense)[0].self_attn.o_proj
    with torch.no_grad():
        for h in rep["layers"][0]["removed_heads"]:
            o.weight[:, h * hd : (h + 1) * hd] = 0
        torch.testing.assert_close(model(ids[:2]).logits, dense(ids[:2]).logits, rtol=1e-4, atol=1e-5)


def test_keeping_every_head_changes_nothing():
    model = shaped_model("qwen2")
    ids = calib(2)
    ref = model(ids).logits
    for layer in decoder_layers(model):
        info = attention_heads(layer)
        shrink_attention(layer, info, torch.arange(info.heads))
    torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)


def test_refit_beats_no_refit_and_osscar_beats_the_head_score():
    ids = calib()
    errs = {}
    for name, opts in {"osscar": {}, "no_refit": dict(refit=False),
                       "baseline": dict(greedy=False, local_search=False, refit=False)}.items():
        model = shaped_model("llama", seed=1)
        errs[name] = structured(model, ids=ids, target="attention", ratio=0.5, nsamples=NS, seqlen=SL,
                                progress=False, **opts).report["attention"]["layers"][0]["recon_error"]
    # layer 0 sees the same inputs in every run
    assert errs["osscar"] < errs["no_refit"] <= errs["baseline"] + 1e-12


def test_kv_cache_generation_equals_no_cache_decode():
    for name, unit in (("llama", "heads"), ("gemma2", "groups"), ("qwen3", "heads")):
        model = shaped_model(name)
        ids = calib()
        structured(model, ids=ids, target="attention", ratio=0.5, attention_unit=unit, nsamples=NS, seqlen=SL,
                   progress=False)
        prompt = ids[:1, :6]
        cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0,
                                eos_token_id=None)
        seq = prompt
        with torch.no_grad():
            for _ in range(6):
                nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], 1)
        assert torch.equal(cached, seq), name


# --- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "opts", "msg"), [
    ("llama", dict(ratio=0.1), "removes no head; the config can express removing 1 of the 2 query heads"),
    ("llama", dict(ratio=0.9), "leaves no query heads per KV group .*--attention-unit groups"),
    ("llama", dict(ratio=0.9, attention_unit="groups"), "leaves no KV groups"),
    ("llama", dict(param_ratio=0.001), "rounds to 0: removes no head"),
    ("llama_mha", dict(ratio=0.1), "removes no head"),
    ("phi3", dict(ratio=0.5), "fused self_attn.qkv_proj is not supported"),
])
def test_bad_head_counts_are_one_clear_error_before_any_work(name, opts, msg, no_calibration_data):
    model = shaped_model(name) if name != "phi3" else family_model("phi3", layers=2)
    snapshot = [t.clone() for t in model.state_dict().values()]

    with pytest.raises(LLMPruneError, match=msg):
        structured(model, tokenizer=None, config={"seqlen": SL, "target": "attention", **opts}, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), snapshot, strict=True))


def test_dense_target_matches_the_plain_objective_where_the_streams_agree():
    """Layer 0 sees the same input on the pruned and the dense stream: the dense target changes
    nothing there; later layers fit the dense stream (advanced in place) and stay finite."""
    ids = calib()
    reports = {}
    for dense_target in (False, True):
        model = shaped_model("llama", layers=3, seed=1)
        reports[dense_target] = structured(model, ids=ids, target="attention", ratio=0.5, nsamples=NS, seqlen=SL,
                                           dense_target=dense_target, progress=False).report["attention"]["layers"]
        assert torch.isfinite(model(ids[:1]).logits).all()
    plain, dense = reports[False][0], reports[True][0]
    assert plain["removed_heads"] == dense["removed_heads"]
    assert dense["recon_error"] == pytest.approx(plain["recon_error"], rel=1e-4, abs=1e-7)
