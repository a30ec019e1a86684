"""How the chain runs one stage of each kind: through that kind's own job, writing the stage's
directory (model + ``pruning.json``). The jobs are looked up on their modules at call time."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from llmprune.chain.recipe import CHAIN_KEYS, StagePlan
from llmprune.errors import LLMPruneError
from llmprune.export.save import RECIPE_FILE, REPORT_FILE, atomic_dir, output_lock, write_json


def checkpoint_for(plan: StagePlan, resumable: bool) -> str | None:
    """A killed training stage's checkpoints (``NN-kind.ckpt``): resumed when the stage is the
    same one (``resumable``), else removed (the chain made them; they belong to another recipe)."""
    from llmprune.maskllm.checkpoint import latest_checkpoint

    ckpt = Path(f"{plan.dir}.ckpt")
    if not ckpt.is_dir():
        return None
    if resumable:
        try:
            latest_checkpoint(ckpt)
            print(f"llmprune: note: {plan.label} resumes from its checkpoint in {ckpt}", file=sys.stderr)
            return str(ckpt)
        except LLMPruneError:  # killed before its first complete checkpoint
            pass
    shutil.rmtree(ckpt)
    print(f"llmprune: note: removed {ckpt} (checkpoints of an earlier attempt that cannot be resumed)",
          file=sys.stderr)
    return None


def run_prune(plan: StagePlan, progress: bool) -> None:
    """One-shot pruning; the stage also leaves its keep-masks as ``masks.npz`` (a MaskLLM prior)."""
    from llmprune import pipeline
    from llmprune.masks import MaskSet

    result = pipeline.prune(config=plan.config, progress=progress)
    MaskSet.from_model(result.model).save(plan.mask_file)


def run_maskllm(plan: StagePlan, progress: bool) -> None:
    from llmprune.maskllm import job

    config = plan.config
    if plan.extra.get("resume"):
        config = config.replace(resume=plan.extra["resume"])
    job.run_maskllm(config, progress=progress)


def run_recover(plan: StagePlan, progress: bool) -> None:
    from llmprune.recover import job

    config = plan.config
    if plan.extra.get("resume"):
        config = config.replace(resume=plan.extra["resume"])
    job.run_recover(config, progress=progress)


def run_structured(plan: StagePlan, progress: bool) -> None:
    from llmprune.structured import job

    job.structured_job(plan.config.model, plan.config, progress=progress)


def run_eval(plan: StagePlan, progress: bool) -> None:
    """Perplexity and zero-shot tasks of the stage's input; the directory holds only the report."""
    from llmprune import pipeline

    c = plan.config
    ppl = c.ppl or ([] if c.tasks else ["wikitext2"])  # as 'llmprune eval'
    res = pipeline.evaluate(c.model, ppl=ppl, seqlen=c.ppl_seqlen or 2048, max_windows=c.max_windows,
                            device=c.device, dtype=c.dtype, progress=progress,
                            trust_remote_code=c.trust_remote_code, tasks=c.tasks, task_dir=c.task_dir,
                            task_limit=c.task_limit, task_batch_size=c.task_batch_size)
    sparsity = res.pop("_sparsity")
    tasks = res.pop("_tasks", None)
    report = {"kind": "eval", "model": {"name": c.model}, "sparsity": sparsity, "ppl": {"after": res},
              **({"tasks": {"after": tasks}} if tasks is not None else {})}
    recipe = yaml.safe_dump({"eval": c.model_dump(exclude=set(CHAIN_KEYS))}, sort_keys=False, allow_unicode=True)
    with output_lock(c.out), atomic_dir(c.out, overwrite=True, inputs=[c.model]) as tmp:
        (tmp / RECIPE_FILE).write_text(recipe)
        write_json(tmp / REPORT_FILE, report)


RUNNERS: dict[str, Callable[[StagePlan, bool], None]] = {
    "prune": run_prune, "maskllm": run_maskllm, "recover": run_recover,
    "structured": run_structured, "eval": run_eval,
}


def user_files(plans: list[StagePlan]) -> list[str]:
    """Files and folders the recipe names (data, masks, tasks): the output must not replace them."""
    keys = ("calib", "train_data", "prior", "masks", "task_dir")
    found = [getattr(p.config, k, None) for p in plans for k in keys]
    found += [name for p in plans for name in p.config.ppl]
    return [f for f in found if isinstance(f, str) and Path(f).expanduser().exists()]


def preflight(plans: list[StagePlan]) -> None:
    """What can be checked before the first stage starts: the device, the recipe's model, every
    stage's data (calibration / training text, perplexity sets, zero-shot tasks and their data)
    and the mask files named in stages. Raises one line naming the stage."""
    from llmprune.data.sources import load_corpus
    from llmprune.eval.perplexity import check_eval_data
    from llmprune.eval.placement import check_device
    from llmprune.eval.zeroshot import load_tasks
    from llmprune.maskllm.api import ONESHOT_PRIORS
    from llmprune.models.loading import check_model_exists
    from llmprune.pipeline import make_allocator
    from llmprune.sparsity.methods import required_stats

    seen: set = set()

    def once(key, check: Callable[[], object], where: str) -> None:
        if key in seen:
            return
        try:
            check()
        except LLMPruneError as e:
            raise LLMPruneError(f"{where}: {e}") from None
        seen.add(key)

    first = plans[0].config
    once("device", lambda: check_device(first.resolved_device()), plans[0].label)
    once("model", lambda: check_model_exists(first.model), "recipe")
    chain_files = {str(p.mask_file) for p in plans if p.mask_file}
    for plan in plans:
        c, kind, where = plan.config, plan.spec.kind, plan.label
        data = None
        if kind == "prune":
            allocator = make_allocator(c)
            if required_stats(c.method, c.solver, c.recon_error, c.refine) or (allocator and allocator.needs):
                data = c.calib
        elif kind == "structured":
            data = c.calib
        elif kind in ("maskllm", "recover"):
            data = c.train_data
        if kind == "recover" and c.mode == "lora":
            from llmprune.recover.lora import require_peft

            once("peft", require_peft, where)
        if data is not None:
            once(("train", data), lambda d=data: load_corpus(d, "train"), where)
        if c.ppl:
            for name in c.ppl:
                once(("eval", name), lambda n=name: check_eval_data([n]), where)
        if c.tasks:
            once(("tasks", tuple(c.tasks), c.task_dir), lambda c=c: load_tasks(c.tasks, c.task_dir), where)
        for key in ("prior", "masks"):
            path = getattr(c, key, None)
            if kind == "maskllm" and key == "prior" and path in (None, "none", *ONESHOT_PRIORS):
                continue
            if path is not None and path not in chain_files and not Path(path).expanduser().is_file():
                raise LLMPruneError(f"{where}: {key} file {path} does not exist")
