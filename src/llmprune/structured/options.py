"""The options of structured pruning, declared once (CLI flags, YAML keys and keywords derive
from here like ``prune``'s). Calibration keys (``calib``, ``nsamples``, ``seqlen``, ``seed``)
mean what they mean for ``prune``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from llmprune.engine.blockwise import BlockwiseOptions
from llmprune.options import (
    CommaList,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    Recipe,
    number,
)

UnitInterval = number(float, lambda v: 0 < v < 1, "in (0, 1)")
ShrinkShare = number(float, lambda v: 0 <= v < 1, "in [0, 1)")
SEARCH_TARGETS = ("mlp", "attention", "hidden", "depth")


class StructuredOptions(Recipe, BlockwiseOptions):
    """OSSCAR MLP-width or attention-head pruning, depth, hidden-size pruning, MoE expert removal,
    or a budget search (optionally followed, layer by layer, by block-wise reconstruction:
    ``reconstruct: blockwise``)."""

    method: Literal["osscar", "depth", "hidden", "experts", "search"] = Field(
        "osscar", description="osscar: remove MLP channels or attention heads (--target) | depth: remove "
                              "consecutive layers | hidden: remove residual-stream channels (hidden_size) | "
                              "experts: remove routed experts of every MoE layer | "
                              "search: split a --param-ratio budget over --targets")
    target: Literal["mlp", "attention"] = Field("mlp", description="osscar: what to remove: MLP channels or "
                                                                   "attention heads")
    attention_unit: Literal["heads", "groups"] = Field(
        "heads", description="osscar --target attention: remove query heads evenly within every KV group "
                             "(heads) or whole KV groups with their k/v heads (groups)")
    ratio: UnitInterval | None = Field(None, description="osscar: share of each MLP's intermediate channels "
                                                         "(--target attention: of its query heads) removed; "
                                                         "hidden: share of hidden_size; experts: share of each "
                                                         "MoE layer's routed experts; in (0, 1)")
    param_ratio: UnitInterval | None = Field(None, description="share of all model parameters removed, in "
                                                               "(0, 1) (instead of --ratio / --layers)")
    layers: PositiveInt | None = Field(None, description="depth: number k of consecutive layers removed")
    score: Literal["ppl", "cosine", "angular"] = Field(
        "ppl", description="depth: how windows are ranked: ppl (calibration perplexity without the "
                           "window) | cosine (1 − cos of the block's input and output) | angular")
    compare_scores: bool = Field(False, strict=True, description="depth: also compute the ppl score of "
                                                                 "every window when ranking by a cheap one")
    round_to: PositiveInt = Field(64, description="osscar / hidden / search: the kept width (MLP channels, "
                                                  "hidden_size) is a multiple of this")
    greedy: bool = Field(True, strict=True, description="osscar / hidden: greedy removal by OBS costs (off: "
                                                        "keep the channels / heads with the largest ‖W‖·‖X‖; "
                                                        "hidden: Minitron's activation importance)")
    local_search: bool = Field(True, strict=True, description="osscar: swap kept and removed channels "
                                                              "while the error drops")
    refit: bool = Field(True, strict=True, description="osscar: least-squares re-fit of down_proj / o_proj on "
                                                       "the kept channels / heads (off: keep its dense columns); "
                                                       "hidden: of every reader (off: norm gains rescaled only)")
    dense_target: bool = Field(False, strict=True, description="osscar: fit each down_proj to the dense "
                                                               "model's output (the reference's fullseq; "
                                                               "one more forward per layer) instead of its own")
    greedy_block: PositiveInt = Field(1, description="osscar: channels removed per greedy step (one "
                                                     "low-rank inverse update each)")
    swaps: NonNegativeInt = Field(100, description="osscar: most local-search swaps per layer")
    candidates: PositiveInt = Field(64, description="osscar: kept channels tried per local-search swap")
    percdamp: NonNegativeFloat = Field(0.01, description="osscar: damping of XᵀX, a fraction of its mean "
                                                         "diagonal")
    shrink: ShrinkShare = Field(0.4, description="osscar: shrink XᵀX toward its diagonal by this share "
                                                 "before greedy / local search / re-fit (discounts channel "
                                                 "correlations over-estimated on few calibration tokens; 0 = "
                                                 "plain XᵀX as in the paper)")
    targets: CommaList = Field(["mlp", "attention", "hidden", "depth"],
                               description="search: the targets the budget is split over (comma-separated "
                                           "subset of mlp,attention,hidden,depth)")
    holdout: PositiveInt = Field(4, description="search: calibration windows drawn after the nsamples ones, "
                                                "held out of the statistics to score allocations on (KL to the "
                                                "dense model)")
    search_candidates: PositiveInt = Field(6, description="search: joint allocations built and scored after "
                                                          "the per-target sensitivity curves")
    expert_score: Literal["reap", "output", "frequency", "random"] = Field(
        "reap", description="experts: which experts go: reap (least mean gate weight x expert output norm over "
                            "the tokens routed to it) | output (greedy: least change of the MoE block's output, "
                            "tokens re-routed) | frequency (fewest tokens routed) | random (seeded)")
    expert_candidates: PositiveInt = Field(16, description="experts, output: experts tried per greedy step (the "
                                                           "least salient by REAP)")
    expert_mlp_ratio: UnitInterval | None = Field(
        None, description="experts: also remove this share of every kept expert's MLP channels by OSSCAR on the "
                          "tokens routed to it (router-weighted; greedy, local search, down_proj re-fit), the "
                          "width a multiple of --round-to; in (0, 1)")
    calib: str = Field("c4", description="calibration data: c4 | wikitext2 | FILE (.txt/.jsonl)")
    nsamples: PositiveInt = Field(128, description="calibration windows")
    seqlen: PositiveInt = Field(2048, description="tokens per calibration window")
    seed: NonNegativeInt = Field(0, description="calibration sampling seed")

    @property
    def windows(self) -> int:
        """Calibration windows drawn: ``nsamples``, and the search's held-out ones after them."""
        return self.nsamples + (self.holdout if self.method == "search" else 0)

    def osscar_kwargs(self, **override) -> dict:
        """:func:`~llmprune.structured.osscar.osscar_prune`'s options as these say (``override``
        replaces some)."""
        return {"greedy": self.greedy, "local_search_swaps": self.swaps if self.local_search else 0,
                "refit_down": self.refit, "block": self.greedy_block, "candidates": self.candidates,
                "percdamp": self.percdamp, "shrink": self.shrink, **override}

    @model_validator(mode="after")
    def _consistent(self) -> StructuredOptions:
        unknown = [t for t in self.targets if t not in SEARCH_TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"--targets must be a comma-separated subset of {','.join(SEARCH_TARGETS)}, "
                             f"got {','.join(self.targets) or 'nothing'}")
        if self.expert_mlp_ratio is not None and self.method != "experts":
            raise ValueError(f"--expert-mlp-ratio applies to --method experts, not --method {self.method}")
        if self.method == "search":
            for wrong in ("ratio", "layers"):
                if getattr(self, wrong) is not None:
                    raise ValueError(f"--{wrong} does not apply to --method search; give --param-ratio (the budget)")
            if self.param_ratio is None:
                raise ValueError("--method search needs --param-ratio (the share of all parameters to remove)")
            return self
        if self.method in ("osscar", "hidden", "experts"):
            size, wrong = "ratio", "layers"
        else:
            size, wrong = "layers", "ratio"
        if getattr(self, wrong) is not None:
            raise ValueError(f"--{wrong} does not apply to --method {self.method}; give --{size} or --param-ratio")
        given = [k for k in (size, "param_ratio") if getattr(self, k) is not None]
        if len(given) != 1:
            what = "both" if given else "neither"
            raise ValueError(f"--method {self.method} needs exactly one of --{size} and --param-ratio "
                             f"({what} given)")
        return self
