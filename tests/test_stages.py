"""prune() as stages: checks before loading, the model saved before the final evaluation,
memory refused with numbers, numerical fallbacks recorded."""

import json

import pytest
import torch

import llmprune
import llmprune.jobs.context as context
import llmprune.pipeline as pipeline
from llmprune.cli import main
from llmprune.config import PruneConfig
from llmprune.errors import LLMPruneError
from tests.conftest import tiny_model

FAST = ["--nsamples", "2", "--seqlen", "16", "-q"]


def test_stage_order():
    names = [s.__name__ for s in pipeline.ONESHOT]
    assert names == ["validate", "load", "check_model", "calibrate", "ppl_before", "plan", "run", "save",
                     "ppl_after", "report"]


def test_cuda_without_gpu_fails_before_loading(tiny_dirs, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("loaded"))
    rc = main(["prune", str(tiny_dirs["llama"]), "--sparsity", "0.5", "--device", "cuda",
               "--out", str(tmp_path / "o"), *FAST])
    assert rc == 2 and "CUDA is not available here" in capsys.readouterr().err


def test_undecodable_calibration_fails_before_loading(tiny_dirs, capsys, monkeypatch, tmp_path):
    bad = tmp_path / "calib.txt"
    bad.write_bytes(b"\xff\xfe\x00binary\x80\x81")
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("loaded"))
    rc = main(["prune", str(tiny_dirs["llama"]), "--sparsity", "0.5", "--calib", str(bad), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and str(bad) in err and "Traceback" not in err


def test_memory_estimate_refuses_what_will_not_fit(tiny_dirs, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr("llmprune.engine.memory.available_bytes", lambda device: 10 * 2**20)
    monkeypatch.setattr(pipeline, "run_sequential", lambda *a, **k: pytest.fail("pruning started"))
    rc = main(["prune", str(tiny_dirs["llama"]), "--sparsity", "0.5", "--nsamples", "4096",
               "--seqlen", "64", "--out", str(tmp_path / "o"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "GiB is free; lower --nsamples (4096)" in err
    assert "activations 0.12" in err  # inputs + outputs: 2 x 4096 x 64 x 64 fp32 = 0.125 GiB
    assert not (tmp_path / "o").exists()


def test_saved_before_the_final_evaluation(tiny_dirs, monkeypatch, tmp_path):
    calls = []
    real = context.evaluate_ppl

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # the "after" pass
            raise RuntimeError("out of memory during evaluation")
        return real(*a, **k)

    monkeypatch.setattr(context, "evaluate_ppl", flaky)
    out = tmp_path / "o"
    with pytest.raises(RuntimeError, match="out of memory"):
        llmprune.prune(str(tiny_dirs["llama"]), PruneConfig(sparsity=0.5, nsamples=2, seqlen=16,
                       ppl=["wikitext2"], max_windows=1, out=str(out)), progress=False)
    report = json.loads((out / "pruning.json").read_text())  # the pruned model is not lost
    assert report["ppl"]["before"]["wikitext2"]["ppl"] > 0 and report["ppl"]["after"] == {}
    assert (out / "model.safetensors").is_file()


def test_report_has_every_stage_timing_and_final_ppl(tiny_dirs, tmp_path):
    out = tmp_path / "o"
    assert main(["prune", str(tiny_dirs["llama"]), "--sparsity", "0.5", "--ppl", "wikitext2",
                 "--max-windows", "1", "--out", str(out), *FAST]) == 0
    report = json.loads((out / "pruning.json").read_text())
    assert {"load_s", "calibrate_s", "ppl_before_s", "run_s", "save_s", "ppl_after_s"} <= set(report["timings"])
    assert report["ppl"]["after"]["wikitext2"]["ppl"] > 0
    assert report["timings"]["save_s"] > 0
    # the saved recipe re-runs from the directory itself, to a new place
    assert main(["prune", "--recipe", str(out), "--out", str(tmp_path / "again"), *FAST]) == 0


def test_singular_xtx_damping_is_warned_and_recorded(capsys):
    model = tiny_model()
    ids = torch.zeros(2, 16, dtype=torch.long)  # one repeated token: XᵀX has rank ~1
    res = llmprune.prune(model, PruneConfig(method="sparsegpt", sparsity=0.5, nsamples=2, seqlen=16,
                                            percdamp=0.0), calib_ids=ids, progress=False)
    damped = [(L["index"], n, e["damping"]) for L in res.report["layers"]
              for n, e in L["linears"].items() if "damping" in e]
    assert damped and all(d > 0 for _, _, d in damped)
    assert "XᵀX is singular with damping 0" in capsys.readouterr().err


def test_result_masks_are_the_pruned_pattern():
    from llmprune.sparsity.patterns import Target

    res = llmprune.prune(tiny_model(), PruneConfig(method="magnitude", pattern="2:4"), progress=False)
    res.masks.check(Target.nm(2, 4))
    assert len(res.masks) == 2 * 7 and res.masks.sparsity == pytest.approx(0.5)


def test_config_is_not_mutated_and_overrides_are_checked():
    cfg = PruneConfig(sparsity=0.5)
    with pytest.raises(LLMPruneError, match="nsamples must be a positive integer"):
        llmprune.prune(tiny_model(), cfg, nsamples=0)
    assert cfg.nsamples == 128


def test_magnitude_needs_no_tokenizer(tmp_path):
    d = tmp_path / "no-tok"
    tiny_model().save_pretrained(d)  # weights and config only
    out = tmp_path / "o"
    assert main(["prune", str(d), "--method", "magnitude", "--pattern", "2:4", "--out", str(out), "-q"]) == 0
    assert json.loads((out / "pruning.json").read_text())["sparsity"] == pytest.approx(0.5)
    rc = main(["prune", str(d), "--method", "wanda", "--sparsity", "0.5", *FAST])
    assert rc == 2


def test_ctrl_c_is_one_line_and_exit_130(tiny_dirs, capsys, monkeypatch, tmp_path):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_sequential", interrupted)
    rc = main(["prune", str(tiny_dirs["llama"]), "--sparsity", "0.5", "--out", str(tmp_path / "o"), *FAST])
    err = capsys.readouterr().err
    assert rc == 130 and err.strip().splitlines()[-1] == "llmprune: interrupted" and "Traceback" not in err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o*"))


def test_a_stage_with_nothing_to_do_records_no_time(tiny_dirs, tmp_path):
    out = tmp_path / "o"
    assert main(["prune", str(tiny_dirs["llama"]), "--method", "magnitude", "--sparsity", "0.5",
                 "--out", str(out), *FAST]) == 0
    timings = json.loads((out / "pruning.json").read_text())["timings"]
    assert {"load_s", "run_s", "save_s"} <= set(timings)
    assert not {"calibrate_s", "ppl_before_s", "ppl_after_s"} & set(timings), timings
