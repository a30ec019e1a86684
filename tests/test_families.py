"""Families beyond Llama/Mistral/Qwen2: per-layer arguments, adapters, MoE experts, save/reload.

Every family is a tiny random model from ``conftest.FAMILY_SPECS`` (4 layers, hidden 64).
The calibration rows (64 tokens) are longer than the sliding window (16), so a layer run with
another layer's mask gives different statistics.
"""

from contextlib import ExitStack

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILY_SPECS, family_model
from transformers import AutoConfig, AutoModelForCausalLM

import llmprune
import llmprune.engine.sequential as seq
from llmprune.config import PruneConfig
from llmprune.engine.capture import capture_inputs
from llmprune.engine.sequential import UNROUTED, LayerPlan, run_sequential
from llmprune.errors import LLMPruneError
from llmprune.models.adapter import (
    MLPTriplet,
    PerExpertLinears,
    decoder_layers,
    linear_layers,
    mlp_triplet,
    per_expert_linears,
    routed_linears,
)
from llmprune.sparsity.patterns import Target, apply_target
from llmprune.sparsity.scores import wanda_score

FAMILIES = list(FAMILY_SPECS)
SLIDING = ["gemma2", "gemma3_text", "qwen2_swa"]
MOE = ["mixtral", "qwen2_moe"]
NSAMPLES, SEQLEN = 4, 64


def calib(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 512, (NSAMPLES, SEQLEN), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def whole_model_col_sq(model, ids, only_layer: int | None = None) -> dict[tuple[int, str], torch.Tensor]:
    """Σx² per input channel of every prunable linear, from hooks on one whole-model forward.

    Fused experts are swapped for per-expert linears (shown equal below) so their hooks fire.
    """
    acc: dict[tuple[int, str], torch.Tensor] = {}
    with ExitStack() as stack:
        handles = []
        for i, layer in enumerate(decoder_layers(model)):
            if only_layer is not None and i != only_layer:
                continue
            stack.enter_context(per_expert_linears(layer))
            for name, lin in linear_layers(layer).items():
                def hook(_m, args, key=(i, name)):
                    x = args[0].reshape(-1, args[0].shape[-1]).float()
                    acc[key] = acc.get(key, 0) + (x * x).sum(0)
                handles.append(lin.register_forward_pre_hook(hook))
        try:
            model(ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
    return acc


class Spy:
    """An allocator that records the dense pass's per-linear statistics and measures nothing."""

    needs = frozenset({"col_sq"})
    measure_name = "spy"

    def __init__(self):
        self.seen: list[dict[str, torch.Tensor]] = []

    def measure(self, weights, stats):
        self.seen.append({n: s["col_sq"].clone() for n, s in stats.items()})
        return 0.0


# --- per-layer arguments (the sliding-window defect) ------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_layer_statistics_equal_a_whole_model_forward(family):
    """The engine's dense pass sees in every linear of every layer what a whole-model forward
    shows it — on sliding-window models only if each layer gets its own mask."""
    model, ids = family_model(family), calib()
    spy = Spy()
    seq.measure_layers(model, ids, spy, progress=False)
    ref = whole_model_col_sq(model, ids)
    for i, seen in enumerate(spy.seen):
        assert set(seen) == {n for (j, n) in ref if j == i}, f"layer {i}"
        for name, got in seen.items():
            torch.testing.assert_close(got, ref[(i, name)], rtol=1e-5, atol=1e-6, msg=f"layer {i} {name}")


@torch.no_grad()
def whole_model_wanda(model, ids, target: Target) -> dict[tuple[int, str], torch.Tensor]:
    """Sequential Wanda computed independently of the engine: layer by layer, the statistics
    of layer i come from a whole-model forward through the already pruned layers 0..i-1."""
    masks = {}
    for i, layer in enumerate(decoder_layers(model)):
        stats = whole_model_col_sq(model, ids, only_layer=i)
        for name, lin in linear_layers(layer).items():
            keep = apply_target(wanda_score(lin.weight, stats[(i, name)]), target)
            masks[(i, name)] = keep
            lin.weight.mul_(keep)
    return masks


@pytest.mark.parametrize("family", SLIDING)
@pytest.mark.parametrize("target", [Target.unstructured(0.5), Target.nm(2, 4)], ids=str)
def test_wanda_masks_equal_whole_model_wanda(family, target):
    ids = calib()
    model = family_model(family)
    run_sequential(model, ids, LayerPlan("wanda", [target] * 4), progress=False)
    ref = whole_model_wanda(family_model(family), ids, target)
    for i, layer in enumerate(decoder_layers(model)):
        for name, lin in linear_layers(layer).items():
            assert torch.equal(lin.weight != 0, ref[(i, name)]), f"layer {i} {name}"


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_layers_get_their_own_masks_shared_not_copied(family):
    model = family_model(family)
    layers = decoder_layers(model)
    _, kw = capture_inputs(model, layers, calib(), "cpu")
    assert model.config.layer_types == ["sliding_attention", "full_attention"] * 2
    # one mask per attention kind, shared (the same object) by the layers of that kind
    assert kw[0]["attention_mask"] is kw[2]["attention_mask"]
    assert kw[1]["attention_mask"] is kw[3]["attention_mask"]
    sliding, full = kw[0]["attention_mask"], kw[1]["attention_mask"]
    assert sliding is not None and (full is None or not torch.equal(sliding, full))  # sdpa: None = causal
    cos = [k["position_embeddings"][0] for k in kw]
    assert cos[0] is cos[2] and cos[1] is cos[3]
    if family == "gemma3_text":  # local and global rotary embeddings
        assert not torch.equal(cos[0], cos[1])
    assert all(not ({"cache", "past_key_values", "use_cache"} & set(k)) for k in kw)


class _TupleLayer(torch.nn.Module):
    """A layer in the transformers 4 style: positional arguments, a tuple out."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, hidden_states, mask, scale=1.0):
        return self.lin(hidden_states) * scale + mask, None


class _TupleModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.layers = torch.nn.ModuleList(_TupleLayer() for _ in range(3))
        self.masks = [torch.zeros(8), torch.ones(8)]

    def get_input_embeddings(self):
        return self.emb

    def forward(self, ids, use_cache=False):
        h = self.emb(ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, self.masks[i % 2], scale=i + 1.0)[0]
        return h


def test_capture_names_positional_arguments_and_keeps_tuple_outputs():
    model, ids = _TupleModel(), torch.randint(0, 16, (3, 5))
    calls = []
    model.layers[1].lin.register_forward_pre_hook(lambda m, a: calls.append(1))
    inps, kw = capture_inputs(model, model.layers, ids, "cpu")
    assert not calls  # layers after the first are never really run
    assert [k["scale"] for k in kw] == [1.0, 2.0, 3.0]
    assert kw[0]["mask"] is kw[2]["mask"] and torch.equal(kw[1]["mask"], torch.ones(8))
    torch.testing.assert_close(inps, model.emb(ids))
    with torch.no_grad():
        h = inps
        for layer, k in zip(model.layers, kw, strict=True):
            h = layer(h, **k)[0]
        torch.testing.assert_close(h, model(ids))
    assert "forward" not in model.layers[0].__dict__  # the catchers are gone


# --- the whole API on every family ------------------------------------------------------------
CASES = [(f, "wanda", t) for f in FAMILIES for t in ("0.5", "2:4")]
CASES += [("gemma2", "sparsegpt", "2:4"), ("phi3", "sparsegpt", "0.5"), ("mixtral", "sparsegpt", "0.5")]


def check_exact(W: torch.Tensor, target: Target, name: str) -> None:
    if target.is_nm:
        kept = (W != 0).reshape(W.shape[0], -1, target.m).sum(-1)
        assert (kept == target.n).all(), name
    else:
        assert int((W == 0).sum()) == int(W.numel() * target.sparsity), name


@pytest.mark.parametrize("family,method,pattern", CASES)
def test_prune_every_family_exactly_and_reload(family, method, pattern, tokenizer, tmp_path):
    model = family_model(family)
    nm = ":" in pattern
    target = Target.parse(pattern if nm else None, None if nm else float(pattern))
    cfg = PruneConfig(method=method, pattern=pattern if nm else None,
                      sparsity=None if nm else float(pattern), nsamples=NSAMPLES, seqlen=SEQLEN)
    res = llmprune.prune(model, cfg, tokenizer=tokenizer, calib_ids=calib(), progress=False)
    n = 0
    for i, layer in enumerate(decoder_layers(model)):
        for name, lin in linear_layers(layer).items():
            check_exact(lin.weight, target, f"layer {i} {name}")
            assert name in res.report["layers"][i]["linears"]
            n += 1
    assert res.report["sparsity"] == pytest.approx(0.5)
    if family in MOE:  # every expert of every layer was pruned
        assert all(len(routed_linears(layer)) == 4 * 3 for layer in decoder_layers(model))
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids = calib(1)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


# --- the adapter ------------------------------------------------------------------------------
def test_decoder_layers_from_no_split_modules():
    for family in FAMILIES:
        model = family_model(family, layers=2)
        layers = decoder_layers(model)
        assert len(layers) == 2 and type(layers[0]).__name__ in model._no_split_modules


def test_gpt2_conv1d_is_a_clear_error(tokenizer):
    cfg = AutoConfig.for_model("gpt2", vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(LLMPruneError, match=r"Conv1D \(attn\.c_attn.*not supported"):
        decoder_layers(model)
    with pytest.raises(LLMPruneError, match="Conv1D"):
        llmprune.prune(model, PruneConfig(method="wanda", sparsity=0.5, nsamples=2, seqlen=16),
                       tokenizer=tokenizer, calib_ids=calib()[:2, :16], progress=False)


def test_linears_include_experts_and_exclude_routers():
    layer = decoder_layers(family_model("qwen2_moe", layers=1))[0]
    names = set(linear_layers(layer))
    assert "mlp.shared_expert_gate" not in names  # a router: see adapter._routers
    assert {"mlp.shared_expert.gate_proj", "mlp.experts.3.down_proj"} <= names
    assert routed_linears(layer) == {f"mlp.experts.{e}.{p}" for e in range(4)
                                     for p in ("gate_proj", "up_proj", "down_proj")}
    lins = linear_layers(decoder_layers(family_model("mixtral", layers=1))[0])
    assert lins["mlp.experts.0.gate_proj"].weight.shape == (128, 64)
    assert lins["mlp.experts.0.down_proj"].weight.shape == (64, 128)


def test_mlp_triplet():
    gemma = decoder_layers(family_model("gemma2", layers=1))[0]
    assert mlp_triplet(gemma) == MLPTriplet(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", 128)
    phi = decoder_layers(family_model("phi3", layers=1))[0]
    assert mlp_triplet(phi) == MLPTriplet(("mlp.gate_up_proj",), "mlp.down_proj", 128, fused_gate_up=True)
    for family in ("opt", "gpt_neox"):
        with pytest.raises(LLMPruneError, match="no recognised gated MLP: expected .*gate_proj"):
            mlp_triplet(decoder_layers(family_model(family, layers=1))[0])
    with pytest.raises(LLMPruneError, match="mixture-of-experts"):
        mlp_triplet(decoder_layers(family_model("mixtral", layers=1))[0])


# --- MoE --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", MOE)
@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
def test_per_expert_module_computes_what_the_fused_one_does(family, impl):
    model = family_model(family, layers=1)
    model.set_experts_implementation(impl)
    layer = decoder_layers(model)[0]
    x = torch.randn(2, 16, 64)
    with torch.no_grad():
        fused = layer.mlp(x)
        with per_expert_linears(layer):
            assert isinstance(layer.mlp.experts, PerExpertLinears)
            unfused = layer.mlp(x)
    assert not isinstance(layer.mlp.experts, PerExpertLinears)
    torch.testing.assert_close(unfused, fused, rtol=1e-5, atol=1e-6)


def never_route_to(router, expert: int):
    """Make a Mixtral router never choose ``expert`` (its logit is -inf), else unchanged."""

    def forward(hidden_states):
        logits = F.linear(hidden_states.reshape(-1, router.hidden_dim), router.weight)
        logits[:, expert] = float("-inf")
        probs = torch.softmax(logits.float(), dim=-1)
        top, idx = torch.topk(probs, router.top_k, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), idx

    router.forward = forward


def test_unrouted_expert_is_pruned_by_magnitude_and_reported():
    model = family_model("mixtral", layers=2)
    for layer in decoder_layers(model):
        never_route_to(layer.mlp.gate, 3)
    before = {n: lin.weight.clone() for n, lin in linear_layers(decoder_layers(model)[1]).items()}
    report = run_sequential(model, calib(), LayerPlan("wanda", [Target.unstructured(0.5)] * 2), progress=False)
    layer = decoder_layers(model)[1]
    lins = linear_layers(layer)
    for p in ("gate_proj", "up_proj", "down_proj"):
        name = f"mlp.experts.3.{p}"
        entry = report[1]["linears"][name]
        assert entry["calibration_tokens"] == 0 and entry["scored_by"] == UNROUTED
        W = lins[name].weight
        check_exact(W, Target.unstructured(0.5), name)
        # magnitude over the whole matrix: the kept weights are the largest |W| before pruning
        keep = apply_target(before[name].abs(), Target.unstructured(0.5), per="matrix")
        assert torch.equal(W != 0, keep)
        routed = report[1]["linears"][f"mlp.experts.0.{p}"]
        assert routed["calibration_tokens"] > 0 and "scored_by" not in routed
    # the pruned weights live in the fused parameters the model computes with
    fused = layer.mlp.experts.gate_up_proj
    assert int((fused[3] == 0).sum()) == fused[3].numel() // 2


def test_mask_set_of_a_pruned_moe_covers_the_fused_experts():
    """Mask files name what the model stores: the fused 3D expert tensors, N:M along inputs."""
    from llmprune.masks import MaskSet
    from llmprune.sparsity.patterns import Target

    model = family_model("mixtral")
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    llmprune.prune(model, PruneConfig(method="wanda", pattern="2:4", nsamples=4, seqlen=32),
                   calib_ids=ids, progress=False)
    masks = MaskSet.from_model(model)
    fused = [n for n in masks if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(fused) == 2 * model.config.num_hidden_layers
    assert masks[fused[0]].dim() == 3
    masks.check(Target.nm(2, 4))
