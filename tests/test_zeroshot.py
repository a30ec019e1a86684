"""Zero-shot tasks through lm-eval: a local multiple-choice task scored by lm-eval equals the
same model's accuracy computed by hand; unknown tasks, missing data and a missing lm-eval
are one-line errors before any model loads."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import llmprune.pipeline as pipeline
from llmprune.cli import main
from llmprune.errors import LLMPruneError
from llmprune.eval import zeroshot
from tests.conftest import tiny_model

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-eval is not installed (pip install 'llmprune[eval]')")

@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Keep the arrow files `datasets` makes of the task data out of the user's cache."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


WORDS = ["cat", "dog", "sun", "moon", "tree", "car", "house", "road", "river", "king", "queen",
         "bird", "ship", "stone", "field", "night"]
LABELS = [0, 1, 2, 3, 1, 3, 0, 2, 2, 0, 3, 1, 3, 2, 1, 0]


def write_task(d: Path, name: str = "tiny_mc", n: int = 16, dataset: dict | None = None) -> Path:
    """A multiple-choice task on a local .jsonl: a question and four one-word choices of
    different lengths (so acc_norm, which divides by the choice's length, can disagree with acc)."""
    d.mkdir(parents=True, exist_ok=True)
    docs = [{"question": f"The {w} is", "choices": [WORDS[(i + 3 + 5 * k) % len(WORDS)] for k in range(4)],
             "label": LABELS[i]} for i, w in enumerate(WORDS[:n])]
    data = d / f"{name}.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in docs) + "\n")
    source = dataset or {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}}
    cfg = {"task": name, **source, "test_split": "test", "output_type": "multiple_choice",
           "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}", "doc_to_target": "label",
           "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                           {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
           "metadata": {"version": 3.0}}
    (d / f"{name}.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    return data


@torch.no_grad()
def by_hand(model, tok, docs: list[dict]) -> tuple[float, float]:
    """acc and acc_norm: each choice's continuation " choice" scored as the sum of its tokens'
    log-probabilities after the question; argmax (plain, or per character of the choice) vs gold."""
    acc = norm = 0
    for doc in docs:
        ctx = tok(doc["question"])["input_ids"]
        lls = []
        for c in doc["choices"]:
            ids = tok(doc["question"] + " " + c)["input_ids"]
            assert ids[: len(ctx)] == ctx
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            lls.append(sum(logp[i - 1, ids[i]].item() for i in range(len(ctx), len(ids))))
        acc += max(range(4), key=lambda k: lls[k]) == doc["label"]
        norm += max(range(4), key=lambda k: lls[k] / len(doc["choices"][k])) == doc["label"]
    return acc / len(docs), norm / len(docs)


@needs_lm_eval
def test_local_task_accuracy_equals_hand_computation(tokenizer, tmp_path):
    data = write_task(tmp_path / "tasks")
    docs = [json.loads(line) for line in data.read_text().splitlines()]
    model = tiny_model("llama", seed=3)
    task_set = zeroshot.load_tasks("tiny_mc", task_dir=str(tmp_path / "tasks"))
    torch.manual_seed(7)
    res = zeroshot.evaluate_tasks(model, tokenizer, task_set, batch_size=3, progress=False)
    drawn = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(drawn, torch.rand(3))  # lm-eval's seeding does not leak into what runs next
    r = res["tiny_mc"]
    acc, acc_norm = by_hand(model, tokenizer, docs)
    assert 0 < acc < 1 and acc != acc_norm  # the check could fail either way
    assert r["metrics"]["acc"] == pytest.approx(acc) and r["metrics"]["acc_norm"] == pytest.approx(acc_norm)
    n = len(docs)
    assert r["metrics"]["acc_stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / (n - 1)))
    assert r["version"] == 3.0 and r["num_fewshot"] == 0 and r["samples"] == n


@needs_lm_eval
def test_cli_eval_writes_tasks_into_the_json_report(tiny_dirs, tmp_path, capsys):
    write_task(tmp_path / "tasks")
    out = tmp_path / "report.json"
    assert main(["eval", str(tiny_dirs["llama"]), "--tasks", "tiny_mc", "--task-dir", str(tmp_path / "tasks"),
                 "--task-limit", "5", "--json", str(out), "-q"]) == 0
    report = json.loads(out.read_text())
    task = report["tasks"]["tiny_mc"]
    assert task["samples"] == 5 and set(task["metrics"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert report["ppl"] == {}  # --tasks alone: no perplexity unless --ppl is given
    assert "tiny_mc (v3.0, 0-shot, 5 examples): acc" in capsys.readouterr().out


@needs_lm_eval
def test_prune_with_tasks_reports_before_and_after(tiny_dirs, tmp_path, capsys):
    write_task(tmp_path / "tasks")
    out = tmp_path / "o"
    assert main(["prune", str(tiny_dirs["llama"]), "--sparsity", "0.5", "--nsamples", "2", "--seqlen", "16",
                 "--tasks", "tiny_mc", "--task-dir", str(tmp_path / "tasks"), "--out", str(out), "-q"]) == 0
    report = json.loads((out / "pruning.json").read_text())
    before, after = report["tasks"]["before"]["tiny_mc"], report["tasks"]["after"]["tiny_mc"]
    assert before["samples"] == after["samples"] == 16
    assert report["recipe"]["tasks"] == ["tiny_mc"]
    assert f"tiny_mc acc (v3.0, 16 examples): dense {before['metrics']['acc']:.4f} -> pruned" in capsys.readouterr().out


@needs_lm_eval
def test_unknown_task_fails_before_loading(tiny_dirs, tmp_path, capsys, monkeypatch):
    write_task(tmp_path / "tasks")
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("loaded"))
    rc = main(["eval", str(tiny_dirs["llama"]), "--tasks", "tiny_mc,boolqq", "--task-dir", str(tmp_path / "tasks"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown task 'boolqq'" in err and "did you mean boolq" in err
    assert len(err.strip().splitlines()) == 1


@needs_lm_eval
def test_builtin_task_without_data_offline_names_the_task(tiny_dirs, capsys, monkeypatch):
    # conftest sets HF_HUB_OFFLINE: boolq's data (super_glue) is neither cached nor reachable.
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("loaded"))
    rc = main(["eval", str(tiny_dirs["llama"]), "--tasks", "boolq", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "task boolq: its data" in err and "cannot be reached" in err and "--task-dir" in err
    assert len(err.strip().splitlines()) == 1


@needs_lm_eval
def test_local_task_on_a_hub_dataset_fails_offline(tmp_path):
    write_task(tmp_path / "tasks", dataset={"dataset_path": "no-such-org/no-such-set"})
    with pytest.raises(LLMPruneError, match="task tiny_mc: its data \\(no-such-org/no-such-set\\)"):
        zeroshot.load_tasks("tiny_mc", task_dir=str(tmp_path / "tasks"))


@needs_lm_eval
def test_missing_data_file_names_the_task(tmp_path):
    data = write_task(tmp_path / "tasks")
    data.unlink()
    with pytest.raises(LLMPruneError, match="task tiny_mc: cannot load it \\(data: json\\)"):
        zeroshot.load_tasks("tiny_mc", task_dir=str(tmp_path / "tasks"))


@needs_lm_eval
def test_a_task_asked_for_twice_fails_before_scoring(tmp_path):
    write_task(tmp_path / "tasks")
    (tmp_path / "tasks" / "group.yaml").write_text(json.dumps({"group": "tiny_group", "task": ["tiny_mc"]}))
    with pytest.raises(LLMPruneError, match="task tiny_mc is in both tiny_group and tiny_mc; drop one"):
        zeroshot.load_tasks("tiny_group,tiny_mc", task_dir=str(tmp_path / "tasks"))
    assert zeroshot.load_tasks(["tiny_group", "tiny_group"], task_dir=str(tmp_path / "tasks")).leaves == ["tiny_mc"]


def test_task_dir_must_be_a_folder(tmp_path):
    with pytest.raises(LLMPruneError, match="is not a directory"):
        zeroshot.load_tasks("tiny_mc", task_dir=str(tmp_path / "nope"))


def test_without_lm_eval_tasks_say_how_to_install(tiny_dirs, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval → ImportError
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("loaded"))
    zeroshot._manager.cache_clear()
    rc = main(["eval", str(tiny_dirs["llama"]), "--tasks", "boolq", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "pip install 'llmprune[eval]'" in err and len(err.strip().splitlines()) == 1


def test_hub_probe_turns_on_offline_mode_only_while_unreachable(monkeypatch):
    import datasets.config
    import huggingface_hub.constants as hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "ENDPOINT", "https://127.0.0.1:9")  # discard port: refused at once
    with zeroshot.offline_unless_reachable():
        assert datasets.config.HF_HUB_OFFLINE and hub.HF_HUB_OFFLINE
    assert not datasets.config.HF_HUB_OFFLINE and not hub.HF_HUB_OFFLINE
