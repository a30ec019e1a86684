"""Typed options: recipes, flags and the Python API come from one declaration per owner."""

import argparse

import pytest
import torch

import llmprune
from llmprune.cli import build_parser, main
from llmprune.config import PruneConfig
from llmprune.errors import LLMPruneError
from llmprune.sparsity.admm import ADMMOptions
from llmprune.sparsity.allocation import OWLOptions
from llmprune.sparsity.sparsegpt import SparseGPTOptions


@pytest.mark.parametrize("recipe,msg", [
    ("recon_error: 'no'", "recon_error: input should be a valid boolean (got 'no')"),
    ("percdamp: x", "percdamp: input should be a valid number"),
    ("method: [wanda, sparsegpt]", "method: input should be a valid string"),
    ("model: 123", "model: input should be a valid string (got 123)"),
    ("nsamples: true", "nsamples must be a number, got True"),
    ("admm_rho: .inf", "admm_rho must be a finite number > 0, got inf"),
    ("percdamp: -0.1", "percdamp must be a finite number ≥ 0"),
    ("blocksize: 1.5", "blocksize: input should be a valid integer"),
    ("owl_m: 0", "owl_m must be a finite number > 0"),
    ("percdam: 0.1", "unknown option 'percdam'; did you mean 'percdamp'?"),
    ("method: wanda\n  bad indent: [", "is not valid YAML at line"),
])
def test_recipe_values_are_typed(tmp_path, recipe, msg):
    p = tmp_path / "r.yaml"
    p.write_text("sparsity: 0.5\n" + recipe + "\n")
    with pytest.raises(LLMPruneError) as e:
        PruneConfig.from_yaml(p)
    assert msg in str(e.value)
    assert "\n" not in str(e.value)


def test_recipe_must_be_a_mapping(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("- just\n- a list\n")
    with pytest.raises(LLMPruneError, match="must be a YAML mapping"):
        PruneConfig.from_yaml(p)
    with pytest.raises(LLMPruneError, match="cannot read recipe"):
        PruneConfig.from_yaml(tmp_path / "missing.yaml")


def test_chained_recipe_given_to_prune_points_to_run(tmp_path):
    p = tmp_path / "chain.yaml"
    p.write_text("model: smollm2-135m\nstages:\n  - prune: {method: wanda}\n")
    with pytest.raises(LLMPruneError, match="chained recipe; run it with `llmprune run"):
        PruneConfig.from_yaml(p)


def test_ppl_string_is_a_list_not_letters():
    assert PruneConfig.from_yaml("{sparsity: 0.5, ppl: wikitext2}").ppl == ["wikitext2"]
    assert PruneConfig(sparsity=0.5, ppl="wikitext2,c4").ppl == ["wikitext2", "c4"]


def test_every_option_has_its_flag_and_help():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    flags = {a.dest: a for a in sub.choices["prune"]._actions}
    for name, f in PruneConfig.model_fields.items():
        assert name in flags, name
        if name != "model":
            assert f.description and f.description in flags[name].help
    # the owners' declarations are the config's: one default, one description, one place
    for owner in (SparseGPTOptions, ADMMOptions, OWLOptions):
        for name, f in owner.model_fields.items():
            mine = PruneConfig.model_fields[name]
            assert (mine.default, mine.description, mine.annotation) == (f.default, f.description, f.annotation), name


def test_options_reach_the_method_typed(monkeypatch):
    from llmprune.engine import sequential

    seen = {}
    real = sequential.prune_weight

    def spy(method, Ws, stats, target, solver=None, options=None, **kw):
        seen.update(options)
        return real(method, Ws, stats, target, solver=solver, options=options, **kw)

    monkeypatch.setattr(sequential, "prune_weight", spy)
    from tests.conftest import tiny_model

    model = tiny_model()
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    llmprune.prune(model, PruneConfig(method="sparsegpt", sparsity=0.5, nsamples=2, seqlen=16,
                                      blocksize=32, percdamp=0.05, solver="admm", admm_iters=3),
                   calib_ids=ids, progress=False)
    assert seen[SparseGPTOptions] == SparseGPTOptions(blocksize=32, percdamp=0.05)
    assert seen[ADMMOptions].admm_iters == 3


def test_unknown_keyword_option_is_an_error():
    with pytest.raises(LLMPruneError, match="unknown option 'admm_iter'; did you mean 'admm_iters'"):
        llmprune.prune(torch.nn.Linear(2, 2), PruneConfig(sparsity=0.5), admm_iter=3)
    with pytest.raises(Exception, match="admm_iter"):
        ADMMOptions(admm_iter=3)


def test_no_update_conflicts_with_a_solver(tiny_dirs, capsys, tmp_path):
    rc = main(["prune", str(tiny_dirs["llama"]), "--method", "sparsegpt", "--sparsity", "0.5",
               "--no-update", "--solver", "admm", "--out", str(tmp_path / "o"), "-q"])
    assert rc == 2 and "--no-update keeps the original weights, but --solver admm" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_flags_override_recipe_and_are_checked(tmp_path, capsys):
    p = tmp_path / "r.yaml"
    PruneConfig(method="wanda", pattern="2:4").to_yaml(p)
    rc = main(["prune", "--recipe", str(p), "--admm-rho", "inf", "-q"])
    assert rc == 2 and "admm_rho must be a finite number > 0, got inf" in capsys.readouterr().err
    rc = main(["prune", "--recipe", str(p), "--nsamples", "many", "-q"])
    assert rc == 2 and "nsamples: input should be a valid integer" in capsys.readouterr().err


def test_saved_recipe_has_no_destination():
    text = PruneConfig(sparsity=0.5, out="somewhere", overwrite=True).to_yaml(recipe_only=True)
    assert "out:" not in text and "overwrite" not in text
