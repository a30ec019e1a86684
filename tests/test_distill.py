"""Recovery by distillation from the dense teacher (logit KL, SquareHead hidden states) on the
one trainer: the loss math, the mask, a student equal to its teacher, resume, the teacher's
memory, bad input, and the CLI with the teacher taken from pruning.json."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from test_recover import FAST, decoder_weights, pruned_tiny

from llmprune.cli import main
from llmprune.data.sources import load_corpus
from llmprune.errors import LLMPruneError
from llmprune.masks import MaskSet
from llmprune.recover import RecoverOptions, recover
from llmprune.sparsity.patterns import Target
from llmprune.train.losses import LayerOutputs, logit_kl, square_head


@pytest.fixture(scope="module")
def corpus(shared_data):
    return load_corpus("c4", "train")


# --- the loss terms' math --------------------------------------------------------------------
def _reference_kl(s, t, T):
    log_q, log_p = torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * T * T


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_logit_kl_equals_the_textbook_formula_and_its_gradient(T):
    torch.manual_seed(0)
    s = torch.randn(2, 7, 40, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 7, 40, dtype=torch.float64)
    ref = _reference_kl(s, t, T)
    got = logit_kl(s, t, T, chunk=3)  # chunks that do not divide the 14 positions
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    g_ref, = torch.autograd.grad(ref, s)
    g_got, = torch.autograd.grad(got * 3.0, s)  # the upstream gradient is applied
    torch.testing.assert_close(g_got, 3.0 * g_ref, rtol=1e-5, atol=1e-7)


def test_topk_kl_renormalises_the_teacher_and_equals_full_at_k_equal_vocab():
    torch.manual_seed(1)
    s = torch.randn(5, 30, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 30, dtype=torch.float64)
    v, idx = t.topk(6, dim=-1)
    p = torch.softmax(v / 2.0, -1)
    ref = (p * (p.log() - torch.log_softmax(s / 2.0, -1).gather(-1, idx))).sum(-1).mean() * 4.0
    got = logit_kl(s, v, 2.0, idx, chunk=2)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(torch.autograd.grad(got, s)[0], torch.autograd.grad(ref, s)[0],
                               rtol=1e-5, atol=1e-7)
    v, idx = t.topk(30, dim=-1)
    assert logit_kl(s, v, 1.0, idx).item() == pytest.approx(logit_kl(s, t, 1.0).item(), rel=1e-6)


def test_square_head_is_normalised_by_the_teacher():
    t = torch.tensor([[3.0, 4.0]])
    assert square_head(t, t).item() == 0
    assert square_head(torch.zeros(1, 2), t).item() == pytest.approx(1.0)
    assert square_head(t + 1, t).item() == pytest.approx(2 / 25)


# --- training ----------------------------------------------------------------------------------
def test_the_mask_stays_exact_through_distillation(tokenizer, corpus):
    model = pruned_tiny()
    start = decoder_weights(model)
    res = recover(model, tokenizer, mode="distill", teacher=tiny_model(), kd_hidden_weight=1.0, steps=3,
                  lr=1e-2, weight_decay=0.1, corpus=corpus, **FAST)
    assert res.report["pruned_nonzero"] == 0
    after = decoder_weights(model)
    for name, w0 in start.items():
        keep = w0 != 0
        assert torch.equal(res.masks[name], keep) and (after[name][~keep] == 0).all(), name
        assert not torch.equal(after[name][keep], w0[keep]), f"{name}: kept weights did not train"
    MaskSet.from_model(model).check(Target.nm(2, 4))
    rec = res.log[-1]
    assert rec["kd"] > 0 and rec["hidden"] > 0 and rec["ce"] > 0
    d = res.report["distill"]
    assert (d["loss"], d["temperature"], d["topk"], d["hidden_weight"], d["layer_map"]) == ("kd", 1.0, None, 1.0, [0, 1])
    assert res.report["options"]["mode"] == "masked" and res.report["options"]["loss"] == "kd"


def test_distillation_moves_the_student_towards_the_teacher(tokenizer, corpus):
    """Many steps on one window (wikitext's first 32 tokens, seen every step): the KL falls."""
    teacher = tiny_model()
    res = recover(pruned_tiny(), tokenizer, mode="distill", teacher=teacher, steps=12, lr=3e-3, min_lr=3e-3,
                  corpus=corpus, **FAST)
    kl = [r["kd"] for r in res.log]
    assert kl[-1] < 0.8 * kl[0], kl


def test_a_student_equal_to_its_teacher_has_zero_kl_and_keeps_its_weights(tokenizer, corpus):
    student = tiny_model()
    res = recover(student, tokenizer, mode="distill", teacher=tiny_model(), kd_hidden_weight=1.0, steps=2,
                  lr=1e-2, corpus=corpus, **FAST)
    assert [r["kd"] for r in res.log] == [0.0, 0.0] and [r["hidden"] for r in res.log] == [0.0, 0.0]
    for (n, p), q in zip(student.named_parameters(), tiny_model().parameters(), strict=True):
        assert torch.equal(p, q), n
    # the same run with the cross-entropy beside the KL does move the weights
    moved = tiny_model()
    recover(moved, tokenizer, loss="kd+ce", teacher=tiny_model(), steps=1, lr=1e-2, corpus=corpus, **FAST)
    assert any(not torch.equal(p, q) for p, q in zip(moved.parameters(), tiny_model().parameters(), strict=True))


def test_lora_distillation_trains_the_adapter_only(tokenizer, corpus):
    pytest.importorskip("peft")
    model = pruned_tiny()
    res = recover(model, tokenizer, mode="lora", loss="kd", teacher=tiny_model(), kd_topk=16, steps=2,
                  lr=1e-2, lora_rank=4, corpus=corpus, **FAST)
    assert res.report["pruned_nonzero"] == 0 and res.report["distill"]["topk"] == 16
    assert res.log[-1]["kd"] > 0 and "lr_lora" in res.log[-1]
    MaskSet.from_model(res.model).check(Target.nm(2, 4))


def test_a_streamed_teacher_gives_the_same_run(tokenizer, corpus, monkeypatch):
    """The teacher brought over one decoder layer at a time computes what it does in place."""
    import llmprune.train.teacher as teacher_mod

    opts = dict(mode="distill", kd_hidden_weight=0.5, steps=2, lr=1e-3, corpus=corpus, **FAST)
    here = recover(pruned_tiny(), tokenizer, teacher=tiny_model(), **opts)
    monkeypatch.setattr(teacher_mod, "choose_placement", lambda *a, **k: "layers")
    streamed = recover(pruned_tiny(), tokenizer, teacher=tiny_model(), **opts)
    assert streamed.report["distill"]["teacher_placement"] == "layers"
    assert [r["kd"] for r in streamed.log] == [r["kd"] for r in here.log]
    for p, q in zip(here.model.parameters(), streamed.model.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("mode", ["distill", "lora"])
def test_distill_resume_is_bit_identical(tokenizer, corpus, tmp_path, mode):
    if mode == "lora":
        pytest.importorskip("peft")
    opts = dict(mode=mode, steps=4, checkpoint_every=1, grad_accum=2, lr=1e-3, kd_hidden_weight=0.5,
                corpus=corpus, **FAST)
    if mode == "lora":
        opts.update(loss="kd+ce", lora_dropout=0.1)
    full = recover(pruned_tiny(), tokenizer, teacher=tiny_model(), work_dir=tmp_path / "full", **opts)
    recover(pruned_tiny(), tokenizer, teacher=tiny_model(), work_dir=tmp_path / "half", until=2, **opts)
    resumed = recover(pruned_tiny(), tokenizer, teacher=tiny_model(), work_dir=tmp_path / "half",
                      resume=tmp_path / "half", **opts)
    for (n, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    assert [(r["ce"], r["kd"], r["hidden"]) for r in resumed.log] == [(r["ce"], r["kd"], r["hidden"]) for r in full.log]
    # another teacher (or temperature) is another run: refused
    with pytest.raises(LLMPruneError, match=r"another model \(teacher differs\)"):
        recover(pruned_tiny(), tokenizer, teacher=tiny_model(seed=5), resume=tmp_path / "half", **opts)
    with pytest.raises(LLMPruneError, match="run with kd_temperature=1.0"):
        recover(pruned_tiny(), tokenizer, teacher=tiny_model(), resume=tmp_path / "half",
                **{**opts, "kd_temperature": 2.0})


# --- the teacher's memory ---------------------------------------------------------------------
def test_the_teacher_memory_estimate_refuses_with_numbers(tokenizer, monkeypatch):
    import llmprune.engine.memory as memory
    from llmprune.recover.memory import estimate_recover_bytes

    model = pruned_tiny()
    opts = RecoverOptions(mode="distill", seqlen=32, batch_size=2)
    student = sum(estimate_recover_bytes(model, opts).values())
    # room for the student alone, not for the teacher beside it
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(student / 0.9) + 1024)
    recover_nothing = pytest.raises(LLMPruneError, match=r"recovery \(masked, distill\) needs about .* GiB more "
                                    r"on cpu \(.*teacher activations [0-9.]+ GiB\) but only [0-9.]+ GiB is free; "
                                    r".*--teacher-device")
    with recover_nothing:
        recover(model, tokenizer, opts, teacher=tiny_model(), steps=1)
    # plain recovery of the same model fits
    from llmprune.recover.memory import check_recover_memory

    check_recover_memory(model, RecoverOptions(seqlen=32, batch_size=2))


def test_the_cli_refuses_a_teacher_that_does_not_fit_before_it_loads(tiny_dirs, pruned_dir, tmp_path, capsys,
                                                                     monkeypatch):
    import llmprune.engine.memory as memory
    import llmprune.recover.distill as distill
    from llmprune.models.loading import load_model
    from llmprune.recover.memory import estimate_recover_bytes

    monkeypatch.setattr(distill, "load_teacher", lambda *a, **k: pytest.fail("the teacher loaded"))
    opts = RecoverOptions(mode="distill", kd_hidden_weight=1.0, seqlen=32)
    student = sum(estimate_recover_bytes(load_model(str(pruned_dir))[0], opts).values())
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(student / 0.9) + 1024)
    capsys.readouterr()
    rc = main(["recover", str(pruned_dir), "--mode", "distill", "--kd-hidden-weight", "1", "--ppl", "wikitext2",
               "--out", str(tmp_path / "o"), *CLI])
    err = capsys.readouterr().err
    assert rc == 2 and "teacher weights" in err and "teacher activations" in err, err
    # the student has loaded (its loading bar is on stderr); the error is one line
    assert len([x for x in err.splitlines() if "error" in x]) == 1 and not (tmp_path / "o").exists()


# --- bad input -----------------------------------------------------------------------------------
@pytest.fixture
def no_training(monkeypatch):
    import llmprune.recover.api as api

    def boom(*a, **k):
        raise AssertionError("heavy work started before the input was validated")

    monkeypatch.setattr(api, "Trainer", boom)
    monkeypatch.setattr(api, "training_stream", boom)


def _other_tokenizer(shared_data):
    """A BPE of the same size as the test tokenizer, trained on other text: other ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = (shared_data / "wikitext-2-raw" / "wiki.test.raw").read_text().splitlines()[5000:7000]
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.mark.parametrize("kw,msg", [
    (dict(mode="distill", kd_temperature=0), "kd_temperature must be a finite number > 0"),
    (dict(mode="distill", loss="ce"), "--mode distill trains on the teacher"),
    (dict(teacher="x"), "a teacher was given but the loss is ce"),
    (dict(mode="lora", kd_hidden_weight=1.0), "--kd-hidden-weight only applies to --mode distill"),
    (dict(mode="distill", teacher_device="tpu"), "unknown device 'tpu'"),
    (dict(mode="distill", teacher="/no/such/teacher"), "teacher: model '/no/such/teacher' not found"),
])
def test_bad_distill_options_are_one_line_before_work(tokenizer, no_training, kw, msg):
    with pytest.raises(LLMPruneError, match=msg.replace("(", r"\(")) as e:
        recover(pruned_tiny(), tokenizer, **{**FAST, **kw})
    assert "\n" not in str(e.value)


def test_a_teacher_with_another_vocabulary_or_tokenizer_is_refused(tokenizer, shared_data, no_training):
    with pytest.raises(LLMPruneError, match="has 600 logits per token, the student 512: another vocabulary"):
        recover(pruned_tiny(), tokenizer, mode="distill", teacher=_vocab600(), **FAST)
    with pytest.raises(LLMPruneError, match="has another tokenizer than the student"):
        recover(pruned_tiny(), tokenizer, mode="distill", teacher=tiny_model(),
                teacher_tokenizer=_other_tokenizer(shared_data), **FAST)
    with pytest.raises(LLMPruneError, match="the teacher is the student itself"):
        model = pruned_tiny()
        recover(model, tokenizer, mode="distill", teacher=model, **FAST)
    with pytest.raises(LLMPruneError, match="distillation needs a teacher"):
        recover(pruned_tiny(), tokenizer, mode="distill", **FAST)


def test_hidden_states_need_a_matching_width_and_a_layer_map(tokenizer, no_training):
    wide = tiny_model(hidden=32, inter=64)
    with pytest.raises(LLMPruneError, match="hidden size is 64 and teacher .* 32 .*--kd-hidden-weight 0"):
        recover(pruned_tiny(), tokenizer, mode="distill", teacher=wide, kd_hidden_weight=1.0, **FAST)
    deep = tiny_model(layers=3)
    with pytest.raises(LLMPruneError, match="the student has 2 decoder layers and teacher .* 3, and no pruning.json"):
        recover(pruned_tiny(), tokenizer, mode="distill", teacher=deep, kd_hidden_weight=1.0, **FAST)


def _vocab600():
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    cfg = tiny_config()
    cfg.vocab_size = 600
    return AutoModelForCausalLM.from_config(cfg)


# --- the command ---------------------------------------------------------------------------------
CLI = ["--steps", "2", "--seqlen", "32", "--checkpoint-every", "1", "--log-every", "1", "--lr", "1e-2",
       "--max-windows", "1", "-q"]



def test_cli_distill_takes_the_teacher_from_pruning_json(tiny_dirs, pruned_dir, tmp_path, capsys):
    out = tmp_path / "rec"
    rc = main(["recover", str(pruned_dir), "--mode", "distill", "--kd-hidden-weight", "1", "--kd-temperature", "2",
               "--ppl", "wikitext2", "--out", str(out), *CLI])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert f"distilled from {tiny_dirs['llama']}: logit KL at T=2 on the full vocabulary + 1 × hidden" in printed.out
    report = json.loads((out / "pruning.json").read_text())
    assert report["recover"]["distill"]["teacher"] == str(tiny_dirs["llama"])
    assert report["recover"]["pruned_nonzero"] == 0 and report["target"] == "2:4"
    assert report["recipe"]["mode"] == "masked" and report["recipe"]["loss"] == "kd"
    assert {"kd", "hidden", "ce"} <= set(json.loads((out / "train_log.jsonl").read_text().splitlines()[-1]))
    # a recovered model's teacher is still the dense one (the chain is followed)
    again = tmp_path / "again"
    assert main(["recover", str(out), "--mode", "distill", "--out", str(again), *CLI]) == 0
    assert json.loads((again / "pruning.json").read_text())["recover"]["distill"]["teacher"] == str(tiny_dirs["llama"])


def test_cli_distills_a_depth_pruned_model_layer_to_layer(tokenizer, tmp_path, capsys):
    deep = tmp_path / "deep"
    tiny_model(layers=3).save_pretrained(deep)
    tokenizer.save_pretrained(deep)
    small = tmp_path / "small"
    assert main(["structured", str(deep), "--method", "depth", "--layers", "1", "--score", "cosine",
                 "--nsamples", "2", "--seqlen", "32", "--out", str(small), "-q"]) == 0
    gone = json.loads((small / "pruning.json").read_text())["depth"]["removed_layers"]
    out = tmp_path / "rec"
    rc = main(["recover", str(small), "--mode", "distill", "--kd-hidden-weight", "1", "--out", str(out), *CLI])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "pruning.json").read_text())
    assert report["recover"]["distill"]["layer_map"] == [j for j in range(3) if j not in gone]
    assert report["input"]["kind"] == "structured" and report["input"]["dense"]
    assert report["recover"]["masks"]["given"] and report["recover"]["masks"]["sparsity"] == 0


@pytest.mark.parametrize("args,msg", [
    (["--mode", "distill", "--kd-temperature", "0"], "kd_temperature must be a finite number > 0"),
    (["--mode", "distill", "--teacher", "/no/such/dir"], "teacher: model '/no/such/dir' not found"),
    (["--mode", "distill", "--teacher", "VOCAB600"], "logits per token, the student 512"),
    (["--mode", "distill", "--teacher", "OTHERTOK"], "has another tokenizer than the student"),
    (["--teacher", "x"], "--teacher only applies to --mode distill or --loss kd"),
    (["--mode", "distill", "--kd-hidden-weight", "1", "--teacher", "DEEP"], "the student has 2 decoder layers"),
])
def test_cli_bad_teacher_is_one_line_before_loading(pruned_dir, shared_data, tokenizer, tmp_path, capsys,
                                                    monkeypatch, args, msg):
    import llmprune.pipeline as pipeline

    teachers = {"VOCAB600": (_vocab600(), tokenizer), "OTHERTOK": (tiny_model(), _other_tokenizer(shared_data)),
                "DEEP": (tiny_model(layers=3), tokenizer)}
    for i, a in enumerate(args):
        if a in teachers:
            model, tok = teachers[a]
            model.save_pretrained(tmp_path / a)
            tok.save_pretrained(tmp_path / a)
            args = [*args[:i], str(tmp_path / a), *args[i + 1:]]
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    out = tmp_path / "o"
    capsys.readouterr()
    rc = main(["recover", str(pruned_dir), *args, "--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_layer_outputs_keep_the_latest_forward():
    model = tiny_model()
    rec = LayerOutputs(list(model.model.layers))
    rec.attach()
    with torch.no_grad():
        model(input_ids=torch.randint(0, 512, (1, 8)))
    assert sorted(rec.outputs) == [0, 1] and rec.outputs[1].shape == (1, 8, 64)
    rec.detach()
    with torch.no_grad():
        model(input_ids=torch.randint(0, 512, (1, 8)))
    assert rec.outputs == {}


def test_an_output_inside_the_teacher_is_refused_before_work(tiny_dirs, pruned_dir, tmp_path, capsys, no_heavy_work):
    teacher = tmp_path / "teacher"
    tiny_model().save_pretrained(teacher)
    out = teacher / "rec"
    capsys.readouterr()
    for cmd in (["recover", str(pruned_dir), "--mode", "distill"], ["blockwise", str(pruned_dir)]):
        rc = main([*cmd, "--teacher", str(teacher), "--out", str(out), "-q"])
        err = capsys.readouterr().err
        assert rc == 2 and "inside" in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_a_distill_stage_distils_with_lora_too():
    from llmprune.recover.job import DistillConfig

    lora = DistillConfig(model="m", mode="lora").validate()
    assert (lora.mode, lora.loss, lora.kd_temperature) == ("lora", "kd", 1.0)
    assert DistillConfig(model="m").validate().loss == "kd"
