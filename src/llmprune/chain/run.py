"""``llmprune run RECIPE --out DIR``: run a chained recipe's stages, restartably.

DIR holds ``recipe.yaml`` (the recipe in normal form), ``pruning.json`` (kind ``chain``: each
stage's hash, status, timing and its own report), ``stages/NN-kind/`` (every stage's output,
kept) and ``final/`` (a copy, hard-linked where possible, of the last model-producing stage's
directory: a plain HF directory). ``pruning.json`` is rewritten atomically after every stage,
so a killed run leaves a record of what finished; re-running the same command continues after
the last finished stage. A stage is finished when ``pruning.json`` says so with the hash of
the stage's full config (chained over the stages before it) and its directory holds its own
``pruning.json``. A recipe that changes a finished stage is refused, or with ``overwrite``
re-run from the first changed stage (the stages before it are kept).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from llmprune.chain import stages as stage_runners
from llmprune.chain.recipe import (
    STAGES_DIR,
    ChainRecipe,
    StagePlan,
    final_stage,
    load_recipe,
    plan_stages,
)
from llmprune.errors import LLMPruneError
from llmprune.export.save import (
    RECIPE_FILE,
    REPORT_FILE,
    atomic_dir,
    atomic_file,
    check_output_dir,
    output_lock,
    write_json,
)
from llmprune.jobs.header import versions
from llmprune.jobs.kind import JobKind
from llmprune.report import load_report

FINAL_DIR = "final"


@dataclass
class ChainResult:
    out: Path
    report: dict
    ran: list[int]  # indices of the stages this call ran (the others were finished before)

    @property
    def final(self) -> Path | None:
        f = self.report.get("final")
        return self.out / f["dir"] if f else None


def _previous_state(out: Path) -> dict | None:
    """The chain report of an earlier run in ``out``; refuse another tool's output."""
    if not (out / REPORT_FILE).is_file():
        return None
    try:
        state = load_report(out)
    except ValueError as e:
        raise LLMPruneError(f"--out {out}: {REPORT_FILE} is unreadable ({e}); give another --out") from None
    if state.get("kind") != "chain":
        raise LLMPruneError(f"--out {out} holds a llmprune output of kind {state.get('kind', 'prune')!r}, "
                            "not a chained run; give another --out")
    try:
        TypeAdapter(list[_StageRecord]).validate_python(state.get("stages"))
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise LLMPruneError(f"--out {out}: {REPORT_FILE} was edited or damaged (stages.{where}: {err['msg']}); "
                            "give another --out") from None
    return state


class _StageRecord(BaseModel):
    """What the chain reads back from each stage record of an earlier run."""

    model_config = ConfigDict(extra="allow", strict=True)
    index: int
    kind: str
    dir: str
    status: str
    hash: str | None = None


def _finished(plan: StagePlan, record: dict | None) -> bool:
    return (record is not None and record.get("status") == "done" and record.get("hash") == plan.hash
            and (plan.dir / REPORT_FILE).is_file())


def _first_to_run(plans: list[StagePlan], previous: list[dict], out: Path, overwrite: bool) -> int:
    """Index into ``plans`` of the first stage to run. A finished stage whose config changed (or
    that the recipe no longer has) is refused unless ``overwrite``; one whose output went missing
    is simply run again (with the stages after it, which read it)."""
    def changed(r: dict) -> bool:
        return r.get("status") == "done" and (r["index"] > len(plans) or r.get("hash") != plans[r["index"] - 1].hash)

    start = next((i for i, p in enumerate(plans)
                  if not _finished(p, previous[i] if i < len(previous) else None)), len(plans))
    bad = [r for r in previous if changed(r)]
    if bad and not overwrite:
        r = bad[0]
        if r["index"] > len(plans):
            raise LLMPruneError(f"stage {r['index']} ({r['kind']}) is no longer in the recipe; pass --overwrite "
                                "to drop it, or choose another --out")
        raise LLMPruneError(f"stage {r['index']} ({r['kind']}) differs from the one finished in {out}; pass "
                            f"--overwrite to re-run from stage {start + 1} (stages before it are kept), or "
                            "choose another --out")
    return start


def _link_or_copy(src: str, dst: str) -> None:
    # Stage files are never modified in place (saves replace them), so a hard link is a safe copy.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _write_final(out: Path, plan: StagePlan) -> None:
    """``out/final``: the final model as a plain HF directory (the stage's files, linked)."""
    target = out / FINAL_DIR
    with output_lock(target), atomic_dir(target, overwrite=True, inputs=[plan.dir]) as tmp:
        tmp.rmdir()
        shutil.copytree(plan.dir, tmp, copy_function=_link_or_copy)


def _drop(out: Path, records: list[dict]) -> None:
    """Remove the directories of stages the chain made and no longer uses."""
    for r in records:
        d = out / r["dir"]
        if d.is_dir() and (d / REPORT_FILE).is_file() and d.parent == out / STAGES_DIR:
            shutil.rmtree(d)
        ckpt = Path(f"{d}.ckpt")
        if ckpt.is_dir() and d.parent == out / STAGES_DIR:
            shutil.rmtree(ckpt)


def _timings(records: list[dict]) -> dict:
    t = {f"{Path(r['dir']).name}_s": r["seconds"] for r in records if r.get("status") == "done"}
    return {**t, "total_s": sum(t.values())}


def _record(plan: StagePlan, out: Path) -> dict:
    return {"index": plan.index, "kind": plan.spec.kind, "dir": str(plan.dir.relative_to(out)),
            "hash": plan.hash, "inputs": plan.inputs, "pattern": plan.pattern, "status": "pending"}


def run_chain(recipe: ChainRecipe | dict | str | Path, out: str | Path, overwrite: bool = False,
              progress: bool = True) -> ChainResult:
    """Run ``recipe`` (a file, a mapping or a parsed recipe) into ``out``; see the module docstring.

    Every stage is planned and validated, and the data every stage reads is checked, before the
    first one starts (one line naming the stage on a bad key or value; nothing is written).
    """
    recipe = recipe if isinstance(recipe, ChainRecipe) else load_recipe(recipe)
    out = Path(out).expanduser().resolve()
    plans = plan_stages(recipe, out)
    previous = _previous_state(out)
    files = [f for f in stage_runners.user_files(plans)  # the chain's own mask files are no inputs
             if not Path(f).expanduser().resolve().is_relative_to(out / STAGES_DIR)]
    check_output_dir(out, overwrite=previous is not None, inputs=[recipe.model, *files], kind="chain")
    stage_runners.preflight(plans)
    with output_lock(out):
        old = list((previous or {}).get("stages", []))
        start = _first_to_run(plans, old, out, overwrite)
        dirs = {str(p.dir.relative_to(out)) for p in plans}
        _drop(out, [r for r in old[start:] if r["dir"] not in dirs])  # dropped, or now another kind
        records = [old[i] if i < start else _record(p, out) for i, p in enumerate(plans)]
        last = final_stage(plans)
        state = {"kind": "chain", "versions": versions(), "recipe": recipe.to_dict(),
                 "model": {"name": recipe.model}, "stages": records,
                 "final": (previous or {}).get("final") if start == len(plans) else None,
                 "timings": _timings(records)}
        out.mkdir(parents=True, exist_ok=True)
        with atomic_file(out / RECIPE_FILE) as f:
            f.write(recipe.to_yaml())
        write_json(out / REPORT_FILE, state)  # marks DIR as ours before any stage writes into it
        stale = out / FINAL_DIR
        if start < len(plans) and stale.is_dir() and (stale / REPORT_FILE).is_file():
            shutil.rmtree(stale)  # an earlier run's result; the new one is written at the end
        ran = []
        for i in range(start, len(plans)):
            plan, record = plans[i], records[i]
            if plan.kind.trains:
                same = old[i].get("hash") == plan.hash if i < len(old) else False
                plan.extra["resume"] = stage_runners.checkpoint_for(plan, same)
            if progress:
                print(f"llmprune: {plan.label} -> {plan.dir}", file=sys.stderr)
            record.update(status="running", started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            write_json(out / REPORT_FILE, state)
            t0 = time.perf_counter()
            try:
                stage_runners.run_stage(plan, progress)
            except BaseException as e:
                record.update(status="failed", error=f"{type(e).__name__}: {e}"[:500])
                write_json(out / REPORT_FILE, state)
                raise
            record.update(status="done", seconds=time.perf_counter() - t0, report=load_report(plan.dir))
            record.pop("error", None)
            state["timings"] = _timings(records)
            write_json(out / REPORT_FILE, state)
            ran.append(plan.index)
        if last is not None:
            _write_final(out, last)
            state["final"] = {"dir": FINAL_DIR, "stage": last.spec.name,
                              "note": f"a copy (hard links where possible) of {STAGES_DIR}/{last.spec.name}"}
        write_json(out / REPORT_FILE, state)
    return ChainResult(out, state, ran)


def _stage_ppl(report: dict) -> list[str]:
    from llmprune.report import format_ppl, format_tasks

    return format_ppl(report.get("ppl") or {}) + format_tasks(report.get("tasks") or {})


def summary(report: dict) -> list[str]:
    """A chained run: one line per stage (its status) with its numbers and the mask its output
    carries, and where the final model is."""
    lines = []
    for r in report["stages"]:
        rep = r.get("report") or {}
        head = f"stage {r['index']} {r['kind']} ({r['dir']}): {r['status']}"
        if "seconds" in r:
            head += f", {r['seconds']:.1f}s"
        if rep.get("sparsity") is not None:
            head += f", sparsity {rep['sparsity']:.4f}"
        if r.get("pattern"):
            head += f", mask {r['pattern']}"
        lines += [head, *_stage_ppl(rep)]
    final = report.get("final")
    lines.append(f"final model: {final['dir']}/ (from {final['stage']})" if final else "final model: none yet")
    return lines


KIND = JobKind(name="chain", config=ChainRecipe, run=None, summary=summary, output="report", chain=False)
