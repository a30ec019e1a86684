"""Recovery fine-tuning (masked and LoRA) on MaskLLM's trainer: the mask stays exact."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import tiny_model

from llmprune.data.sources import load_corpus
from llmprune.errors import LLMPruneError
from llmprune.masks import MaskSet
from llmprune.models.adapter import masked_linears
from llmprune.recover import RecoverOptions, model_masks, pruned_nonzero, recover
from llmprune.sparsity.patterns import Target

FAST = dict(seqlen=32, batch_size=2, log_every=1, progress=False)


@pytest.fixture(scope="module")
def corpus(shared_data):
    return load_corpus("c4", "train")


@torch.no_grad()
def prune_2_4(model: torch.nn.Module) -> torch.nn.Module:
    """Magnitude 2:4 on every decoder linear, by hand (independent of the engine)."""
    for lin in masked_linears(model).values():
        w = lin.weight
        groups = w.abs().reshape(-1, 4)
        drop = groups.topk(2, dim=-1, largest=False).indices
        keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
        w.masked_fill_(~keep.reshape(w.shape), 0)
    return model


def pruned_tiny(seed: int = 0):
    return prune_2_4(tiny_model(seed=seed))


def decoder_weights(model) -> dict[str, torch.Tensor]:
    return {f"{n}.weight": lin.weight.detach().clone() for n, lin in masked_linears(model).items()}


# --- masked fine-tuning --------------------------------------------------------------------------
def test_masked_finetuning_leaves_every_pruned_weight_exactly_zero(tokenizer, corpus):
    model = pruned_tiny()
    start = decoder_weights(model)
    # weight decay and a large learning rate: both would move zeros without the guards
    res = recover(model, tokenizer, mode="masked", steps=3, lr=1e-2, weight_decay=0.1, corpus=corpus, **FAST)
    assert res.model is model and res.report["pruned_nonzero"] == 0
    after = decoder_weights(model)
    for name, w0 in start.items():
        keep = w0 != 0
        assert torch.equal(res.masks[name], keep), name
        assert (after[name][~keep] == 0).all(), name
        assert not torch.equal(after[name][keep], w0[keep]), f"{name}: kept weights did not train"
    MaskSet.from_model(model).check(Target.nm(2, 4))
    assert res.report["masks"]["nm"] == "2:4" and res.report["masks"]["sparsity"] == pytest.approx(0.5)
    assert res.report["trainable_params"] == sum(w.numel() for w in start.values())
    assert all(p.requires_grad for p in model.parameters())
    assert not any(w._backward_hooks for w in (lin.weight for lin in masked_linears(model).values()))


def test_without_the_guards_the_zeros_would_move(tokenizer, corpus, monkeypatch):
    """The test above can fail: with the gradient hook and the re-masking off, zeros move."""
    from llmprune.recover.task import MaskedFinetuneTask

    monkeypatch.setattr(MaskedFinetuneTask, "set_training", lambda self, training: None)
    monkeypatch.setattr(MaskedFinetuneTask, "after_step", lambda self: None)
    model = pruned_tiny()
    res = recover(model, tokenizer, mode="masked", steps=2, lr=1e-2, corpus=corpus, **FAST)
    assert res.report["pruned_nonzero"] > 0


def test_given_masks_are_applied_and_kept(tokenizer, corpus):
    dense = tiny_model()
    masks = model_masks(pruned_tiny())  # a 2:4 mask of the same weights
    res = recover(dense, tokenizer, masks=masks, steps=2, lr=1e-3, corpus=corpus, **FAST)
    assert res.report["masks"]["given"] and pruned_nonzero(dense, masks) == 0
    MaskSet.from_model(dense).check(Target.nm(2, 4))


# --- LoRA ----------------------------------------------------------------------------------------
def test_lora_merge_and_remask_keeps_the_pattern(tokenizer, corpus):
    pytest.importorskip("peft")
    model = pruned_tiny()
    start = decoder_weights(model)
    res = recover(model, tokenizer, mode="lora", steps=3, lr=1e-2, lora_rank=4, corpus=corpus, **FAST)
    assert not res.is_adapter and type(res.model).__name__ == "LlamaForCausalLM"
    assert not any("lora" in n for n, _ in res.model.named_parameters())
    after = decoder_weights(res.model)
    for name, w0 in start.items():
        assert (after[name][w0 == 0] == 0).all(), name
    assert any(not torch.equal(after[n], start[n]) for n in start), "the adapter changed nothing"
    MaskSet.from_model(res.model).check(Target.nm(2, 4))
    assert res.report["pruned_nonzero"] == 0
    assert 0 < res.report["remask"]["update_outside_mask"] < 1  # BA is dense: re-masking drops part
    assert res.report["lora"]["targets"] == 14 and res.report["options"]["lora_alpha"] == 16.0
    n_lora = 4 * sum(lin.in_features + lin.out_features for lin in masked_linears(res.model).values())
    assert res.report["trainable_params"] == n_lora
    assert all(p.requires_grad for p in res.model.parameters())


def test_lora_keep_adapter_leaves_the_base_untouched(tokenizer, corpus, tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel

    model = pruned_tiny()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = recover(model, tokenizer, mode="lora", keep_adapter=True, lora_targets="q_proj,down_proj",
                  steps=2, lr=1e-2, corpus=corpus, **FAST)
    assert res.is_adapter and res.report["lora"]["targets"] == 4
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        adapted = res.model(input_ids=ids).logits
    res.model.save_pretrained(tmp_path / "adapter")
    base = res.model.unload()
    for n, p in base.named_parameters():
        assert torch.equal(p, start[n]), n
    again = PeftModel.from_pretrained(tiny_model_like(start), str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, adapted)
        assert not torch.allclose(base(input_ids=ids).logits, adapted)


def tiny_model_like(state: dict[str, torch.Tensor]):
    model = tiny_model()
    model.load_state_dict(state)
    return model


# --- resume --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["masked", "lora"])
def test_resume_equals_uninterrupted(tokenizer, corpus, tmp_path, mode):
    if mode == "lora":
        pytest.importorskip("peft")
    opts = dict(mode=mode, steps=4, checkpoint_every=1, grad_accum=2, lr=1e-3, corpus=corpus, **FAST)
    if mode == "lora":
        opts["lora_dropout"] = 0.1  # seeded per micro-batch: the resumed run draws the same
    full = recover(pruned_tiny(), tokenizer, work_dir=tmp_path / "full", **opts)
    half = recover(pruned_tiny(), tokenizer, work_dir=tmp_path / "half", until=2, **opts)
    assert half.report["steps"] == 2
    resumed = recover(pruned_tiny(), tokenizer, work_dir=tmp_path / "half", resume=tmp_path / "half", **opts)
    assert resumed.report["steps"] == 4
    for (n, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    assert [r["ce"] for r in resumed.log] == [r["ce"] for r in full.log]
    lines = (tmp_path / "half" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]
    assert f"lr_{'weights' if mode == 'masked' else 'lora'}" in json.loads(lines[-1])


def test_resume_with_another_mode_or_mask_is_refused(tokenizer, corpus, tmp_path):
    recover(pruned_tiny(), tokenizer, steps=2, checkpoint_every=1, work_dir=tmp_path, corpus=corpus, **FAST)
    with pytest.raises(LLMPruneError, match="written for another model"):
        recover(tiny_model(), tokenizer, steps=2, resume=tmp_path, corpus=corpus, **FAST)  # dense: other mask
    with pytest.raises(LLMPruneError, match="run with lr="):
        recover(pruned_tiny(), tokenizer, steps=2, lr=1e-3, resume=tmp_path, corpus=corpus, **FAST)


# --- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,msg", [
    (dict(mode="masked", lora_rank=4), "--lora-rank only applies to --mode lora"),
    (dict(keep_adapter=True), "--keep-adapter only applies to --mode lora"),
    (dict(lora_alpha=8.0, lora_targets="q_proj"), "--lora-alpha, --lora-targets only apply"),
    (dict(mode="qlora"), "mode: input should be 'masked', 'lora' or 'distill'"),
    (dict(steps=0), "steps must be a positive integer"),
    (dict(mode="lora", lora_dropout=1.0), "lora_dropout must be in"),
    pytest.param(dict(mode="lora", lora_targets="nosuch"), "lora target 'nosuch' matches no decoder linear",
                 marks=pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")),
    (dict(seqlen=4096), "longer than the model's context"),
    (dict(masks={"lm_head.weight": torch.ones(512, 64, dtype=torch.bool)}), "names no decoder linear"),
])
def test_bad_input_refused_before_work(tokenizer, no_pruning, kw, msg):
    with pytest.raises(LLMPruneError, match=msg.replace("(", r"\(")):
        recover(pruned_tiny(), tokenizer, **{**FAST, **kw})


def test_lora_without_peft_is_one_line(tokenizer, no_pruning, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(LLMPruneError, match=r"needs the peft package: pip install 'llmprune\[lora\]'"):
        recover(pruned_tiny(), tokenizer, mode="lora", **FAST)


def test_mode_defaults():
    assert RecoverOptions().lr == 5e-5 and RecoverOptions().lora_rank is None
    lo = RecoverOptions(mode="lora")
    assert (lo.lr, lo.min_lr, lo.lora_rank, lo.lora_alpha, lo.lora_dropout) == (1e-4, 1e-5, 8, 16.0, 0.05)
    assert RecoverOptions.model_validate(lo.model_dump()) == lo  # round trip keeps the values


def test_resume_with_given_masks_on_a_dense_model(tokenizer, corpus, tmp_path):
    masks = model_masks(pruned_tiny())
    opts = dict(steps=2, checkpoint_every=1, lr=1e-3, masks=masks, corpus=corpus, **FAST)
    full = recover(tiny_model(), tokenizer, **opts)
    recover(tiny_model(), tokenizer, work_dir=tmp_path, until=1, **opts)
    resumed = recover(tiny_model(), tokenizer, resume=tmp_path, work_dir=tmp_path, **opts)
    for (n, p), q in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q), n


# --- two processes (gloo) == one process with the same global batch -----------------------------
DDP_SCRIPT = '''
import sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from accelerate import Accelerator
from llmprune.recover import recover
torch.set_num_threads(1)
model_dir, data, out, accum, mode = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
acc = Accelerator(cpu=True)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(model_dir)
extra = {"lora": dict(lora_dropout=0.1), "distill": dict(teacher=sys.argv[6], kd_hidden_weight=0.5)}.get(mode, {})
res = recover(model, tok, mode=mode, steps=3, seqlen=32, batch_size=1, grad_accum=accum, train_data=data,
              log_every=1, lr=1e-3, progress=False, accelerator=acc, **extra)
state = {k: v.contiguous() for k, v in res.model.state_dict().items()}
save_file(state, f"{out}/{mode}-rank{acc.process_index}-of-{acc.num_processes}.safetensors")
'''


@pytest.mark.multiprocess
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
@pytest.mark.parametrize("mode", ["masked", "lora", "distill"])
def test_two_process_recovery_equals_one_process(tmp_path, shared_data, tokenizer, mode):
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    if mode == "lora":
        pytest.importorskip("peft")
    model_dir, dense_dir = tmp_path / "pruned", tmp_path / "dense"
    pruned_tiny().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    tiny_model().save_pretrained(dense_dir)  # the teacher of mode distill
    tokenizer.save_pretrained(dense_dir)
    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    text = tmp_path / "train.txt"
    shutil.copy(shared_data / "wikitext-2-raw" / "wiki.valid.raw", text)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for nproc, accum in ((2, 1), (1, 2)):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29700 + os.getpid() % 1000 + nproc), str(tmp_path / "ddp.py"),
               str(model_dir), str(text), str(tmp_path), str(accum), mode, str(dense_dir)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr[-3000:]
    r0, r1, single = (load_file(tmp_path / f"{mode}-{f}.safetensors")
                      for f in ("rank0-of-2", "rank1-of-2", "rank0-of-1"))
    masks = {n: w != 0 for n, w in pruned_tiny().state_dict().items() if ".layers." in n and n.endswith("proj.weight")}
    for k in single:
        assert torch.equal(r0[k], r1[k]), f"ranks differ at {k}"
        assert torch.equal(r0[k], single[k]), f"2 processes differ from 1 at {k}"
    for n, keep in masks.items():
        assert (single[n][~keep] == 0).all(), n
    assert any(not torch.equal(single[n], w) for n, w in pruned_tiny().state_dict().items() if n in masks)
