"""How the chain runs one stage of each kind: through that kind's own job, writing the stage's
directory (model + ``pruning.json``). The jobs are looked up on their modules at call time."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from llmprune.chain.recipe import StagePlan
from llmprune.errors import LLMPruneError


def checkpoint_for(plan: StagePlan, resumable: bool) -> str | None:
    """A killed training stage's checkpoints (``NN-kind.ckpt``): resumed when the stage is the
    same one (``resumable``), else removed (the chain made them; they belong to another recipe)."""
    from llmprune.train.checkpoint import latest_checkpoint

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


def run_stage(plan: StagePlan, progress: bool) -> None:
    """One stage through its kind's own job, writing the stage's directory; a training stage
    killed before resumes from its checkpoints (``plan.extra["resume"]``)."""
    config = plan.config
    if plan.extra.get("resume"):
        config = config.replace(resume=plan.extra["resume"])
    plan.kind.run(config, progress)


def user_files(plans: list[StagePlan]) -> list[str]:
    """Files and folders the recipe names (data, masks, tasks): the output must not replace them."""
    found = [path for p in plans for path in [*p.kind.reads(p.config).values(), *p.kind.files(p.config).values()]]
    found += [p.config.task_dir for p in plans]
    found += [name for p in plans for name in p.config.ppl]
    return [f for f in found if isinstance(f, str) and Path(f).expanduser().exists()]


def check_windows(plans: list[StagePlan]) -> None:
    """Every stage's windows against the model's context, read from its config before the first
    stage runs (no stage changes the context): an eval stage at the end must not fail after
    hours of the stages before it."""
    from llmprune.models.layers import config_context_length
    from llmprune.models.loading import load_config

    first = plans[0].config
    ctx = config_context_length(load_config(first.model, first.trust_remote_code))
    if ctx is None:
        return
    for plan in plans:
        for name, n in plan.kind.windows(plan.config):
            if n > ctx:
                raise LLMPruneError(f"{plan.label}: {name} {n} is longer than the model's context ({ctx} "
                                    f"tokens); use {name}: {ctx} or less")


def preflight(plans: list[StagePlan]) -> None:
    """What can be checked before the first stage starts: the device, the recipe's model, every
    stage's data (calibration / training text, perplexity sets, zero-shot tasks and their data)
    and the mask files named in stages. Raises one line naming the stage."""
    from llmprune.data.sources import load_corpus
    from llmprune.eval.perplexity import check_eval_data
    from llmprune.eval.placement import check_device
    from llmprune.eval.zeroshot import load_tasks
    from llmprune.models.loading import check_model_exists

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
    check_windows(plans)
    chain_files = {str(p.mask_file) for p in plans if p.mask_file}
    for plan in plans:
        c, kind, where = plan.config, plan.spec.kind, plan.label
        data = next(iter(plan.kind.reads(c).values()), None)
        if data is not None:
            once(("train", data), lambda d=data: load_corpus(d, "train"), where)
        if c.ppl:
            for name in c.ppl:
                once(("eval", name), lambda n=name: check_eval_data([n]), where)
        if c.tasks:
            once(("tasks", tuple(c.tasks), c.task_dir), lambda c=c: load_tasks(c.tasks, c.task_dir), where)
        for key, path in plan.kind.files(c).items():
            if path not in chain_files and not Path(path).expanduser().is_file():
                raise LLMPruneError(f"{where}: {key} file {path} does not exist")
        once(("check", kind, where), lambda plan=plan: plan.kind.check(plan.config), where)
