"""Recipe objects: what to prune and how, validated early, round-tripping to YAML.

``PruneConfig`` is the job's own fields (:class:`JobConfig`) plus the options every method,
solver and allocator declares at its owner (``SparseGPTOptions``, ``ADMMOptions``,
``OWLOptions``, ...). Keys stay flat in recipes and flags (``admm_iters``, ``--admm-iters``).
Every value is type-checked by pydantic: a wrong type, a value out of bounds or an unknown key
is a one-line :class:`LLMPruneError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, Field, field_validator, model_validator

from llmprune.engine.blockwise import BlockwiseOptions
from llmprune.errors import LLMPruneError
from llmprune.eval.zeroshot import TaskOptions
from llmprune.options import (
    CommaList,
    NonNegativeInt,
    Options,
    PositiveInt,
    Recipe,
    check_distinct_fields,
    validated,
)
from llmprune.sparsity.allocation import ALLOCATIONS, check_layer_ratios, check_owl_bounds
from llmprune.sparsity.methods import METHODS, REFINERS, SOLVERS, option_classes
from llmprune.sparsity.patterns import Target

# Where the job writes is not part of the recipe: a saved recipe.yaml re-runs elsewhere.
NOT_IN_RECIPE = ("out", "overwrite")


def parse_yaml(text: str, where: str | Path) -> object:
    """``yaml.safe_load(text)``; a syntax error is one line naming ``where`` and its line/column."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise LLMPruneError(f"recipe {where} is not valid YAML{at}: {getattr(e, 'problem', e)}") from None


def read_yaml(path: Path) -> object:
    """A recipe file's YAML, with one-line errors for unreadable files and syntax errors."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LLMPruneError(f"cannot read recipe {path}: {e}") from None
    return parse_yaml(text, path)


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` where a GPU is available, else ``cpu``; other names unchanged."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _one_of(kind: str, choices) -> Any:
    """A ``str`` annotation that must name one of ``choices`` (a registry)."""
    def check(v: str) -> str:
        if v not in choices:
            raise ValueError(f"unknown {kind} {v!r}; choose from {', '.join(choices)}")
        return v
    return Annotated[str, AfterValidator(check)]


class _RunFields(Recipe):
    """The model, devices, perplexity and output of :class:`RunOptions`."""

    model: str = Field("smollm2-135m", description="bundled name (smollm2-135m), local HF dir, .gguf file or hub id")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N (one layer at a time goes there)")
    dtype: str = Field("auto", description="auto | float32 | bfloat16 | float16")
    trust_remote_code: bool = Field(False, strict=True, description="allow the model's own code from the hub "
                                                                    "(only for models you trust)")
    ppl: CommaList = Field(default_factory=list, description="also measure perplexity before and after, "
                                                             "e.g. wikitext2,c4")
    ppl_seqlen: PositiveInt | None = Field(None, description="perplexity window (default: seqlen)")
    max_windows: PositiveInt | None = Field(None, description="evaluate only the first K windows")
    out: str | None = Field(None, description="save the result here (HF directory + pruning.json)")
    overwrite: bool = Field(False, strict=True, description="replace a previous llmprune output at --out")

    def resolved_device(self) -> str:
        return resolve_device(self.device)


# TaskOptions first: pydantic lists the fields of the last base first (the model comes first).
class RunOptions(TaskOptions, _RunFields):
    """What every entry point (prune, maskllm, ...) shares: the model, devices, evaluation
    (perplexity, zero-shot tasks), output."""


class JobConfig(RunOptions):
    """A one-shot job: method and pattern, calibration data, plus the shared run options."""

    method: _one_of("method", METHODS) = Field("wanda", description=f"how weights are chosen: {' | '.join(METHODS)}")
    sparsity: float | None = Field(None, description="unstructured sparsity in [0, 1), e.g. 0.5")
    pattern: str | None = Field(None, description="N:M (N kept of every M inputs), e.g. 2:4; or 'unstructured'")
    solver: _one_of("solver", SOLVERS) | None = Field(None, description=f"weight update after the mask: {' | '.join(SOLVERS)} "
                                                 "(default: the method's own)")
    refine: _one_of("refine", REFINERS) = Field("none", description=f"refine the method's mask before the solver: "
                                                                    f"{' | '.join(REFINERS)} (dsnot: DSnoT swaps)")
    refine_linears: str | None = Field(None, description="refine only the linears whose name in the decoder layer "
                                                         "matches one of these comma-separated globs, e.g. 'self_attn.*' "
                                                         "(DSnoT's reference default); default all")
    calib: str = Field("c4", description="calibration data: c4 | wikitext2 | FILE (.txt/.jsonl)")
    nsamples: PositiveInt = Field(128, description="calibration windows")
    seqlen: PositiveInt = Field(2048, description="tokens per calibration window")
    seed: NonNegativeInt = Field(0, description="calibration sampling seed")
    allocation: _one_of("allocation", ALLOCATIONS) = Field("uniform", description=f"layer-wise sparsity: {' | '.join(ALLOCATIONS)}")
    recon_error: bool = Field(False, strict=True, description="report each linear's reconstruction "
                                                              "error ‖WX−ŴX‖²/‖WX‖² (collects XᵀX)")
    true_sequential: bool | None = Field(
        None, strict=True, description="one forward per layer: each linear is pruned once every calibration "
        "row reached it, so o_proj / down_proj see the pruned q/k/v / gate/up (faster, lower PPL; holds one "
        "layer's intermediate activations for all rows). Default: on when those fit in memory, else the "
        "exact two-pass mode (dense statistics, as the papers' code); --no-true-sequential forces exact")

    @field_validator("sparsity", mode="before")
    @classmethod
    def _sparsity_number(cls, v: Any) -> Any:
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float | str)):
            raise ValueError(f"sparsity must be a number in [0, 1), not {v!r}")
        return v


# The owners whose options make up a one-shot recipe: the job, then every method, refiner, solver
# and allocator that has settings. Their field names must differ (one namespace of keys and flags).
PRUNE_OWNERS = (JobConfig, *option_classes(), *[c for c in ALLOCATIONS.values() if c], BlockwiseOptions)
check_distinct_fields(PRUNE_OWNERS)


# Bases in reverse: pydantic orders fields from the last base, so recipes list the job first.
class PruneConfig(*reversed(PRUNE_OWNERS)):
    """One pruning job. Every field has the CLI flag of the same name (``_`` → ``-``)."""

    @property
    def is_nm(self) -> bool:
        return self.pattern not in (None, "", "unstructured")

    @property
    def target(self) -> Target:
        """The global target; every layer's with ``uniform``, the mean to keep with ``owl``."""
        return Target.parse(self.pattern, None if self.is_nm else self.sparsity)

    @property
    def has_target(self) -> bool:
        """False only for an explicit allocation that lists every layer and no global target."""
        return self.is_nm or self.sparsity is not None

    @model_validator(mode="after")
    def _consistent(self) -> PruneConfig:
        self._validate_allocation()
        if self.has_target:  # without one, validate() says what to give (a default config is fine)
            target = self.target  # parses pattern / sparsity and raises on bad values
            if self.is_nm and self.sparsity is not None and abs(target.sparsity - self.sparsity) > 1e-9:
                raise LLMPruneError(f"--pattern {self.pattern} means sparsity {target.sparsity:g}, "
                                    f"but --sparsity {self.sparsity} was also given; drop one")
            if self.allocation == "owl":
                check_owl_bounds(target.sparsity, self.owl_lambda)
        method = METHODS[self.method]
        if method.check is not None:
            method.check(method.options.pick(self))
        if self.refine_linears is not None and self.refine == "none":
            raise LLMPruneError("--refine-linears chooses which linears a refiner refines; give --refine too "
                                f"({' | '.join(r for r in REFINERS if r != 'none')})")
        return self

    def _validate_allocation(self) -> None:
        """OWL's bounds and explicit ``layer_ratios`` (their count against the model's layers is
        checked once the model is loaded, before any calibration)."""
        if self.allocation == "explicit":
            if self.layer_ratios is None:
                raise LLMPruneError("--allocation explicit needs --layer-ratios (one sparsity per layer)")
            check_layer_ratios(self.layer_ratios, m=self.target.m if self.is_nm else None)
            if isinstance(self.layer_ratios, dict) and not self.has_target:
                raise LLMPruneError("layer_ratios as a map sets only some layers; give --sparsity for "
                                    "the others (or --pattern N:M)")
        elif self.layer_ratios is not None:
            raise LLMPruneError(f"--layer-ratios is only used with --allocation explicit (not {self.allocation})")

    def validate(self) -> PruneConfig:
        """Check every field again (after attribute assignments); raise :class:`LLMPruneError`."""
        super().validate()
        if not self.has_target and self.allocation != "explicit":
            self.target  # noqa: B018 -- raises "give --sparsity ... or --pattern ..."
        return self

    def options_for(self, *owners: type[Options] | None) -> dict[type[Options], Options]:
        """The typed options of each owner (e.g. the method's and the solver's)."""
        return {c: c.pick(self) for c in owners if c is not None}

    # --- YAML recipes -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return self.model_dump()

    def to_yaml(self, path: str | Path | None = None, recipe_only: bool = True) -> str:
        """The recipe as YAML; ``recipe_only`` (the default) leaves out where it writes (``out``,
        ``overwrite``): a recipe file that sets them is refused, so a shared recipe never decides
        where output goes."""
        data = self.model_dump(exclude=set(NOT_IN_RECIPE) if recipe_only else None)
        text = yaml.safe_dump({"llmprune": data}, sort_keys=False, allow_unicode=True)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, d: dict) -> PruneConfig:
        d = d.get("llmprune", d) if isinstance(d, dict) else d
        if not isinstance(d, dict):
            raise LLMPruneError(f"a recipe must be a mapping of option: value, got {type(d).__name__}")
        return validated(cls, d)

    @classmethod
    def load_recipe(cls, path_or_text: str | Path) -> dict:
        """The raw mapping of a recipe file (or a saved model directory's ``recipe.yaml``, or YAML
        text), not yet validated: flags may still override it."""
        p = Path(path_or_text).expanduser()
        if p.is_dir():
            p = p / "recipe.yaml"
        looks_like_file = p.suffix in (".yaml", ".yml") or p.is_file()
        data = read_yaml(p) if looks_like_file else parse_yaml(str(path_or_text), "(text)")
        if isinstance(data, dict) and "llmprune" in data:
            data = data["llmprune"]
        if not isinstance(data, dict):
            raise LLMPruneError(f"recipe {p} must be a YAML mapping of option: value")
        if "stages" in data:
            raise LLMPruneError(f"recipe {p} lists stages: it is a chained recipe; run it with "
                                f"`llmprune run {p} --out DIR`")
        for key in NOT_IN_RECIPE:
            if data.get(key) not in (None, False):
                raise LLMPruneError(f"recipe {p} sets {key!r}: where output goes is given on the command line "
                                    f"(--{key}), never by a recipe; remove it from the file")
        return data

    @classmethod
    def from_yaml(cls, path_or_text: str | Path) -> PruneConfig:
        return cls.from_dict(cls.load_recipe(path_or_text))


def add_prune_flags(p) -> None:
    """``llmprune prune``'s flags beyond PruneConfig's own fields."""
    p.add_argument("--recipe", help="YAML recipe (or a pruned directory holding recipe.yaml); flags given here override it")
    p.add_argument("--no-update", dest="no_update", action="store_true",
                   help="keep the original weights under the mask (SparseGPT mask-only); same as --solver none")


def prune_config_from_flags(opts: dict) -> PruneConfig:
    """The recipe (if any) overridden by the flags given: one validated ``PruneConfig``."""
    recipe = opts.pop("recipe", None)
    data = PruneConfig.load_recipe(recipe) if recipe else {}
    if opts.pop("no_update", False):
        if opts.get("solver", "none") != "none":
            raise LLMPruneError(f"--no-update keeps the original weights, but --solver {opts['solver']} "
                                "updates them; drop one")
        opts["solver"] = "none"
    if "pattern" in opts and "sparsity" not in opts:
        data.pop("sparsity", None)  # an N:M pattern on the command line replaces a recipe's ratio
    if "sparsity" in opts and "pattern" not in opts:
        data.pop("pattern", None)
    return PruneConfig.from_dict({**data, **opts})
