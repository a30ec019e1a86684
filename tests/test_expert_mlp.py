"""OSSCAR inside the kept experts (``structured --method experts --expert-mlp-ratio R``): the
router-weighted statistics against a direct computation, the block's output error against the
score-only baseline, parameter budgets, plain-transformers reloads, and the bad inputs."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_reloads_in_plain_transformers, tiny_model
from test_experts import NS, SL, calib, moe_model

from llmprune.errors import LLMPruneError
from llmprune.export.save import save_pruned
from llmprune.models.adapter import PerExpertLinears, decoder_layers, moe_blocks
from llmprune.structured import expert_mlp as M
from llmprune.structured import experts as X
from llmprune.structured import structured


def prune(model, ids=None, ratio=0.25, mlp_ratio=0.5, **kw):
    kw.setdefault("round_to", 8)
    return structured(model, ids=calib() if ids is None else ids, method="experts", ratio=ratio,
                      expert_mlp_ratio=mlp_ratio, nsamples=NS, seqlen=SL, progress=False, **kw).report


def block_inputs(model, ids, layer: int = 0) -> torch.Tensor:
    captured = []
    mb = moe_blocks(decoder_layers(model)[layer])[0]
    h = mb.block.register_forward_pre_hook(lambda _m, a: captured.append(a[0]))
    with torch.no_grad():
        model(ids)
    h.remove()
    return captured[0]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_gram_is_the_router_weighted_down_proj_input(family):
    model = moe_model(family)
    x = block_inputs(model, calib())
    mb = moe_blocks(decoder_layers(model)[0])[0]
    mb.block.experts = PerExpertLinears(mb.experts)
    grams = M.ExpertGrams(mb.block.experts, [0, 2])
    with torch.no_grad():
        mb.block(x)
    grams.remove()
    # direct: route every token, compute each expert's down_proj input, weight by g
    flat = x.reshape(-1, x.shape[-1])
    index, weight = [], []

    def route(_module, args) -> None:
        index.append(args[1])
        weight.append(args[2])

    h = mb.block.experts.register_forward_pre_hook(route)
    with torch.no_grad():
        mb.block(x)
    h.remove()
    for e in (0, 2):
        token, slot = torch.where(index[0] == e)
        ex = mb.block.experts[e]
        a = torch.nn.functional.silu(ex.gate_proj(flat[token])) * ex.up_proj(flat[token])
        ga = a.double() * weight[0][token, slot].double()[:, None]
        assert grams.tokens[e] == token.numel() > 0
        torch.testing.assert_close(grams.H[e], ga.T @ ga, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_osscar_beats_the_score_only_baseline_and_refit_beats_none(family):
    ids = calib()
    full = prune(moe_model(family), ids)["experts"]
    baseline = prune(moe_model(family), ids, greedy=False, local_search=False, refit=False)["experts"]
    no_refit = prune(moe_model(family), ids, refit=False)["experts"]
    for f, b, n in zip(full["layers"], baseline["layers"], no_refit["layers"], strict=True):
        assert f["kept"] == b["kept"]  # the same experts: only the channels inside differ
        assert f["expert_mlp"]["mean_recon_error"] < b["expert_mlp"]["mean_recon_error"]
        assert f["expert_mlp"]["mean_recon_error"] < n["expert_mlp"]["mean_recon_error"]
    assert full["expert_mlp"]["width"] == {"before": 128 if family == "mixtral" else 32,
                                           "after": 64 if family == "mixtral" else 16}


def test_shrunk_experts_save_and_reload_in_plain_transformers(tmp_path):
    ids = calib()
    cases = {"mixtral": moe_model("mixtral"), "qwen2_moe": moe_model("qwen2_moe", layers=3, mlp_only_layers=[1]),
             "qwen3_moe": moe_model("qwen3_moe", experts=6)}
    saved = {}
    for name, model in cases.items():
        report = prune(model, ids)
        save_pruned(model, None, tmp_path / name, report)
        saved[name] = (model, tmp_path / name)
    config = assert_reloads_in_plain_transformers(saved, ids, tmp_path)
    assert config["mixtral"]["intermediate_size"] == 64
    assert config["qwen2_moe"]["moe_intermediate_size"] == 16
    assert config["qwen2_moe"]["intermediate_size"] == 128  # the dense layer is left alone
    assert config["qwen2_moe"]["shared_expert_intermediate_size"] == cases["qwen2_moe"].config.shared_expert_intermediate_size
    assert config["qwen3_moe"]["moe_intermediate_size"] == 16


def test_param_ratio_counts_the_shrink_before_the_experts():
    model = moe_model("mixtral", experts=8)
    report = prune(model, ratio=None, param_ratio=0.4, mlp_ratio=0.25)
    ex = report["experts"]
    per_expert = (3 * 64 * 128 + 64) * 2  # gate, up, down slices + router row, two layers
    shrunk = 3 * 64 * 32 * 2  # a quarter of each kept expert's channels
    removed = ex["num_experts"]["before"] - ex["num_experts"]["after"]
    assert removed == round((0.4 * report["params"]["before"] / 2 - 8 * shrunk / 2) / (per_expert / 2 - shrunk / 2))
    assert report["params"]["removed_share"] == pytest.approx(0.4, abs=per_expert / report["params"]["before"])


@pytest.mark.parametrize(("model_fn", "opts", "msg"), [
    (lambda: moe_model("mixtral"), dict(method="osscar", ratio=0.5, expert_mlp_ratio=0.5),
     "--expert-mlp-ratio applies to --method experts"),
    (lambda: moe_model("mixtral"), dict(method="experts", ratio=0.25, expert_mlp_ratio=0.1),
     "removes no expert channel"),
    (lambda: moe_model("mixtral"), dict(method="experts", ratio=0.25, expert_mlp_ratio=1.5),
     "expert_mlp_ratio"),
    (lambda: tiny_model("llama", layers=2), dict(method="experts", ratio=0.25, expert_mlp_ratio=0.5),
     "needs a mixture-of-experts model"),
])
def test_bad_input_is_one_clear_error_before_any_work(model_fn, opts, msg, no_calibration_data):
    model = model_fn()
    snapshot = [t.clone() for t in model.state_dict().values()]

    with pytest.raises((LLMPruneError, ValueError), match=msg):
        structured(model, config={"seqlen": SL, **opts}, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), snapshot, strict=True))


def test_moe_intermediate_size_names_the_experts_width_whatever_else_equals_it():
    model = moe_model("qwen2_moe", layers=3, mlp_only_layers=[1], moe_intermediate_size=128)
    structured(model, ids=calib(), config={"method": "experts", "ratio": 0.25, "expert_mlp_ratio": 0.5,
                                           "round_to": 8, "nsamples": NS, "seqlen": SL}, progress=False)
    assert model.config.moe_intermediate_size == 64 and model.config.intermediate_size == 128


def test_width_key_refuses_a_width_no_config_attribute_holds_alone():
    model = moe_model("qwen2_moe", layers=3, mlp_only_layers=[1])
    del model.config.moe_intermediate_size
    model.config.intermediate_size = 32  # the experts' width, but the dense layer reads it too
    with pytest.raises(LLMPruneError, match="no config attribute holds the experts' width"):
        M.expert_width_key(model, 32)
    assert X.moe_config(model.config).num_experts == 4
