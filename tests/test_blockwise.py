"""Block-wise reconstruction (engine/blockwise.py): the mask stays exact through tuning, the
tuned blocks get closer to the dense model, exact blocks are left alone, bad input is refused
in one line before anything heavy, and the structured walks (OSSCAR, depth) use the same stage."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import family_model, tiny_model

from llmprune.config import PruneConfig
from llmprune.engine import memory, sequential
from llmprune.engine.blockwise import BlockwiseOptions, summarize
from llmprune.engine.capture import capture_inputs, layer_output
from llmprune.engine.sequential import LayerPlan, run_sequential
from llmprune.errors import LLMPruneError
from llmprune.masks.checks import group_counts
from llmprune.models.layers import decoder_layers, linear_layers
from llmprune.sparsity.patterns import Target

BW = dict(reconstruct="blockwise", recon_steps=6, recon_lr=2e-3, recon_batch=2)


def ids(rows: int = 4, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (rows, seqlen), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def final_hidden(model, x_ids: torch.Tensor) -> torch.Tensor:
    """The last decoder layer's outputs (before the final norm) for every row."""
    layers = decoder_layers(model)
    h, kwargs = capture_inputs(model, layers, x_ids, "cpu")
    for i, layer in enumerate(layers):
        h = layer_output(layer(h, **kwargs[i]))
    return h


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).sum() / b.pow(2).sum())


def record_masks(monkeypatch) -> list[dict]:
    """Wrap the engine's prune_group: each call's keep-masks and the weights it left, per call."""
    calls = []
    real = sequential.prune_group

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        bound = inspect.signature(real).bind(*args, **kwargs).arguments
        linears, names, masks = bound["linears"], bound["names"], bound["masks"]
        calls.append({n: (masks[n].clone(), linears[n].weight.detach().clone(), linears[n].weight) for n in names})
        return out
    monkeypatch.setattr(sequential, "prune_group", spy)
    return calls


@pytest.mark.parametrize("true_sequential", [False, True])
@pytest.mark.parametrize("setting", ["2:4", "0.5"])
def test_mask_exact_through_tuning(monkeypatch, true_sequential, setting):
    model = tiny_model("llama", layers=2)
    target = Target.parse(setting, None) if ":" in setting else Target.unstructured(float(setting))
    calls = record_masks(monkeypatch)
    plan = LayerPlan("sparsegpt", [target] * 2, true_sequential=true_sequential,
                     blockwise=BlockwiseOptions(**BW))
    report = run_sequential(model, ids(), plan, progress=False)
    tuned = 0
    for call in calls:
        for name, (keep, pruned_w, w) in call.items():
            assert not bool(w[~keep].any()), f"{name}: a pruned weight is nonzero after tuning"
            if target.is_nm:
                assert bool((group_counts(keep, 4) == 2).all())
            else:
                assert int((~keep).sum()) == int(target.sparsity * keep.shape[1]) * keep.shape[0]
            tuned += not torch.equal(w[keep], pruned_w[keep])
    assert tuned == sum(len(c) for c in calls)  # every linear's kept weights moved
    for entry in report:
        bw = entry["blockwise"]
        assert bw["steps"] == 6 and bw["error_after"] < bw["error_before"]


@pytest.mark.parametrize("recon_target", ["dense", "local"])
def test_tuning_brings_the_model_closer_to_dense(recon_target):
    dense = tiny_model("llama", layers=3)
    x = ids()
    ref = final_hidden(dense, x)
    errors = {}
    for bw in (None, BlockwiseOptions(**BW, recon_target=recon_target)):
        model = tiny_model("llama", layers=3)
        run_sequential(model, x, LayerPlan("wanda", [Target.parse("2:4", None)] * 3, blockwise=bw), progress=False)
        errors[bw is not None] = rel(final_hidden(model, x), ref)
    assert errors[True] < 0.8 * errors[False]


def test_dense_target_is_the_dense_models_hidden_state():
    """With the dense target, the first layer's target is the dense layer's output on the same
    inputs (both streams agree there), so both targets measure the same error before tuning;
    from the second layer on the dense target is the dense model's own hidden state."""
    x = ids()
    before = {}
    for t in ("dense", "local"):
        for ts in (False, True):  # exact mode + local target takes the targets from the statistics pass
            model = tiny_model("llama", layers=2)
            plan = LayerPlan("sparsegpt", [Target.parse("2:4", None)] * 2, true_sequential=ts,
                             blockwise=BlockwiseOptions(**BW, recon_target=t))
            before[t, ts] = [e["blockwise"]["error_before"] for e in run_sequential(model, x, plan, progress=False)]
    for ts in (False, True):
        assert before["dense", ts][0] == pytest.approx(before["local", ts][0], rel=1e-4)
        assert before["dense", ts][1] > before["local", ts][1]  # the accumulated error is in the dense target


def test_exact_block_is_left_unchanged():
    """A layer pruned to nothing already gives the dense output: it is not tuned, bit for bit."""
    model = tiny_model("llama", layers=2)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    plan = LayerPlan("magnitude", [Target.unstructured(0.0), Target.unstructured(0.5)],
                     blockwise=BlockwiseOptions(**BW))
    report = run_sequential(model, ids(), plan, progress=False)
    first = report[0]["blockwise"]
    assert first["skipped"] and first["steps"] == 0 and first["error_before"] == 0.0
    assert first["error_after"] == 0.0
    for k, v in model.state_dict().items():
        if k.startswith("model.layers.0."):
            assert torch.equal(v, dense[k]), k
    assert report[1]["blockwise"]["steps"] == 6  # magnitude reads no data, but the stage does


def test_norms_are_tuned_only_when_asked():
    for norms in (False, True):
        model = tiny_model("llama", layers=1)
        before = model.model.layers[0].input_layernorm.weight.clone()
        plan = LayerPlan("wanda", [Target.parse("2:4", None)], blockwise=BlockwiseOptions(**BW, recon_norms=norms))
        run_sequential(model, ids(), plan, progress=False)
        assert torch.equal(model.model.layers[0].input_layernorm.weight, before) != norms


@pytest.mark.parametrize("family", ["opt", "phi3", "mixtral"])
def test_families_keep_the_pattern(family):
    """Biases (OPT), fused q/k/v and gate/up (Phi-3), per-expert views of fused experts (Mixtral)."""
    model = family_model(family, layers=2)
    plan = LayerPlan("sparsegpt", [Target.parse("2:4", None)] * 2, blockwise=BlockwiseOptions(**BW))
    report = run_sequential(model, ids(), plan, progress=False)
    for layer in decoder_layers(model):
        with sequential.per_expert_linears(layer):
            for name, lin in linear_layers(layer).items():
                assert bool((group_counts(lin.weight != 0, 4) <= 2).all()), name
    assert all(e["blockwise"]["error_after"] < e["blockwise"]["error_before"] for e in report)


def test_bad_options_are_one_line_errors():
    for bad, word in [({"recon_steps": 0}, "recon_steps"), ({"recon_lr": -1e-4}, "recon_lr"),
                      ({"recon_lr": "x"}, "recon_lr"), ({"reconstruct": "block"}, "reconstruct"),
                      ({"recon_target": "sparse"}, "recon_target"), ({"recon_norms": "yes"}, "recon_norms")]:
        with pytest.raises(LLMPruneError, match=word) as e:
            PruneConfig(method="wanda", sparsity=0.5, **bad)
        assert "\n" not in str(e.value)


def test_cli_refuses_bad_options_before_loading(capsys, tmp_path):
    from llmprune.cli import main

    missing = tmp_path / "no-such-model"
    rc = main(["prune", str(missing), "--method", "wanda", "--sparsity", "0.5",
               "--reconstruct", "blockwise", "--recon-steps", "-3"])
    err = capsys.readouterr().err
    assert rc == 2 and "recon_steps" in err and "no-such-model" not in err and len(err.strip().splitlines()) == 1


def test_memory_estimate_and_refusal(monkeypatch):
    model = tiny_model("llama", layers=2)
    base = memory.estimate_bytes(model, 64, 128, frozenset({"xtx"}))
    on = memory.estimate_bytes(model, 64, 128, frozenset({"xtx"}), blockwise=BlockwiseOptions(**BW))
    assert "target" not in base and on["target"] == base["activations"] // 2 and on["tuning"] > 0
    off = memory.estimate_bytes(model, 64, 128, frozenset({"xtx"}), blockwise=BlockwiseOptions())
    assert off == base

    from llmprune import pipeline

    config = PruneConfig(method="sparsegpt", sparsity=0.5, nsamples=64, seqlen=128, **BW)
    need = sum(on.values())
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(need / 0.9) - 1)
    with pytest.raises(LLMPruneError, match="recon-batch") as e:
        pipeline.check_memory(model, config, "cpu", frozenset({"xtx"}))
    assert "target" in str(e.value) and "tuning" in str(e.value)
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(need / 0.9) + (1 << 20))
    pipeline.check_memory(model, config.replace(true_sequential=False), "cpu", frozenset({"xtx"}))


def test_prune_job_reports_the_stage(tokenizer, tmp_path):
    import json

    import llmprune
    from llmprune.report import layer_table, summary

    model = tiny_model("llama", layers=2)
    config = PruneConfig(method="magnitude", sparsity=0.5, nsamples=4, seqlen=32, out=str(tmp_path / "o"), **BW)
    result = llmprune.prune(model, config, tokenizer=tokenizer, calib_ids=ids(4), progress=False)
    saved = json.loads((tmp_path / "o" / "pruning.json").read_text())
    section = saved["blockwise"]
    assert section["layers"] == 2 and section["tuned"] == 2
    assert section["error_after_mean"] < section["error_before_mean"]
    assert all("blockwise" in L for L in saved["layers"])
    assert "block-wise reconstruction (dense target, 6 steps x 2 rows" in summary(result.report)
    assert "block err before->after" in layer_table(result.report)
    assert saved["recipe"]["reconstruct"] == "blockwise"


def test_osscar_with_blockwise():
    from llmprune.structured.api import structured

    x = ids()
    ref = final_hidden(tiny_model("llama", layers=2), x)
    errors = {}
    for on in (False, True):
        model = tiny_model("llama", layers=2)
        extra = BW if on else {}
        res = structured(model, config={"method": "osscar", "ratio": 0.5, "round_to": 16, "nsamples": 4,
                                        "seqlen": 32, **extra}, ids=x, progress=False)
        errors[on] = rel(final_hidden(model, x), ref)
        assert model.config.intermediate_size == 64
    section = res.report["osscar"]["blockwise"]
    assert section["tuned"] == 2 and section["error_after_mean"] < section["error_before_mean"]
    assert all(e["blockwise"]["error_after"] < e["blockwise"]["error_before"] for e in res.report["osscar"]["layers"])
    assert errors[True] < errors[False]


@pytest.mark.parametrize("start", [0, 2, 4])
def test_depth_tunes_the_blocks_beside_the_gap(monkeypatch, start):
    """k = 2 of 6 layers: the layer before the gap is fit to the dense output of the whole
    window, the one after to its own; nothing else changes."""
    from llmprune.structured import api

    monkeypatch.setattr(api.D, "best_window", lambda scores: start)
    x = ids()
    dense = tiny_model("llama", layers=6)
    ref = final_hidden(dense, x)
    model = tiny_model("llama", layers=6)
    before = [{k: v.clone() for k, v in layer.state_dict().items()} for layer in decoder_layers(model)]
    res = api.structured(model, config={"method": "depth", "layers": 2, "score": "cosine", "nsamples": 4,
                                        "seqlen": 32, **BW}, ids=x, progress=False)
    section = res.report["depth"]["blockwise"]
    tuned = [i for i in (start - 1, start + 2) if 0 <= i < 6]
    assert [e["index"] for e in section["tuned_layers"]] == tuned
    assert all(e["error_after"] < e["error_before"] for e in section["tuned_layers"])
    kept = [i for i in range(6) if not start <= i < start + 2]
    for new, old in enumerate(kept):
        same = all(torch.equal(v, before[old][k]) for k, v in decoder_layers(model)[new].state_dict().items())
        assert same == (old not in tuned), old

    plain = tiny_model("llama", layers=6)
    api.structured(plain, config={"method": "depth", "layers": 2, "score": "cosine", "nsamples": 4, "seqlen": 32},
                   ids=x, progress=False)
    assert rel(final_hidden(model, x), ref) < rel(final_hidden(plain, x), ref)


def test_token_loss_weighs_every_token_alike():
    """A 10 % error on every token is 0.01 per token whatever the token's norm (an attention-sink
    token 1000x the others does not dominate it, as it dominates the plain MSE)."""
    from llmprune.engine.blockwise import ErrorMeter, block_loss, token_errors

    t = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    t[:, 0] *= 1000
    y = 1.1 * t
    assert torch.allclose(token_errors(y, t), torch.full((2, 5), 0.01), rtol=1e-4)
    assert float(block_loss(y, t, "token")) == pytest.approx(0.01, rel=1e-4)
    assert float(block_loss(y, t, "mse")) == pytest.approx(float((0.1 * t).pow(2).mean()), rel=1e-4)
    y2 = t.clone()
    y2[:, 1:] *= 1.3  # the small tokens 30 % off, the sink exact: MSE hardly sees it
    meter = ErrorMeter(t)
    meter(0, y2[:1])
    meter(1, y2[1:])
    assert meter.error == pytest.approx(0.09 * 4 / 5, rel=1e-4)
    assert float(block_loss(y2, t, "mse")) < 1e-3 * float(t.pow(2).mean())


def test_the_summary_names_the_layers_that_got_worse_by_their_index():
    entries = [{"index": 11, "error_before": 0.2, "error_after": 0.1, "steps": 4, "seconds": 1.0},
               {"index": 14, "error_before": 0.1, "error_after": 0.3, "steps": 4, "seconds": 1.0}]
    s = summarize(entries, BlockwiseOptions(reconstruct="blockwise"))
    assert s["worse"] == [14] and s["tuned"] == 2 and s["seconds"] == 2.0
    assert s["error_before_mean"] == pytest.approx(0.15) and s["error_after_mean"] == pytest.approx(0.2)
