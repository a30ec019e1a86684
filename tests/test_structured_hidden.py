"""Hidden-size pruning: the residual layout asked of the model, shrinking on Llama / Mistral /
Qwen2 / Qwen3 / Gemma2 shapes (tied and untied embeddings), exact identity when nothing goes,
re-fit vs slicing, generation with the KV cache, plain-transformers reloads of every new
output (attention heads, hidden, search) in a fresh process, and the bad inputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import assert_reloads_in_plain_transformers, family_model, tiny_model

from llmprune.errors import LLMPruneError
from llmprune.export.save import save_pruned
from llmprune.models.adapter import decoder_layers
from llmprune.models.residual import residual_layout
from llmprune.structured import structured
from llmprune.structured.hidden import HiddenPlan, channel_params, run_hidden
from llmprune.structured.options import StructuredOptions

NS, SL = 8, 32
FAMILIES = ["llama", "llama_tied", "mistral", "qwen2", "qwen3", "gemma2"]


def calib(n: int = NS, seqlen: int = SL, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def model_of(name: str, layers: int = 2, seed: int = 0):
    if name in ("llama", "mistral", "qwen2"):
        return tiny_model(name, layers=layers, seed=seed)
    if name == "llama_tied":
        model = tiny_model("llama", layers=layers, seed=seed)
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
        return model
    return family_model(name, layers=layers, seed=seed)


def greedy_decode(model, prompt, steps: int = 6):
    seq = prompt
    with torch.no_grad():
        for _ in range(steps):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq


# --- the layout -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "mlp_read", "writer_norms", "scale", "tied"), [
    ("llama", "post_attention_layernorm", False, 1.0, False),
    ("llama_tied", "post_attention_layernorm", False, 1.0, True),
    ("qwen3", "post_attention_layernorm", False, 1.0, True),
    ("gemma2", "pre_feedforward_layernorm", True, 8.0, True),
    ("gemma3_text", "pre_feedforward_layernorm", True, 8.0, True),
])
def test_residual_layout_is_asked_of_the_model(name, mlp_read, writer_norms, scale, tied):
    lay = residual_layout(model_of(name))
    assert [r.norm for r in lay.reads] == ["input_layernorm", mlp_read]
    assert lay.reads[0].consumers == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    assert lay.reads[1].consumers == ("mlp.gate_proj", "mlp.up_proj")
    assert [w.linear for w in lay.writers] == ["self_attn.o_proj", "mlp.down_proj"]
    assert all((w.norm is not None) == writer_norms for w in lay.writers)
    assert lay.reads[0].offset == (1.0 if name.startswith("gemma") else 0.0)  # Gemma's norm is (1 + w)
    assert lay.embed_scale == pytest.approx(scale) and lay.tied == tied
    assert lay.final.norm == "model.norm" and lay.final.consumers == ("lm_head",)


@pytest.mark.parametrize(("name", "msg"), [
    ("gpt_neox", "needs RMSNorm; input_layernorm \\(LayerNorm\\) has a bias"),
    ("mixtral", "mixture-of-experts models is not supported"),
    ("opt", "not a multiple of the embedding"),
])
def test_unsupported_layouts_are_one_clear_error(name, msg):
    with pytest.raises(LLMPruneError, match=msg):
        residual_layout(family_model(name, layers=2))


# --- whole models ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_hidden_on_every_family(name):
    model = model_of(name)
    lay = residual_layout(model)
    per = channel_params(model, lay)
    before = sum(p.numel() for p in model.parameters())
    ids = calib()
    r = structured(model, ids=ids, method="hidden", ratio=0.25, round_to=8, nsamples=NS, seqlen=SL, progress=False)
    rep = r.report["hidden"]
    assert model.config.hidden_size == 48 and model.config.head_dim == 16
    assert len(rep["removed"]) == 16 and rep["hidden_size"] == {"before": 64, "after": 48}
    assert before - r.report["params"]["after"] == 16 * per  # every parameter of a channel goes with it
    emb = model.get_input_embeddings()
    assert emb.weight.shape == (512, 48) and (model.lm_head.weight is emb.weight) == lay.tied
    for layer in decoder_layers(model):  # nothing of the old width is left
        for read in lay.reads:
            assert layer.get_submodule(read.norm).weight.shape == (48,)
            assert all(layer.get_submodule(c).in_features == 48 for c in read.consumers)
        for w in lay.writers:
            assert layer.get_submodule(w.linear).weight.shape[0] == 48
            assert w.norm is None or layer.get_submodule(w.norm).weight.shape == (48,)
    for entry in rep["layers"]:
        for e in entry["reads"].values():
            assert 0 <= e["recon_error"] <= e["recon_error_sliced"] + 1e-6 and 0 < e["removed_energy"] < 1
    assert rep["objective"]["local_search"] <= rep["objective"]["greedy"]
    assert torch.isfinite(model(ids[:2]).logits).all()
    json.dumps(r.report)


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_keeping_every_channel_changes_nothing(name):
    model = model_of(name)
    ids = calib()
    ref = model(ids[:2]).logits
    lay = residual_layout(model)
    opts = StructuredOptions(method="hidden", ratio=0.5, nsamples=NS, seqlen=SL)
    run_hidden(model, ids, HiddenPlan(lay, 64, 64), opts.replace(refit=False, greedy=False, local_search=False),
               progress=False)
    torch.testing.assert_close(model(ids[:2]).logits, ref, rtol=0, atol=0)
    run_hidden(model, ids, HiddenPlan(lay, 64, 64), opts.replace(local_search=False), progress=False)
    torch.testing.assert_close(model(ids[:2]).logits, ref, rtol=1e-4, atol=1e-4)  # the fit of what is there


def test_refit_beats_slicing_and_the_rms_scale():
    """With shrink 0 the re-fit is least squares (ridge toward the sliced weights): never worse
    than slicing on the calibration tokens; end to end the model is closer to the dense one."""
    ids = calib(16)
    dense = model_of("llama", seed=3)
    out = {}
    for refit in (True, False):
        model = copy.deepcopy(dense)
        rep = structured(model, ids=ids, method="hidden", ratio=0.25, round_to=8, nsamples=16, seqlen=SL,
                         shrink=0.0, refit=refit, progress=False).report["hidden"]
        with torch.no_grad():
            out[refit] = float((model(ids).logits - dense(ids).logits).pow(2).mean())
        if refit:
            for entry in rep["layers"]:
                for e in entry["reads"].values():
                    assert e["recon_error"] < e["recon_error_sliced"]
    assert out[True] < out[False]


def test_greedy_beats_minitron_on_its_objective():
    ids = calib()
    objs = {}
    for greedy in (True, False):
        rep = structured(model_of("qwen2"), ids=ids, method="hidden", ratio=0.25, round_to=8, nsamples=NS,
                         seqlen=SL, greedy=greedy, local_search=greedy, progress=False).report["hidden"]
        objs[greedy] = rep["mean_recon_error"]
    assert objs[True] < objs[False]


@pytest.mark.parametrize("name", ["llama_tied", "gemma2", "qwen3"])
def test_kv_cache_generation_equals_no_cache_decode(name):
    model = model_of(name)
    ids = calib()
    structured(model, ids=ids, method="hidden", ratio=0.25, round_to=8, nsamples=NS, seqlen=SL, progress=False)
    prompt = ids[:1, :6]
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0,
                            eos_token_id=None)
    assert torch.equal(cached, greedy_decode(model, prompt))


# --- saved models in plain transformers, fresh process ---------------------------------------------


def test_saved_models_reload_in_plain_transformers(tmp_path):
    ids = calib(10)
    cases = {
        "attention_gemma2": (model_of("gemma2"), dict(target="attention", ratio=0.5, attention_unit="groups")),
        "attention_qwen2": (model_of("qwen2"), dict(target="attention", ratio=0.5)),
        "hidden_llama_tied": (model_of("llama_tied"), dict(method="hidden", ratio=0.25, round_to=8)),
        "hidden_gemma2": (model_of("gemma2"), dict(method="hidden", ratio=0.25, round_to=8)),
        "hidden_qwen2": (model_of("qwen2"), dict(method="hidden", ratio=0.25, round_to=8)),
        "search_llama": (model_of("llama", layers=3), dict(method="search", param_ratio=0.3, round_to=32,
                                                          nsamples=8, holdout=2, search_candidates=2)),
    }
    saved = {}
    for name, (model, opts) in cases.items():
        r = structured(model, ids=ids, seqlen=SL, progress=False, **{"nsamples": 10, **opts})
        save_pruned(model, None, tmp_path / name, r.report)
        saved[name] = (model, tmp_path / name)
    config = assert_reloads_in_plain_transformers(saved, ids, tmp_path)
    keys = ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "intermediate_size")
    for name, (model, _) in saved.items():
        assert [config[name][k] for k in keys] == [getattr(model.config, k) for k in keys], name
    assert config["hidden_llama_tied"]["hidden_size"] == 48 and config["attention_gemma2"]["num_key_value_heads"] == 1


# --- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "opts", "msg"), [
    ("llama", dict(ratio=0.01, round_to=8), "removes no hidden channel"),
    ("llama", dict(ratio=0.99, round_to=8), "leaves no hidden channel"),
    ("llama", dict(param_ratio=0.99, round_to=8), "param_ratio 0.99 is 0.99 of the hidden channels: .*leaves no"),
    ("llama", dict(param_ratio=0.001, round_to=8), "param_ratio 0.001 is 0.001 of the hidden channels: .*removes no"),
    ("mixtral", dict(ratio=0.25, round_to=8), "mixture-of-experts"),
    ("gpt_neox", dict(ratio=0.25, round_to=8), "needs RMSNorm"),
    ("llama", dict(ratio=0.25, layers=2), "--layers does not apply to --method hidden"),
])
def test_bad_input_is_one_clear_error_before_any_work(name, opts, msg, no_calibration_data):
    model = model_of(name) if name in FAMILIES else family_model(name, layers=2)
    snapshot = [t.clone() for t in model.state_dict().values()]

    with pytest.raises(LLMPruneError, match=msg):
        structured(model, tokenizer=None, config={"seqlen": SL, "method": "hidden", **opts}, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), snapshot, strict=True))


@pytest.mark.parametrize("name", ["llama", "gemma2", "qwen2"])
def test_bf16_models_have_a_layout_and_shrink(name):
    """bf16 (the default dtype on a GPU) rounds the probe's sums: the checks allow for it."""
    model = model_of(name).to(torch.bfloat16)
    assert len(residual_layout(model).writers) == 2
    structured(model, ids=calib(4), method="hidden", ratio=0.25, round_to=8, nsamples=4, seqlen=SL, progress=False)
    assert model.config.hidden_size == 48 and next(model.parameters()).dtype == torch.bfloat16


def nine_heads():
    """SmolLM2's head layout (9 query heads, 3 KV heads) at a tiny size: Llama's config accepts
    only hidden sizes that are multiples of 9."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=512, hidden_size=144, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=9, num_key_value_heads=3, head_dim=16,
                               max_position_embeddings=256, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_a_hidden_size_the_config_refuses_is_one_line_with_the_nearest_it_accepts(no_calibration_data):
    model = nine_heads()
    with pytest.raises(LLMPruneError, match=r"hidden size 112 is not one LlamaConfig accepts \(.*multiple of the "
                                            r"number of attention heads \(9\)\.?\); the nearest it accepts .*: 72"):
        structured(model, config={"method": "hidden", "ratio": 0.25, "round_to": 8, "seqlen": SL}, progress=False)


def test_the_search_only_picks_sizes_the_config_accepts(tmp_path):
    model = nine_heads()
    r = structured(model, ids=calib(8), method="search", param_ratio=0.25, targets="hidden,attention", round_to=8,
                   nsamples=6, seqlen=SL, holdout=2, search_candidates=2, progress=False)
    c = model.config
    assert c.hidden_size % c.num_attention_heads == 0, (c.hidden_size, c.num_attention_heads)
    hidden_levels = r.report["search"]["sensitivity"]["hidden"]
    assert hidden_levels and all((144 - lv["amount"]) % 9 == 0 for lv in hidden_levels), hidden_levels
    save_pruned(model, None, tmp_path / "s", r.report)  # transformers validates the config here
