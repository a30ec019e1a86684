"""`llmprune maskllm` end to end on a tiny model: output directory, mask file, transfer, errors."""

import json

import pytest
from transformers import AutoModelForCausalLM

from llmprune.cli import main
from llmprune.masks import MaskSet
from llmprune.sparsity.patterns import Target

TINY = ["--steps", "2", "--seqlen", "32", "--prior-nsamples", "2", "--checkpoint-every", "1", "-q"]


def test_maskllm_cli_saves_a_plain_model_and_a_mask_file(tiny_dirs, tmp_path, capsys, shared_data):
    out = tmp_path / "learned"
    rc = main(["maskllm", str(tiny_dirs["llama"]), "--pattern", "2:4", "--prior", "sparsegpt",
               "--calib", "c4", "--ppl", "wikitext2", "--max-windows", "1", "--out", str(out), *TINY])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "maskllm 2:4, prior sparsegpt, 2 steps" in printed.out
    assert "removed the checkpoints" in printed.err and not (tmp_path / "learned.ckpt").exists()
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers
    masks = MaskSet.load(out / "masks.npz", model)
    masks.check(Target.nm(2, 4))
    assert masks.compare(MaskSet.from_model(model))["hamming"] == 0
    report = json.loads((out / "pruning.json").read_text())
    assert report["kind"] == "maskllm" and report["sparsity"] == pytest.approx(0.5)
    assert report["ppl"]["after"]["wikitext2"]["ppl"] > 0 and report["timings"]["save_s"] > 0
    assert len((out / "train_log.jsonl").read_text().splitlines()) >= 1
    assert main(["report", str(out)]) == 0

    # a learned mask is the prior of a further run (transfer), on other data
    again = tmp_path / "again"
    assert main(["maskllm", str(tiny_dirs["llama"]), "--prior", str(out / "masks.npz"),
                 "--train-data", str(shared_data / "wikitext-2-raw" / "wiki.valid.raw"), "--out", str(again), *TINY]) == 0
    MaskSet.load(again / "masks.npz", model).check(Target.nm(2, 4))
    assert json.loads((again / "pruning.json").read_text())["maskllm"]["prior"] == "masks"


@pytest.mark.parametrize("args,msg", [
    (["--pattern", "2:5"], "not divisible by M=5"),
    (["--pattern", "0.5"], "N:M"),
    (["--steps", "0"], "steps must be a positive integer"),
    (["--prior", "nosuch.npz"], "neither one of sparsegpt"),
    (["--resume", "/no/such/dir"], "resume directory /no/such/dir does not exist"),
    (["--tau-start", "inf"], "tau_start must be a finite number"),
])
def test_maskllm_bad_input_fails_before_training(tiny_dirs, tmp_path, capsys, monkeypatch, args, msg):
    import llmprune.maskllm.api as api

    monkeypatch.setattr(api, "oneshot_prior", lambda *a, **k: pytest.fail("the prior started"))
    monkeypatch.setattr(api, "Trainer", lambda *a, **k: pytest.fail("training started"))
    out = tmp_path / "o"
    rc = main(["maskllm", str(tiny_dirs["llama"]), *args, "--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err, err
    assert not out.exists()


def test_maskllm_bad_mask_file_is_refused_naming_the_key(tiny_dirs, tmp_path, capsys):
    import numpy as np

    bad = tmp_path / "bad.npz"
    np.savez_compressed(bad, **{"model.layers.0.mlp.nope.weight.mask": np.packbits(np.ones(8, bool))})
    rc = main(["maskllm", str(tiny_dirs["llama"]), "--prior", str(bad), "--out", str(tmp_path / "o"), *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and "model.layers.0.mlp.nope.weight" in err
    assert not (tmp_path / "o").exists()
