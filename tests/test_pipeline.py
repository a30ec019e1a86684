"""End to end on tiny models: CLI, API, save/reload, recipes, perplexity protocol."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmprune
from llmprune.cli import main
from llmprune.config import PruneConfig
from llmprune.data.sources import load_corpus
from llmprune.data.tokens import eval_token_stream
from llmprune.eval.perplexity import perplexity

FAST = ["--nsamples", "4", "--seqlen", "32", "-q"]


def test_cli_prune_save_reload_roundtrip(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "pruned"
    rc = main(["prune", str(tiny_dirs["llama"]), "--method", "sparsegpt", "--pattern", "2:4",
               "--ppl", "wikitext2", "--max-windows", "2", "--out", str(out), *FAST])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "sparsity of decoder linears: 0.5000" in printed and "PPL" in printed
    report = json.loads((out / "pruning.json").read_text())
    assert report["recipe"]["pattern"] == "2:4" and report["sparsity"] == pytest.approx(0.5)
    assert report["ppl"]["after"]["wikitext2"]["windows"] == 2
    assert {"versions", "layers", "timings", "peak_rss_mb"} <= set(report)
    assert (out / "model.safetensors").is_file() and (out / "recipe.yaml").is_file()
    assert not list(tmp_path.glob(".pruned.tmp-*"))
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers
    W = model.model.layers[1].mlp.down_proj.weight
    assert ((W != 0).reshape(W.shape[0], -1, 4).sum(-1) <= 2).all()
    # eval and report read the saved directory
    assert main(["eval", str(out), "--ppl", "wikitext2", "--seqlen", "32", "--max-windows", "2", "-q"]) == 0
    ev = capsys.readouterr().out
    after = report["ppl"]["after"]["wikitext2"]["ppl"]
    assert f"PPL {after:.3f}" in ev
    assert main(["report", str(out)]) == 0
    assert "down_proj" in capsys.readouterr().out


def test_api_prune_with_loaded_model(tiny_dirs):
    model, tok = llmprune.load_model(str(tiny_dirs["qwen2"]))
    cfg = PruneConfig(method="wanda", sparsity=0.7, nsamples=4, seqlen=32)
    res = llmprune.prune(model, cfg, tokenizer=tok, progress=False)
    assert res.model is model
    assert res.report["sparsity"] == pytest.approx(0.7, abs=0.015)
    assert cfg.model == "smollm2-135m"  # the caller's config is not mutated
    r = llmprune.evaluate(model, tok, ppl="wikitext2", seqlen=32, max_windows=2, progress=False)
    assert r["wikitext2"]["ppl"] > 1 and r["_sparsity"] == pytest.approx(0.7, abs=0.015)


def test_recipe_roundtrip_and_rerun(tiny_dirs, tmp_path):
    cfg = PruneConfig(model=str(tiny_dirs["mistral"]), method="sparsegpt", pattern="4:8",
                      nsamples=4, seqlen=32, seed=3, ppl=["wikitext2"], out=str(tmp_path / "a"))
    text = cfg.to_yaml()  # a recipe never says where output goes
    assert "out:" not in text and PruneConfig.from_yaml(text) == cfg.replace(out=None)
    path = tmp_path / "r.yaml"
    cfg.to_yaml(path)
    assert PruneConfig.from_yaml(path) == cfg.replace(out=None)
    # the recipe saved next to a model re-runs the same job with identical weights
    assert main(["prune", "--recipe", str(path), "--out", str(tmp_path / "a"), "--max-windows", "1", "-q"]) == 0
    saved = tmp_path / "a" / "recipe.yaml"
    assert main(["prune", "--recipe", str(saved), "--out", str(tmp_path / "b"), "-q"]) == 0
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(llmprune.LLMPruneError, match="unknown option 'sparsty'; did you mean 'sparsity'"):
        PruneConfig.from_yaml("llmprune: {method: wanda, sparsty: 0.5}")


def test_seed_changes_calibration(tiny_dirs):
    from llmprune.data.calibration import calibration_windows

    _, tok = llmprune.load_model(str(tiny_dirs["llama"]))
    corpus = load_corpus("c4", "train")
    a = calibration_windows(corpus, tok, 4, 64, seed=0)
    b = calibration_windows(corpus, tok, 4, 64, seed=0)
    c = calibration_windows(corpus, tok, 4, 64, seed=1)
    assert a.shape == (4, 64) and torch.equal(a, b) and not torch.equal(a, c)


def test_perplexity_protocol(tiny_dirs):
    model, tok = llmprune.load_model(str(tiny_dirs["llama"]))
    corpus = load_corpus("wikitext2", "test")
    ids = eval_token_stream(corpus, tok, 32)
    joined = tok("\n\n".join(corpus.pieces), return_tensors="pt").input_ids
    assert torch.equal(ids, joined)
    assert corpus.pieces[1] == " = Robert Boulter = \n"
    r = perplexity(model, ids, 32, max_windows=3, progress=False)
    nll = []
    with torch.no_grad():
        for i in range(3):
            x = ids[:, i * 32 : (i + 1) * 32]
            logp = torch.log_softmax(model(x).logits[0, :-1], -1)
            nll.append(-logp[torch.arange(31), x[0, 1:]].mean().item())
    assert r["ppl"] == pytest.approx(math.exp(sum(nll) / 3), rel=1e-5)
    assert r["windows"] == 3 and r["tokens"] == 96


def test_c4_sample_is_labelled():
    corpus = load_corpus("c4", "validation")
    assert len(corpus.pieces) == 1000
    assert "1000-document" in corpus.label
