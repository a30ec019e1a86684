"""Shared fixtures: tiny random models of several families with a tiny real tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests never reach the hub: missing local data must fail fast, not retry for 30 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where CUDA is."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def data_dir() -> Path | None:
    d = os.environ.get("LLMPRUNE_DATA_DIR")
    if d and Path(d).is_dir():
        return Path(d)
    guess = REPO.parent / "shared" / "data"
    if guess.is_dir():
        os.environ["LLMPRUNE_DATA_DIR"] = str(guess)
        return guess
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = data_dir()
    if d is None:
        pytest.skip("LLMPRUNE_DATA_DIR not set (point it at the shared WikiText-2 / C4 data)")
    return d


@pytest.fixture(scope="session")
def tokenizer(shared_data):
    """A byte-level BPE with 512 tokens, trained on WikiText-2 valid (about a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = (shared_data / "wikitext-2-raw" / "wiki.valid.raw").read_text().splitlines()[:2000]
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


FAMILIES = ("llama", "mistral", "qwen2")


def tiny_config(family: str = "llama", layers: int = 2, hidden: int = 64, inter: int = 128):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        family, vocab_size=512, hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=False,
    )


def tiny_model(family: str = "llama", seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kw), dtype=torch.float32)
    # Spread the weights a little so that pruning visibly changes outputs.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.eval()
    model.config.use_cache = False
    return model


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """A saved tiny model directory per family, loadable by ``load_model``."""
    out = {}
    for fam in FAMILIES:
        d = tmp_path_factory.mktemp(f"tiny-{fam}")
        tiny_model(fam).save_pretrained(d)
        tokenizer.save_pretrained(d)
        out[fam] = d
    return out


# More families for tests/test_families.py: each with the settings that exercise its special
# path (sliding-window layers, local/global rotary, fused gate_up, fused MoE experts, LayerNorm
# + fc1/fc2, parallel residual). 2-4 layers, hidden 64, vocab 512 like the test tokenizer.
_ALTERNATING = ["sliding_attention", "full_attention"]


def family_config(name: str, layers: int = 4):
    """Config of a tiny random model of family ``name`` (a key of :data:`FAMILY_SPECS`)."""
    from transformers import AutoConfig

    model_type, extra = FAMILY_SPECS[name]
    extra = dict(extra)
    if extra.pop("alternating", False):
        extra["layer_types"] = [_ALTERNATING[i % 2] for i in range(layers)]
    base = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base.update(extra)
    return AutoConfig.for_model(model_type, **base)


FAMILY_SPECS: dict[str, tuple[str, dict]] = {
    # Gemma2's default layer_types alternate sliding (even) and full (odd) attention.
    "gemma2": ("gemma2", dict(head_dim=16, sliding_window=16, tie_word_embeddings=True)),
    # Gemma3's default pattern (5 local : 1 global) has no global layer in 4 layers: alternate.
    "gemma3_text": ("gemma3_text", dict(head_dim=16, sliding_window=16, alternating=True,
                                        tie_word_embeddings=True)),
    # Qwen2 with sliding-window attention from layer max_window_layers on.
    "qwen2_swa": ("qwen2", dict(use_sliding_window=True, sliding_window=16, max_window_layers=2,
                                tie_word_embeddings=False)),
    "qwen3": ("qwen3", dict(head_dim=16, tie_word_embeddings=True)),
    "phi3": ("phi3", dict(tie_word_embeddings=False)),  # fused qkv_proj and gate_up_proj
    "opt": ("opt", dict(ffn_dim=128, word_embed_proj_dim=64, tie_word_embeddings=True)),
    "gpt_neox": ("gpt_neox", dict(tie_word_embeddings=False)),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)),
    "qwen2_moe": ("qwen2_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                    shared_expert_intermediate_size=64, tie_word_embeddings=False)),
}


def family_model(name: str, layers: int = 4, seed: int = 0):
    """A tiny random model of family ``name`` with weights spread like :func:`tiny_model`'s."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(name, layers), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:  # fused experts are 3D
                p.normal_(0, 0.08)
    model.eval()
    model.config.use_cache = False
    return model


# ---- the tripwire: fail the moment heavy work starts --------------------------------------------
def arm_tripwire(monkeypatch, weights: bool) -> None:
    """Every entry to heavy work raises: reading model weights (``weights``), a calibration layer
    walk (pruning, OSSCAR, OWL's statistics, a one-shot prior), MaskLLM's learnable masks, a LoRA
    adapter, tokenising the training stream, training."""
    import llmprune.recover.lora as lora
    from llmprune.engine.sequential import LayerWalk
    from llmprune.maskllm.gumbel import LearnableNMMask
    from llmprune.train.stream import PackedStream
    from llmprune.train.trainer import Trainer

    def wire(what: str):
        def boom(*a, **k):
            raise AssertionError(f"heavy work started ({what}) before the input was refused")
        return boom

    if weights:
        from transformers import AutoModelForCausalLM

        monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", wire("model weights read"))
    monkeypatch.setattr(LayerWalk, "__init__", wire("a layer walk"))
    monkeypatch.setattr(LearnableNMMask, "__init__", wire("MaskLLM masks built"))
    monkeypatch.setattr(lora, "wrap_lora", wire("a LoRA adapter"))
    monkeypatch.setattr(PackedStream, "__init__", wire("the training stream tokenised"))
    monkeypatch.setattr(Trainer, "__init__", wire("training"))


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Bad input must be refused before any heavy work, reading the model's weights included."""
    arm_tripwire(monkeypatch, weights=True)


@pytest.fixture
def no_calibration_data(monkeypatch):
    """Structured pruning must refuse bad input before it reads any calibration text."""

    def no_data(*_a, **_k):
        raise AssertionError("calibration data was read before the input was checked")

    monkeypatch.setattr("llmprune.structured.api.load_corpus", no_data)


@pytest.fixture
def no_pruning(monkeypatch):
    """Bad input that needs the loaded model must be refused before any work beyond loading it."""
    arm_tripwire(monkeypatch, weights=False)


def one_line_error(capsys, rc: int) -> str:
    """Assert a command failed with exit 2 and exactly one ``llmprune: error:`` line; return it."""
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("llmprune: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def pruned_dir(tiny_dirs, tmp_path_factory):
    """The tiny Llama pruned to 2:4 by magnitude, through the CLI (a llmprune output directory)."""
    from llmprune.cli import main

    out = tmp_path_factory.mktemp("pruned") / "p24"
    assert main(["prune", str(tiny_dirs["llama"]), "--method", "magnitude", "--pattern", "2:4",
                 "--out", str(out), "-q"]) == 0
    return out


RELOAD = """
import json, sys
import numpy as np, torch
from transformers import AutoModelForCausalLM
assert "llmprune" not in sys.modules
out = {}
for d in sys.argv[1:]:
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = torch.from_numpy(np.load(d + "/ids.npy", allow_pickle=False))
    with torch.no_grad():
        np.save(d + "/logits.npy", m(ids).logits.numpy())
        gen = m.generate(ids[:1, :6], max_new_tokens=5, do_sample=False, use_cache=True,
                         pad_token_id=0, eos_token_id=None)
    out[d] = {"generated": gen.tolist(), "config": m.config.to_dict()}
print(json.dumps(out))
"""


def assert_reloads_in_plain_transformers(saved: dict[str, tuple], ids: torch.Tensor, cwd: Path) -> dict[str, dict]:
    """Load each saved directory with plain ``transformers`` in a fresh process (llmprune not
    importable): its logits on ``ids[:2]`` and a greedy cached generation must equal the in-memory
    model's. ``saved`` maps a name to ``(model, directory)``; returns each name's reloaded config."""
    import json
    import subprocess
    import sys

    import numpy as np

    dirs = {name: str(d) for name, (_, d) in saved.items()}
    for d in dirs.values():
        np.save(f"{d}/ids.npy", ids[:2].numpy())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", RELOAD, *dirs.values()], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (model, _) in saved.items():
        d = dirs[name]
        with torch.no_grad():
            ref = model(ids[:2]).logits.numpy()
            gen = model.generate(ids[:1, :6], max_new_tokens=5, do_sample=False, use_cache=True,
                                 pad_token_id=0, eos_token_id=None)
        np.testing.assert_allclose(np.load(f"{d}/logits.npy", allow_pickle=False), ref, rtol=1e-4, atol=1e-5,
                                   err_msg=name)
        assert out[d]["generated"] == gen.tolist(), name
    return {name: out[d]["config"] for name, d in dirs.items()}
