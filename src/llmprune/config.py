"""Recipe objects: what to prune and how, validated early, round-tripping to YAML."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from llmprune.errors import LLMPruneError
from llmprune.sparsity.allocation import check_layer_ratios, check_owl_bounds
from llmprune.sparsity.methods import METHODS, SOLVERS
from llmprune.sparsity.patterns import Target

ALLOCATIONS = ("uniform", "owl", "explicit")


@dataclass
class PruneConfig:
    """One pruning job. Every field has the CLI flag of the same name (``_`` → ``-``)."""

    model: str = "smollm2-135m"
    method: str = "wanda"
    sparsity: float | None = None  # unstructured ratio; give this or pattern
    pattern: str | None = None  # "unstructured" or "N:M" (N kept of every M)
    solver: str | None = None  # None = the method's own (sparsegpt → sparsegpt, others → none)
    calib: str = "c4"  # wikitext2 | c4 | path to a .txt / .jsonl file
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    blocksize: int = 128
    percdamp: float = 0.01
    # layer-wise allocation of the target (issue: OWL)
    allocation: str = "uniform"  # uniform | owl | explicit
    owl_m: float = 7.0  # outlier threshold: score > M x layer mean (sweep: docs/owl.md)
    owl_lambda: float = 0.12  # ratios stay within [S - lambda, S + lambda]
    layer_ratios: list[float] | dict[int, float] | None = None  # explicit per-layer sparsity
    # ADMM solver / ADMM gradual pruning (issue: ADMM)
    admm_iters: int = 20
    admm_ks: int = 15
    admm_rho: float = 1.0
    admm_damp: float = 0.1
    recon_error: bool = False  # collect XᵀX for any method, to report ‖WX − ŴX‖²/‖WX‖² per linear
    device: str = "auto"
    dtype: str = "auto"
    ppl: list[str] = field(default_factory=list)  # measure these perplexities before and after
    ppl_seqlen: int | None = None  # default: seqlen
    max_windows: int | None = None  # evaluate only the first K windows (None = all)
    out: str | None = None
    overwrite: bool = False

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

    def resolved_device(self) -> str:
        if self.device == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def validate(self) -> PruneConfig:
        """Raise :class:`LLMPruneError` naming the bad field and how to fix it."""
        if self.method not in METHODS:
            raise LLMPruneError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.solver is not None and self.solver not in SOLVERS:
            raise LLMPruneError(f"unknown solver {self.solver!r}; choose from {', '.join(SOLVERS)}")
        if self.sparsity is not None and (isinstance(self.sparsity, bool) or not isinstance(self.sparsity, int | float)):
            raise LLMPruneError(f"sparsity must be a number in [0, 1), not {self.sparsity!r}")
        self._validate_allocation()
        if self.has_target or self.allocation != "explicit":
            target = self.target  # parses pattern / sparsity and raises on bad values
            if self.is_nm and self.sparsity is not None and abs(target.sparsity - self.sparsity) > 1e-9:
                raise LLMPruneError(f"--pattern {self.pattern} means sparsity {target.sparsity:g}, "
                                    f"but --sparsity {self.sparsity} was also given; drop one")
            if self.allocation == "owl":
                check_owl_bounds(target.sparsity, self.owl_lambda)
        for name in ("nsamples", "seqlen", "blocksize"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise LLMPruneError(f"{name} must be a positive integer, got {v!r}")
        if self.ppl_seqlen is not None and self.ppl_seqlen < 1:
            raise LLMPruneError(f"ppl_seqlen must be a positive integer, got {self.ppl_seqlen!r}")
        if self.max_windows is not None and self.max_windows < 1:
            raise LLMPruneError(f"max_windows must be a positive integer, got {self.max_windows!r}")
        if not (0 <= self.percdamp):
            raise LLMPruneError(f"percdamp must be ≥ 0, got {self.percdamp}")
        for name in ("admm_iters", "admm_ks"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise LLMPruneError(f"{name} must be a positive integer, got {v!r}")
        if self.method == "admm-grad" and self.admm_ks > self.admm_iters:
            raise LLMPruneError(f"admm_ks ({self.admm_ks}) must be ≤ admm_iters ({self.admm_iters}): "
                                "the mask has to be final before the last ADMM iteration")
        if not (isinstance(self.admm_rho, int | float) and self.admm_rho > 0):
            raise LLMPruneError(f"admm_rho must be > 0, got {self.admm_rho!r}")
        if not (isinstance(self.admm_damp, int | float) and self.admm_damp >= 0):
            raise LLMPruneError(f"admm_damp must be ≥ 0, got {self.admm_damp!r}")
        if self.out is not None:
            out = Path(self.out)
            if out.exists() and (not out.is_dir() or any(out.iterdir())) and not self.overwrite:
                raise LLMPruneError(f"output {out} exists and is not empty; pass --overwrite or choose another --out")
        return self

    def _validate_allocation(self) -> None:
        """``allocation``, OWL's M and λ, and explicit ``layer_ratios`` (their count against the
        model's layers is checked once the model is loaded, before any calibration)."""
        if self.allocation not in ALLOCATIONS:
            raise LLMPruneError(f"unknown allocation {self.allocation!r}; choose from {', '.join(ALLOCATIONS)}")
        for name in ("owl_m", "owl_lambda"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise LLMPruneError(f"{name} must be a number, got {v!r}")
        if not self.owl_m > 0:
            raise LLMPruneError(f"owl_m must be > 0 (outliers are scores above M x the layer mean), got {self.owl_m}")
        if not self.owl_lambda >= 0:
            raise LLMPruneError(f"owl_lambda must be ≥ 0 (layer sparsities stay within S ± lambda), got {self.owl_lambda}")
        if self.allocation == "explicit":
            if self.layer_ratios is None:
                raise LLMPruneError("--allocation explicit needs --layer-ratios (one sparsity per layer)")
            m = self.target.m if self.is_nm else None
            check_layer_ratios(self.layer_ratios, m=m)
            if isinstance(self.layer_ratios, dict) and not self.has_target:
                raise LLMPruneError("layer_ratios as a map sets only some layers; give --sparsity for "
                                    "the others (or --pattern N:M)")
        elif self.layer_ratios is not None:
            raise LLMPruneError(f"--layer-ratios is only used with --allocation explicit (not {self.allocation})")

    # --- YAML recipes -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump({"llmprune": self.to_dict()}, sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, d: dict) -> PruneConfig:
        d = d.get("llmprune", d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LLMPruneError(f"unknown recipe keys {unknown}; valid keys: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path_or_text: str | Path) -> PruneConfig:
        p = Path(path_or_text)
        try:
            text = p.read_text() if p.suffix in (".yaml", ".yml") or p.is_file() else str(path_or_text)
        except OSError as e:
            raise LLMPruneError(f"cannot read recipe {p}: {e}") from e
        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise LLMPruneError(f"recipe {p} must be a YAML mapping")
        return cls.from_dict(data)
