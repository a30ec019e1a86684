"""True-sequential pruning in one forward per layer (engine/onepass.py)."""

import threading

import pytest
import torch
from conftest import family_model, tiny_model
from torch import nn

import llmprune
import llmprune.engine.memory as memory
import llmprune.engine.sequential as seq
from llmprune.cli import build_parser
from llmprune.config import prune_config_from_flags
from llmprune.engine.capture import capture_inputs
from llmprune.engine.onepass import prune_in_one_pass
from llmprune.engine.sequential import LayerPlan, prune_group, run_layer, run_sequential
from llmprune.engine.stats import LayerStats
from llmprune.errors import LLMPruneError
from llmprune.models.layers import decoder_layers, linear_layers
from llmprune.pipeline import AUTO_TRUE_SEQUENTIAL_SHARE
from llmprune.report import summary
from llmprune.sparsity.methods import required_stats
from llmprune.sparsity.patterns import Target


def calib_ids(n=10, seqlen=24, seed=0):
    return torch.randint(0, 512, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def call_order(layer, inps, kwargs) -> list[str]:
    seen = []
    hooks = [lin.register_forward_pre_hook(lambda m, a, n=n: seen.append(n))
             for n, lin in linear_layers(layer).items()]
    with torch.no_grad():
        layer(inps[:1], **kwargs)
    for h in hooks:
        h.remove()
    return seen


@torch.no_grad()
def slow_true_sequential(model, ids, plan, batch_size):
    """The obvious version: for every linear, in call order, one more forward of all rows
    through the layer as pruned so far gathers that linear's input statistics; then prune it."""
    layers = decoder_layers(model)
    inps, kwargs = capture_inputs(model, layers, ids, "cpu")
    needs = required_stats(plan.method, plan.solver)
    for i, layer in enumerate(layers):
        linears = linear_layers(layer)
        for name in call_order(layer, inps, kwargs[i]):
            stats = LayerStats({name: linears[name]}, needs)
            run_layer(layer, inps, kwargs[i], None, stats, batch_size)
            stats.remove()
            prune_group(linears, [name], name, plan, plan.targets[i], stats)
        run_layer(layer, inps, kwargs[i], inps, batch_size=batch_size)


@pytest.mark.parametrize("method,target", [("sparsegpt", Target.unstructured(0.5)), ("wanda", Target.nm(2, 4))])
def test_one_pass_equals_the_slow_true_sequential(monkeypatch, method, target):
    monkeypatch.setattr(seq, "MAX_ROWS_PER_CALL", 4)  # 10 rows: batches of 4, 4, 2 in three workers
    ids = calib_ids()
    plan = LayerPlan(method, [target] * 2, true_sequential=True)
    fast, slow = tiny_model(), tiny_model()
    report = run_sequential(fast, ids, plan, progress=False)
    slow_true_sequential(slow, ids, plan, batch_size=4)
    for (n, a), b in zip(fast.state_dict().items(), slow.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    assert all(entry["true_sequential"] for entry in report)
    # q/k/v read one input: k and v use q's statistics, none is gathered twice
    assert report[0]["linears"]["self_attn.k_proj"]["shared_input_with"] == "self_attn.q_proj"


def test_one_pass_differs_from_exact_only_after_the_first_group():
    """Layer 0's q/k/v see the same dense input either way; o_proj sees the pruned q/k/v only
    in one pass."""
    ids = calib_ids()
    exact, one = tiny_model(), tiny_model()
    run_sequential(exact, ids, LayerPlan("sparsegpt", [Target.unstructured(0.5)] * 2), progress=False)
    run_sequential(one, ids, LayerPlan("sparsegpt", [Target.unstructured(0.5)] * 2, true_sequential=True),
                   progress=False)
    a, b = linear_layers(decoder_layers(exact)[0]), linear_layers(decoder_layers(one)[0])
    for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        assert torch.equal(a[n].weight, b[n].weight), n
    assert not torch.equal(a["self_attn.o_proj"].weight, b["self_attn.o_proj"].weight)


def test_moe_layers_fall_back_to_the_exact_mode():
    model = family_model("qwen2_moe", layers=2)
    report = run_sequential(model, calib_ids(), LayerPlan("wanda", [Target.unstructured(0.5)] * 2,
                                                          true_sequential=True), progress=False)
    assert [e["true_sequential"] for e in report] == [False, False]


def test_magnitude_reads_no_data_in_either_mode():
    model = tiny_model()
    report = run_sequential(model, calib_ids(), LayerPlan("magnitude", [Target.unstructured(0.5)] * 2,
                                                          true_sequential=True), progress=False)
    assert not any(e["true_sequential"] for e in report)


class _Branchy(nn.Module):
    """A 'layer' whose second linear only some rows reach (like routing)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        x = self.a(x)
        return self.b(x) if x.sum() > 0 else x


def _run(layer, inps, prune, batch_size=1):
    linears = {"a": layer.a, "b": layer.b}
    stats = LayerStats(linears, frozenset({"xtx"}))
    try:
        return prune_in_one_pass(layer, linears, inps, {}, stats, prune, batch_size)
    finally:
        stats.remove()


def _no_worker_left():
    return not any(t.name.startswith("llmprune-batch-") for t in threading.enumerate())


def test_rows_that_reach_other_linears_are_refused():
    layer = _Branchy()
    with torch.no_grad():
        layer.b.weight.zero_()
        layer.a.weight.copy_(torch.eye(4))
        layer.a.bias.zero_()
    inps = torch.tensor([[[1.0, 1, 1, 1]], [[-1.0, -1, -1, -1]]])  # row 0 reaches b, row 1 does not
    with pytest.raises(RuntimeError, match="cannot be pruned in one pass"):
        _run(layer, inps, lambda name: None)
    assert _no_worker_left()


def test_an_error_while_pruning_reaches_the_caller_and_stops_every_worker():
    layer = _Branchy()
    inps = torch.randn(3, 2, 4).abs()
    with torch.no_grad():
        layer.a.weight.copy_(torch.eye(4))
        layer.a.bias.zero_()

    def prune(name):
        if name == "b":
            raise FloatingPointError("b: boom")

    with pytest.raises(FloatingPointError, match="b: boom"):
        _run(layer, inps, prune)
    assert _no_worker_left()


def test_each_linear_is_pruned_after_every_row_reached_it_and_before_any_went_on():
    layer = _Branchy()
    with torch.no_grad():
        layer.a.weight.copy_(torch.eye(4))
        layer.a.bias.zero_()
    inps = torch.randn(5, 2, 4).abs()
    stats = LayerStats({"a": layer.a, "b": layer.b}, frozenset({"xtx"}))
    events = []
    layer.b.register_forward_pre_hook(lambda m, a: events.append("b reached"))
    order = prune_in_one_pass(layer, {"a": layer.a, "b": layer.b}, inps, {}, stats,
                              lambda name: events.append(f"prune {name} after {stats.tokens[name]} tokens"), 2)
    stats.remove()
    assert order == ["a", "b"]
    # 5 rows in batches of 2, 2, 1: three workers; b is reached three times, then pruned
    assert events == ["prune a after 10 tokens", "b reached", "b reached", "b reached", "prune b after 10 tokens"]


def test_prune_api_and_recipe_take_true_sequential(tokenizer):
    model = tiny_model()
    res = llmprune.prune(model, llmprune.PruneConfig(method="sparsegpt", sparsity=0.5, nsamples=4, seqlen=32,
                                                     true_sequential=True), tokenizer=tokenizer,
                         calib_ids=calib_ids(4, 32), progress=False)
    assert res.report["recipe"]["true_sequential"] is True
    assert all(e["true_sequential"] for e in res.report["layers"])
    assert res.report["sparsity"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("true_sequential", [False, True])
def test_a_linear_no_row_reaches_is_an_error_in_both_modes(true_sequential):
    model = tiny_model()
    decoder_layers(model)[0].mlp.unused = nn.Linear(64, 64)
    with pytest.raises(RuntimeError, match=r"\['mlp.unused'\] saw no calibration input"):
        run_sequential(model, calib_ids(), LayerPlan("wanda", [Target.unstructured(0.5)] * 2,
                                                     true_sequential=true_sequential), progress=False)


def _prune_with_free_memory(monkeypatch, tokenizer, free, **options):
    monkeypatch.setattr(memory, "available_bytes", lambda device: free)
    return llmprune.prune(tiny_model(), llmprune.PruneConfig(method="wanda", sparsity=0.5, nsamples=4, seqlen=32,
                                                             **options),
                          tokenizer=tokenizer, calib_ids=calib_ids(4, 32), progress=False)


def _estimates():
    needs = required_stats("wanda", None, False)
    exact = sum(memory.estimate_bytes(tiny_model(), 4, 32, needs).values())
    held = sum(memory.estimate_bytes(tiny_model(), 4, 32, needs, true_sequential=True).values())
    assert held > exact
    return exact, held


def test_the_default_prunes_true_sequentially_when_its_activations_fit(monkeypatch, tokenizer):
    res = _prune_with_free_memory(monkeypatch, tokenizer, None)  # free memory unknown: nothing limits
    assert res.report["recipe"]["true_sequential"] is True  # the recipe records what the run chose
    assert res.report["mode"] == "true-sequential"
    assert all(e["true_sequential"] for e in res.report["layers"])
    assert "true-sequential mode" in summary(res.report)


def test_the_default_falls_back_to_exact_when_memory_is_short(monkeypatch, tokenizer, capsys):
    exact, held = _estimates()
    free = held / AUTO_TRUE_SEQUENTIAL_SHARE - 1  # the exact mode fits, the held activations do not
    assert exact <= 0.9 * free
    res = _prune_with_free_memory(monkeypatch, tokenizer, free)
    assert res.report["mode"] == "exact" and res.report["recipe"]["true_sequential"] is False
    assert not any(e["true_sequential"] for e in res.report["layers"])
    assert "pruning in the exact two-pass mode" in capsys.readouterr().err


def test_a_saved_recipe_reproduces_an_automatic_run_where_memory_would_choose_otherwise(
        monkeypatch, tiny_dirs, tmp_path, capsys):
    """The automatic mode is resolved at run time; recipe.yaml must hold what was resolved."""
    from transformers import AutoModelForCausalLM

    from llmprune.cli import main

    exact, held = _estimates()
    args = ["--method", "wanda", "--sparsity", "0.5", "--nsamples", "4", "--seqlen", "32", "-q"]
    monkeypatch.setattr(memory, "available_bytes", lambda device: None)  # plenty: true-sequential
    assert main(["prune", str(tiny_dirs["llama"]), *args, "--out", str(tmp_path / "a")]) == 0
    recipe = (tmp_path / "a" / "recipe.yaml").read_text()
    assert "true_sequential: true" in recipe and "device: cpu" in recipe and "dtype: float32" in recipe
    # where the automatic mode would now choose the exact mode, the recipe still runs true-sequentially
    free = held / AUTO_TRUE_SEQUENTIAL_SHARE - 1
    monkeypatch.setattr(memory, "available_bytes", lambda device: free)
    capsys.readouterr()
    assert main(["prune", "--recipe", str(tmp_path / "a"), "--out", str(tmp_path / "b"), "-q"]) == 0
    assert "exact two-pass mode" not in capsys.readouterr().err
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # while a fresh automatic run there takes the other mode, and other weights
    assert main(["prune", str(tiny_dirs["llama"]), *args, "--out", str(tmp_path / "c")]) == 0
    c = AutoModelForCausalLM.from_pretrained(tmp_path / "c").state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_explicit_modes_are_kept_or_refused(monkeypatch, tokenizer):
    exact, held = _estimates()
    free = (exact + held) / 2 / 0.9  # exact fits in 90 %, true-sequential does not
    with pytest.raises(LLMPruneError, match="true-sequential pruning needs about .*--no-true-sequential"):
        _prune_with_free_memory(monkeypatch, tokenizer, free, true_sequential=True)
    res = _prune_with_free_memory(monkeypatch, tokenizer, None, true_sequential=False)
    assert res.report["mode"] == "exact"


def test_cli_switches_the_mode_both_ways():
    parser = build_parser()
    for flags, expected in (([], None), (["--true-sequential"], True), (["--no-true-sequential"], False)):
        opts = vars(parser.parse_args(["prune", "m", "--sparsity", "0.5", *flags]))
        del opts["command"]
        assert prune_config_from_flags(opts).true_sequential is expected
