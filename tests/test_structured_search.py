"""The budget search: exact parameter counts of pruned shapes, the held-out KL, the plan's
errors, a whole search on tiny models, and the new choices through the command line."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import family_model, tiny_model

from llmprune.cli import main
from llmprune.errors import LLMPruneError
from llmprune.structured import StructuredOptions, structured
from llmprune.structured.search import (
    TOLERANCE,
    Allocation,
    Teacher,
    build_fast,
    dense_stats,
    plan_search,
    shapes,
    targets_of,
)

SL = 32


def calib(n: int, seqlen: int = SL, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def model_of(name: str, layers: int = 3):
    if name in ("llama", "qwen2"):
        return tiny_model(name, layers=layers)
    return family_model(name, layers=layers)


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "gemma2"])
def test_shape_counts_are_the_pruned_models_parameters(name):
    dense = model_of(name)
    sh = shapes(dense, ["mlp", "attention", "hidden", "depth"])
    assert sh.count(Allocation()) == sum(p.numel() for p in dense.parameters())
    opts = StructuredOptions(method="search", param_ratio=0.5, round_to=16, nsamples=6, seqlen=SL)
    plan = plan_search(dense, 0.5, ["mlp", "attention", "hidden", "depth"], 16)
    st = dense_stats(dense, calib(4), plan, opts, "cpu", False)
    for a in [Allocation(mlp=32), Allocation(attention=("groups", 1), hidden=16),
              Allocation(mlp=16, attention=("heads", 1), hidden=32, depth=1), Allocation(depth=2, hidden=16)]:
        model = build_fast(dense, a, st, plan, opts)
        assert sh.count(a) == sum(p.numel() for p in model.parameters()), a
        assert torch.isfinite(model(calib(1)).logits).all()


def test_teacher_kl():
    model = tiny_model("llama", layers=2)
    held = calib(2, seed=5)
    teacher = Teacher(model, held)
    assert teacher.kl(model) == pytest.approx(0.0, abs=1e-9)
    other = tiny_model("llama", layers=2, seed=1)
    kl = teacher.kl(other)
    # with every token in the top-k the coarsened KL is the full one
    full = Teacher(model, held, k=512).kl(other)
    with torch.no_grad():
        p = torch.log_softmax(model(held).logits, -1)
        q = torch.log_softmax(other(held).logits, -1)
    exact = float((p.exp() * (p - q)).sum(-1).mean())
    assert full == pytest.approx(exact, rel=1e-4)
    assert 0 < kl <= exact + 1e-9  # a coarsening never adds divergence


def test_allocations_are_within_the_tolerance_and_the_filler_is_nearest():
    model = tiny_model("llama", layers=4)
    plan = plan_search(model, 0.3, ["mlp", "attention", "hidden", "depth"], 8)
    sh = plan.shapes
    total = sh.count(Allocation())

    def gap(a: Allocation) -> float:
        return abs(1 - sh.count(a) / total - 0.3)

    assert plan.allocations and all(gap(a) <= TOLERANCE for a in plan.allocations)
    assert {t for a in plan.allocations for t in targets_of(a)} == {"mlp", "attention", "hidden", "depth"}
    # the filler (the MLP: most levels) is the nearest of its levels for the rest of the allocation
    step = 8
    for a in plan.allocations:
        for other in (a.mlp - step, a.mlp + step):
            if 0 <= other < sh.inter:
                assert gap(a) <= gap(replace(a, mlp=other)) + 1e-12, a
    # a single target alone is among them where it can reach the budget: the MLP, as --param-ratio would cut it
    fine = plan_search(model, 0.1, ["mlp", "attention", "hidden", "depth"], 4)
    assert any(targets_of(a) == ["mlp"] for a in fine.allocations), fine.allocations


def test_search_on_a_tiny_model():
    model = tiny_model("llama", layers=3)
    before = sum(p.numel() for p in model.parameters())
    ids = calib(10)
    r = structured(model, ids=ids, method="search", param_ratio=0.3, round_to=16, nsamples=8, seqlen=SL, holdout=2,
                   search_candidates=3, progress=False)
    s = r.report["search"]
    after = sum(p.numel() for p in model.parameters())
    assert r.report["params"]["after"] == after
    assert 1 - after / before == pytest.approx(s["predicted_removed_share"], abs=1e-12)
    assert s["allocations_in_budget"] >= len(s["candidates"]) >= 1
    assert s["timings"]["builds_scored"] >= len(s["candidates"])
    # the finals: the best single target and the best mix by the fast KL; the winner has the least final KL
    assert 1 <= len(s["finals"]) <= 2 and s["kl"]["final"] == min(f["kl_final"] for f in s["finals"]) >= 0
    assert set(s["sensitivity"]) <= {"mlp", "attention", "hidden", "depth"}
    assert s["holdout_windows"] == 2 and s["statistics_windows"] == 8
    assert torch.isfinite(model(ids[:1]).logits).all()
    json.dumps(r.report)


@pytest.mark.parametrize(("name", "targets"), [("phi3", "mlp,depth"), ("gpt_neox", "depth"), ("llama", "mlp,depth")])
def test_search_needs_only_the_modules_of_its_targets(name, targets):
    """Phi-3's fused qkv has no head view, GPT-NeoX has LayerNorm and no gated MLP: targets that
    do not touch them still search, and the counts are exact."""
    model = model_of(name)
    before = sum(p.numel() for p in model.parameters())
    r = structured(model, ids=calib(10), method="search", param_ratio=0.2, targets=targets, round_to=16, nsamples=8,
                   seqlen=SL, holdout=2, search_candidates=2, progress=False)
    after = sum(p.numel() for p in model.parameters())
    assert r.report["params"]["after"] == after and after < before
    assert 1 - after / before == pytest.approx(r.report["search"]["predicted_removed_share"], abs=1e-12)


@pytest.mark.parametrize(("opts", "msg"), [
    (dict(param_ratio=0.5, targets="attention"), "more than --targets attention can remove"),
    (dict(), "--method search needs --param-ratio"),
    (dict(ratio=0.2), "--ratio does not apply to --method search"),
    (dict(param_ratio=0.2, targets="mlp,experts"), "--targets must be a comma-separated subset"),
])
def test_bad_search_input_is_one_clear_error(opts, msg, monkeypatch):
    monkeypatch.setattr("llmprune.structured.api.load_corpus",
                        lambda *_a, **_k: (_ for _ in ()).throw(AssertionError("data read first")))
    with pytest.raises(LLMPruneError, match=msg):
        structured(tiny_model("llama", layers=2), config={"method": "search", "seqlen": SL, "nsamples": 8, **opts},
                   progress=False)


# --- the command line -------------------------------------------------------------------------------
FAST = ["--nsamples", "4", "--seqlen", "32", "-q"]


@pytest.mark.parametrize("args,key,value", [
    (["--method", "osscar", "--target", "attention", "--ratio", "0.5"], "num_attention_heads", 2),
    (["--target", "attention", "--ratio", "0.5", "--attention-unit", "groups", "--no-greedy", "--no-local-search",
      "--no-refit"], "num_key_value_heads", 1),
    (["--method", "hidden", "--ratio", "0.25", "--round-to", "8"], "hidden_size", 48),
    (["--method", "search", "--param-ratio", "0.2", "--targets", "mlp,hidden", "--round-to", "16", "--holdout",
      "1", "--search-candidates", "2"], "hidden_size", None),
])
def test_cli_new_choices_save_a_smaller_model(tiny_dirs, tmp_path, capsys, args, key, value):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "small"
    rc = main(["structured", str(tiny_dirs["llama"]), *args, "--out", str(out), *FAST])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "% removed" in printed.out
    config = json.loads((out / "config.json").read_text())
    if value is not None:
        assert config[key] == value
    report = json.loads((out / "pruning.json").read_text())
    assert report["params"]["after"] < report["params"]["before"]
    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("args,msg", [
    (["--target", "attention", "--ratio", "0.1"], "removes no head"),
    (["--method", "hidden", "--ratio", "0.01", "--round-to", "8"], "removes no hidden channel"),
    (["--method", "search", "--ratio", "0.2"], "--ratio does not apply to --method search"),
    (["--target", "bogus", "--ratio", "0.2"], "target"),
])
def test_cli_bad_input_is_one_line_before_work(tiny_dirs, tmp_path, capsys, args, msg):
    out = tmp_path / "o"
    rc = main(["structured", str(tiny_dirs["llama"]), *args, "--out", str(out), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err, err
    assert not out.exists()


def test_moe_and_hidden_is_one_clear_error():
    with pytest.raises(LLMPruneError, match="mixture-of-experts"):
        structured(family_model("qwen2_moe", layers=2), config={"method": "hidden", "ratio": 0.25, "round_to": 8,
                                                                "seqlen": SL}, progress=False)


def test_a_final_on_a_copy_becomes_the_callers_model():
    """When the first final (pruned on a copy) wins, the caller's model object is made that copy."""
    import copy

    from llmprune.models.adapter import decoder_layers
    from llmprune.structured.search import _adopt
    from llmprune.structured.shrink import drop_layers

    model = tiny_model("llama", layers=3)
    other = copy.deepcopy(model)
    drop_layers(other, range(1, 2))
    ids = calib(1)
    with torch.no_grad():
        want = other(ids).logits
        _adopt(model, other)
        got = model(ids).logits
    assert len(decoder_layers(model)) == 2 and model.config.num_hidden_layers == 2
    torch.testing.assert_close(got, want)
