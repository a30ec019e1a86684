"""The job-kind registry: every kind's output reads back through `llmprune report` with one shared
header; devices are honoured and recorded; masks are recorded, not guessed from zeros."""

from __future__ import annotations

import json

import pytest
import torch

from llmprune.cli import main
from llmprune.jobs import registry
from llmprune.jobs.header import HEADER_KEYS
from llmprune.masks import MaskSet
from llmprune.sparsity.patterns import Target

TRAIN = ["--steps", "1", "--seqlen", "32", "--checkpoint-every", "1", "-q"]


@pytest.fixture(scope="module")
def outputs(tiny_dirs, tmp_path_factory, shared_data) -> dict:
    """One output of every kind that writes a model directory, from the CLI."""
    root = tmp_path_factory.mktemp("kinds")
    m = str(tiny_dirs["llama"])
    runs = {
        "prune": ["prune", m, "--method", "wanda", "--pattern", "2:4", "--nsamples", "2", "--seqlen", "32",
                  "--ppl", "wikitext2", "--max-windows", "1", "-q"],
        "maskllm": ["maskllm", m, "--pattern", "2:4", "--prior", "magnitude", *TRAIN],
        "structured": ["structured", m, "--method", "depth", "--layers", "1", "--nsamples", "2", "--seqlen", "32",
                       "-q"],
    }
    out = {}
    for kind, args in runs.items():
        out[kind] = root / kind
        assert main([*args, "--out", str(out[kind])]) == 0
    out["recover"] = root / "recover"
    assert main(["recover", str(out["prune"]), *TRAIN, "--out", str(out["recover"])]) == 0
    out["masks"] = root / "masks"
    assert main(["masks", "apply", m, str(out["prune"] / "masks.npz"), "--out", str(out["masks"])]) == 0
    recipe = root / "chain.yaml"
    recipe.write_text(f"model: {m}\nseqlen: 32\nstages:\n  - prune: {{method: magnitude, pattern: '2:4'}}\n"
                      "  - distill: {steps: 1, checkpoint_every: 1}\n"
                      "  - blockwise: {nsamples: 2, recon_steps: 2, ppl: wikitext2, ppl_seqlen: 32, max_windows: 1}\n"
                      "  - eval: {ppl: wikitext2, ppl_seqlen: 32, max_windows: 1}\n")
    out["chain"] = root / "chain"
    assert main(["run", str(recipe), "--out", str(out["chain"]), "-q"]) == 0
    for stage in ("02-distill", "03-blockwise", "04-eval"):
        out[stage[3:]] = out["chain"] / "stages" / stage
    return out


def test_every_registered_kind_is_covered(outputs):
    assert set(registry.kinds()) == set(outputs)


@pytest.mark.parametrize("kind", list(registry.MODULES))
def test_report_works_on_every_kind_with_one_header(outputs, kind, capsys):
    report = json.loads((outputs[kind] / "pruning.json").read_text())
    assert report["kind"] == kind
    if kind != "chain":  # a chain's stages carry the header; it keeps its own state
        missing = [k for k in HEADER_KEYS if k not in report]
        assert not missing, missing
        assert set(report["model"]) >= {"name", "class", "layers", "params"}
        assert report["device"] == "cpu" and "llmprune" in report["versions"]
        assert "out" not in report["recipe"] and report["recipe"].get("device", "cpu") == "cpu"
    capsys.readouterr()
    assert main(["report", str(outputs[kind])]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"{kind}: model ")
    if kind != "chain":
        assert "timings: " in printed and "peak RSS" in printed


def test_the_main_job_prints_its_summary_once(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["prune", str(tiny_dirs["llama"]), "--method", "magnitude", "--sparsity", "0.5",
                 "--out", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("prune: model ") == 1 and f"per-layer table: llmprune report {out}" in printed


def test_maskllm_summary_prints_the_final_loss(outputs, capsys):
    assert main(["report", str(outputs["maskllm"])]) == 0
    assert "final loss " in capsys.readouterr().out


def test_a_cpu_device_trains_on_the_cpu_where_cuda_is_available(tiny_dirs, tmp_path, monkeypatch):
    """--device cpu builds a CPU accelerator and the report records cpu, with CUDA reported."""
    import llmprune.train.trainer as trainer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    built = []
    real = trainer.accelerator_for

    def spy(device=None):
        built.append(device)
        with monkeypatch.context() as m:
            m.setattr(torch.cuda, "is_available", lambda: False)  # the real machine has no GPU to give
            return real(device)

    monkeypatch.setattr(trainer, "accelerator_for", spy)
    import llmprune.maskllm.api as api
    import llmprune.recover.api as rapi

    monkeypatch.setattr(api, "accelerator_for", spy)
    monkeypatch.setattr(rapi, "accelerator_for", spy)
    out = tmp_path / "m"
    assert main(["maskllm", str(tiny_dirs["llama"]), "--pattern", "2:4", "--prior", "none", "--device", "cpu",
                 *TRAIN, "--out", str(out)]) == 0
    report = json.loads((out / "pruning.json").read_text())
    assert built == ["cpu"] and report["device"] == "cpu" and report["maskllm"]["device"] == "cpu"
    acc = real("cpu")
    assert acc.device.type == "cpu"


def _with_natural_zeros(model_dir, tmp_path):
    """A copy of the tiny model in which some weights are exactly 0, as in dequantised Q4_1 ones."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.mlp.up_proj, layer.self_attn.q_proj):
                lin.weight[torch.rand(lin.weight.shape, generator=g) < 0.2] = 0
    d = tmp_path / "zeros"
    model.save_pretrained(d)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(d)
    return d


def test_masks_are_recorded_not_guessed_from_zeros(tiny_dirs, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    src = _with_natural_zeros(tiny_dirs["llama"], tmp_path)
    out = tmp_path / "p"
    assert main(["prune", str(src), "--method", "sparsegpt", "--pattern", "2:4", "--solver", "none",
                 "--nsamples", "2", "--seqlen", "32", "--out", str(out), "-q"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert MaskSet.from_model(model).violations(Target.nm(2, 4))  # the zeros alone are not 2:4
    recorded = MaskSet.load(out / "masks.npz", model)
    recorded.check(Target.nm(2, 4))
    # export and recovery read the recorded mask
    exported = tmp_path / "m.npz"
    assert main(["masks", "export", str(out), "--out", str(exported)]) == 0
    assert "every mask 2:4" in capsys.readouterr().out
    assert MaskSet.load(exported, model).compare(recorded)["hamming"] == 0
    rec = tmp_path / "r"
    assert main(["recover", str(out), *TRAIN, "--out", str(rec)]) == 0
    MaskSet.load(rec / "masks.npz", model).check(Target.nm(2, 4))
    assert json.loads((rec / "pruning.json").read_text())["recover"]["masks"]["nm"] == "2:4"
    # without masks.npz, the weights are completed to the N:M pattern pruning.json records
    (out / "masks.npz").unlink()
    completed = MaskSet.of_output(out, model)
    completed.check(Target.nm(2, 4))
    assert (completed.compare(MaskSet.from_model(model))["hamming"]) > 0


def test_complete_nm_keeps_exactly_n_and_refuses_more():
    from llmprune.errors import LLMPruneError
    from llmprune.masks.checks import complete_nm

    nonzero = torch.tensor([[1, 0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1, 0, 1]], dtype=torch.bool)
    done = complete_nm(nonzero, 2, 4)
    assert done.tolist() == [[1, 1, 0, 0, 1, 1, 0, 0], [1, 1, 0, 0, 0, 1, 0, 1]]
    assert torch.equal(done & nonzero, nonzero)  # never drops a nonzero
    with pytest.raises(LLMPruneError, match="not 2:4"):
        complete_nm(torch.ones(1, 4, dtype=torch.bool), 2, 4)


def test_the_chain_distills_and_tunes_block_wise_keeping_the_pattern(outputs, tiny_dirs):
    from transformers import AutoModelForCausalLM

    distilled = json.loads((outputs["distill"] / "pruning.json").read_text())
    assert distilled["recover"]["distill"]["loss"] == "kd" and distilled["target"] == "2:4"
    tuned = json.loads((outputs["blockwise"] / "pruning.json").read_text())
    b = tuned["blockwise"]
    assert b["layers"] == 2 and b["teacher"] == str(tiny_dirs["llama"])  # the chain's dense model
    assert b["error_after_mean"] < b["error_before_mean"]
    assert tuned["ppl"]["after"]["wikitext2"]["ppl"] < tuned["ppl"]["before"]["wikitext2"]["ppl"]
    model = AutoModelForCausalLM.from_pretrained(outputs["blockwise"])
    MaskSet.load(outputs["blockwise"] / "masks.npz", model).check(Target.nm(2, 4))
    MaskSet.from_model(model).check(Target.nm(2, 4))  # the weights themselves: the pattern held
