"""MaskLLM: candidates, the Gumbel mask, schedules, prior, regulariser, trainer, resume, DDP."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from llmprune.data.sources import load_corpus
from llmprune.errors import LLMPruneError
from llmprune.maskllm import (
    LearnableNMMask,
    MaskLLMOptions,
    NoiseSource,
    apply_prior,
    attach_masks,
    candidates,
    detach_masks,
    hard_masks,
    maskllm,
    oneshot_prior,
)
from llmprune.maskllm.candidates import parse_nm
from llmprune.maskllm.memory import estimate_train_bytes
from llmprune.maskllm.schedule import MaskSchedule
from llmprune.maskllm.task import MaskLLMTask, model_fingerprint
from llmprune.train.checkpoint import latest_checkpoint
from llmprune.train.schedule import cosine, linear

REPO = Path(__file__).resolve().parents[1]
FAST = dict(seqlen=32, batch_size=2, log_every=1, progress=False)


@pytest.fixture(scope="module")
def corpus(shared_data):
    return load_corpus("c4", "train")


def is_nm(keep: torch.Tensor, n: int, m: int) -> bool:
    return bool((keep.reshape(-1, m).sum(-1) == n).all())


# --- candidates --------------------------------------------------------------------------------
@pytest.mark.parametrize("n,m", [(1, 2), (1, 4), (2, 4), (3, 4), (2, 8), (4, 8), (3, 6)])
def test_candidates_count_and_n_kept(n, m):
    c = candidates(n, m)
    assert c.shape == (math.comb(m, n), m)
    assert (c.sum(-1) == n).all()
    assert len({tuple(r.tolist()) for r in c}) == c.shape[0]  # all distinct
    keys = [tuple(int(i) for i in r.nonzero().flatten()) for r in c]
    assert keys == sorted(keys)  # lexicographic in the kept positions


def test_candidates_2_4_order_is_the_reference_order():
    assert candidates(2, 4).tolist() == [[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1],
                                         [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]]


@pytest.mark.parametrize("bad", ["unstructured", "0.5", "4:4", "5:4", "0:4", "two:four", ""])
def test_parse_nm_refuses_non_nm(bad):
    with pytest.raises(LLMPruneError):
        parse_nm(bad)


# --- the differentiable mask -------------------------------------------------------------------
def test_soft_mask_keeps_n_in_expectation_and_hard_mask_is_exact():
    mask = LearnableNMMask(torch.Size((8, 16)), 2, 4, init_std=1.0, generator=torch.Generator().manual_seed(0))
    soft = mask.soft_mask()
    assert soft.shape == (32, 4)
    torch.testing.assert_close(soft.sum(-1), torch.full((32,), 2.0))
    assert is_nm(mask.hard_mask(), 2, 4) and mask.hard_mask().dtype == torch.bool


def test_gradients_reach_logits_not_frozen_weights(tokenizer):
    model = tiny_model()
    masks = attach_masks(model, 2, 4, seed=0)
    for m in masks.values():
        m.train()
    ids = torch.randint(0, 512, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    for name, m in masks.items():
        assert m.logits.grad is not None and m.logits.grad.abs().sum() > 0, name
    for lin in (mod for mod in model.modules() if isinstance(mod, torch.nn.Linear)):
        if hasattr(lin, "parametrizations"):
            assert lin.parametrizations.weight.original.grad is None
    assert model.lm_head.weight.grad is not None  # not masked, not frozen by us
    assert "lm_head.weight" not in masks and "model.embed_tokens.weight" not in masks


def test_train_weights_gives_weight_gradients():
    model = tiny_model()
    masks = attach_masks(model, 2, 4, seed=0, train_weights=True)
    for m in masks.values():
        m.train()
    ids = torch.randint(0, 512, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    w = model.model.layers[0].mlp.down_proj.parametrizations.weight.original
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_eval_forward_uses_the_hard_mask_and_detach_applies_it():
    model = tiny_model()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    attach_masks(model, 2, 4, init_std=1.0, seed=3)
    ids = torch.randint(0, 512, (1, 16))
    keep = hard_masks(model)
    with torch.no_grad():
        out_masked = model(input_ids=ids).logits
    assert set(keep) == {n for n in dense if ".layers." in n and n.endswith("proj.weight")}
    returned = detach_masks(model, apply=True)
    for name, k in keep.items():
        assert torch.equal(returned[name], k) and is_nm(k, 2, 4)
        assert torch.equal(model.get_parameter(name).detach(), dense[name] * k)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, out_masked, rtol=0, atol=0)
    assert not any("parametrizations" in n for n, _ in model.named_parameters())


def test_seeded_noise_repeats_and_differs_between_seeds():
    noise = NoiseSource(0)
    mask = LearnableNMMask(torch.Size((4, 8)), 2, 4, generator=torch.Generator().manual_seed(0), noise=noise)
    noise.reseed(11)
    a = mask.soft_mask()
    noise.reseed(11)
    b = mask.soft_mask()
    noise.reseed(12)
    c = mask.soft_mask()
    assert torch.equal(a, b) and not torch.equal(a, c)


# --- schedules -----------------------------------------------------------------------------------
def test_schedules_linear_ends_and_midpoint():
    s = MaskSchedule(11)
    first, mid, last = s.at(0), s.at(5), s.at(10)
    assert (first["tau"], first["kappa"], first["lambda"]) == (4.0, 100.0, 1e-5)
    assert last["tau"] == pytest.approx(0.05) and last["kappa"] == pytest.approx(500.0) and last["lambda"] == 0.0
    assert mid["tau"] == pytest.approx((4 + 0.05) / 2) and mid["kappa"] == pytest.approx(300.0)
    assert mid["lambda"] == pytest.approx(5e-6)
    taus = [s.at(i)["tau"] for i in range(11)]
    assert all(b < a for a, b in zip(taus, taus[1:], strict=False))
    assert linear(1.0, 3.0, 0, 1) == 1.0
    assert cosine(5e-4, 5e-5, 0, 100) == 5e-4 and cosine(5e-4, 5e-5, 100, 100) == pytest.approx(5e-5)
    assert cosine(1.0, 0.0, 50, 100) == pytest.approx(0.5)


# --- prior ---------------------------------------------------------------------------------------
def random_nm(shape, n, m, seed):
    g = torch.Generator().manual_seed(seed)
    c = candidates(n, m).bool()
    idx = torch.randint(0, c.shape[0], (shape[0] * shape[1] // m,), generator=g)
    return c[idx].reshape(shape)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4)])
def test_prior_makes_argmax_the_prior_mask(n, m):
    model = tiny_model()
    masks = attach_masks(model, n, m, seed=0)
    prior = {name: random_nm(mask.shape, n, m, i) for i, (name, mask) in enumerate(masks.items())}
    apply_prior(masks, prior, strength=10.0)
    for name, keep in hard_masks(model).items():
        assert torch.equal(keep, prior[name]), name


def test_prior_shift_formula_and_default_strength_agreement():
    model = tiny_model()
    masks = attach_masks(model, 2, 4, seed=0)
    name, mask = next(iter(masks.items()))
    before = mask.logits.detach().clone()
    prior = {k: random_nm(v.shape, 2, 4, 7) for k, v in masks.items()}
    apply_prior(masks, prior, strength=3.0)
    groups = prior[name].reshape(-1, 4).float()
    overlap = groups @ candidates(2, 4).T
    torch.testing.assert_close(mask.logits.detach(), before + (overlap - 1) * before.std() * 3.0)
    # With the reference's strength 3 and N(0, 0.01) logits, near-ties remain: most groups (about
    # 94% for 2:4) start at the prior and training decides the rest.
    agree = sum(int((hard_masks(model)[k] == prior[k]).reshape(-1, 4).all(-1).sum()) for k in masks)
    total = sum(v.numel() // 4 for v in prior.values())
    assert 0.88 < agree / total < 0.99


def test_oneshot_prior_sparsegpt_mask_only_restores_weights(tokenizer, shared_data):
    model = tiny_model()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    prior = oneshot_prior(model, tokenizer, "2:4", "sparsegpt", progress=False, nsamples=4, seqlen=32)
    for n, p in model.named_parameters():
        assert torch.equal(p, dense[n]), n
    assert len(prior) == 14 and all(is_nm(k, 2, 4) for k in prior.values())


# --- regulariser ---------------------------------------------------------------------------------
def test_regulariser_value_and_its_pull_towards_large_weights():
    noise = NoiseSource(0)
    mask = LearnableNMMask(torch.Size((1, 4)), 2, 4, generator=torch.Generator().manual_seed(0), noise=noise)
    W = torch.tensor([[0.1, 10.0, 0.1, 10.0]])
    noise.reseed(5)
    mask(W)
    noise.reseed(5)
    torch.testing.assert_close(mask.sq_norm, (W * mask.soft_mask().view(1, 4)).square().sum())
    # Minimising −‖W ⊙ mask‖² alone must choose the two large weights (candidate 0101).
    opt = torch.optim.Adam([mask.logits], lr=0.05)
    for i in range(50):
        noise.reseed(i)
        mask(W)
        opt.zero_grad()
        (-mask.sq_norm).backward()
        opt.step()
    assert mask.hard_mask().tolist() == [[False, True, False, True]]


def test_task_loss_is_minus_lambda_times_sum_of_norms():
    model = tiny_model()
    noise = NoiseSource(0)
    masks = attach_masks(model, 2, 4, seed=0, noise=noise)
    opts = MaskLLMOptions(steps=10)
    task = MaskLLMTask(model, masks, opts, noise, {})
    task.set_training(True)
    vals = task.before_step(0)
    ids = torch.randint(0, 512, (1, 8))
    model(input_ids=ids)
    norms = torch.stack([m.sq_norm for m in masks.values()]).sum()
    loss, logged = task.extra_loss()
    torch.testing.assert_close(loss, -vals["lambda"] * norms)
    assert logged["sparse_weight_norm"] == pytest.approx(norms.item())


# --- trainer: log, checkpoints, resume -----------------------------------------------------------
def run(tokenizer, corpus, seed=0, **kw):
    model = tiny_model(seed=seed)
    return maskllm(model, tokenizer, corpus=corpus, **{**FAST, **kw})


@pytest.mark.parametrize("train_weights", [False, True])
def test_resume_equals_uninterrupted(tokenizer, corpus, tmp_path, train_weights):
    opts = dict(steps=4, checkpoint_every=1, train_weights=train_weights, grad_accum=2)
    full = run(tokenizer, corpus, work_dir=tmp_path / "full", **opts)
    half = run(tokenizer, corpus, work_dir=tmp_path / "half", until=2, **opts)
    assert half.report["steps"] == 2
    resumed = run(tokenizer, corpus, work_dir=tmp_path / "half", resume=tmp_path / "half", **opts)
    assert resumed.report["steps"] == 4
    for name, keep in full.masks.items():
        assert torch.equal(resumed.masks[name], keep), name
    for (n, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n  # the applied weights (and trained ones) bit for bit
    assert [r["ce"] for r in resumed.log] == [r["ce"] for r in full.log]
    lines = (tmp_path / "half" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]
    rec = json.loads(lines[-1])
    for key in ("ce", "tau", "kappa", "lambda", "tokens", "tokens_per_s", "flipped", "lr_logits"):
        assert key in rec
    assert ("lr_weights" in rec) == train_weights
    assert all(is_nm(k, 2, 4) for k in full.masks.values())
    ckpts = sorted(p.name for p in (tmp_path / "half" / "checkpoints").iterdir())
    assert ckpts == ["latest", "step-00000004"]  # older ones dropped, no temp dirs left


def test_training_flips_masks_and_ends_the_schedules(tokenizer, corpus):
    res = run(tokenizer, corpus, steps=12, lr=5e-3, batch_size=4)
    assert res.log[0]["flipped"] > 0
    assert res.log[-1]["tau"] == pytest.approx(0.05) and res.log[-1]["kappa"] == pytest.approx(500)


def test_only_the_trained_parameters_get_gradients(tokenizer, corpus, monkeypatch):
    seen = {}
    real_step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        seen.update({n: p.grad is not None for n, p in model.named_parameters()})
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    model = tiny_model()
    maskllm(model, tokenizer, corpus=corpus, **{**FAST, "steps": 1})
    assert seen and all(has == name.endswith(".logits") for name, has in seen.items()), seen
    assert all(p.requires_grad for p in model.parameters())  # handed back trainable


def test_bf16_logits_train_resume_and_halve_the_logit_memory(tokenizer, corpus, tmp_path, monkeypatch):
    seen = {}
    real_step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        params = [p for g in self.param_groups for p in g["params"]]
        seen.update(params={p.dtype for p in params}, grads={p.grad.dtype for p in params})
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    opts = dict(steps=4, checkpoint_every=1, logits_dtype="bfloat16", lr=5e-3)
    full = run(tokenizer, corpus, work_dir=tmp_path / "full", **opts)
    assert seen["params"] == {torch.bfloat16} and seen["grads"] == {torch.bfloat16}
    assert full.log[-1]["flipped"] > 0 or full.log[0]["flipped"] > 0  # the bf16 updates move masks
    assert all(is_nm(k, 2, 4) for k in full.masks.values())
    run(tokenizer, corpus, work_dir=tmp_path / "half", until=2, **opts)
    resumed = run(tokenizer, corpus, work_dir=tmp_path / "half", resume=tmp_path / "half", **opts)
    for name, keep in full.masks.items():
        assert torch.equal(resumed.masks[name], keep), name
    with pytest.raises(LLMPruneError, match="logits_dtype"):  # not resumable with other logits
        run(tokenizer, corpus, resume=tmp_path / "half", **{**opts, "logits_dtype": "float32"})
    fp32 = estimate_train_bytes(tiny_model(), MaskLLMOptions(seqlen=32), 2, 4)
    bf16 = estimate_train_bytes(tiny_model(), MaskLLMOptions(seqlen=32, logits_dtype="bfloat16"), 2, 4)
    assert 2 * bf16["logits"] == fp32["logits"] and bf16["masks"] == fp32["masks"]
    with pytest.raises(ValueError, match="logits_dtype"):
        MaskLLMOptions(logits_dtype="float16")


def test_interrupted_checkpoint_write_is_ignored(tokenizer, corpus, tmp_path):
    run(tokenizer, corpus, steps=2, checkpoint_every=1, work_dir=tmp_path)
    (tmp_path / "checkpoints" / ".step-00000003.tmp-1").mkdir()  # a write that never finished
    assert latest_checkpoint(tmp_path).name == "step-00000002"


# --- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,msg", [
    (dict(pattern="0.5"), "not N:M"),
    (dict(pattern="unstructured"), "not N:M"),
    (dict(pattern="4:4"), "0 < N < M"),
    (dict(pattern="2:3"), "not divisible by M=3"),
    (dict(steps=0), "steps must be a positive integer"),
    (dict(steps=True), "steps must be a number"),
    (dict(seqlen=4096), "longer than the model's context"),
    (dict(lr=-1.0), "lr must be"),
    (dict(bogus=1), "unknown option 'bogus'"),
    (dict(prior="owl"), "not one of sparsegpt"),
])
def test_bad_input_refused_before_work(tokenizer, no_pruning, kw, msg):
    model = tiny_model()
    with pytest.raises(LLMPruneError, match=msg):
        maskllm(model, tokenizer, **{**FAST, **kw})
    assert not any("parametrizations" in n for n, _ in model.named_parameters())


def test_bad_prior_dict_names_the_first_bad_key(tokenizer, no_pruning):
    model = tiny_model()
    shapes = {n: p.shape for n, p in model.named_parameters() if ".layers." in n and n.endswith("proj.weight")}
    prior = {n: torch.ones(s, dtype=torch.bool) for n, s in shapes.items()}
    first = next(iter(shapes))
    with pytest.raises(LLMPruneError, match=f"no mask for {first}"):
        maskllm(model, tokenizer, prior={k: v for k, v in prior.items() if k != first}, **FAST)
    bad = {**prior, first: torch.ones(3, 4, dtype=torch.bool)}
    with pytest.raises(LLMPruneError, match=f"prior mask {first} has shape"):
        maskllm(model, tokenizer, prior=bad, **FAST)
    with pytest.raises(LLMPruneError, match="lm_head.weight, which is not a masked weight"):
        maskllm(model, tokenizer, prior={**prior, "lm_head.weight": torch.ones(512, 64)}, **FAST)


def test_resume_from_another_model_pattern_or_recipe_is_refused(tokenizer, corpus, tmp_path, monkeypatch):
    from conftest import arm_tripwire

    run(tokenizer, corpus, steps=2, checkpoint_every=1, work_dir=tmp_path / "a")
    arm_tripwire(monkeypatch, weights=False)  # only that run may work; every refusal comes before any
    cases = [
        (dict(model=tiny_model(), pattern="1:4"), "written for pattern 2:4, not 1:4"),
        (dict(model=tiny_model(seed=1)), "written for another model"),
        (dict(model=tiny_model(hidden=32, inter=64)), "written for another model"),
        (dict(model=tiny_model(), steps=3), "run with steps=2, this run has steps=3"),
        (dict(model=tiny_model(), batch_size=1), "run with global_batch=2, this run has global_batch=1"),
    ]
    for kw, msg in cases:
        model = kw.pop("model")
        with pytest.raises(LLMPruneError, match=msg):
            maskllm(model, tokenizer, resume=tmp_path / "a", **{**FAST, "steps": 2, **kw})
    with pytest.raises(LLMPruneError, match="holds no training checkpoint"):
        maskllm(tiny_model(), tokenizer, resume=tmp_path, **{**FAST, "steps": 2})


def test_fingerprint_names_pattern_and_weights():
    a, b = model_fingerprint(tiny_model(), "2:4"), model_fingerprint(tiny_model(seed=1), "2:4")
    assert a["shapes"] == b["shapes"] and a["weights"] != b["weights"] and a["pattern"] == "2:4"


# --- two processes (gloo) == one process with the same global batch -----------------------------
DDP_SCRIPT = '''
import sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from accelerate import Accelerator
from llmprune.maskllm import maskllm
torch.set_num_threads(1)
model_dir, data, out, accum = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
acc = Accelerator(cpu=True)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(model_dir)
res = maskllm(model, tok, steps=3, seqlen=32, batch_size=1, grad_accum=accum, train_data=data,
              log_every=1, lr=1e-3, progress=False, accelerator=acc)
state = {k: v.contiguous() for k, v in model.state_dict().items()}
state.update({k + ".mask": v.to(torch.uint8) for k, v in res.masks.items()})
save_file(state, f"{out}/rank{acc.process_index}-of-{acc.num_processes}.safetensors")
'''


def _torchrun(nproc: int, args: list[str], tmp: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(29500 + os.getpid() % 1000 + nproc), str(tmp / "ddp.py"), *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.multiprocess
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_two_process_run_equals_one_process(tiny_dirs, shared_data, tmp_path):
    from safetensors.torch import load_file

    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    text = tmp_path / "train.txt"
    shutil.copy(shared_data / "wikitext-2-raw" / "wiki.valid.raw", text)
    model_dir = str(tiny_dirs["llama"])
    _torchrun(2, [model_dir, str(text), str(tmp_path), "1"], tmp_path)
    _torchrun(1, [model_dir, str(text), str(tmp_path), "2"], tmp_path)
    r0, r1, single = (load_file(tmp_path / f) for f in
                      ("rank0-of-2.safetensors", "rank1-of-2.safetensors", "rank0-of-1.safetensors"))
    assert r0.keys() == single.keys() and any(k.endswith(".mask") for k in r0)
    for k in single:
        assert torch.equal(r0[k], r1[k]), f"ranks differ at {k}"
        assert torch.equal(r0[k], single[k]), f"2 processes differ from 1 at {k}"


def test_masked_sq_norm_matches_autograd_of_the_plain_formula():
    from llmprune.maskllm.gumbel import masked_sq_norm

    W = torch.randn(6, 8, dtype=torch.float64)
    mask = torch.rand(6, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m: masked_sq_norm(W, m), (mask,))
    plain = (W * mask).square().sum()
    torch.testing.assert_close(masked_sq_norm(W, mask), plain)


def test_failed_training_hands_the_model_back_dense(tokenizer, corpus, monkeypatch):
    import llmprune.maskllm.api as api

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(api.Trainer, "train", interrupted)
    model = tiny_model()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(KeyboardInterrupt):
        maskllm(model, tokenizer, corpus=corpus, steps=2, **FAST)
    assert {n: p for n, p in model.named_parameters()}.keys() == dense.keys()
    for n, p in model.named_parameters():
        assert torch.equal(p, dense[n]), n


def test_packed_stream_joins_documents_with_eos_and_resumes(tokenizer):
    from llmprune.data.sources import Corpus
    from llmprune.train.stream import PackedStream, StreamState

    docs = [f"document number {i} " * (i + 1) for i in range(7)]
    stream = PackedStream(Corpus(docs, "docs", "toy", "toy"), tokenizer, seqlen=16, seed=3)
    first = stream.next_batch(3)
    st = stream.state
    saved = StreamState(st.epoch, st.cursor, list(st.buffer), st.windows)
    rest = stream.next_batch(20)  # wraps into the next epoch
    again = PackedStream(Corpus(docs, "docs", "toy", "toy"), tokenizer, seqlen=16, seed=3, state=saved)
    assert torch.equal(again.next_batch(20), rest)
    order = list(range(7))
    random.Random("3:0").shuffle(order)  # the stream's documented epoch-0 order
    expect = []
    for i in order:
        expect += tokenizer(docs[i], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert first.shape == (3, 16) and first.flatten().tolist() == expect[:48]  # packed, no padding


def test_training_that_cannot_fit_is_refused_with_numbers(tokenizer, no_pruning, monkeypatch):
    import llmprune.maskllm.memory as memory

    monkeypatch.setattr("llmprune.engine.memory.available_bytes", lambda device: 2**20)
    with pytest.raises(LLMPruneError, match=r"needs about .* GiB more on cpu \(logits .*lower --batch-size"):
        maskllm(tiny_model(), tokenizer, **FAST)
    parts = memory.estimate_train_bytes(tiny_model(), MaskLLMOptions(seqlen=32), 2, 4)
    numel = 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128)  # 2 layers: q, o; k, v (2 kv heads); gate, up, down
    assert parts["logits"] == 16 * numel // 4 * 6 and parts["weights"] == 0


def test_fused_gumbel_soft_mask_matches_the_plain_formula_and_its_gradient():
    from llmprune.maskllm.gumbel import _GumbelSoftMask

    c = candidates(2, 4).double()
    logits = (torch.randn(10, 6, dtype=torch.float64) * 0.01).requires_grad_()
    noise = torch.randn(10, 6, dtype=torch.float64)
    fused = _GumbelSoftMask.apply(logits, noise, c, 300.0, 2.0)
    plain = torch.softmax((logits * 300.0 + noise) / 2.0, dim=-1) @ c
    torch.testing.assert_close(fused, plain)
    assert torch.autograd.gradcheck(lambda lg: _GumbelSoftMask.apply(lg, noise, c, 300.0, 2.0), (logits,))
