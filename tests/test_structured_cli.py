"""`llmprune structured` end to end on tiny models: a smaller model that plain transformers loads."""

import json

import pytest
from transformers import AutoModelForCausalLM

from llmprune.cli import main

FAST = ["--nsamples", "2", "--seqlen", "32", "-q"]


@pytest.mark.parametrize("args,config_key,value", [
    (["--method", "osscar", "--ratio", "0.25", "--round-to", "16"], "intermediate_size", 96),
    (["--ratio", "0.25", "--round-to", "16", "--no-greedy", "--no-local-search"], "intermediate_size", 96),
    (["--method", "depth", "--layers", "1", "--score", "cosine"], "num_hidden_layers", 1),
])
def test_structured_cli_saves_a_smaller_model(tiny_dirs, tmp_path, capsys, args, config_key, value):
    out = tmp_path / "small"
    rc = main(["structured", str(tiny_dirs["llama"]), *args, "--ppl", "wikitext2", "--max-windows", "1",
               "--out", str(out), *FAST])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "% removed" in printed.out and "PPL" in printed.out
    assert json.loads((out / "config.json").read_text())[config_key] == value
    report = json.loads((out / "pruning.json").read_text())
    assert report["params"]["after"] < report["params"]["before"] and report["ppl"]["after"]
    assert {"load_s", "measure_before_s", "prune_s", "save_s", "measure_after_s"} <= set(report["timings"])
    # the header describes the input as it was loaded, not the smaller result
    assert report["model"]["layers"] == 2 and report["model"]["params"] == report["params"]["before"]
    AutoModelForCausalLM.from_pretrained(out)  # plain transformers
    assert report["options"]["greedy"] == ("--no-greedy" not in args)


@pytest.mark.parametrize("args,msg", [
    (["--ratio", "1.5"], "ratio must be in (0, 1)"),
    (["--method", "depth", "--layers", "2"], "layers"),
    (["--method", "depth", "--ratio", "0.2"], "--ratio does not apply to --method depth"),
    (["--ratio", "0.2", "--score", "bogus"], "score"),
])
def test_structured_bad_input_is_one_line_before_work(tiny_dirs, tmp_path, capsys, args, msg):
    out = tmp_path / "o"
    rc = main(["structured", str(tiny_dirs["llama"]), *args, "--out", str(out), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err, err
    assert not out.exists()
