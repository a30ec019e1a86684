"""Zero-shot tasks (BoolQ, ARC, HellaSwag, ...) through EleutherAI's ``lm-eval``.

lm-eval is an optional extra (``pip install 'llmprune[eval]'``) imported only here, and only
when tasks are asked for. Tasks are checked and their data loaded by :func:`load_tasks` before
any model loads (unknown names, a task directory that is not one, data that is not available
offline all fail there in one line); :func:`evaluate_tasks` then scores an already loaded model
through ``lm_eval.simple_evaluate`` with an ``HFLM`` wrapping it, and returns a JSON-ready
``{task: {"version", "num_fewshot", "samples", "metrics": {"acc", "acc_stderr", ...}}}``.

User tasks (e.g. a multiple-choice set in a local ``.jsonl``) are lm-eval task YAMLs in a
folder given as ``task_dir`` (``--task-dir``), e.g. ``dataset_path: json`` with
``dataset_kwargs: {data_files: {test: /path/data.jsonl}}``.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import math
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from llmprune.errors import LLMPruneError
from llmprune.eval.placement import choose_placement, model_device, placed
from llmprune.options import CommaList, Options, PositiveInt

INSTALL_HINT = "zero-shot tasks need lm-eval: pip install 'llmprune[eval]'"
HUB_PROBE_TIMEOUT_S = 3.0


class TaskOptions(Options):
    """Zero-shot task settings, shared by ``llmprune eval`` and every job's run options."""

    tasks: CommaList = Field(default_factory=list, description="zero-shot tasks through lm-eval "
                             "(pip install 'llmprune[eval]'), e.g. boolq,arc_easy,hellaswag")
    task_dir: str | None = Field(None, description="folder of your own lm-eval task YAMLs "
                                 "(e.g. on local .jsonl files), added to the known tasks. A YAML's "
                                 "'!function' runs that folder's Python (lm-eval's behaviour): only "
                                 "point it at folders you trust")
    task_limit: PositiveInt | None = Field(None, description="score only the first K examples "
                                           "of each task (a quick look, not a reportable number)")
    task_batch_size: PositiveInt = Field(8, description="examples per forward in the zero-shot tasks")


def _lm_eval() -> Any:
    """The ``lm_eval`` package, or one line saying how to install it."""
    try:
        import lm_eval
        import lm_eval.tasks  # noqa: F401 -- the TaskManager lives here
    except ImportError:
        raise LLMPruneError(INSTALL_HINT) from None
    if not hasattr(lm_eval.tasks.TaskManager, "load"):  # TaskManager.load came with lm-eval 0.4.1x
        raise LLMPruneError(f"lm-eval {getattr(lm_eval, '__version__', '?')} is too old for llmprune's "
                            f"zero-shot tasks: pip install -U 'llmprune[eval]'")
    return lm_eval


@functools.lru_cache(maxsize=4)
def _manager(task_dir: str | None, defaults: bool) -> Any:
    """A ``TaskManager`` (indexing lm-eval's ~15k built-in tasks takes seconds: built once)."""
    lm_eval = _lm_eval()
    return lm_eval.tasks.TaskManager(include_path=task_dir, include_defaults=defaults)


OUTPUT_TYPES = ("loglikelihood", "loglikelihood_rolling", "generate_until", "multiple_choice")


class _FunctionTag(str):
    """A ``!function module.name`` value of an lm-eval task YAML (code in the task folder)."""


class _TaskYamlLoader(yaml.SafeLoader):
    """The safe loader, plus lm-eval's ``!function`` tag read as a marker (nothing is imported)."""


_TaskYamlLoader.add_constructor("!function", lambda loader, node: _FunctionTag(loader.construct_scalar(node)))


class _TaskYaml(BaseModel):
    """The keys of an lm-eval task YAML whose type lm-eval relies on (the rest pass through);
    lm-eval itself skips a file it cannot parse without a word, so a typo would lose a task."""

    model_config = ConfigDict(extra="allow", strict=True)
    task: str | list[str | dict[str, Any]] | None = None
    dataset_path: str | None = None
    dataset_name: str | None = None
    dataset_kwargs: dict[str, Any] | None = None
    training_split: str | None = None
    validation_split: str | None = None
    test_split: str | None = None
    fewshot_split: str | None = None
    num_fewshot: int | None = None
    output_type: Literal[OUTPUT_TYPES] | None = None  # type: ignore[valid-type]
    metric_list: list[dict[str, Any]] | None = None
    generation_kwargs: dict[str, Any] | None = None
    repeats: int | None = None
    description: str | None = None
    include: str | None = None


def check_task_dir(task_dir: str) -> list[Path]:
    """Read every task YAML under ``task_dir`` as lm-eval will, and refuse (one line, naming the
    file) a syntax error or a key of the wrong type. Returns the files whose ``!function`` will run
    the folder's own Python, which the caller announces."""
    runs_code = []
    for f in sorted([*Path(task_dir).rglob("*.yaml"), *Path(task_dir).rglob("*.yml")]):
        try:
            data = yaml.load(f.read_text(encoding="utf-8"), Loader=_TaskYamlLoader)  # noqa: S506 -- safe loader
        except (OSError, UnicodeDecodeError) as e:
            raise LLMPruneError(f"--task-dir: {f} is unreadable ({e})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise LLMPruneError(f"--task-dir: {f} is not valid YAML{where} "
                                f"({getattr(e, 'problem', None) or type(e).__name__})") from None
        if data is None:
            continue
        if not isinstance(data, dict):
            raise LLMPruneError(f"--task-dir: {f} holds a YAML {type(data).__name__}, not a task (a mapping of "
                                "key: value)")
        try:
            _TaskYaml.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            key = ".".join(str(x) for x in err["loc"][:1])
            raise LLMPruneError(f"--task-dir: {f}: {key!r} {err['msg'].lower()} (got {type(data.get(key)).__name__})"
                                ) from None
        if any(isinstance(v, _FunctionTag) for v in _values(data)):
            runs_code.append(f)
    return runs_code


def _values(data: Any):
    if isinstance(data, dict):
        for v in data.values():
            yield from _values(v)
    elif isinstance(data, list):
        for v in data:
            yield from _values(v)
    else:
        yield data


def task_manager(names: list[str], task_dir: str | None = None) -> Any:
    """The manager that knows every name: ``task_dir``'s own when it holds them all (fast),
    else the built-ins plus ``task_dir``. Unknown names are one error, with a suggestion."""
    if task_dir is not None:
        d = Path(task_dir).expanduser()
        if not d.is_dir():
            raise LLMPruneError(f"--task-dir {task_dir} is not a directory (a folder of lm-eval task YAMLs)")
        task_dir = str(d.resolve())
        for f in check_task_dir(task_dir):
            print(f"llmprune: note: {f} uses '!function': lm-eval will run Python code from {task_dir}",
                  file=sys.stderr)
        local = _manager(task_dir, False)
        if all(n in local.all_tasks for n in names):
            return local
    tm = _manager(task_dir, True)
    unknown = [n for n in names if n not in tm.all_tasks]
    if unknown:
        close = difflib.get_close_matches(unknown[0], tm.all_tasks, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        where = f" (lm-eval's tasks and {task_dir})" if task_dir else " (lm-eval's tasks; --task-dir adds your own)"
        raise LLMPruneError(f"unknown task {unknown[0]!r}{where}{hint}")
    return tm


def _hub_reachable(endpoint: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub opens within ``timeout`` (name lookup included:
    it runs in a thread because ``getaddrinfo`` itself has no timeout)."""
    url = urlparse(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


@contextlib.contextmanager
def offline_unless_reachable():
    """Hub offline mode for the body when the hub cannot be reached, so that a task's data comes
    from the local ``datasets`` cache or fails at once, instead of after ~25 s of retries per
    file. Nothing changes when offline mode is already on or the hub answers."""
    import datasets.config
    import huggingface_hub.constants as hub

    if datasets.config.HF_HUB_OFFLINE or _hub_reachable(hub.ENDPOINT):
        yield
        return
    # Both libraries read these module constants at call time (set once from the environment).
    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved


def _is_offline_error(e: BaseException) -> bool:
    """A connection failure or a file missing from the offline cache (not a bad local file)."""
    names = " ".join(c.__name__ for c in type(e).__mro__)
    return isinstance(e, ConnectionError) or any(
        k in names for k in ("OfflineModeIsEnabled", "LocalEntryNotFound", "HTTPError", "Timeout"))


def _data_error(name: str, tm: Any, e: BaseException) -> LLMPruneError:
    """One line: which task, which data, why, and what to do about it."""
    cfg = getattr(tm.task_index.get(name), "cfg", None) or {}
    source = cfg.get("dataset_path", "?") if isinstance(cfg, dict) else "?"
    why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    if _is_offline_error(e):
        return LLMPruneError(
            f"task {name}: its data ({source}) is not in the local datasets cache and the Hugging "
            f"Face hub cannot be reached ({why}); fetch it once where the hub is reachable "
            f"(HF_DATASETS_CACHE), or define the task on local files with --task-dir")
    return LLMPruneError(f"task {name}: cannot load it (data: {source}): {why}")


@dataclass
class TaskSet:
    """Tasks checked and with their data loaded, ready for :func:`evaluate_tasks`."""

    names: list[str]
    objects: list[Any]  # lm-eval Task / Group objects, one or more per name (a tag expands)
    manager: Any
    leaves: list[str] = field(default_factory=list)  # the tasks that are scored


def task_names(tasks: list[str] | str | None) -> list[str]:
    """``"boolq,rte"`` or a list → names, without blanks or repeats (order kept)."""
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks or [])
    return list(dict.fromkeys(t for t in names if t))


def load_tasks(tasks: list[str] | str, task_dir: str | None = None) -> TaskSet:
    """Check the task names and load each task's data, before any model is loaded.

    Raises :class:`LLMPruneError` when lm-eval is missing, a name is unknown, ``task_dir`` is
    not a folder, or a task's data cannot be had (e.g. offline and not cached), naming the task.
    """
    names = task_names(tasks)
    if not names:
        raise LLMPruneError("no tasks given (--tasks); e.g. --tasks boolq,arc_easy")
    tm = task_manager(names, task_dir)
    objects, owner = [], {}
    with offline_unless_reachable(), _quiet_lm_eval():
        for name in names:
            try:
                loaded = tm.load([name])  # builds the task: downloads / reads its data
            except Exception as e:  # datasets and the hub raise many kinds; each becomes one line
                raise _data_error(name, tm, e) from e
            for leaf in loaded["tasks"]:  # lm-eval refuses this too, but only once the model is loaded
                if leaf in owner:
                    raise LLMPruneError(f"task {leaf} is in both {owner[leaf]} and {name}; drop one")
                owner[leaf] = name
            groups = loaded["groups"]
            objects += [groups[name]] if name in groups else list(loaded["tasks"].values())
    return TaskSet(names, objects, tm, list(owner))


@contextlib.contextmanager
def _quiet_lm_eval(level: int = logging.ERROR):
    """lm-eval logs a warning per task and per option it defaults; keep the user's screen for
    our own lines."""
    log = logging.getLogger("lm_eval")
    old = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(old)


def _number(v: Any) -> float | None:
    """lm-eval writes ``"N/A"`` for a stderr it did not compute; JSON wants a number or null."""
    if isinstance(v, int | float) and not isinstance(v, bool):
        return float(v) if math.isfinite(v) else None
    return None


def _metrics(row: dict) -> dict[str, float | None]:
    """``{"acc,none": .6, "acc_stderr,none": .01}`` → ``{"acc": .6, "acc_stderr": .01}``
    (a metric under a named filter keeps it: ``exact_match,strict-match``)."""
    out = {}
    for key, v in row.items():
        if "," not in key:  # alias, name, sample_len: not metrics
            continue
        metric, filt = key.split(",", 1)
        out[metric if filt == "none" else key] = _number(v)
    return out


def summarize(results: dict, leaves: list[str]) -> dict[str, dict]:
    """The JSON-ready part of ``simple_evaluate``'s results, per task (and group)."""
    out = {}
    rows = {**results.get("results", {}), **results.get("groups", {})}
    for name, row in rows.items():
        n = results.get("n-samples", {}).get(name, {})
        out[name] = {
            "version": results.get("versions", {}).get(name),
            "num_fewshot": results.get("n-shot", {}).get(name),
            "samples": n.get("effective"),
            "metrics": _metrics(row),
            "higher_is_better": results.get("higher_is_better", {}).get(name, {}),
            "group": name not in leaves,
        }
    return out


def context_length_of(model: nn.Module) -> int:
    cfg = model.config
    return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048)


@contextlib.contextmanager
def _rng_kept():
    """simple_evaluate seeds Python's, NumPy's and torch's global generators (for lm-eval's
    reproducibility); put them back after, so what runs next (e.g. MaskLLM's Gumbel noise) draws
    the same numbers with or without tasks."""
    import random

    import numpy as np

    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@torch.no_grad()
def evaluate_tasks(model: nn.Module, tokenizer, task_set: TaskSet, batch_size: int = 8,
                   limit: int | None = None, device: str | torch.device | None = None,
                   progress: bool = True) -> dict[str, dict]:
    """Score ``model`` on the tasks of ``task_set`` with lm-eval; see :func:`summarize`.

    ``device``: where the forward runs (None: where the model is); the model is back where it
    was afterwards (:mod:`llmprune.eval.placement`). ``limit``: the first K examples of each task.
    """
    if tokenizer is None:
        raise LLMPruneError("zero-shot tasks need the model's tokenizer; pass tokenizer=")
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    mode = choose_placement(model, device, batch_size, context_length_of(model))
    was_training = model.training
    model.eval()
    try:
        with placed(model, device, mode), _quiet_lm_eval(), _rng_kept():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            lm._device = model_device(model)  # HFLM read model.device before any placement
            # lm-eval has no quiet switch for its per-request progress bar; its method has one.
            lm.loglikelihood = functools.partial(lm.loglikelihood, disable_tqdm=not progress)
            results = lm_eval.simple_evaluate(
                model=lm, tasks=task_set.objects, task_manager=task_set.manager, limit=limit,
                log_samples=False, batch_size=batch_size)
    finally:
        model.train(was_training)
    return summarize(results, task_set.leaves)


def format_tasks(tasks: dict[str, dict]) -> list[str]:
    """One line per task: version, shots, samples and its accuracies with stderr."""
    lines = []
    for name, r in tasks.items():
        m = r["metrics"]
        shown = [f"{k} {m[k]:.4f}" + (f" ± {m[k + '_stderr']:.4f}" if m.get(k + "_stderr") is not None else "")
                 for k in m if not k.endswith("_stderr") and "_stderr," not in k and m[k] is not None]
        lines.append(f"{name} (v{r['version']}, {r['num_fewshot']}-shot, {r['samples']} examples): "
                     + ", ".join(shown))
    return lines
