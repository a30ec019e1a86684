"""`llmprune recover` end to end on a tiny pruned model directory: outputs, report, errors."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmprune.cli import main
from llmprune.masks import MaskSet
from llmprune.sparsity.patterns import Target

TINY = ["--steps", "2", "--seqlen", "32", "--checkpoint-every", "1", "--log-every", "1", "--lr", "1e-2", "-q"]



def test_recover_lora_cli_merges_remasks_and_reports_the_cost(pruned_dir, tmp_path, capsys):
    pytest.importorskip("peft")
    out = tmp_path / "rec"
    rc = main(["recover", str(pruned_dir), "--mode", "lora", "--calib", "c4", "--ppl", "wikitext2",
               "--max-windows", "1", "--out", str(out), *TINY])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "recover lora r=8, 2 steps" in printed.out and "kept exactly" in printed.out
    assert "merged, not re-masked" in printed.out
    assert "removed the checkpoints" in printed.err and not (tmp_path / "rec.ckpt").exists()
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no adapter
    before = AutoModelForCausalLM.from_pretrained(pruned_dir)
    assert MaskSet.from_model(model).compare(MaskSet.from_model(before))["hamming"] == 0
    MaskSet.from_model(model).check(Target.nm(2, 4))
    report = json.loads((out / "pruning.json").read_text())
    assert report["kind"] == "recover" and report["mode"] == "lora" and report["target"] == "2:4"
    assert report["sparsity"] == pytest.approx(0.5) and report["recover"]["pruned_nonzero"] == 0
    assert report["input"]["kind"] == "prune" and report["input"]["method"] == "magnitude"
    cost = report["remask_cost"]["wikitext2"]
    assert cost["delta"] == pytest.approx(cost["remasked_ppl"] - cost["merged_ppl"])
    assert report["ppl"]["merged"]["wikitext2"]["ppl"] == cost["merged_ppl"]
    assert report["ppl"]["after"]["wikitext2"]["ppl"] == cost["remasked_ppl"]
    assert report["ppl"]["before"]["wikitext2"]["ppl"] > 0 and report["timings"]["train_s"] > 0
    assert [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2]
    assert (out / "recipe.yaml").read_text().startswith("recover:")
    assert main(["report", str(out)]) == 0


def test_recover_masked_cli_and_resume(pruned_dir, tmp_path, capsys):
    out = tmp_path / "rec"
    assert main(["recover", str(pruned_dir), "--mode", "masked", "--out", str(out), *TINY]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    before = AutoModelForCausalLM.from_pretrained(pruned_dir)
    assert MaskSet.from_model(model).compare(MaskSet.from_model(before))["hamming"] == 0
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters(), strict=True))
    report = json.loads((out / "pruning.json").read_text())
    assert report["kind"] == "recover" and report["recover"]["pruned_nonzero"] == 0
    assert "remask_cost" not in report and "merged" not in report["ppl"]
    # a run that left its checkpoints (e.g. killed) resumes from OUT.ckpt to the same result
    ckpt = tmp_path / "again.ckpt"
    from llmprune.models.loading import load_model
    from llmprune.recover import recover

    half, tok = load_model(str(pruned_dir))
    recover(half, tok, steps=2, seqlen=32, checkpoint_every=1, lr=1e-2, work_dir=ckpt, until=1, progress=False)
    again = tmp_path / "again"
    assert main(["recover", str(pruned_dir), "--resume", str(ckpt), "--out", str(again), *TINY]) == 0
    resumed = AutoModelForCausalLM.from_pretrained(again)
    for (n, p), q in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_recover_keep_adapter_cli_saves_a_peft_adapter(pruned_dir, tmp_path, capsys):
    pytest.importorskip("peft")
    from peft import PeftModel

    out = tmp_path / "rec"
    rc = main(["recover", str(pruned_dir), "--mode", "lora", "--keep-adapter", "--lora-rank", "2",
               "--ppl", "wikitext2", "--max-windows", "1", "--out", str(out), *TINY])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "adapter saved in adapter/" in printed.out
    base = AutoModelForCausalLM.from_pretrained(out)
    before = AutoModelForCausalLM.from_pretrained(pruned_dir)
    for (n, p), q in zip(base.named_parameters(), before.parameters(), strict=True):
        assert torch.equal(p, q), n  # the sparse base is the input, bit for bit
    adapted = PeftModel.from_pretrained(base, str(out / "adapter"))
    assert any("lora_A" in n for n, _ in adapted.named_parameters())
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert not torch.allclose(adapted(input_ids=ids).logits, before(input_ids=ids).logits)
    report = json.loads((out / "pruning.json").read_text())
    assert report["adapter"] == "adapter" and report["recover"]["pruned_nonzero"] == 0
    assert report["sparsity"] == pytest.approx(0.5) and "remask_cost" not in report
    assert report["ppl"]["after"]["wikitext2"]["ppl"] > 0


@pytest.mark.parametrize("args,msg", [
    (["--mode", "masked", "--lora-rank", "4"], "--lora-rank only applies to --mode lora"),
    (["--keep-adapter"], "--keep-adapter only applies to --mode lora"),
    (["--mode", "sparse"], "mode: input should be 'masked', 'lora' or 'distill'"),
    (["--steps", "0"], "steps must be a positive integer"),
    (["--masks", "nosuch.npz"], "mask file nosuch.npz does not exist"),
    (["--resume", "/no/such/dir"], "resume directory /no/such/dir does not exist"),
    (["--calib", "/no/such.txt"], "/no/such.txt"),
])
def test_recover_bad_input_fails_before_loading(pruned_dir, tmp_path, capsys, monkeypatch, args, msg):
    import llmprune.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    out = tmp_path / "o"
    rc = main(["recover", str(pruned_dir), *args, "--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err, err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_recover_refuses_to_overwrite_its_input(pruned_dir, capsys):
    rc = main(["recover", str(pruned_dir), "--out", str(pruned_dir), "--overwrite", *TINY])
    assert rc == 2 and "is the input" in capsys.readouterr().err


def test_recover_accepts_any_hf_dir_its_zeros_are_the_mask(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "rec"
    assert main(["recover", str(tiny_dirs["llama"]), "--out", str(out), *TINY]) == 0
    err = capsys.readouterr().err
    assert "no pruned (zero) weights" in err
    report = json.loads((out / "pruning.json").read_text())
    assert report["input"] is None and report["recover"]["masks"]["sparsity"] == 0
    assert "merge_s" not in report["timings"] and report["timings"]["train_s"] > 0
