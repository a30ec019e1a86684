"""A whole structured-pruning job: check → load → calibrate → measure → prune → save → measure.

What the ``llmprune structured`` command runs. Every check that needs no model (options,
evaluation arguments, data files, the output directory, the device) runs before the model
loads; the model's own checks (:func:`~llmprune.structured.api.plan_structured`) before any
calibration. The saved directory is written atomically; the final numbers (PPL and speed after)
replace its ``pruning.json`` once measured.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
import yaml
from torch import nn

from llmprune.config import resolve_device
from llmprune.data.calibration import calibration_windows
from llmprune.data.sources import load_corpus
from llmprune.errors import LLMPruneError
from llmprune.eval.perplexity import check_eval_args, check_eval_data, eval_names
from llmprune.eval.perplexity import evaluate as evaluate_ppl
from llmprune.eval.placement import check_device
from llmprune.export.save import check_output_dir, output_lock, save_pruned, update_report
from llmprune.models.loading import check_model_exists, load_model
from llmprune.structured.api import StructuredResult, _options, plan_structured, structured
from llmprune.structured.speed import measure_speed


def structured_job(model: str | nn.Module, config=None, *, tokenizer=None, ids: torch.Tensor | None = None,
                   ppl: list[str] | str = (), ppl_seqlen: int | None = None, max_windows: int | None = None,
                   speed: bool = False, out: str | None = None, overwrite: bool = False,
                   device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
                   progress: bool = True, **overrides: Any) -> StructuredResult:
    """Load ``model`` (a name/path, or a loaded model plus ``tokenizer``), prune it as ``config``
    (:class:`StructuredOptions` or a dict, plus ``overrides``) says, and report.

    ``ppl``: datasets for perplexity before and after (window ``ppl_seqlen``, default the
    calibration seqlen); ``speed``: prefill / decode tokens/s before and after, measured in
    this process where the model lives; ``out``: save the pruned model there.
    """
    options = _options(config, overrides)
    dev = check_device(resolve_device(device))
    names = eval_names(ppl) if ppl else []
    seqlen = ppl_seqlen or options.seqlen
    if names:
        check_eval_args(seqlen, max_windows)
    corpora = check_eval_data(names)
    inputs = [model] if isinstance(model, str) else []
    if ids is None:
        inputs.append(options.calib)
    corpus = load_corpus(options.calib, "train") if ids is None else None
    with contextlib.ExitStack() as stack:
        if out:
            check_output_dir(out, overwrite, inputs)
            stack.enter_context(output_lock(out))
        if isinstance(model, str):
            check_model_exists(model)
            name = model
            model, tokenizer = load_model(model, device=dev, dtype=dtype, trust_remote_code=trust_remote_code)
        else:
            name = type(model).__name__
            if tokenizer is None and (ids is None or names):
                raise LLMPruneError("pass tokenizer= along with a loaded model")
        plan_structured(model, options)  # the model's own checks, before any calibration
        timings: dict[str, float] = {}
        if ids is None:
            t0 = time.perf_counter()
            ids = calibration_windows(corpus, tokenizer, options.nsamples, options.seqlen, options.seed)
            timings["calibrate_s"] = time.perf_counter() - t0
        before = _measure(model, tokenizer, names, seqlen, max_windows, corpora, speed, dev, progress)
        result = structured(model, tokenizer, options, ids=ids, device=dev, progress=progress)
        report = result.report
        report["model"] = {"name": name, "class": type(model).__name__}
        report["device"] = dev
        report["timings"].update(timings)
        report["ppl"] = {"before": before.get("ppl", {}), "after": {}}
        report["speed"] = {"before": before.get("speed"), "after": None}
        saved = None
        if out:  # saved before the final measurements: a failure there loses nothing
            recipe = yaml.safe_dump({"structured": options.model_dump()}, sort_keys=False, allow_unicode=True)
            saved = save_pruned(model, tokenizer, out, report, recipe, overwrite, inputs=inputs)
        after = _measure(model, tokenizer, names, seqlen, max_windows, corpora, speed, dev, progress)
        report["ppl"]["after"] = after.get("ppl", {})
        report["speed"]["after"] = after.get("speed")
        if speed:
            report["speed"]["decode_speedup"] = after["speed"]["decode_tok_s"] / before["speed"]["decode_tok_s"]
            report["speed"]["prefill_speedup"] = after["speed"]["prefill_tok_s"] / before["speed"]["prefill_tok_s"]
        if saved is not None:
            update_report(saved, report)
    return result


def _measure(model, tokenizer, names, seqlen, max_windows, corpora, speed, device, progress) -> dict:
    out: dict[str, Any] = {}
    if names:
        out["ppl"] = evaluate_ppl(model, tokenizer, names, seqlen, max_windows, progress, corpora=corpora,
                                  device=device)
    if speed:
        out["speed"] = measure_speed(model)
    return out
