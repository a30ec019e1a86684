"""Bad models, bad data files and bad evaluation settings: one clear line, exit 2, nothing written.

Also the perplexity fixes that go with them: no OverflowError on a huge loss, per-window loss
equal to the batch formula, and the forward on a chosen device.
"""

from __future__ import annotations

import importlib
import json
import shutil

import pytest

import llmprune.pipeline as pipeline
from llmprune.cli import main
from llmprune.errors import LLMPruneError
from llmprune.models.loading import load_model

# The package re-exports the function ``perplexity``, which hides the module of that name.
ppl_mod = importlib.import_module("llmprune.eval.perplexity")
EVAL = ["--seqlen", "32", "--max-windows", "1", "-q"]


def one_line_error(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("llmprune: error: "), err
    return lines[0]


@pytest.fixture
def no_model_load(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(pipeline, "load_model", boom)


@pytest.fixture
def no_weights_read(monkeypatch):
    from transformers import AutoModelForCausalLM

    def boom(*a, **k):
        raise AssertionError("weights were read before the files were checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", boom)


@pytest.fixture
def model_copy(tiny_dirs, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(tiny_dirs["llama"], d)
    return d


# ---- 1. loading ---------------------------------------------------------------------------

@pytest.mark.parametrize("keep,phrase", [(0.5, "is truncated"), (0, "is empty"), (5, "truncated")])
def test_truncated_or_empty_safetensors(model_copy, keep, phrase, capsys, no_weights_read):
    st = model_copy / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: int(len(data) * keep)] if keep < 1 else data[:keep])
    line = one_line_error(capsys, main(["eval", str(model_copy), *EVAL]))
    assert phrase in line and "model.safetensors" in line and "re-download" in line


def test_corrupt_safetensors_header(model_copy, capsys, no_weights_read):
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


def test_unknown_architecture(model_copy, capsys, no_weights_read):
    import transformers

    _edit_config(model_copy, model_type="brandnewlm", architectures=["BrandNewLMForCausalLM"])
    line = one_line_error(capsys, main(["eval", str(model_copy), *EVAL]))
    assert "does not know model_type 'brandnewlm'" in line and transformers.__version__ in line
    assert "trust-remote-code" not in line  # no custom code to trust: the flag would not help


def test_custom_code_needs_the_flag(model_copy, capsys, no_weights_read, monkeypatch):
    # transformers would ask "Do you wish to run the custom code? [y/N]" on a terminal.
    _edit_config(model_copy, model_type="brandnewlm",
                 auto_map={"AutoModelForCausalLM": "modeling_brand.BrandForCausalLM"})
    line = one_line_error(capsys, main(["eval", str(model_copy), *EVAL]))
    assert "pass --trust-remote-code" in line and "auto_map" in line


def test_config_that_is_not_json(model_copy, capsys, no_weights_read):
    (model_copy / "config.json").write_text("{not json")
    assert "not valid JSON" in one_line_error(capsys, main(["eval", str(model_copy), *EVAL]))


def test_model_dir_without_weights(model_copy, capsys, no_weights_read):
    (model_copy / "model.safetensors").unlink()
    assert "has no weights" in one_line_error(capsys, main(["eval", str(model_copy), *EVAL]))


def test_good_model_still_loads(tiny_dirs):
    model, tok = load_model(str(tiny_dirs["mistral"]))
    assert tok is not None and type(model).__name__ == "MistralForCausalLM"


