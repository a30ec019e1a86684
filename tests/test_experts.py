"""MoE expert removal (``structured --method experts``): REAP's statistics against a direct
computation, removal = the router restricted to the kept experts, saved models in plain
transformers (fresh process), REAP against random removal, and the bad inputs."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_reloads_in_plain_transformers, family_config, family_model, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

from llmprune.cli import main
from llmprune.errors import LLMPruneError
from llmprune.export.save import save_pruned
from llmprune.models.adapter import decoder_layers, moe_blocks
from llmprune.structured import experts as X
from llmprune.structured import structured

NS, SL = 6, 32
# conftest.family_config's tiny base
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
QWEN3_MOE = dict(TINY, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)


def calib(n: int = NS, seqlen: int = SL, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 512, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def moe_model(family: str, layers: int = 2, seed: int = 0, experts: int | None = None, **extra):
    """A tiny random MoE model: conftest's Mixtral / Qwen2-MoE, or Qwen3-MoE; ``experts`` and
    ``extra`` override the config."""
    if family == "qwen3_moe" or experts or extra:
        config = (AutoConfig.for_model("qwen3_moe", **QWEN3_MOE) if family == "qwen3_moe"
                  else family_config(family, layers))
        config.num_hidden_layers = layers
        if experts:
            setattr(config, X.moe_config(config).key, experts)
        for k, v in extra.items():
            setattr(config, k, v)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0, 0.08)
        model.eval()
        model.config.use_cache = False
        return model
    return family_model(family, layers=layers, seed=seed)


def prune(model, score: str = "reap", ratio: float = 0.5, ids=None, **kw):
    return structured(model, ids=calib() if ids is None else ids, method="experts", ratio=ratio,
                      expert_score=score, nsamples=NS, seqlen=SL, progress=False, **kw).report


# --- REAP's statistics ----------------------------------------------------------------------------
def direct_stats(block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per expert (tokens routed, mean gate·‖output‖) of ``block`` on its inputs ``x``, computed
    from the router's own output and the fused weights, without the engine."""
    x = x.reshape(-1, x.shape[-1])
    _, weights, index = block.gate(x)
    gu, down = block.experts.gate_up_proj, block.experts.down_proj
    n = gu.shape[0]
    count, reap = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for e in range(n):
        tok, slot = torch.where(index == e)
        gate, up = (x[tok] @ gu[e].T).chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ down[e].T
        count[e] = tok.numel()
        reap[e] = (weights[tok, slot].double() * y.double().norm(dim=-1)).sum() / max(tok.numel(), 1)
    return count, reap


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_reap_statistics_match_a_direct_computation_on_the_pruned_stream(family):
    """Layer 1's counts and saliencies come from its dense experts fed by the *pruned* layer 0."""
    model = moe_model(family)
    dense = copy.deepcopy(model)
    ids = calib()
    report = prune(model, ids=ids)
    entries = report["experts"]["layers"]
    assert [e["index"] for e in entries] == [0, 1]
    # the reference: dense layer 1 after layer 0 pruned the same way
    ref = copy.deepcopy(dense)
    X.remove_experts(moe_blocks(decoder_layers(ref)[0])[0], torch.tensor(entries[0]["kept"]))
    seen = {}
    for i, layer in enumerate(decoder_layers(ref)):
        layer.mlp.register_forward_pre_hook(lambda _m, a, i=i: seen.setdefault(i, []).append(a[0]))
    with torch.no_grad():
        ref(ids)
        count, reap = direct_stats(decoder_layers(ref)[1].mlp, torch.cat(seen[1]))
        count0, reap0 = direct_stats(decoder_layers(dense)[0].mlp, torch.cat(seen[0]))
    assert entries[1]["tokens_routed"] == count.long().tolist()
    np.testing.assert_allclose(entries[1]["reap"], reap.numpy(), rtol=1e-5)
    np.testing.assert_allclose(entries[0]["reap"], reap0.numpy(), rtol=1e-5)
    assert entries[1]["tokens"] == NS * SL and sum(entries[1]["tokens_routed"]) == NS * SL * 2
    # the kept experts are the most salient ones
    for e in entries:
        assert min(e["reap"][j] for j in e["kept"]) >= max(e["reap"][j] for j in e["removed"])


def test_scores_and_selection():
    class S:
        count = torch.tensor([4.0, 0.0, 2.0, 8.0], dtype=torch.float64)
        reap_sum = torch.tensor([2.0, 0.0, 3.0, 4.0], dtype=torch.float64)

    assert X.expert_scores(S, "reap").tolist() == [0.5, 0.0, 1.5, 0.5]
    assert X.expert_scores(S, "frequency").tolist() == [4.0, 0.0, 2.0, 8.0]
    assert torch.equal(X.expert_scores(S, "random", 3), X.expert_scores(S, "random", 3))
    assert not torch.equal(X.expert_scores(S, "random", 3), X.expert_scores(S, "random", 4))
    # highest first, ties to the lower index, returned in the original order
    assert X.keep_experts(X.expert_scores(S, "reap"), 2).tolist() == [0, 2]
    assert X.keep_experts(torch.tensor([1.0, 3.0, 2.0, 3.0]), 3).tolist() == [1, 2, 3]


def test_removal_effect():
    index = torch.tensor([[0, 1], [2, 3], [1, 2]])
    weight = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.9, 0.1]])
    eff = X.removal_effect(index, weight, torch.tensor([1, 2]))
    assert eff["rerouted_share"] == pytest.approx(2 / 3)
    assert eff["routed_weight_kept"] == pytest.approx((0.4 + 0.5 + 1.0) / 3.0)


# --- what removal does to the model -------------------------------------------------------------
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_keeping_every_expert_in_any_order_keeps_the_logits(family):
    model = moe_model(family)
    ids = calib()
    with torch.no_grad():
        ref = model(ids).logits
        for layer in decoder_layers(model):
            [mb] = moe_blocks(layer)
            X.remove_experts(mb, torch.arange(mb.num_experts).flip(0))  # every expert, reordered
        out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def restrict_router(router, removed: list[int], renormalise: bool) -> None:
    """The reference semantics of removal on the unpruned model: the router's softmax over the
    kept experts only (removed logits -inf), top-k, renormalised where the family does."""

    def forward(hidden_states):
        logits = F.linear(hidden_states.reshape(-1, router.hidden_dim), router.weight)
        logits[:, removed] = float("-inf")
        top, idx = torch.topk(torch.softmax(logits.float(), dim=-1), router.top_k, dim=-1)
        if renormalise:
            top = top / top.sum(-1, keepdim=True)
        return logits, top.to(logits.dtype), idx

    router.forward = forward


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_removal_is_the_router_restricted_to_the_kept_experts(family):
    model = moe_model(family, experts=6)
    ref = copy.deepcopy(model)
    ids = calib()
    report = prune(model, ratio=0.34, ids=ids)  # 2 of 6 experts per layer
    ex = report["experts"]
    assert ex["num_experts"] == {"before": 6, "after": 4}
    assert getattr(model.config, ex["config_key"]) == 4
    renorm = family == "mixtral" or bool(model.config.norm_topk_prob)
    for layer, entry in zip(decoder_layers(ref), ex["layers"], strict=True):
        restrict_router(layer.mlp.gate, entry["removed"], renorm)
    for layer in decoder_layers(model):
        [mb] = moe_blocks(layer)
        assert mb.num_experts == 4 and mb.router.weight.shape[0] == 4 and mb.experts.num_experts == 4
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-5)
    assert report["params"]["after"] < report["params"]["before"]


def test_qwen2_moe_dense_layers_are_left_alone():
    model = moe_model("qwen2_moe", layers=3, mlp_only_layers=[1])
    dense_mlp = copy.deepcopy(decoder_layers(model)[1].mlp.state_dict())
    report = prune(model)
    assert [e["index"] for e in report["experts"]["layers"]] == [0, 2]
    after = decoder_layers(model)[1].mlp.state_dict()
    assert all(torch.equal(after[k], v) for k, v in dense_mlp.items())
    # the shared expert and its gate are never removed
    for i in (0, 2):
        mlp = decoder_layers(model)[i].mlp
        assert mlp.shared_expert_gate.weight.shape == (1, 64) and mlp.shared_expert.down_proj.in_features == 64




def test_saved_expert_models_reload_in_plain_transformers(tmp_path):
    ids = calib()
    cases = {"mixtral": moe_model("mixtral"), "qwen2_moe": moe_model("qwen2_moe", layers=3, mlp_only_layers=[1]),
             "qwen3_moe": moe_model("qwen3_moe", experts=6)}
    saved = {}
    for name, model in cases.items():
        save_pruned(model, None, tmp_path / name, prune(model, ids=ids))
        saved[name] = (model, tmp_path / name)
    config = assert_reloads_in_plain_transformers(saved, ids, tmp_path)
    for name, model in cases.items():
        assert config[name][X.moe_config(model.config).key] == (3 if name == "qwen3_moe" else 2), name


# --- REAP against the baselines -------------------------------------------------------------------
def skewed_mixtral(seed: int = 0):
    """Tiny Mixtral, 8 experts, top-2, whose experts differ in output scale (×1 … ×1/8, shuffled
    per layer), as trained experts differ in how much they contribute."""
    model = moe_model("mixtral", seed=seed, experts=8)
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([1.0, 0.7, 0.5, 0.35, 0.25, 0.18, 0.125, 0.125])
    with torch.no_grad():
        for layer in decoder_layers(model):
            layer.mlp.experts.down_proj.mul_(scales[torch.randperm(8, generator=g)][:, None, None] * 3)
    return model


@torch.no_grad()
def kl_to(dense_logits: torch.Tensor, model, ids) -> float:
    """Calibration loss of a pruned model: mean KL(dense ‖ pruned) of the next-token distributions."""
    p = F.log_softmax(dense_logits, -1)
    q = F.log_softmax(model(ids).logits, -1)
    return float(F.kl_div(q, p, log_target=True, reduction="batchmean") / ids.shape[1])


def test_reap_and_output_beat_random_removal_on_calibration_loss():
    ids = calib(8, 48)
    base = skewed_mixtral()
    with torch.no_grad():
        dense = base(ids).logits

    def loss(score, seed=0):
        model = copy.deepcopy(base)
        report = structured(model, ids=ids, method="experts", ratio=0.5, expert_score=score, seed=seed,
                            nsamples=8, seqlen=48, progress=False).report
        return kl_to(dense, model, ids), report["experts"]["mean_output_error"]

    reap, reap_err = loss("reap")
    output, output_err = loss("output")
    randoms = [loss("random", s) for s in range(4)]
    # measured: reap 0.112, output 0.090, random 0.117, 0.147, 0.139, 0.156
    assert reap < min(kl for kl, _ in randoms), (reap, randoms)
    assert output < reap
    # the greedy minimises the block's output error: lower than any other choice made here
    assert output_err < reap_err and output_err < min(err for _, err in randoms)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_routing_to_a_subset_is_what_removal_computes(family):
    """The greedy's evaluation (router rows sliced, indices mapped back, experts untouched)
    gives the block output of the model with those experts removed."""
    model = moe_model(family, layers=1, experts=6)
    [mb] = moe_blocks(decoder_layers(model)[0])
    x = torch.randn(2, 16, 64)
    keep = torch.tensor([0, 2, 3, 5])
    with torch.no_grad():
        dense = mb.block(x)
        with X.routed_to(mb, keep):
            routed = mb.block(x)
        assert torch.equal(mb.block(x), dense)  # restored
        shrunk = copy.deepcopy(model)
        [smb] = moe_blocks(decoder_layers(shrunk)[0])
        X.remove_experts(smb, keep)
        torch.testing.assert_close(routed, smb.block(x), rtol=1e-5, atol=1e-6)
    assert mb.router.weight.shape[0] == 6


def test_output_greedy_reports_its_steps():
    model = moe_model("qwen2_moe", experts=6)
    report = prune(model, score="output", ratio=0.5)
    for e in report["experts"]["layers"]:
        assert len(e["greedy_errors"]) == 3 and len(e["removed"]) == 3
        assert e["greedy_errors"][-1] == pytest.approx(e["output_error"], rel=1e-6)
        assert 0 < e["output_error"] < 1


def test_param_ratio_removes_about_that_share():
    model = moe_model("mixtral", experts=8)
    report = prune(model, ratio=None, param_ratio=0.3)
    ex = report["experts"]
    per_expert = (3 * 64 * 128 + 64) * 2  # gate, up, down slices + router row, two layers
    assert ex["num_experts"]["before"] - ex["num_experts"]["after"] == round(0.3 * report["params"]["before"] / per_expert)
    assert report["params"]["removed_share"] == pytest.approx(0.3, abs=per_expert / report["params"]["before"])


# --- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("model_fn", "opts", "msg"), [
    (lambda: tiny_model("llama", layers=2), dict(ratio=0.5), "needs a mixture-of-experts model; this llama"),
    (lambda: moe_model("mixtral"), dict(ratio=0.75), "at most 2 can go, since every token is routed to 2"),
    (lambda: moe_model("mixtral"), dict(ratio=0.1), "removes none"),
    (lambda: moe_model("mixtral"), dict(ratio=1.0), "ratio must be in \\(0, 1\\)"),
    (lambda: moe_model("mixtral"), dict(layers=1), "--layers does not apply to --method experts"),
    (lambda: moe_model("mixtral"), dict(param_ratio=0.9), "at most 2 can go"),
    (lambda: moe_model("mixtral"), dict(param_ratio=0.001), "less than one expert"),
    (lambda: moe_model("mixtral"), dict(ratio=0.5, expert_score="bogus"), "expert_score"),
    (lambda: moe_model("mixtral"), dict(ratio=0.5, expert_candidates=0), "expert_candidates"),
])
def test_bad_input_is_one_clear_error_before_any_work(model_fn, opts, msg, no_calibration_data):
    model = model_fn()
    snapshot = [t.clone() for t in model.state_dict().values()]

    with pytest.raises(LLMPruneError, match=msg):
        structured(model, config={"method": "experts", "seqlen": SL, **opts}, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), snapshot, strict=True))


def test_grouped_routing_is_refused():
    config = AutoConfig.for_model("deepseek_v3", n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2)
    with pytest.raises(LLMPruneError, match="expert groups"):
        X.moe_config(config)


# --- the command ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("tiny-mixtral")
    moe_model("mixtral").save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def test_cli_removes_experts_and_reports(moe_dir, tmp_path, capsys):
    out = tmp_path / "small"
    rc = main(["structured", str(moe_dir), "--method", "experts", "--ratio", "0.5", "--ppl", "wikitext2",
               "--max-windows", "1", "--speed", "--out", str(out), "--nsamples", "2", "--seqlen", "32", "-q"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "experts: parameters" in printed.out and "PPL" in printed.out
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 2
    report = json.loads((out / "pruning.json").read_text())
    ex = report["experts"]
    assert ex["score"] == "reap" and [len(e["removed"]) for e in ex["layers"]] == [2, 2]
    assert report["params"]["after"] < report["params"]["before"]
    assert report["speed"]["before"]["decode_tok_s"] > 0 and report["speed"]["after"]["prefill_tok_s"] > 0
    assert report["ppl"]["before"] and report["ppl"]["after"]


@pytest.mark.parametrize(("which", "args", "msg"), [
    ("moe", ["--ratio", "0.75"], "at most 2 can go"),
    ("dense", ["--ratio", "0.5"], "needs a mixture-of-experts model"),
    ("moe", ["--ratio", "1.5"], "ratio must be in (0, 1)"),
    ("moe", ["--ratio", "0.5", "--expert-score", "bogus"], "expert_score"),
])
def test_cli_bad_input_is_one_line_before_the_model_loads(moe_dir, tiny_dirs, tmp_path, capsys, monkeypatch,
                                                          which, args, msg):
    def no_load(*_a, **_k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr("llmprune.pipeline.load_model", no_load)
    out = tmp_path / "o"
    model = moe_dir if which == "moe" else tiny_dirs["llama"]
    rc = main(["structured", str(model), "--method", "experts", *args, "--out", str(out), "--nsamples", "2",
               "--seqlen", "32", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


# --- more families --------------------------------------------------------------------------------
OTHER_FAMILIES = {
    "olmoe": dict(num_experts=6, num_experts_per_tok=2),
    "phimoe": dict(num_local_experts=6, num_experts_per_tok=2),
    "granitemoe": dict(num_local_experts=6, num_experts_per_tok=2),
    # router and expert biases, a block returning (hidden, router scores), transposed interleaved experts
    "gpt_oss": dict(num_local_experts=6, num_experts_per_tok=2, head_dim=16, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention"]),
    # sigmoid router with a score-correction bias buffer, shared experts; layer 0 dense in DeepSeek-V2
    "glm4_moe": dict(n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=0,
                     n_group=1, topk_group=1, head_dim=16),
    "deepseek_v2": dict(n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
                        n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16),
    # the router's (1, experts) score-correction parameter sits in a submodule
    "ernie4_5_moe": dict(moe_num_experts=6, moe_k=2),
}


@pytest.mark.parametrize("family", list(OTHER_FAMILIES))
def test_other_families_shrink_and_reload(family, tmp_path):
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **TINY, num_hidden_layers=2, **OTHER_FAMILIES[family])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    model.config.use_cache = False
    ids = calib()
    report = prune(model, score="output", ratio=0.34, ids=ids)
    ex = report["experts"]
    assert ex["num_experts"] == {"before": 6, "after": 4} and 0 < ex["mean_output_error"] < 1
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert getattr(again.config, ex["config_key"]) == 4
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)
