"""The sequential engine on tiny random models."""

import pytest
import torch
from conftest import FAMILIES, tiny_model

import llmprune.engine.sequential as seq
from llmprune.engine.capture import capture_inputs
from llmprune.engine.sequential import LayerPlan, run_sequential
from llmprune.models.layers import decoder_layers, linear_layers
from llmprune.sparsity.patterns import Target


def calib_ids(n=4, seqlen=32, seed=0):
    return torch.randint(0, 512, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def inputs_of(model, layer_idx, name, ids):
    """Σx² per channel of what `name` in layer `layer_idx` sees when the whole model runs."""
    lin = linear_layers(decoder_layers(model)[layer_idx])[name]
    acc = []
    h = lin.register_forward_pre_hook(lambda m, a: acc.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for i in range(ids.shape[0]):
            model(ids[i : i + 1], use_cache=False)
    h.remove()
    X = torch.cat(acc)
    return (X * X).sum(0)


def test_capture_matches_model_forward():
    model = tiny_model()
    ids = calib_ids()
    inps, kwargs = capture_inputs(model, decoder_layers(model), ids, "cpu")
    assert inps.shape == (4, 32, 64) and len(kwargs) == 2
    emb = model.get_input_embeddings()(ids)
    torch.testing.assert_close(inps, emb)


def test_stats_come_from_pruned_previous_layers(monkeypatch):
    """Layer 1 must be scored on the outputs of the *pruned* layer 0."""
    model = tiny_model(layers=3)
    dense = tiny_model(layers=3)
    ids = calib_ids()
    seen = {}
    real = seq.prune_weight

    def spy(method, Ws, stats, target, **kw):
        seen.setdefault(len(seen), {k: v.clone() for k, v in stats.items()})
        return real(method, Ws, stats, target, **kw)

    monkeypatch.setattr(seq, "prune_weight", spy)
    run_sequential(model, ids, LayerPlan("wanda", [Target.unstructured(0.5)] * 3), progress=False)
    # groups per layer: qkv, o, gate/up, down -> the 5th call is layer 1's q/k/v group
    got = seen[4]["col_sq"]
    torch.testing.assert_close(got, inputs_of(model, 1, "self_attn.q_proj", ids), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, inputs_of(dense, 1, "self_attn.q_proj", ids), rtol=1e-3)


def test_shared_inputs_are_grouped(monkeypatch):
    model = tiny_model()
    groups = []
    real = seq.prune_weight

    def spy(method, Ws, stats, target, **kw):
        groups.append(tuple(W.shape for W in Ws))
        return real(method, Ws, stats, target, **kw)

    monkeypatch.setattr(seq, "prune_weight", spy)
    report = run_sequential(model, calib_ids(), LayerPlan("sparsegpt", [Target.nm(2, 4)] * 2), progress=False)
    # q,k,v read one input; gate,up read one input: four groups per layer
    assert groups[:4] == [((64, 64), (32, 64), (32, 64)), ((64, 64),), ((128, 64), (128, 64)), ((64, 128),)]
    assert report[0]["linears"]["self_attn.k_proj"]["shared_input_with"] == "self_attn.q_proj"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,target", [("magnitude", Target.unstructured(0.6)),
                                           ("wanda", Target.nm(2, 4)),
                                           ("sparsegpt", Target.unstructured(0.5))])
def test_families_prune_exactly(family, method, target):
    model = tiny_model(family)
    report = run_sequential(model, calib_ids(), LayerPlan(method, [target] * 2), progress=False)
    for layer in decoder_layers(model):
        for name, lin in linear_layers(layer).items():
            W = lin.weight
            assert torch.isfinite(W).all()
            if target.is_nm:
                assert ((W != 0).reshape(W.shape[0], -1, 4).sum(-1) <= 2).all(), name
            else:
                zeros = (W == 0).sum().item()
                assert zeros >= int(W.numel() * target.sparsity) - 2, name
    assert len(report) == 2 and all(r["seconds"] >= 0 for r in report)
    logits = model(calib_ids(1)).logits
    assert torch.isfinite(logits).all()


def test_pruning_changes_output_less_with_sparsegpt():
    """On the same data, SparseGPT's update keeps the output closer to dense than its mask alone."""
    ids = calib_ids(8, 32)
    dense = tiny_model()
    with torch.no_grad():
        ref = dense(ids).logits
    errs = {}
    for solver in ("sparsegpt", "none"):
        m = tiny_model()
        run_sequential(m, ids, LayerPlan("sparsegpt", [Target.unstructured(0.5)] * 2, solver=solver), progress=False)
        with torch.no_grad():
            errs[solver] = (m(ids).logits - ref).pow(2).mean().item()
    assert errs["sparsegpt"] < errs["none"]


def test_dense_pass_statistics_equal_a_whole_model_forward():
    """measure_layers propagates *dense* outputs: every layer's Σx² equals a full forward's."""
    model = tiny_model(layers=3)
    ids = calib_ids()
    seen = []

    class Spy:
        needs = frozenset({"col_sq"})
        measure_name = "spy"

        def measure(self, weights, stats):
            seen.append(stats["self_attn.q_proj"]["col_sq"].clone())
            return 0.0

    before = {k: v.clone() for k, v in model.state_dict().items()}
    measures, seconds = seq.measure_layers(model, ids, Spy())
    assert measures == [0.0] * 3 and len(seconds) == 3
    for i in range(3):
        torch.testing.assert_close(seen[i], inputs_of(model, i, "self_attn.q_proj", ids), rtol=1e-4, atol=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing pruned
