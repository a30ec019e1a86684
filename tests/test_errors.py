"""Bad input: a clear error before heavy work, exit code 2, nothing left on disk."""

import pytest

import llmprune.pipeline as pipeline
from llmprune.cli import main


def run_err(args, capsys, tmp_path):
    out = tmp_path / "out"
    rc = main(["prune", *args, "--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    return err


@pytest.mark.parametrize("args,msg", [
    (["--method", "wanda", "--sparsity", "1.0"], "must be in [0, 1)"),
    (["--method", "wanda", "--sparsity", "-0.1"], "must be in [0, 1)"),
    (["--method", "wanda", "--pattern", "4:4"], "0 < N < M"),
    (["--method", "wanda", "--pattern", "6:4"], "0 < N < M"),
    (["--method", "wanda", "--pattern", "2:4", "--sparsity", "0.7"], "drop one"),
    (["--method", "wanda"], "give --sparsity"),
    (["--method", "obs", "--sparsity", "0.5"], "unknown method 'obs'"),
    (["--method", "wanda", "--sparsity", "0.5", "--nsamples", "0"], "nsamples must be a positive"),
    (["--method", "wanda", "--sparsity", "0.5", "--seqlen", "0"], "seqlen must be a positive"),
    (["--method", "wanda", "--sparsity", "0.5", "--calib", "/nonexistent/calib.jsonl"], "does not exist"),
    (["--method", "wanda", "--sparsity", "0.5", "--ppl", "/nonexistent/test.txt"], "does not exist"),
])
def test_bad_options(tiny_dirs, args, msg, capsys, tmp_path, no_heavy_work):
    err = run_err([str(tiny_dirs["llama"]), *args], capsys, tmp_path)
    assert msg in err


def test_unknown_model(capsys, tmp_path, no_heavy_work):
    err = run_err(["./no/such/model", "--method", "wanda", "--sparsity", "0.5"], capsys, tmp_path)
    assert "not found" in err and "smollm2-135m" in err


def test_missing_data_dir_says_where_it_looked(tiny_dirs, capsys, tmp_path, monkeypatch, no_heavy_work):
    monkeypatch.setenv("LLMPRUNE_DATA_DIR", str(tmp_path / "empty"))
    err = run_err([str(tiny_dirs["llama"]), "--method", "wanda", "--sparsity", "0.5"], capsys, tmp_path)
    assert "c4-train.00000-of-01024" in err and "LLMPRUNE_DATA_DIR" in err


def test_wikitext2_train_offline_is_clear(tiny_dirs, capsys, tmp_path, no_heavy_work):
    err = run_err([str(tiny_dirs["llama"]), "--method", "wanda", "--sparsity", "0.5", "--calib", "wikitext2"],
                  capsys, tmp_path)
    assert "wiki.train.raw" in err and "not available offline" in err


def test_magnitude_needs_no_calibration_data(tiny_dirs, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPRUNE_DATA_DIR", str(tmp_path / "empty"))
    assert main(["prune", str(tiny_dirs["llama"]), "--method", "magnitude", "--sparsity", "0.5", "-q"]) == 0


def test_seqlen_longer_than_context(tiny_dirs, capsys, tmp_path, no_pruning):
    err = run_err([str(tiny_dirs["llama"]), "--method", "wanda", "--sparsity", "0.5", "--seqlen", "512"],
                  capsys, tmp_path)
    assert "longer than the model's context (256" in err


def test_in_features_not_divisible(tiny_dirs, capsys, tmp_path, no_pruning):
    err = run_err([str(tiny_dirs["llama"]), "--method", "wanda", "--pattern", "2:6", "--seqlen", "32"],
                  capsys, tmp_path)
    assert "not divisible by M=6" in err


def test_existing_out_needs_overwrite(tiny_dirs, capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = main(["prune", str(tiny_dirs["llama"]), "--method", "magnitude", "--sparsity", "0.5",
               "--out", str(out), "-q"])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    rc = main(["prune", str(tiny_dirs["llama"]), "--method", "magnitude", "--sparsity", "0.5",
               "--out", str(out), "--overwrite", "-q"])
    assert rc == 2 and "llmprune did not write" in capsys.readouterr().err  # a foreign dir: never
    assert (out / "keep.txt").read_text() == "mine"
    (out / "pruning.json").write_text("{}")  # a previous llmprune output: --overwrite replaces it
    rc = main(["prune", str(tiny_dirs["llama"]), "--method", "magnitude", "--sparsity", "0.5",
               "--out", str(out), "--overwrite", "-q"])
    assert rc == 0 and (out / "pruning.json").is_file() and not (out / "keep.txt").exists()


def test_failure_while_saving_leaves_nothing(tiny_dirs, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def broken(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        main(["prune", str(tiny_dirs["llama"]), "--method", "magnitude", "--sparsity", "0.5",
              "--out", str(tmp_path / "out"), "-q"])
    assert list(tmp_path.iterdir()) == []


def test_failure_while_pruning_leaves_nothing(tiny_dirs, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise FloatingPointError("boom")

    monkeypatch.setattr(pipeline, "run_sequential", broken)
    with pytest.raises(FloatingPointError):
        main(["prune", str(tiny_dirs["llama"]), "--method", "wanda", "--sparsity", "0.5",
              "--seqlen", "32", "--nsamples", "2", "--out", str(tmp_path / "out"), "-q"])
    assert list(tmp_path.iterdir()) == []
