"""Chained recipes: parse a YAML recipe of stages and build every stage's typed config up front.

A recipe is the shared run options at the top level plus ``stages``, a list in which each
item names one kind and holds that stage's own keys::

    model: smollm2-135m
    seed: 0
    stages:
      - prune: {method: sparsegpt, pattern: "2:4", solver: none}
      - maskllm: {steps: 20}
      - recover: {mode: lora, steps: 20}
      - eval: {ppl: wikitext2}

Each stage's config is its job's own class (``PruneConfig``, ``MaskLLMConfig``, ...) built from
the shared keys that class has, then the stage's keys, then what the chain decides (the input
model, the output directory, MaskLLM's prior). Everything is validated here, before any work:
a bad key or value is one line naming the stage (``stage 3 (recover): ...``).
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmprune.config import RunOptions, read_yaml
from llmprune.errors import LLMPruneError
from llmprune.jobs import registry
from llmprune.jobs.kind import JobKind
from llmprune.masks.files import MASK_FILE
from llmprune.options import Recipe, validated

STAGES_DIR = "stages"


def stage_kinds() -> dict[str, JobKind]:
    """The job kinds a recipe may chain (the registry's, in its order)."""
    return {name: kind for name, kind in registry.kinds().items() if kind.chain}

# Set by the chain, never by the user: where each stage reads and writes.
CHAIN_KEYS = ("model", "out", "overwrite", "resume")
# Stage inputs that only make sense for one stage.
STAGE_ONLY = ("prior", "masks")
CALIB_ALIAS = ("calib", "train_data")  # as the CLI's --calib of maskllm and recover


@dataclass
class StageSpec:
    """A stage as written: its 1-based index, kind and own keys."""

    index: int
    kind: str
    options: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.index:02d}-{self.kind}"


@dataclass
class ChainRecipe:
    """A parsed (not yet planned) recipe: the shared keys and the stages."""

    shared: dict[str, Any]
    stages: list[StageSpec]

    @property
    def model(self) -> str:
        return str(self.shared.get("model", RunOptions.model_fields["model"].default))

    def to_dict(self) -> dict:
        """The recipe in its normal form (each stage a one-key mapping), as ``recipe.yaml`` holds it."""
        return {**self.shared, "stages": [{s.kind: dict(s.options)} for s in self.stages]}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


@dataclass
class StagePlan:
    """A stage ready to run: its validated config (with input and output filled in)."""

    spec: StageSpec
    kind: JobKind
    dir: Path
    config: Recipe
    inputs: dict[str, str]  # what it reads, by what it is (the recipe's model, "stage 01-prune"), for the hash
    hash: str = ""
    mask_file: Path | None = None  # the masks.npz this stage leaves for a later MaskLLM prior
    pattern: str | None = None  # the mask its output carries (e.g. "2:4", "sparsity 0.5"); None: dense
    extra: dict = field(default_factory=dict)

    @property
    def index(self) -> int:
        return self.spec.index

    @property
    def label(self) -> str:
        return f"stage {self.spec.index} ({self.spec.kind})"

    def normalised(self) -> dict:
        """The full config this stage runs, with paths the chain chose replaced by what they are."""
        data = self.config.model_dump(exclude=set(CHAIN_KEYS) - {"model"})
        data.update(self.inputs)
        return data


def _all_keys() -> set[str]:
    keys = {k for kind in stage_kinds().values() for k in kind.config.model_fields}
    return keys | {"calib"}


def _unknown(key: str, known: set[str], where: str) -> LLMPruneError:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return LLMPruneError(f"{where}: unknown option {key!r}{hint}")


def parse_recipe(data: Any) -> ChainRecipe:
    """Check the recipe's shape (top-level keys, stage list, kinds); values are checked by
    :func:`plan_stages`."""
    if not isinstance(data, dict):
        raise LLMPruneError(f"a chained recipe must be a YAML mapping with 'stages', got {type(data).__name__}")
    if "stages" not in data:
        raise LLMPruneError("the recipe has no 'stages' list; for a single one-shot job use "
                            "'llmprune prune --recipe'")
    shared = {k: v for k, v in data.items() if k != "stages"}
    known = _all_keys()
    for key in shared:
        if key in CHAIN_KEYS[1:]:
            raise LLMPruneError(f"recipe: {key!r} is set by 'llmprune run' (--out, --overwrite), "
                                "not in the recipe")
        if key in STAGE_ONLY:
            raise LLMPruneError(f"recipe: {key!r} belongs in the stage that reads it, not at the top")
        if key not in known:
            raise _unknown(key, known, "recipe")
    raw = data["stages"]
    if not isinstance(raw, list) or not raw:
        raise LLMPruneError("recipe: 'stages' must be a non-empty list, e.g. [{prune: {...}}, {eval: {...}}]")
    stages = []
    for i, item in enumerate(raw, 1):
        if isinstance(item, str):  # "- eval": a stage with no keys of its own
            item = {item: None}
        if not isinstance(item, dict) or len(item) != 1:
            raise LLMPruneError(f"stage {i}: must be a mapping of one kind to its options, e.g. "
                                f"'- prune: {{pattern: \"2:4\"}}', got {item!r}")
        (kind, options), = item.items()
        kinds = stage_kinds()
        if kind not in kinds:
            close = difflib.get_close_matches(str(kind), list(kinds), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise LLMPruneError(f"stage {i}: unknown kind {kind!r}; {hint}choose from {', '.join(kinds)}")
        options = {} if options is None else options
        if not isinstance(options, dict):
            raise LLMPruneError(f"stage {i} ({kind}): options must be a mapping of key: value, got {options!r}")
        for key in options:
            if key in CHAIN_KEYS:
                what = ("the previous stage's output (give the model once, at the top)" if key == "model"
                        else "chosen by the chain (DIR/stages/NN-kind)")
                raise LLMPruneError(f"stage {i} ({kind}): {key!r} is {what}; remove it")
        stages.append(StageSpec(i, str(kind), dict(options)))
    return ChainRecipe(shared, stages)


def load_recipe(path_or_data: str | Path | dict) -> ChainRecipe:
    """A recipe from a YAML file (or an already read mapping), shape-checked."""
    if isinstance(path_or_data, dict):
        return parse_recipe(path_or_data)
    return parse_recipe(read_yaml(Path(path_or_data).expanduser()))


def _with_alias(cls: type[Recipe], options: dict, where: str) -> dict:
    """``calib`` means ``train_data`` for the training stages (as their CLI flag does)."""
    if "calib" in options and "calib" not in cls.model_fields and "train_data" in cls.model_fields:
        if "train_data" in options:
            raise LLMPruneError(f"{where}: give 'calib' or 'train_data', not both (they are the same here)")
        options = {("train_data" if k == "calib" else k): v for k, v in options.items()}
    return options


def _stage_config(spec: StageSpec, kind: JobKind, shared: dict, chain: dict) -> Recipe:
    where = f"stage {spec.index} ({spec.kind})"
    cls = kind.config
    own = _with_alias(cls, spec.options, where)
    for key in own:
        if key not in cls.model_fields:
            raise _unknown(key, set(cls.model_fields) - set(CHAIN_KEYS), where)
    common = {k: v for k, v in _with_alias(cls, shared, "recipe").items() if k in cls.model_fields}
    try:
        return validated(cls, {**common, **own, **chain}).validate()
    except LLMPruneError as e:
        raise LLMPruneError(f"{where}: {e}") from None


def _chain_hash(previous: str, normalised: dict) -> str:
    text = json.dumps(normalised, sort_keys=True, default=str)
    return hashlib.sha256(f"{previous}\n{text}".encode()).hexdigest()[:16]


def plan_stages(recipe: ChainRecipe, out: str | Path) -> list[StagePlan]:
    """Every stage's validated config, input and output directory under ``out``, before any work.

    The model flows from stage to stage (each reads the last model-producing stage's directory);
    MaskLLM trains on the last *dense* model (the recipe's, or a structured stage's output) with
    the last prune / maskllm stage's ``masks.npz`` as its prior unless the stage names one. Each
    stage's hash covers its full config and those of the stages before it.
    """
    out = Path(out).expanduser().resolve()
    model = recipe.model
    dense = model_in = (model, model)  # the recipe's model by name: a new model is a new chain
    mask: tuple[Path, str] | None = None
    pattern: tuple[str, str] | None = None  # the mask the current model carries, and which stage made it
    kinds = stage_kinds()
    plans, previous = [], ""
    for spec in recipe.stages:
        kind = kinds[spec.kind]
        d = out / STAGES_DIR / spec.name
        source = dense if spec.kind == "maskllm" else model_in
        chain: dict[str, Any] = {"model": str(source[0]), "out": str(d), "overwrite": True}
        inputs = {"model": source[1]}
        if spec.kind == "maskllm" and "prior" not in spec.options and mask is not None:
            chain["prior"] = str(mask[0])
            inputs["prior"] = mask[1]
        config = _stage_config(spec, kind, recipe.shared, chain)
        _check_keeps_pattern(spec, kind, config, pattern)
        plan = StagePlan(spec, kind, d, config, inputs)
        plan.hash = previous = _chain_hash(previous, plan.normalised())
        if kind.output == "sparse":
            plan.mask_file = d / MASK_FILE
            mask = (plan.mask_file, f"stage {spec.name} {MASK_FILE}")
            pattern = (_pattern(spec.kind, config, pattern), spec.name)
        if kind.output != "report":
            model_in = (d, f"stage {spec.name}")
        if kind.output == "dense":
            dense, mask, pattern = model_in, None, None  # new shapes: earlier masks no longer fit
        plan.pattern = pattern[0] if pattern else None
        plans.append(plan)
    return plans


def _pattern(kind: str, config: Recipe, before: tuple[str, str] | None) -> str:
    """The mask a sparse stage's output carries: its own target, or (recovery) its input's."""
    if kind == "prune":
        return str(config.target) if config.has_target else "explicit"
    if kind == "maskllm":
        return config.pattern
    return before[0] if before else "its input's zeros"


def _check_keeps_pattern(spec: StageSpec, kind: JobKind, config: Recipe, pattern: tuple[str, str] | None) -> None:
    """Refuse, before anything runs, a stage that would make a sparse input dense: a structured
    stage (OSSCAR's re-fit and removed columns break the groups; new shapes void the masks) or a
    LoRA adapter kept unmerged (the next stage would read the sparse base without it)."""
    where = f"stage {spec.index} ({spec.kind})"
    if pattern is None:
        return
    if kind.output == "dense":
        raise LLMPruneError(f"{where}: its input carries the {pattern[0]} mask of stage {pattern[1]}, which "
                            "structured pruning would not keep (new shapes, a dense re-fit); run the structured "
                            "stage before the sparse ones")
    if getattr(config, "keep_adapter", False):
        raise LLMPruneError(f"{where}: keep_adapter leaves the {pattern[0]} base and a separate dense adapter, "
                            "which later stages and final/ would not apply; drop keep_adapter (the adapter is "
                            "merged and the mask re-applied) or run 'llmprune recover' on the chain's output")


def final_stage(plans: list[StagePlan]) -> StagePlan | None:
    """The last stage that produces a model (its output is the chain's result)."""
    return next((p for p in reversed(plans) if p.kind.output != "report"), None)

