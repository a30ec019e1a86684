"""One training loop on ``accelerate``: the same code on a CPU (fp32), one GPU and many (DDP /
FSDP through accelerate's own config).

A method plugs in as a :class:`TrainTask`: its parameter groups, per-step schedule, loss terms
(:mod:`llmprune.train.losses`: the LM loss by default, a teacher's logit KL and hidden states
for distillation) and extra loss, checkpoint tensors and log statistics. The trainer owns the
data stream, gradient accumulation, the weighted sum of the terms, AdamW with a cosine learning
rate, clipping, the tqdm bar, the JSONL log and checkpoint / resume.

Reproducibility: every process reads the same global stream and takes its own micro-batches
(global micro-batch ``j = a·world + rank`` for accumulation step ``a``), and the task's noise is
reseeded from ``(seed, step, j)``. So 2 processes × 1 micro-batch compute exactly what
1 process × 2 accumulated micro-batches does, and a resumed run continues bit for bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path
from typing import Protocol

import torch
from pydantic import Field
from torch import nn

from llmprune.errors import LLMPruneError
from llmprune.options import NonNegativeFloat, NonNegativeInt, Options, PositiveFloat, PositiveInt
from llmprune.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    read_meta,
    save_checkpoint,
)
from llmprune.train.losses import LMLoss, LossTerm, MicroBatch, total_loss, wants_labels
from llmprune.train.schedule import cosine
from llmprune.train.stream import PackedStream, StreamState

LOG_FILE = "train_log.jsonl"
CHECKPOINTS = "checkpoints"


class TrainerOptions(Options):
    """The loop's own settings: data, batch, optimiser, schedule, logging and checkpoints."""

    steps: PositiveInt = Field(2000, description="optimiser steps (each one global batch)")
    lr: PositiveFloat = Field(5e-5, description="base learning rate, decayed by a cosine to min_lr")
    min_lr: NonNegativeFloat = Field(5e-6, description="cosine floor of the base learning rate (every "
                                                       "group decays by the same factor)")
    weight_decay: NonNegativeFloat = Field(0.1, description="AdamW weight decay")
    beta1: NonNegativeFloat = Field(0.9, description="AdamW β1")
    beta2: NonNegativeFloat = Field(0.95, description="AdamW β2")
    adam_eps: PositiveFloat = Field(1e-5, description="AdamW ε")
    grad_clip: NonNegativeFloat = Field(1.0, description="clip the global gradient norm to this (0: off)")
    batch_size: PositiveInt = Field(1, description="training windows per micro-batch on each process")
    grad_accum: PositiveInt = Field(1, description="micro-batches accumulated per optimiser step")
    seqlen: PositiveInt = Field(4096, description="tokens per training window (packed documents)")
    train_data: str = Field("c4", description="training text: c4 | wikitext2 | FILE (.txt/.jsonl)")
    seed: NonNegativeInt = Field(0, description="seed of the initialisation, data order and noise")
    checkpoint_every: NonNegativeInt = Field(500, description="write a resumable checkpoint every K "
                                                              "steps (0: only at the end)")
    log_every: PositiveInt = Field(10, description="log (bar, JSONL) every K steps")


# Options that may change between a run and its resume without changing what it computes.
RESUMABLE_CHANGES = ("checkpoint_every", "log_every")


class TrainTask(Protocol):
    """What a training method contributes to the loop."""

    def param_groups(self, lr: float) -> list[dict]:
        """AdamW groups (each with ``name``, ``params``, ``lr``), in a fixed order."""

    def set_training(self, training: bool) -> None:
        """Switch the method's modules between training and evaluation behaviour."""

    def before_step(self, step: int) -> dict[str, float]:
        """Set the step's schedules; return them for the log."""

    def before_micro_batch(self, seed: int) -> None:
        """Reseed the method's noise for one micro-batch."""

    def extra_loss(self) -> tuple[torch.Tensor | None, dict[str, float]]:
        """A loss beside the terms, after a forward (and values to log), e.g. a regulariser
        of the method's own parameters."""

    def log_stats(self) -> dict[str, float]:
        """Statistics since the last call (e.g. the share of hard-mask flips)."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything the method learns, for checkpoints."""

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...

    def fingerprint(self) -> dict:
        """What a checkpoint must match to be resumed by this task (model, pattern, shapes)."""

    # Optional (looked up with getattr, so older tasks need not define them):
    #   name: str                 -- the progress bar's label (default "train")
    #   loss_terms() -> list[LossTerm]
    #                             -- what the loss sums (llmprune.train.losses: the LM loss, logit
    #                                KL to a teacher, hidden-state MSE); default [LMLoss()]
    #   after_step() -> None      -- called after every optimiser step, e.g. to re-apply a fixed
    #                                mask to weights that AdamW's decay or moments could move


def task_terms(task: TrainTask) -> list[LossTerm]:
    """The loss terms ``task`` trains on: its own, or the plain LM loss."""
    get = getattr(task, "loss_terms", None)
    terms = list(get()) if get is not None else [LMLoss()]
    if not any(isinstance(t, LMLoss) for t in terms):
        terms.insert(0, LMLoss(0.0))  # the cross-entropy is always logged
    return terms


def checkpoint_dir(out: str | None) -> Path | None:
    """Where a training job writing to ``out`` keeps its checkpoints (``OUT.ckpt``, beside it)."""
    return Path(f"{Path(out).expanduser().resolve()}.ckpt") if out else None


def micro_seed(seed: int, step: int, j: int) -> int:
    """A 63-bit seed for global micro-batch ``j`` of ``step``."""
    digest = hashlib.sha256(f"{seed}:{step}:{j}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def run_options(opts: Options, world: int) -> dict:
    """Options recorded in a checkpoint and compared on resume (global batch, not process count)."""
    d = opts.model_dump()
    d["global_batch"] = d["batch_size"] * d["grad_accum"] * world
    for k in (*RESUMABLE_CHANGES, "batch_size", "grad_accum"):
        d.pop(k, None)
    return d


def accelerator_for(device: str | None = None):
    """The ``accelerate`` Accelerator for a job's ``device``: ``cpu`` trains on the CPU even where
    CUDA is available; ``cuda`` (or ``None``: CUDA where there is one) on the process's GPU.
    Under ``accelerate launch`` each process takes its own device as accelerate assigns it."""
    from accelerate import Accelerator

    on_cpu = str(device).startswith("cpu") if device is not None else not torch.cuda.is_available()
    return Accelerator(cpu=on_cpu)


def model_bytes_to_move(model: nn.Module, device: str | torch.device) -> dict[str, int]:
    """The model's own bytes where training will move it, when that is not where it is now (a
    memory estimate for another device must count the weights too)."""
    here = next(model.parameters()).device
    if torch.device(device).type == here.type:
        return {}
    return {"model": sum(p.numel() * p.element_size() for p in model.parameters())}


def check_resume_dir(path: str | Path) -> Path:
    """The checkpoint a ``--resume`` directory holds, read as far as can be without the model
    (pointer, JSON record, safetensors header): a damaged one is one line before anything loads."""
    if not Path(path).expanduser().is_dir():
        raise LLMPruneError(f"resume directory {path} does not exist")
    ckpt = latest_checkpoint(path)
    read_meta(ckpt)
    return ckpt


def check_resume(path: str | Path, fingerprint: dict, opts: Options, world: int = 1) -> Path:
    """The checkpoint to resume from ``path``, refused (one line) if it is from another model,
    pattern or recipe. Reads only the JSON: call it before any heavy work."""
    ckpt = latest_checkpoint(path)
    meta = read_meta(ckpt)
    theirs, ours = meta.get("fingerprint", {}), fingerprint
    for key in ours:
        if theirs.get(key) != ours[key]:
            what = {"pattern": f"pattern {theirs.get(key)}, not {ours[key]}",
                    "prior": f"prior {theirs.get(key)!r}, not {ours[key]!r} (resume with the run's own prior, "
                             "or start a new run)"}.get(key, f"another model ({key} differs)")
            raise LLMPruneError(f"resume directory {path} was written for {what}")
    mine = run_options(opts, world)
    for key, value in meta.get("options", {}).items():
        if key in mine and mine[key] != value:
            raise LLMPruneError(f"resume directory {path} was run with {key}={value}, this run has "
                                f"{key}={mine[key]}; a resume must continue the same recipe")
    return ckpt


@contextlib.contextmanager
def only_trained(model: nn.Module, opt: torch.optim.Optimizer):
    """Freeze every parameter the optimiser does not train, for the duration.

    A tied embedding / ``lm_head`` left trainable would cost a vocabulary-sized weight gradient
    every step (and DDP would synchronise it).
    """
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in trained]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


class Trainer:
    """Train ``task``'s parameters of ``model`` on the LM loss plus the task's terms."""

    def __init__(self, model: nn.Module, task: TrainTask, stream: PackedStream, opts: TrainerOptions,
                 work_dir: str | Path | None = None, progress: bool = True, accelerator=None) -> None:

        self.model, self.task, self.stream, self.opts = model, task, stream, opts
        self.acc = accelerator or accelerator_for()
        self.work_dir = Path(work_dir) if work_dir else None
        self.progress = progress
        self.step = 0
        self.log: list[dict] = []

    # --- setup ----------------------------------------------------------------------------------
    def _optimizer(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        o = self.opts
        groups = self.task.param_groups(o.lr)
        kw = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.adam_eps, weight_decay=o.weight_decay)
        try:  # the fused kernel is ~8x faster on CPUs than the default
            opt = torch.optim.AdamW(groups, fused=True, **kw)
        except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
            opt = torch.optim.AdamW(groups, **kw)
        floor = o.min_lr / o.lr
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine(1.0, floor, s, o.steps))
        return opt, sched

    def _restore(self, ckpt: Path, opt, sched) -> None:
        tensors, meta = load_checkpoint(ckpt)
        self.task.load_state_tensors({k[len("task."):]: v for k, v in tensors.items() if k.startswith("task.")})
        optimizer_from_flat(opt, tensors, meta["optimizer"])
        sched.load_state_dict(meta["scheduler"])
        torch.set_rng_state(tensors["rng.cpu"])
        s = meta["stream"]
        self.stream.state = StreamState(s["epoch"], s["cursor"], tensors["stream.buffer"].tolist(), s["windows"])
        self.step = meta["step"]
        self.log = [r for r in meta.get("log", []) if r["step"] <= self.step]

    def _save(self, opt, sched) -> None:
        if self.work_dir is None:
            return
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            opt_tensors, opt_meta = optimizer_to_flat(opt)
            st = self.stream.state
            tensors = {**{f"task.{k}": v for k, v in self.task.state_tensors().items()}, **opt_tensors,
                       "rng.cpu": torch.get_rng_state(),
                       "stream.buffer": torch.tensor(st.buffer, dtype=torch.long)}
            meta = {"step": self.step, "fingerprint": self.task.fingerprint(),
                    "options": run_options(self.opts, self.acc.num_processes),
                    "world_size": self.acc.num_processes,
                    "optimizer": opt_meta, "scheduler": sched.state_dict(),
                    "stream": {"epoch": st.epoch, "cursor": st.cursor, "windows": st.windows},
                    "log": self.log}
            save_checkpoint(self.work_dir / CHECKPOINTS, self.step, tensors, meta)
        self.acc.wait_for_everyone()

    def _write_log(self) -> None:
        if self.work_dir is None or not self.acc.is_main_process:
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.work_dir / f".{LOG_FILE}.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.log))
        tmp.replace(self.work_dir / LOG_FILE)

    # --- the loop -------------------------------------------------------------------------------
    def train(self, resume: str | Path | None = None, until: int | None = None) -> list[dict]:
        """Run to ``opts.steps`` (from a checkpoint under ``resume`` if given); returns the log.

        ``until`` stops early after that many steps (schedules still span ``opts.steps``) and
        leaves a checkpoint there: the first half of a run that is resumed later.
        """

        opt, sched = self._optimizer()
        ckpt = None if resume is None else check_resume(resume, self.task.fingerprint(), self.opts,
                                                        self.acc.num_processes)
        with only_trained(self.model, opt):
            self._loop(opt, sched, ckpt, until)
        self._save(opt, sched)
        self._write_log()
        return self.log

    def _loop(self, opt, sched, ckpt: Path | None, until: int | None) -> None:
        from tqdm.auto import tqdm

        o, acc = self.opts, self.acc
        model, popt = acc.prepare(self.model, opt)  # the scheduler is stepped by hand: once a step
        if ckpt is not None:  # after prepare: the state lands on the parameters' device
            self._restore(ckpt, opt, sched)
        params = [p for g in opt.param_groups for p in g["params"]]
        world, rank, per = acc.num_processes, acc.process_index, o.batch_size
        model.eval()  # no dropout: the noise is the mask's own (the reference trains with dropout 0)
        self.task.set_training(True)
        after_step = getattr(self.task, "after_step", None)
        terms = task_terms(self.task)
        labels = wants_labels(terms)
        bar = tqdm(total=o.steps, initial=self.step, disable=not (self.progress and acc.is_main_process),
                   desc=getattr(self.task, "name", "train"), dynamic_ncols=True)
        t_last, tokens, ce_acc, extra_acc, n_acc = time.perf_counter(), 0, 0.0, {}, 0
        try:
            while self.step < min(o.steps, until or o.steps):
                sched_vals = self.task.before_step(self.step)
                windows = self.stream.next_batch(world * o.grad_accum * per)  # the global batch
                for a in range(o.grad_accum):
                    j = a * world + rank
                    self.task.before_micro_batch(micro_seed(o.seed, self.step, j))
                    ids = windows[j * per:(j + 1) * per].to(acc.device)
                    sync = contextlib.nullcontext() if a == o.grad_accum - 1 else acc.no_sync(model)
                    with sync:
                        out = model(input_ids=ids, labels=ids if labels else None, use_cache=False)
                        loss, vals = total_loss(terms, MicroBatch(ids, out))
                        del out  # the graph keeps what the backward needs
                        extra, extra_vals = self.task.extra_loss()
                        loss = extra if loss is None else loss if extra is None else loss + extra
                        acc.backward(loss / o.grad_accum)
                    ce_acc += vals.pop("ce")
                    for k, v in {**vals, **extra_vals}.items():
                        extra_acc[k] = extra_acc.get(k, 0.0) + v
                    n_acc += 1
                if o.grad_clip > 0:
                    acc.clip_grad_norm_(params, o.grad_clip)
                lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(opt.param_groups)}
                popt.step()
                if after_step is not None:
                    after_step()
                sched.step()
                popt.zero_grad(set_to_none=True)
                self.step += 1
                tokens += windows.numel()
                bar.update(1)
                if self.step % o.log_every == 0 or self.step in (o.steps, until):
                    stats = torch.tensor([ce_acc / n_acc], device=acc.device)
                    ce_mean = acc.reduce(stats, "mean").item()
                    dt = time.perf_counter() - t_last
                    rec = {"step": self.step, "ce": ce_mean,
                           **{k: v / n_acc for k, v in extra_acc.items()}, **sched_vals,
                           **{f"lr_{k}": v for k, v in lrs.items()},
                           "tokens": self.stream.state.windows * o.seqlen,
                           "tokens_per_s": tokens / dt if dt > 0 else None,
                           **self.task.log_stats()}
                    self.log.append(rec)
                    shown = {"loss": f"{ce_mean:.3f}",  # a task's own values only where it has them
                             **{k: f"{rec[k]:.3f}" for k in ("kd", "hidden") if k in rec},
                             **{k: f"{sched_vals[k]:.3g}" for k in ("tau", "kappa") if k in sched_vals},
                             "tok_s": f"{rec['tokens_per_s'] or 0:.0f}",
                             **({"flip": f"{rec['flipped']:.2%}"} if "flipped" in rec else {})}
                    bar.set_postfix(shown)
                    self._write_log()
                    t_last, tokens, ce_acc, extra_acc, n_acc = time.perf_counter(), 0, 0.0, {}, 0
                if o.checkpoint_every and self.step % o.checkpoint_every == 0 and self.step < (until or o.steps):
                    self._save(opt, sched)
        finally:
            bar.close()
            self.task.set_training(False)
