"""Distillation's side of recovery: which teacher, whether it fits the student, and which of
its layers each student layer is compared with — all decided before anything heavy runs.

- **The teacher by default** is the dense model the input came from: the ``pruning.json``
  chain is followed (a recovered model's input is the pruned one, whose input is the dense
  model) to the first model without one.
- **Compatibility**: logits are compared token by token, so the teacher must have the
  student's tokenizer (the same token → id table) and as many logits; refused in one line.
- **Layer map** for the hidden-state term: student layer ``i`` is compared with teacher layer
  ``layer_map[i]``. Same depth: the identity. A depth-pruned input: the layers its
  ``pruning.json`` chain removed are skipped. Another hidden size (hidden-channel pruning): no
  map; the hidden term is refused and the logits alone can teach.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmprune.errors import LLMPruneError
from llmprune.models.adapter import decoder_layers, masked_linears, text_config
from llmprune.models.loading import BUNDLED, load_config, model_source
from llmprune.recover.options import RecoverOptions
from llmprune.report import optional_report

MAX_CHAIN = 32  # pruning.json links followed before giving up (a cycle, or a very long chain)


def recorded_input(report: dict) -> str | None:
    """The model a report's job read: ``recipe.model``, else ``model.name``."""
    recipe, model = report.get("recipe"), report.get("model")
    name = recipe.get("model") if isinstance(recipe, dict) else None
    if not name and isinstance(model, dict):
        name = model.get("name")
    return name if isinstance(name, str) and name else None


def lineage(path: str) -> tuple[str | None, list[dict]]:
    """Follow ``pruning.json`` from ``path`` back to the first model without one.

    Returns that model (None when ``path`` has no report, or a link is missing) and the reports
    on the way, newest first.
    """
    reports: list[dict] = []
    seen: set[str] = set()
    here = path
    while len(reports) < MAX_CHAIN:
        report = optional_report(here) if here not in BUNDLED else None
        if report is None:
            return (here if reports else None), reports
        key = str(Path(here).expanduser().resolve())
        if key in seen:
            return None, reports
        seen.add(key)
        reports.append(report)
        here = recorded_input(report)
        if here is None:
            return None, reports
    return None, reports


def default_teacher(path: str) -> str:
    """The dense model ``path`` came from, by its ``pruning.json`` chain; one line if unknown."""
    root, reports = lineage(path)
    if root is None:
        why = "has no pruning.json" if not reports else "has a pruning.json that names no readable input"
        raise LLMPruneError(f"{path} {why}, so the dense teacher is unknown; give --teacher MODEL")
    return root


def removed_layers(report: dict) -> list[int]:
    """The decoder layers a depth-pruning report says it removed (empty for other jobs)."""
    depth = report.get("depth")
    if isinstance(depth, dict) and isinstance(depth.get("removed_layers"), list):
        return [int(i) for i in depth["removed_layers"]]
    return []


def lineage_layer_map(reports: list[dict], teacher_layers: int) -> list[int]:
    """Teacher layer of each remaining layer after the depth pruning in ``reports`` (newest first)."""
    kept = list(range(teacher_layers))
    for r in reversed(reports):
        drop = set(removed_layers(r))
        kept = [j for i, j in enumerate(kept) if i not in drop]
    return kept


def shape_of(model: nn.Module) -> dict[str, int]:
    """What distillation compares: logits per position, hidden size, decoder layers."""
    cfg = text_config(model.config)
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0] if head is not None else cfg.vocab_size
    return {"vocab": int(vocab), "hidden": int(cfg.hidden_size), "layers": len(decoder_layers(model))}


def config_shape(name: str, trust_remote_code: bool = False) -> dict[str, int]:
    """:func:`shape_of` from a model's config alone (a .gguf file's metadata included)."""
    cfg = text_config(load_config(name, trust_remote_code))
    return {"vocab": int(cfg.vocab_size), "hidden": int(cfg.hidden_size), "layers": int(cfg.num_hidden_layers)}


def check_tokenizers(student_tok, teacher_tok, teacher: str) -> None:
    """The teacher must read text as the student does: the same token → id table."""
    if student_tok is None or teacher_tok is None:
        return
    a, b = student_tok.get_vocab(), teacher_tok.get_vocab()
    if a != b:
        differ = len(set(a.items()) ^ set(b.items())) // 2 or abs(len(a) - len(b))
        raise LLMPruneError(f"teacher {teacher!r} has another tokenizer than the student ({len(b)} vs {len(a)} "
                            f"tokens, ~{differ} ids differ); distillation compares logits token by token, "
                            "so give a teacher with the student's tokenizer")


def check_shapes(student: dict[str, int], teacher: dict[str, int], name: str, hidden_weight: float) -> None:
    """Same number of logits; with the hidden term also the same hidden size."""
    if student["vocab"] != teacher["vocab"]:
        raise LLMPruneError(f"teacher {name!r} has {teacher['vocab']} logits per token, the student "
                            f"{student['vocab']}: another vocabulary; give a teacher with the student's tokenizer")
    if hidden_weight > 0 and student["hidden"] != teacher["hidden"]:
        raise LLMPruneError(f"--kd-hidden-weight compares hidden states, but the student's hidden size is "
                            f"{student['hidden']} and teacher {name!r}'s {teacher['hidden']} (hidden-size "
                            "pruning); distil the logits alone (--kd-hidden-weight 0)")


def map_layers(student: dict[str, int], teacher: dict[str, int], reports: list[dict] | None,
               name: str) -> list[int]:
    """Teacher layer of each student layer: the identity at equal depth, else the layers the
    input's depth pruning kept; one line when neither explains the student's depth."""
    if student["layers"] == teacher["layers"]:
        return list(range(student["layers"]))
    kept = lineage_layer_map(reports or [], teacher["layers"])
    if len(kept) == student["layers"]:
        return kept
    raise LLMPruneError(f"the student has {student['layers']} decoder layers and teacher {name!r} "
                        f"{teacher['layers']}, and no pruning.json of the input says which were removed; "
                        "distil the logits alone (--kd-hidden-weight 0)")


def teacher_fingerprint(teacher: nn.Module) -> str:
    """A checksum of the teacher's first decoder linear's first row (resume must use the same)."""
    lin = next(iter(masked_linears(teacher).values()))
    return hashlib.sha256(lin.weight.detach()[0].float().cpu().numpy().tobytes()).hexdigest()[:16]


def teacher_skeleton(name: str, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The teacher's modules on the meta device (no memory): sizes for the estimate before it
    loads."""
    from transformers import AutoModelForCausalLM

    cfg = load_config(name, trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype, trust_remote_code=trust_remote_code)


@dataclass
class TeacherPlan:
    """What :func:`plan_teacher` decided: the teacher's ``name``, the ``model`` when it was given
    loaded (else it loads later), a ``sizer`` for the memory estimate (the loaded model or a
    meta-device skeleton; None for a .gguf file) and the hidden term's ``layer_map``."""

    name: str
    model: nn.Module | None
    sizer: nn.Module | None
    layer_map: list[int] | None
    reports: list[dict]


def plan_teacher(student: nn.Module | dict[str, int] | None, tokenizer, opts: RecoverOptions,
                 teacher: nn.Module | str | None, teacher_tokenizer=None, layer_map: list[int] | None = None,
                 source: str | None = None, trust_remote_code: bool = False,
                 dtype: torch.dtype | None = None) -> TeacherPlan:
    """Every teacher check that needs no weights: which teacher (``teacher``, else
    ``opts.teacher``, else the dense model of ``source``'s pruning.json chain), that it exists,
    its tokenizer and shapes against the student's, the layer map, the device.

    ``student``: the loaded student, or its :func:`shape_of` read from its config before it
    loads (None: unknown yet, e.g. a .gguf file; those checks wait for :func:`load_teacher`).
    """
    from llmprune.eval.placement import check_device
    from llmprune.models.loading import check_model_exists, load_tokenizer

    if opts.teacher_device is not None:
        try:
            check_device(opts.teacher_device)
        except LLMPruneError as e:
            raise LLMPruneError(f"--teacher-device: {e}") from None
    if isinstance(student, nn.Module):
        source = source or getattr(student, "name_or_path", None) or None
        dtype = next(student.parameters()).dtype
    reports = lineage(source)[1] if source else []
    teacher = teacher if teacher is not None else opts.teacher
    if teacher is None:
        if not source:
            raise LLMPruneError("distillation needs a teacher: pass teacher= (a model or a name load_model "
                                "reads) or --teacher MODEL")
        teacher = default_teacher(source)
    if isinstance(teacher, str):
        name = teacher
        try:
            check_model_exists(name)
        except LLMPruneError as e:
            raise LLMPruneError(f"teacher: {e}") from None
        shape = config_shape(name, trust_remote_code)
        teacher_tokenizer = teacher_tokenizer or load_tokenizer(model_source(name), name, False, trust_remote_code)
        sizer = teacher_skeleton(name, dtype or torch.float32, trust_remote_code)
        model = None
    else:
        if teacher is student:
            raise LLMPruneError("the teacher is the student itself; give a separate (dense) model")
        name = getattr(teacher, "name_or_path", None) or type(teacher).__name__
        shape, sizer, model = shape_of(teacher), teacher, teacher
    check_tokenizers(tokenizer, teacher_tokenizer, name)
    lmap = layer_map
    if shape is not None and student is not None:
        mine = shape_of(student) if isinstance(student, nn.Module) else student
        lmap = check_student(mine, shape, opts, name, reports, layer_map)
    return TeacherPlan(name, model, sizer, lmap, reports)


def check_student(mine: dict[str, int], teacher: dict[str, int], opts: RecoverOptions, name: str,
                  reports: list[dict], layer_map: list[int] | None) -> list[int] | None:
    """Shapes against the student's; the layer map the hidden term uses (None without it)."""
    check_shapes(mine, teacher, name, opts.kd_hidden_weight)
    if not opts.kd_hidden_weight:
        return None
    if layer_map is None:
        return map_layers(mine, teacher, reports, name)
    if len(layer_map) != mine["layers"] or not all(0 <= j < teacher["layers"] for j in layer_map):
        raise LLMPruneError(f"layer_map has {len(layer_map)} entries for {mine['layers']} student layers, "
                            f"each must name one of the teacher's {teacher['layers']}")
    return list(layer_map)


def load_teacher(plan: TeacherPlan, student: nn.Module,
                 trust_remote_code: bool = False) -> nn.Module:
    """The teacher model (loaded now if it was named), frozen in eval mode."""
    from llmprune.models.loading import load_model

    if plan.model is not None:
        model = plan.model
    else:
        dtype = next(student.parameters()).dtype
        model, _ = load_model(plan.name, dtype=dtype, trust_remote_code=trust_remote_code, need_tokenizer=False)
    model.eval()
    return model
