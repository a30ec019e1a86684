"""What llmprune never does: run remote code unasked (or prompt for it), write over an input,
replace an output of another kind, abort on Ctrl-C, leave files the umask did not ask for, show
a traceback for a file the user gave, or record what did not happen.

Each test here failed before its fix (the hostile probe of issue 21).
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from conftest import one_line_error

from llmprune.cli import main
from llmprune.masks import MaskSet

REPO_SRC = str(Path(__file__).resolve().parents[1] / "src")
EVAL = ["--seqlen", "32", "--max-windows", "1", "-q"]




def run_py(code: str, *args: str, stdin: str | None = None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO_SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], input=stdin, text=True,
                          capture_output=True, env=env, timeout=240, **kw)


@pytest.fixture
def model_copy(tiny_dirs, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(tiny_dirs["llama"], d)
    return d


@pytest.fixture
def mask_file(tiny_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    f = tmp_path / "m.npz"
    MaskSet.from_model(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])).save(f)
    return f


# ---- remote code: never run, never asked about ---------------------------------------------------

@pytest.fixture
def custom_code_model(model_copy, tmp_path, monkeypatch):
    """A model whose config names its own Python code, which would leave a marker file if run;
    ``input`` (transformers' "Do you wish to run the custom code? [y/N]") answers yes."""
    marker = tmp_path / "REMOTE-CODE-RAN"
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg.update(model_type="brandnewlm", auto_map={"AutoConfig": "configuration_brand.BrandConfig",
                                                 "AutoModelForCausalLM": "modeling_brand.BrandForCausalLM"})
    (model_copy / "config.json").write_text(json.dumps(cfg))
    code = f"open({str(marker)!r}, 'w').close()\nfrom transformers import LlamaConfig as BrandConfig\n"
    (model_copy / "configuration_brand.py").write_text(code)
    (model_copy / "modeling_brand.py").write_text(code)
    asked = []
    monkeypatch.setattr(builtins, "input", lambda *a: asked.append(a) or "y")
    yield model_copy
    assert not asked, "transformers prompted for remote code"
    assert not marker.exists(), "the model's own code ran"


@pytest.mark.parametrize("cmd", ["masks inspect", "masks apply", "masks export", "eval", "prune", "bench-speed",
                                 "structured", "maskllm", "recover"])
def test_no_command_runs_or_asks_about_remote_code(custom_code_model, mask_file, tmp_path, capsys, cmd):
    m, out = str(custom_code_model), str(tmp_path / "out")
    args = {"masks inspect": ["masks", "inspect", str(mask_file), "--model", m],
            "masks apply": ["masks", "apply", m, str(mask_file), "--out", out],
            "masks export": ["masks", "export", m, "--out", str(tmp_path / "e.npz")],
            "eval": ["eval", m, *EVAL],
            "prune": ["prune", m, "--method", "magnitude", "--sparsity", "0.5", "--out", out, "-q"],
            "bench-speed": ["bench-speed", m],
            "structured": ["structured", m, "--method", "depth", "--layers", "1", "--out", out, "-q"],
            "maskllm": ["maskllm", m, "--pattern", "2:4", "--prior", "none", "--steps", "1", "--out", out, "-q"],
            "recover": ["recover", m, "--steps", "1", "--out", out, "-q"]}[cmd]
    line = one_line_error(capsys, main(args))
    assert "--trust-remote-code" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "e.npz").exists()


# ---- outputs never replace inputs, nor outputs of another kind -----------------------------------

def test_masks_export_never_replaces_an_input_or_a_foreign_file(model_copy, tmp_path, capsys):
    weights = model_copy / "model.safetensors"
    before = weights.read_bytes()
    line = one_line_error(capsys, main(["masks", "export", str(model_copy), "--out", str(weights), "--overwrite"]))
    assert "inside the input" in line and weights.read_bytes() == before
    notes = tmp_path / "notes.npz"
    notes.write_text("my notes")
    line = one_line_error(capsys, main(["masks", "export", str(model_copy), "--out", str(notes), "--overwrite"]))
    assert "is not a mask file llmprune wrote" in line and notes.read_text() == "my notes"
    # a mask file is replaced, and only with --overwrite
    ours = tmp_path / "ours.npz"
    assert main(["masks", "export", str(model_copy), "--out", str(ours)]) == 0
    capsys.readouterr()
    assert "pass --overwrite" in one_line_error(capsys, main(["masks", "export", str(model_copy), "--out", str(ours)]))
    assert main(["masks", "export", str(model_copy), "--out", str(ours), "--overwrite"]) == 0


@pytest.mark.parametrize("name", ["config.json", "pruning.json", "tokenizer.json"])
def test_eval_json_never_writes_into_its_input(model_copy, capsys, name):
    target = model_copy / name
    existed = target.exists()
    before = target.read_bytes() if existed else None
    line = one_line_error(capsys, main(["eval", str(model_copy), *EVAL, "--json", str(target), "--overwrite"]))
    assert "inside the input" in line
    assert (target.read_bytes() if existed else target.exists()) == (before if existed else False)


def test_bench_speed_json_never_writes_into_its_input(model_copy, capsys):
    cfg = (model_copy / "config.json").read_bytes()
    line = one_line_error(capsys, main(["bench-speed", str(model_copy), "--json", str(model_copy / "config.json"),
                                        "--overwrite"]))
    assert "inside the input" in line and (model_copy / "config.json").read_bytes() == cfg


def test_prune_overwrite_never_replaces_a_chained_run(tiny_dirs, tmp_path, capsys):
    chain = tmp_path / "chain"
    (chain / "stages" / "01-prune").mkdir(parents=True)
    (chain / "pruning.json").write_text(json.dumps({"kind": "chain", "stages": []}))
    (chain / "stages" / "01-prune" / "model.safetensors").write_bytes(b"weights of an hour")
    line = one_line_error(capsys, main(["prune", str(tiny_dirs["llama"]), "--method", "magnitude", "--sparsity",
                                        "0.5", "--out", str(chain), "--overwrite", "-q"]))
    assert "kind 'chain'" in line and "never replaces it" in line
    assert (chain / "stages" / "01-prune" / "model.safetensors").read_bytes() == b"weights of an hour"


def test_overwrite_replaces_an_output_of_the_same_kind(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "p"
    args = ["prune", str(tiny_dirs["llama"]), "--method", "magnitude", "--sparsity", "0.5", "--out", str(out), "-q"]
    assert main(args) == 0
    assert json.loads((out / "pruning.json").read_text())["kind"] == "prune"
    assert main([*args, "--overwrite", "--sparsity", "0.25"]) == 0
    assert json.loads((out / "pruning.json").read_text())["sparsity"] == pytest.approx(0.25)
    # an unreadable pruning.json: not known to be ours
    (out / "pruning.json").write_text("{cut")
    capsys.readouterr()
    assert "cannot read" in one_line_error(capsys, main([*args, "--overwrite"]))


def test_a_recipe_never_decides_where_output_goes(tiny_dirs, tmp_path, capsys):
    victim = tmp_path / "victim"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: magnitude\nsparsity: 0.5\nout: {victim}\noverwrite: true\n")
    line = one_line_error(capsys, main(["prune", str(tiny_dirs["llama"]), "--recipe", str(recipe), "-q"]))
    assert "sets 'out'" in line and not victim.exists()


# ---- Ctrl-C --------------------------------------------------------------------------------------

def test_ctrl_c_stops_the_true_sequential_workers_before_returning(tokenizer):
    """A worker still inside torch when the interpreter exits aborts the process (SIGABRT)."""
    import _thread

    from conftest import tiny_model

    from llmprune.engine.onepass import prune_in_one_pass
    from llmprune.engine.stats import LayerStats

    model = tiny_model("llama")
    layer = model.model.layers[0]
    linears = {"self_attn.q_proj": layer.self_attn.q_proj, "mlp.down_proj": layer.mlp.down_proj}
    x = torch.randn(4, 16, 64)
    pos = torch.arange(16)[None]
    kwargs = {"position_embeddings": model.model.rotary_emb(x, pos), "attention_mask": None}
    stats = LayerStats(linears, frozenset({"col_sq"}))
    finished = threading.Event()

    def slow_interrupt(_m, _a):  # the first batch, mid-forward: Ctrl-C reaches the main thread
        if threading.current_thread().name == "llmprune-batch-0" and not finished.is_set():
            finished.set()
            _thread.interrupt_main()
            threading.Event().wait(0.5)  # still computing when the KeyboardInterrupt arrives

    layer.self_attn.k_proj.register_forward_pre_hook(slow_interrupt)
    with pytest.raises(KeyboardInterrupt):
        prune_in_one_pass(layer, linears, x, kwargs, stats, lambda name: None, batch_size=1)
    alive = [t.name for t in threading.enumerate() if t.name.startswith("llmprune-batch")]
    assert alive == []


SIGINT_DURING_PRUNE = """
import os, signal, sys, threading
import llmprune.engine.stats as stats
real = stats.LayerStats._accumulate
def interrupted(self, name, x):
    real(self, name, x)
    if threading.current_thread().name.startswith("llmprune-batch") and not os.environ.get("SENT"):
        os.environ["SENT"] = "1"
        os.kill(os.getpid(), signal.SIGINT)
        threading.Event().wait(0.3)
stats.LayerStats._accumulate = interrupted
from llmprune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_in_the_default_mode_exits_130_with_one_line(tiny_dirs, tmp_path):
    out = tmp_path / "o"
    r = run_py(SIGINT_DURING_PRUNE, "prune", str(tiny_dirs["llama"]), "--method", "wanda", "--sparsity", "0.5",
               "--true-sequential", "--nsamples", "4", "--seqlen", "32", "--out", str(out), "-q")
    assert r.returncode == 130, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "llmprune: interrupted"
    assert "Traceback" not in r.stderr and "terminate called" not in r.stderr, r.stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


INTERRUPT_IMPORTS = """
import sys
class CtrlC:  # Ctrl-C while torch imports
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt
sys.meta_path.insert(0, CtrlC())
from llmprune.cli import main  # what the console script does
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_during_imports_is_one_line():
    r = run_py(INTERRUPT_IMPORTS, "report", "nowhere")
    assert r.returncode == 130 and r.stderr.strip() == "llmprune: interrupted", r.stderr


# ---- modes follow the umask ------------------------------------------------------------------------

@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_saved_files_follow_the_umask(tiny_dirs, tmp_path, umask, file_mode, dir_mode):
    from llmprune.train.checkpoint import save_checkpoint

    old = os.umask(umask)
    try:
        out = tmp_path / "p"
        assert main(["prune", str(tiny_dirs["llama"]), "--method", "magnitude", "--sparsity", "0.5",
                     "--out", str(out), "-q"]) == 0
        ckpt = save_checkpoint(tmp_path / "ck", 1, {"w": torch.ones(2)}, {"step": 1})
    finally:
        os.umask(old)
    assert (out / "model.safetensors").is_file()
    for d in (out, ckpt):
        assert d.stat().st_mode & 0o777 == dir_mode
        for f in d.iterdir():
            assert f.stat().st_mode & 0o777 == file_mode, f.name


# ---- one line, not a traceback -------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"", b"PK\x03\x04cut", os.urandom(64), b"\x93NUMPY\x01\x00v", b"text, not zip"],
                         ids=["empty", "truncated-zip", "random", "npy", "text"])
def test_a_mask_file_that_is_not_one_is_one_line(tmp_path, capsys, content):
    f = tmp_path / "m.npz"
    f.write_bytes(content)
    line = one_line_error(capsys, main(["masks", "inspect", str(f)]))
    assert str(f) in line and "pickle" not in line


def test_masks_inspect_nm_check_without_a_model_is_refused(mask_file, capsys):
    line = one_line_error(capsys, main(["masks", "inspect", str(mask_file), "--pattern", "2:4"]))
    assert "pass --model" in line


@pytest.fixture
def pruned(tiny_dirs, tmp_path):
    out = tmp_path / "p"
    assert main(["prune", str(tiny_dirs["llama"]), "--method", "magnitude", "--sparsity", "0.5",
                 "--out", str(out), "-q"]) == 0
    return out


@pytest.mark.parametrize("edit", ["truncated", "list", "recipe-number", "timings-text", "binary"])
def test_a_damaged_report_is_one_line(pruned, capsys, edit):
    f = pruned / "pruning.json"
    report = json.loads(f.read_text())
    f.write_bytes({"truncated": f.read_bytes()[:50], "list": b"[1, 2]", "binary": os.urandom(40),
                   "recipe-number": json.dumps({**report, "recipe": 5}).encode(),
                   "timings-text": json.dumps({**report, "timings": "fast"}).encode()}[edit])
    capsys.readouterr()
    line = one_line_error(capsys, main(["report", str(pruned)]))
    assert "pruning.json" in line


@pytest.mark.parametrize("stages", ["[{\"index\": \"one\"}]", "5", "[{\"index\": 1, \"kind\": \"prune\", \"dir\": 3, \"status\": \"done\"}]"])
def test_a_damaged_chain_state_is_one_line(tiny_dirs, tmp_path, capsys, stages):
    out = tmp_path / "chain"
    out.mkdir()
    (out / "pruning.json").write_text(f'{{"kind": "chain", "stages": {stages}}}')
    recipe = tmp_path / "c.yaml"
    recipe.write_text(f"model: {tiny_dirs['llama']}\nstages:\n  - prune: {{method: magnitude, sparsity: 0.5}}\n")
    line = one_line_error(capsys, main(["run", str(recipe), "--out", str(out), "-q"]))
    assert "edited or damaged" in line


@pytest.mark.parametrize("yaml_text,phrase", [
    ("task: mytask\ndataset_path: json\nnum_fewshot: [1\n", "not valid YAML at line"),
    ("task: mytask\ndataset_path: json\nnum_fewshot: many\n", "'num_fewshot'"),
    ("- task: mytask\n", "not a task"),
    ("task: mytask\noutput_type: guess\n", "'output_type'"),
])
def test_a_bad_task_yaml_is_one_line_not_silently_skipped(tiny_dirs, tmp_path, capsys, yaml_text, phrase):
    pytest.importorskip("lm_eval")
    d = tmp_path / "tasks"
    d.mkdir()
    (d / "mytask.yaml").write_text(yaml_text)
    line = one_line_error(capsys, main(["eval", str(tiny_dirs["llama"]), "--tasks", "mytask", "--task-dir", str(d),
                                        "-q"]))
    assert "mytask.yaml" in line and phrase in line


def test_task_dir_code_is_announced(tmp_path, capsys):
    from llmprune.eval.zeroshot import check_task_dir

    (tmp_path / "t.yaml").write_text("task: t\ndataset_path: json\nprocess_docs: !function utils.process\n")
    assert check_task_dir(str(tmp_path)) == [tmp_path / "t.yaml"]


def test_disk_full_while_saving_is_one_line_and_loses_nothing(tiny_dirs, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    out = tmp_path / "p"
    args = ["prune", str(tiny_dirs["llama"]), "--method", "magnitude", "--sparsity", "0.5", "--out", str(out), "-q"]
    assert main(args) == 0
    before = (out / "model.safetensors").read_bytes()

    def full(self, d, **kw):
        (d / "model.safetensors").write_bytes(b"half")
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    capsys.readouterr()
    line = one_line_error(capsys, main([*args, "--overwrite"]))
    assert "no space left" in line and str(out) in line
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # no temp dir left


def test_a_malicious_pickled_checkpoint_is_one_line_and_never_runs(model_copy, tmp_path, capsys):
    import pickle

    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (model_copy / "model.safetensors").unlink()
    with open(model_copy / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": Evil()}, f)
    line = one_line_error(capsys, main(["eval", str(model_copy), *EVAL]))
    assert "refused to load the pickled weights" in line and not marker.exists()


def test_report_into_a_closed_pipe_is_quiet(pruned):
    code = "import sys\nfrom llmprune.cli import main\nsys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": REPO_SRC}
    p = subprocess.Popen([sys.executable, "-c", code, "report", str(pruned)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # `| head` that has already gone
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and "Traceback" not in err and "Error" not in err, err


# ---- nothing left behind, nothing recorded that did not happen ----------------------------------------

def test_a_relative_resume_dir_is_removed_after_the_run(pruned, tmp_path, monkeypatch, capsys):
    from llmprune.models.loading import load_model
    from llmprune.recover import recover

    monkeypatch.setenv("LLMPRUNE_DATA_DIR", str(Path(os.environ["LLMPRUNE_DATA_DIR"]).resolve()))
    monkeypatch.chdir(tmp_path)
    half, tok = load_model(str(pruned))
    recover(half, tok, steps=2, seqlen=32, checkpoint_every=1, work_dir="again.ckpt", until=1, progress=False)
    assert (tmp_path / "again.ckpt").is_dir()
    assert main(["recover", str(pruned), "--resume", "again.ckpt", "--out", "again", "--steps", "2",
                 "--seqlen", "32", "--checkpoint-every", "1", "-q"]) == 0
    assert (tmp_path / "again").is_dir() and not (tmp_path / "again.ckpt").exists()


def test_resume_with_another_prior_is_refused(tiny_dirs, tmp_path, capsys, mask_file):
    from llmprune.maskllm import maskllm
    from llmprune.models.loading import load_model

    model, tok = load_model(str(tiny_dirs["llama"]))
    maskllm(model, tok, pattern="2:4", steps=2, seqlen=32, checkpoint_every=1, prior="magnitude",
            work_dir=tmp_path / "o.ckpt", until=1, progress=False)
    capsys.readouterr()
    line = one_line_error(capsys, main(["maskllm", str(tiny_dirs["llama"]), "--pattern", "2:4", "--prior", "wanda",
                                        "--steps", "2", "--seqlen", "32", "--resume", str(tmp_path / "o.ckpt"),
                                        "--out", str(tmp_path / "o"), "-q"]))
    assert "prior 'magnitude" in line and "not 'wanda" in line and not (tmp_path / "o").exists()


def test_a_chain_eval_window_beyond_the_context_is_refused_before_any_stage(tiny_dirs, tmp_path, capsys,
                                                                            monkeypatch):
    import llmprune.chain.stages as stages

    monkeypatch.setattr(stages, "run_stage", lambda *a: pytest.fail("a stage ran"))
    recipe = tmp_path / "c.yaml"
    recipe.write_text(f"model: {tiny_dirs['llama']}\nstages:\n  - prune: {{method: magnitude, sparsity: 0.5}}\n"
                      "  - eval: {ppl: wikitext2, ppl_seqlen: 4096}\n")
    line = one_line_error(capsys, main(["run", str(recipe), "--out", str(tmp_path / "o"), "-q"]))
    assert "ppl_seqlen 4096 is longer than the model's context (256 tokens)" in line
    assert not (tmp_path / "o").exists()
