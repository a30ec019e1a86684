"""`llmprune run`: chained recipes end to end on a tiny model, validation before any work, restart."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from llmprune.chain import load_recipe, plan_stages, run_chain
from llmprune.cli import main
from llmprune.errors import LLMPruneError
from llmprune.masks import MaskSet
from llmprune.sparsity.patterns import Target

REPO = Path(__file__).resolve().parents[1]
TRAIN = {"steps": 2, "checkpoint_every": 1, "log_every": 1}


def tiny_recipe(model) -> dict:
    """prune 2:4 mask-only → maskllm (prior = that mask) → masked recovery → eval, seconds each."""
    return {
        "model": str(model), "device": "cpu", "seed": 0, "seqlen": 32, "calib": "c4",
        "stages": [
            {"prune": {"method": "sparsegpt", "pattern": "2:4", "solver": "none", "nsamples": 2}},
            {"maskllm": dict(TRAIN)},
            {"recover": {"mode": "masked", "lr": 1e-2, **TRAIN}},
            {"eval": {"ppl": "wikitext2", "ppl_seqlen": 32, "max_windows": 1}},
        ],
    }


def write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def weights(d: Path) -> dict[str, torch.Tensor]:
    return dict(AutoModelForCausalLM.from_pretrained(d).state_dict())


@pytest.fixture(scope="module")
def finished(tiny_dirs, shared_data, tmp_path_factory):
    """One uninterrupted run of the tiny chain through the CLI (copied by the tests that change it)."""
    root = tmp_path_factory.mktemp("chain")
    recipe = write(root / "recipe.yaml", tiny_recipe(tiny_dirs["llama"]))
    assert main(["run", str(recipe), "--out", str(root / "out"), "-q"]) == 0
    return recipe, root / "out"


def test_chain_runs_end_to_end_and_the_final_dir_is_plain_and_2_4(finished, tiny_dirs, capsys):
    recipe, out = finished
    final = AutoModelForCausalLM.from_pretrained(out / "final")  # plain transformers
    masks = MaskSet.from_model(final)
    masks.check(Target.nm(2, 4))
    assert masks.sparsity == pytest.approx(0.5, abs=1e-6)
    report = json.loads((out / "pruning.json").read_text())
    assert report["kind"] == "chain" and report["final"]["stage"] == "03-recover"
    assert [(s["index"], s["kind"], s["status"]) for s in report["stages"]] == [
        (1, "prune", "done"), (2, "maskllm", "done"), (3, "recover", "done"), (4, "eval", "done")]
    assert [s["dir"] for s in report["stages"]] == [
        "stages/01-prune", "stages/02-maskllm", "stages/03-recover", "stages/04-eval"]
    prune, learned, recovered, evaluated = (s["report"] for s in report["stages"])
    # stage 1 is mask-only: kept weights are the dense ones, and its mask file is MaskLLM's prior
    dense = weights(tiny_dirs["llama"])
    one = weights(out / "stages/01-prune")
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(one[name][one[name] != 0], dense[name][one[name] != 0])
    assert prune["recipe"]["solver"] == "none" and prune["sparsity"] == pytest.approx(0.5)
    # MaskLLM learns on the dense model, starting from stage 1's mask
    assert learned["kind"] == "maskllm" and learned["maskllm"]["prior"] == "masks"
    assert learned["recipe"]["model"] == str(tiny_dirs["llama"])
    assert learned["recipe"]["prior"] == str(out / "stages/01-prune/masks.npz")
    assert report["stages"][1]["inputs"] == {"model": str(tiny_dirs["llama"]), "prior": "stage 01-prune masks.npz"}
    # recovery reads MaskLLM's output and keeps its mask exactly
    assert recovered["input"]["kind"] == "maskllm" and recovered["recover"]["pruned_nonzero"] == 0
    two = MaskSet.from_model(AutoModelForCausalLM.from_pretrained(out / "stages/02-maskllm"))
    assert masks.compare(two)["hamming"] == 0
    # the eval stage measured the final model
    assert evaluated["model"]["name"] == str(out / "stages/03-recover")
    assert evaluated["ppl"]["after"]["wikitext2"]["ppl"] > 0
    assert evaluated["sparsity"] == pytest.approx(0.5)
    assert report["timings"]["total_s"] >= report["timings"]["02-maskllm_s"] > 0
    # the normalised recipe re-runs as it is, and a re-run has nothing left to do
    assert load_recipe(out / "recipe.yaml").to_dict() == load_recipe(recipe).to_dict()
    capsys.readouterr()
    assert main(["run", str(out / "recipe.yaml"), "--out", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "this run: ran stages none, kept [1, 2, 3, 4] (finished before)" in printed and "final model in" in printed
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "stage 3 recover (stages/03-recover): done" in printed and "final model: final/ (from 03-recover)" in printed
    assert main(["report", str(out / "stages/04-eval")]) == 0
    assert "PPL wikitext2, first 1 windows (seqlen 32): " in capsys.readouterr().out


BAD = [
    (lambda r: r["stages"][2]["recover"].update(lora_rnk=4), "stage 3 (recover): unknown option 'lora_rnk'"),
    (lambda r: r["stages"][2]["recover"].update(steps=0), "stage 3 (recover): steps must be a positive integer"),
    (lambda r: r["stages"][2]["recover"].update(lora_rank=4), "stage 3 (recover): --lora-rank only applies"),
    (lambda r: r["stages"][0]["prune"].update(pattern="2:3:4"), "stage 1 (prune):"),
    (lambda r: r["stages"].insert(2, {"finetune": {}}), "stage 3: unknown kind 'finetune'"),
    (lambda r: r["stages"][1]["maskllm"].update(out="x"), "stage 2 (maskllm): 'out' is chosen by the chain"),
    (lambda r: r["stages"][1]["maskllm"].update(model="x"), "stage 2 (maskllm): 'model' is the previous"),
    (lambda r: r.update(lorarank=3), "recipe: unknown option 'lorarank'; did you mean 'lora_rank'?"),
    (lambda r: r["stages"][1]["maskllm"].update(train_data="/no/such.txt"), "stage 2 (maskllm): "),
    (lambda r: r["stages"][3]["eval"].update(ppl="/no/such.txt"), "stage 4 (eval): "),
    (lambda r: r["stages"].append(["eval"]), "stage 5: must be a mapping of one kind"),
]


@pytest.mark.parametrize("change,msg", BAD)
def test_a_bad_stage_fails_before_any_work_with_no_output(tiny_dirs, shared_data, tmp_path, capsys,
                                                          monkeypatch, change, msg):
    import llmprune.models.loading as loading
    import llmprune.pipeline as pipeline

    monkeypatch.setattr(pipeline, "prune", lambda *a, **k: pytest.fail("stage 1 started"))
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    recipe = tiny_recipe(tiny_dirs["llama"])
    change(recipe)
    out = tmp_path / "out"
    rc = main(["run", str(write(tmp_path / "r.yaml", recipe)), "--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err, err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_restart_after_a_killed_stage_continues_and_equals_an_uninterrupted_run(
        finished, tiny_dirs, tmp_path, monkeypatch):
    import llmprune.maskllm.job as maskllm_job
    import llmprune.pipeline as pipeline

    recipe, ref = finished
    out = tmp_path / "out"
    real, calls = maskllm_job.run_maskllm, []

    def killed_once(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt  # as a Ctrl-C / kill in the middle of stage 2
        return real(*a, **k)

    monkeypatch.setattr(maskllm_job, "run_maskllm", killed_once)
    with pytest.raises(KeyboardInterrupt):
        run_chain(recipe, out, progress=False)
    state = json.loads((out / "pruning.json").read_text())
    assert [s["status"] for s in state["stages"]] == ["done", "failed", "pending", "pending"]
    assert state["final"] is None and not (out / "final").exists()
    assert (out / "stages/01-prune/masks.npz").is_file() and not (out / "stages/02-maskllm").exists()

    monkeypatch.setattr(pipeline, "prune", lambda *a, **k: pytest.fail("stage 1 ran again"))
    result = run_chain(recipe, out, progress=False)
    assert result.ran == [2, 3, 4] and len(calls) == 2
    ref_w, got = weights(ref / "final"), weights(out / "final")
    for name, w in ref_w.items():
        assert torch.equal(w, got[name]), name
    state = json.loads((out / "pruning.json").read_text())
    assert [s["status"] for s in state["stages"]] == ["done"] * 4
    ref_state = json.loads((ref / "pruning.json").read_text())
    assert [s["hash"] for s in state["stages"]] == [s["hash"] for s in ref_state["stages"]]


def test_a_changed_finished_stage_is_refused_or_rerun_from_there(finished, tmp_path, monkeypatch):
    import llmprune.maskllm.job as maskllm_job
    import llmprune.pipeline as pipeline

    recipe, ref = finished
    out = tmp_path / "out"
    shutil.copytree(ref, out)  # the hashes do not depend on where DIR is
    changed = yaml.safe_load(recipe.read_text())
    changed["stages"][2]["recover"]["lr"] = 2e-2
    path = write(tmp_path / "changed.yaml", changed)
    before = (out / "pruning.json").read_text()
    with pytest.raises(LLMPruneError, match=r"stage 3 \(recover\) differs .*--overwrite to re-run from stage 3"):
        run_chain(path, out, progress=False)
    assert (out / "pruning.json").read_text() == before

    monkeypatch.setattr(pipeline, "prune", lambda *a, **k: pytest.fail("stage 1 ran again"))
    monkeypatch.setattr(maskllm_job, "run_maskllm", lambda *a, **k: pytest.fail("stage 2 ran again"))
    import llmprune.recover.job as recover_job

    real_recover = recover_job.run_recover

    def check_stale_final_gone(*a, **k):
        assert not (out / "final").exists()  # the previous result is not left looking current
        return real_recover(*a, **k)

    monkeypatch.setattr(recover_job, "run_recover", check_stale_final_gone)
    result = run_chain(path, out, overwrite=True, progress=False)
    assert result.ran == [3, 4]
    assert result.report["stages"][2]["report"]["recipe"]["lr"] == 2e-2
    assert any(not torch.equal(w, weights(out / "final")[n]) for n, w in weights(ref / "final").items())
    # a shorter recipe is a change too: refused, then its dropped stage's directory goes
    changed["stages"].pop()
    changed["stages"].append({"recover": {"mode": "masked", "lr": 1e-2, **TRAIN}})
    with pytest.raises(LLMPruneError, match=r"stage 4 \(eval\) differs"):
        run_chain(write(path, changed), out, progress=False)
    changed["stages"].pop()
    with pytest.raises(LLMPruneError, match=r"stage 4 \(eval\) is no longer in the recipe"):
        run_chain(write(path, changed), out, progress=False)
    assert run_chain(path, out, overwrite=True, progress=False).ran == []
    assert not (out / "stages/04-eval").exists()


def test_a_foreign_or_other_output_dir_is_refused(tiny_dirs, shared_data, tmp_path):
    recipe = write(tmp_path / "r.yaml", tiny_recipe(tiny_dirs["llama"]))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(LLMPruneError, match="llmprune did not write"):
        run_chain(recipe, foreign, progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "pruning.json").write_text(json.dumps({"kind": "maskllm"}))
    with pytest.raises(LLMPruneError, match="kind 'maskllm', not a chained run"):
        run_chain(recipe, other, progress=False)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_the_example_recipe_plans(tmp_path):
    recipe = load_recipe(REPO / "examples" / "chain-2of4.yaml")
    plans = plan_stages(recipe, tmp_path / "out")
    assert [p.spec.kind for p in plans] == ["prune", "maskllm", "recover", "eval"]
    prune, learn, rec, ev = (p.config for p in plans)
    assert prune.allocation == "owl" and prune.method == "sparsegpt" and prune.solver == "none"
    assert prune.pattern == "2:4" and learn.pattern == "2:4" and rec.mode == "lora"
    assert learn.model == "smollm2-135m" and learn.prior == str(plans[0].dir / "masks.npz")
    assert rec.model == str(plans[1].dir) and ev.model == str(plans[2].dir)
    assert ev.ppl == ["wikitext2"] and prune.ppl == ["wikitext2"] and not learn.ppl and not rec.ppl
    assert ev.ppl_seqlen == prune.ppl_seqlen == 1024 and ev.max_windows == 40


def test_a_stage_killed_mid_training_resumes_from_its_checkpoint(finished, tmp_path, monkeypatch, capsys):
    import llmprune.pipeline as pipeline
    import llmprune.train.trainer as trainer

    recipe, ref = finished
    out = tmp_path / "out"
    real, saved = trainer.save_checkpoint, []

    def save_then_die(root, step, *a, **k):
        path = real(root, step, *a, **k)
        saved.append(str(root))
        if "03-recover.ckpt" in str(root) and step == 1:
            raise KeyboardInterrupt  # killed after stage 3's first checkpoint
        return path

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_chain(recipe, out, progress=False)
    assert (out / "stages/03-recover.ckpt").is_dir() and not (out / "stages/03-recover").exists()
    monkeypatch.setattr(pipeline, "prune", lambda *a, **k: pytest.fail("stage 1 ran again"))
    capsys.readouterr()
    assert run_chain(recipe, out, progress=False).ran == [3, 4]
    assert "stage 3 (recover) resumes from its checkpoint" in capsys.readouterr().err
    assert not (out / "stages/03-recover.ckpt").exists()  # spent once the stage saved its result
    ref_w, got = weights(ref / "final"), weights(out / "final")
    for name, w in ref_w.items():
        assert torch.equal(w, got[name]), name


def test_structured_stage_is_a_new_dense_base(tiny_dirs, tmp_path):
    recipe = load_recipe({"model": str(tiny_dirs["llama"]), "stages": [
        {"structured": {"method": "depth", "layers": 1}},
        {"prune": {"method": "magnitude", "pattern": "2:4"}},
        {"maskllm": {"steps": 2}},
        {"maskllm": {"steps": 2, "prior": "none"}},
        "eval"]})
    plans = plan_stages(recipe, tmp_path)
    depth, prune, learn, again, ev = plans
    assert prune.config.model == str(depth.dir) and depth.pattern is None and prune.pattern == "2:4"
    assert learn.config.model == str(depth.dir) and learn.config.prior == str(prune.mask_file)  # the dense base
    assert again.config.model == str(depth.dir) and again.config.prior == "none"
    assert ev.config.model == str(again.dir) and ev.config.ppl == [] and ev.pattern == "2:4"
    assert len({p.hash for p in plans}) == 5
    # a change to one stage changes its hash and those after it, not those before
    recipe.stages[1].options["pattern"] = "4:8"
    changed = plan_stages(recipe, tmp_path / "elsewhere")
    assert changed[0].hash == depth.hash and all(a.hash != b.hash for a, b in zip(plans[1:], changed[1:], strict=True))


@pytest.mark.parametrize("stage,phrase", [
    ({"structured": {"method": "depth", "layers": 1}}, "structured pruning would not keep"),
    ({"structured": {"method": "osscar", "ratio": 0.25}}, "structured pruning would not keep"),
    ({"recover": {"mode": "lora", "keep_adapter": True}}, "keep_adapter leaves the 2:4 base"),
])
def test_a_stage_that_would_make_a_sparse_input_dense_is_refused(tiny_dirs, tmp_path, stage, phrase):
    recipe = load_recipe({"model": str(tiny_dirs["llama"]), "stages": [
        {"prune": {"method": "magnitude", "pattern": "2:4"}}, stage]})
    with pytest.raises(LLMPruneError, match=rf"stage 2 \({next(iter(stage))}\): .*{phrase}"):
        plan_stages(recipe, tmp_path)


def test_lora_recovery_stage_gives_a_plain_2_4_final_dir(tiny_dirs, shared_data, tmp_path):
    pytest.importorskip("peft")
    recipe = {"model": str(tiny_dirs["llama"]), "device": "cpu", "seqlen": 32,
              "stages": [{"prune": {"method": "magnitude", "pattern": "2:4"}},
                         {"recover": {"mode": "lora", "lora_rank": 4, "lr": 1e-2, **TRAIN,
                                      "ppl": "wikitext2", "max_windows": 1}}]}
    result = run_chain(recipe, tmp_path / "out", progress=False)
    final = AutoModelForCausalLM.from_pretrained(result.final)
    MaskSet.from_model(final).check(Target.nm(2, 4))
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out/stages/01-prune")
    assert MaskSet.from_model(final).compare(MaskSet.from_model(pruned))["hamming"] == 0
    rec = result.report["stages"][1]["report"]
    assert rec["mode"] == "lora" and "wikitext2" in rec["remask_cost"]
    assert not (result.final / "adapter").exists()
