"""Every command, every input file it reads, five kinds of bad: empty, truncated, random bytes,
the wrong type, hostile. Each must be one line (exit 2) before any heavy work (no weights read,
no training, no layer walk), with nothing written and nothing deleted.

The inputs: a model directory, a mask file, calibration / training / evaluation text, a prune
recipe, a chained recipe, an output's own ``pruning.json``, a zero-shot task folder and a
training checkpoint to resume.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from llmprune.cli import main
from llmprune.masks import MaskSet

VARIANTS = ("empty", "truncated", "random", "wrong-type", "hostile")
RANDOM = bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))


class Evil:
    """Unpickling this would create ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _cut(data: bytes) -> bytes:
    return data[: len(data) // 2]


# ---- one maker per input kind: (variant, good files, where) -> path of the bad input ------------

def bad_model(v: str, good: dict, d: Path) -> Path:
    m = d / "model"
    shutil.copytree(good["model"], m)
    st, cfg = m / "model.safetensors", m / "config.json"
    if v == "empty":
        cfg.write_bytes(b"")
    elif v == "truncated":
        st.write_bytes(_cut(st.read_bytes()))
    elif v == "random":
        st.write_bytes(RANDOM)
    elif v == "wrong-type":
        cfg.write_text("[1, 2, 3]")
    else:  # its own code, behind a config that asks for it
        c = json.loads(cfg.read_text())
        c.update(model_type="evil", auto_map={"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"})
        cfg.write_text(json.dumps(c))
        (m / "evil.py").write_text(f"open({str(good['marker'])!r}, 'w').close()\n")
    return m


def bad_config(v: str, good: dict, d: Path) -> Path:
    """A model directory as ``masks inspect --model`` reads it: only its config."""
    if v not in ("truncated", "random"):
        return bad_model(v, good, d)
    m = bad_model("wrong-type", good, d)
    cfg = (Path(good["model"]) / "config.json").read_bytes()
    (m / "config.json").write_bytes(_cut(cfg) if v == "truncated" else RANDOM)
    return m


def bad_masks(v: str, good: dict, d: Path) -> Path:
    f = d / "bad.npz"
    if v == "empty":
        f.write_bytes(b"")
    elif v == "truncated":
        f.write_bytes(_cut(good["masks"].read_bytes()))
    elif v == "random":
        f.write_bytes(RANDOM)
    elif v == "wrong-type":  # a float array where packed bits belong
        np.savez(f, **{"model.layers.0.mlp.up_proj.weight.mask": np.ones(8, dtype=np.float32)})
    else:  # a pickled object inside the archive
        with open(f, "wb") as fh:
            np.savez(fh, **{"model.layers.0.mlp.up_proj.weight.mask": np.array([Evil(good["marker"])], dtype=object)})
    return f


def bad_text(v: str, good: dict, d: Path) -> Path:
    if v == "empty":
        (f := d / "bad.txt").write_bytes(b"")
    elif v == "truncated":
        (f := d / "bad.jsonl.gz").write_bytes(_cut(gzip.compress(b'{"text": "a document"}\n' * 400)))
    elif v == "random":
        (f := d / "bad.txt").write_bytes(RANDOM)
    elif v == "wrong-type":
        (f := d / "bad.jsonl").write_text('["a list", "not an object"]\n')
    else:  # a JSON bomb: nesting deeper than any parser's recursion
        (f := d / "bad.jsonl").write_text("[" * 200_000 + "]" * 200_000 + "\n")
    return f


def bad_recipe(v: str, good: dict, d: Path) -> Path:
    f = d / "bad.yaml"
    f.write_bytes({"empty": b"", "truncated": b"method: sparsegpt\nsparsity: [0.5\n", "random": RANDOM,
                   "wrong-type": b"- method: wanda\n- sparsity: 0.5\n",
                   "hostile": f"method: !!python/object/apply:os.system ['touch {good['marker']}']\n".encode()}[v])
    return f


def bad_chain_recipe(v: str, good: dict, d: Path) -> Path:
    f = d / "bad.yaml"
    f.write_bytes({"empty": b"", "truncated": f"model: {good['model']}\nstages:\n  - prune: {{method: wan".encode(),
                   "random": RANDOM, "wrong-type": f"model: {good['model']}\nstages: 5\n".encode(),
                   "hostile": f"model: {good['model']}\nout: {d / 'victim'}\nstages:\n  - prune: "
                              f"{{method: magnitude, sparsity: 0.5}}\n".encode()}[v])
    return f


def bad_report(v: str, good: dict, d: Path) -> Path:
    """A directory whose ``pruning.json`` is damaged (the rest of the pruned output is intact)."""
    out = d / "pruned"
    shutil.copytree(good["pruned"], out)
    f = out / "pruning.json"
    report = json.loads(f.read_text())
    f.write_bytes({"empty": b"", "truncated": _cut(f.read_bytes()), "random": RANDOM,
                   "wrong-type": json.dumps({**report, "recipe": [1], "layers": "all", "timings": 3}).encode(),
                   "hostile": ("[" * 200_000 + "]" * 200_000).encode()}[v])
    return out


def bad_chain_state(v: str, good: dict, d: Path) -> Path:
    """A chain output directory (``run --out``) whose own ``pruning.json`` is damaged."""
    out = d / "chain"
    (out / "stages").mkdir(parents=True)
    victim = d / "victim"
    victim.mkdir()
    (victim / "pruning.json").write_text("{}")
    state = {"kind": "chain", "stages": [{"index": 1, "kind": "prune", "dir": "../victim", "hash": "x",
                                          "status": "done"}]}
    (out / "pruning.json").write_bytes({"empty": b"", "truncated": _cut(json.dumps(state).encode()),
                                        "random": RANDOM, "wrong-type": b'{"kind": "chain", "stages": {"a": 1}}',
                                        "hostile": json.dumps(state).encode()}[v])
    return out


def bad_task_dir(v: str, good: dict, d: Path) -> Path:
    t = d / "tasks"
    t.mkdir()
    head = "task: mytask\ndataset_path: json\noutput_type: multiple_choice\n"
    content = {"empty": None, "truncated": head + "dataset_kwargs: {data_files: {test: [x",
               "random": RANDOM, "wrong-type": head + "num_fewshot: many\n",
               "hostile": head + f"description: !!python/object/apply:os.system ['touch {good['marker']}']\n"}[v]
    if content is not None:
        (t / "mytask.yaml").write_bytes(content if isinstance(content, bytes) else content.encode())
    return t


def bad_resume(v: str, good: dict, d: Path) -> Path:
    ck = d / "run.ckpt"
    step = ck / "checkpoints" / "step-00000001"
    step.mkdir(parents=True)
    (ck / "checkpoints" / "latest").write_text("step-00000001")
    (step / "state.json").write_text(json.dumps({"fingerprint": {}, "options": {}, "step": 1}))
    (step / "state.safetensors").write_bytes(good["tensors"].read_bytes())
    if v == "empty":
        (step / "state.json").write_bytes(b"")
    elif v == "truncated":
        (step / "state.safetensors").write_bytes(_cut(good["tensors"].read_bytes()))
    elif v == "random":
        (step / "state.safetensors").write_bytes(RANDOM)
    elif v == "wrong-type":
        (step / "state.json").write_text("[1, 2]")
    else:  # a pointer out of the folder
        (ck / "checkpoints" / "latest").write_text("../../../pruned")
    return ck


# ---- the cases: command line with the bad input at X ---------------------------------------------

P = ["--method", "magnitude", "--sparsity", "0.5"]
DATA = ["--nsamples", "2", "--seqlen", "32"]
TRAIN = ["--steps", "1", "--seqlen", "32"]
CASES: list[tuple[str, Callable, Callable[[dict, Path], list[str]]]] = [
    ("prune/model", bad_model, lambda g, x: ["prune", str(x), *P, "--out", str(g["out"])]),
    ("prune/calib", bad_text, lambda g, x: ["prune", str(g["model"]), "--method", "wanda", "--sparsity", "0.5",
                                            "--calib", str(x), *DATA, "--out", str(g["out"])]),
    ("prune/ppl", bad_text, lambda g, x: ["prune", str(g["model"]), *P, "--ppl", str(x), "--out", str(g["out"])]),
    ("prune/recipe", bad_recipe, lambda g, x: ["prune", str(g["model"]), "--recipe", str(x), "--out", str(g["out"])]),
    ("prune/task-dir", bad_task_dir, lambda g, x: ["prune", str(g["model"]), *P, "--tasks", "mytask",
                                                   "--task-dir", str(x), "--out", str(g["out"])]),
    ("eval/model", bad_model, lambda g, x: ["eval", str(x), "--seqlen", "32", "--json", str(g["out"])]),
    ("eval/ppl", bad_text, lambda g, x: ["eval", str(g["model"]), "--ppl", str(x), "--seqlen", "32"]),
    ("eval/task-dir", bad_task_dir, lambda g, x: ["eval", str(g["model"]), "--tasks", "mytask", "--task-dir", str(x)]),
    ("report/pruning.json", bad_report, lambda g, x: ["report", str(x)]),
    ("masks export/model", bad_model, lambda g, x: ["masks", "export", str(x), "--out", str(g["out"])]),
    ("masks apply/model", bad_model, lambda g, x: ["masks", "apply", str(x), str(g["masks"]), "--out", str(g["out"])]),
    ("masks apply/masks", bad_masks, lambda g, x: ["masks", "apply", str(g["model"]), str(x), "--out", str(g["out"])]),
    ("masks inspect/masks", bad_masks, lambda g, x: ["masks", "inspect", str(x), "--model", str(g["model"])]),
    ("masks inspect/model", bad_config, lambda g, x: ["masks", "inspect", str(g["masks"]), "--model", str(x)]),
    ("masks inspect/against", bad_masks, lambda g, x: ["masks", "inspect", str(g["masks"]), "--against", str(x)]),
    ("maskllm/model", bad_model, lambda g, x: ["maskllm", str(x), "--prior", "none", *TRAIN, "--out", str(g["out"])]),
    ("maskllm/train-data", bad_text, lambda g, x: ["maskllm", str(g["model"]), "--prior", "none", "--train-data",
                                                   str(x), *TRAIN, "--out", str(g["out"])]),
    ("maskllm/prior", bad_masks, lambda g, x: ["maskllm", str(g["model"]), "--prior", str(x), *TRAIN,
                                               "--out", str(g["out"])]),
    ("maskllm/resume", bad_resume, lambda g, x: ["maskllm", str(g["model"]), "--prior", "none", "--resume", str(x),
                                                 *TRAIN, "--out", str(g["out"])]),
    ("maskllm/ppl", bad_text, lambda g, x: ["maskllm", str(g["model"]), "--prior", "none", "--ppl", str(x), *TRAIN,
                                            "--out", str(g["out"])]),
    ("structured/model", bad_model, lambda g, x: ["structured", str(x), "--method", "depth", "--layers", "1",
                                                  *DATA, "--out", str(g["out"])]),
    ("structured/calib", bad_text, lambda g, x: ["structured", str(g["model"]), "--method", "depth", "--layers", "1",
                                                 "--calib", str(x), *DATA, "--out", str(g["out"])]),
    ("structured/ppl", bad_text, lambda g, x: ["structured", str(g["model"]), "--method", "depth", "--layers", "1",
                                               "--ppl", str(x), *DATA, "--out", str(g["out"])]),
    ("recover/model", bad_model, lambda g, x: ["recover", str(x), *TRAIN, "--out", str(g["out"])]),
    ("recover/pruning.json", bad_report, lambda g, x: ["recover", str(x), *TRAIN, "--out", str(g["out"])]),
    ("recover/masks", bad_masks, lambda g, x: ["recover", str(g["pruned"]), "--masks", str(x), *TRAIN,
                                               "--out", str(g["out"])]),
    ("recover/train-data", bad_text, lambda g, x: ["recover", str(g["pruned"]), "--train-data", str(x), *TRAIN,
                                                   "--out", str(g["out"])]),
    ("recover/resume", bad_resume, lambda g, x: ["recover", str(g["pruned"]), "--resume", str(x), *TRAIN,
                                                 "--out", str(g["out"])]),
    ("run/recipe", bad_chain_recipe, lambda g, x: ["run", str(x), "--out", str(g["out"])]),
    ("run/pruning.json", bad_chain_state, lambda g, x: ["run", str(g["chain_recipe"]), "--out", str(x)]),
    ("bench-speed/model", bad_model, lambda g, x: ["bench-speed", str(x), "--json", str(g["out"])]),
]


@pytest.fixture(scope="module")
def good_files(tiny_dirs, tmp_path_factory) -> dict:
    from transformers import AutoModelForCausalLM

    from llmprune.train.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("good")
    masks = d / "m.npz"
    MaskSet.from_model(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])).save(masks)
    pruned = d / "pruned"
    assert main(["prune", str(tiny_dirs["llama"]), "--method", "magnitude", "--pattern", "2:4", "--out", str(pruned),
                 "-q"]) == 0
    ckpt = save_checkpoint(d / "ck", 1, {"w": __import__("torch").ones(4)}, {"step": 1})
    chain_recipe = d / "chain.yaml"
    chain_recipe.write_text(f"model: {tiny_dirs['llama']}\nstages:\n  - prune: {{method: magnitude, sparsity: 0.5}}\n")
    return {"model": tiny_dirs["llama"], "masks": masks, "pruned": pruned, "tensors": ckpt / "state.safetensors",
            "chain_recipe": chain_recipe}


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if not p.is_symlink()}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_hostile_input_is_one_line_before_heavy_work(case, variant, good_files, tmp_path, capsys, no_heavy_work):
    if "task-dir" in case:
        pytest.importorskip("lm_eval")
    _, make, argv = next(c for c in CASES if c[0] == case)
    marker = tmp_path / "PWNED"
    good = {**good_files, "out": tmp_path / "out", "marker": marker}
    bad = make(variant, good, tmp_path)
    watched = [tmp_path, Path(good_files["model"]), Path(good_files["masks"]).parent]
    before = [_snapshot(w) for w in watched]
    rc = main([*argv(good, bad), "-q"] if case.split("/")[0] not in ("report", "masks export", "masks apply",
                                                                       "masks inspect", "bench-speed")
              else argv(good, bad))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("llmprune: note:")]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("llmprune: error: "), err
    assert not marker.exists(), "hostile input ran code"
    assert [_snapshot(w) for w in watched] == before, "a file was written or deleted"
