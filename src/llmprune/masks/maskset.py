"""A set of keep-masks by parameter name: the value any pruning method hands on."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llmprune.errors import LLMPruneError
from llmprune.masks import checks, files
from llmprune.models.adapter import decoder_layers, prunable_weights
from llmprune.sparsity.patterns import Target


def param_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """``{parameter name: shape}`` of every parameter (a meta-device model works too)."""
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def prunable_names(model: nn.Module) -> list[str]:
    """Full parameter names of the weights of every decoder-layer linear, in model order."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for layer in decoder_layers(model) for p in prunable_weights(layer).values()
            if id(p) in names]


def _as_bool(name: str, value) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(value)) if not isinstance(value, torch.Tensor) else value
    t = t.detach().cpu()
    if t.dtype != torch.bool:
        if t.is_floating_point() or t.is_complex() or bool(((t != 0) & (t != 1)).any()):
            raise LLMPruneError(f"mask {name!r} is {t.dtype} with values other than 0/1; give booleans")
        t = t.bool()
    return t


def recorded_nm(target) -> Target | None:
    """The N:M pattern a report records as a layer's ``target`` (``"2:4"``); None otherwise."""
    return Target.parse(target, None) if isinstance(target, str) and ":" in target else None


def recorded_targets(directory: Path, n_layers: int) -> list[Target | None] | None:
    """The pattern each decoder layer was pruned to, as ``directory``'s ``pruning.json`` says
    (None: no report, or no N:M recorded)."""
    from llmprune.report import optional_report

    report = optional_report(directory)
    if report is None:
        return None

    layers = report.get("layers") or []
    if len(layers) == n_layers and all(isinstance(L, dict) and "target" in L for L in layers):
        return [recorded_nm(L["target"]) for L in layers]
    return [recorded_nm(report.get("target"))] * n_layers


class MaskSet(Mapping[str, torch.Tensor]):
    """``{parameter name: bool keep-tensor}`` (True = the weight stays), on the CPU.

    Holds one byte per weight; files hold one bit (:mod:`llmprune.masks.files`).
    """

    def __init__(self, masks: Mapping[str, torch.Tensor | np.ndarray]):
        self._masks = {name: _as_bool(name, m) for name, m in masks.items()}

    # -- Mapping ---------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __repr__(self) -> str:
        return f"MaskSet({len(self)} masks, sparsity {self.sparsity:.4f})"

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, masks: Mapping[str, torch.Tensor | np.ndarray]) -> MaskSet:
        return cls(masks)

    @classmethod
    @torch.no_grad()
    def from_model(cls, model: nn.Module, targets: Target | Sequence[Target | None] | None = None) -> MaskSet:
        """The keep-masks of every prunable decoder linear of ``model`` read off its weights.

        Without ``targets``, the nonzero pattern (a weight that was kept but is exactly 0 reads as
        pruned). With the N:M pattern that was pruned to (one for every layer, or one per decoder
        layer), each group is completed to exactly N kept positions, so the mask is exactly N:M.
        Where a mask was recorded (``masks.npz``), read that instead: :meth:`load`.
        """
        params = dict(model.named_parameters())
        layers = decoder_layers(model)
        per_layer = list(targets) if isinstance(targets, Sequence) else [targets] * len(layers)
        if len(per_layer) != len(layers):
            raise LLMPruneError(f"{len(per_layer)} targets for {len(layers)} decoder layers")
        owner = {id(p): i for i, layer in enumerate(layers) for p in prunable_weights(layer).values()}
        out = {}
        for name in prunable_names(model):
            nonzero = params[name] != 0
            t = per_layer[owner[id(params[name])]]
            out[name] = checks.complete_nm(nonzero.cpu(), t.n, t.m, name) if t is not None and t.is_nm else nonzero
        return cls(out)

    @classmethod
    def of_output(cls, directory: str | Path, model: nn.Module) -> MaskSet:
        """The mask of the model saved in ``directory``, as recorded: its ``masks.npz`` when it has
        one; else its weights, each group completed to the N:M pattern its ``pruning.json`` records
        (per layer where it records layers); else (a plain HF directory) its nonzeros."""
        d = Path(directory).expanduser()
        if (d / files.MASK_FILE).is_file():
            return cls.load(d / files.MASK_FILE, model)
        return cls.from_model(model, recorded_targets(d, len(decoder_layers(model))))

    @classmethod
    def to_keep(cls, model: nn.Module, source, masks_file: str | Path | None = None, dense: bool = False) -> MaskSet:
        """The mask a tuning stage (``recover``, ``blockwise``) keeps exact: ``masks_file`` when
        given; all ones for a dense (structured) input, whose exact zeros (dequantised weights
        have some) are no mask, so every weight tunes; a local directory's recorded one
        (:meth:`of_output`); else the weights' nonzeros."""
        if masks_file:
            return cls.load(masks_file, model)
        if dense:
            return cls({n: torch.ones_like(m) for n, m in cls.from_model(model).items()})
        if isinstance(source, str | Path) and Path(source).expanduser().is_dir():
            return cls.of_output(source, model)
        return cls.from_model(model)

    @classmethod
    def from_bits(cls, bits: Mapping[str, np.ndarray], shapes: Mapping[str, Sequence[int]] | nn.Module) -> MaskSet:
        """Masks from packed bits (:func:`files.pack`'s form), e.g. what the engine recorded."""
        if isinstance(shapes, nn.Module):
            shapes = param_shapes(shapes)
        return cls(files.unpack(bits, shapes))

    @classmethod
    def load(cls, path: str | Path, shapes: Mapping[str, Sequence[int]] | nn.Module) -> MaskSet:
        """Read a MaskLLM mask file; ``shapes`` (or a model, meta device is fine) give the sizes."""
        if isinstance(shapes, nn.Module):
            shapes = param_shapes(shapes)
        return cls(files.unpack(files.read_packed(path), shapes, source=str(path)))

    def save(self, path: str | Path) -> Path:
        """Write MaskLLM's layout (``<name>.mask`` = packbits of the flat mask), atomically."""
        return files.write_packed(path, {n: m.numpy() for n, m in self._masks.items()})

    # -- questions -------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return sum(m.numel() for m in self._masks.values())

    @property
    def kept(self) -> int:
        return sum(int(m.sum()) for m in self._masks.values())

    @property
    def sparsity(self) -> float:
        return 1 - self.kept / self.numel if self.numel else 0.0

    def violations(self, target: Target, tol: float = 0.01) -> dict[str, str]:
        """``{name: why}`` for every mask that breaks ``target``; empty when all comply."""
        return {n: why for n, m in self._masks.items() if (why := checks.violation(m, target, tol))}

    def check(self, target: Target, tol: float = 0.01) -> None:
        """Raise ``LLMPruneError`` naming the first mask that breaks ``target``."""
        for name, m in self._masks.items():
            why = checks.violation(m, target, tol)
            if why:
                raise LLMPruneError(f"mask {name} breaks {target}: {why}")

    def nm(self) -> tuple[int, int] | None:
        """The N:M every mask follows (same N and M everywhere), else None."""
        found = {checks.detect_nm(m) for m in self._masks.values()}
        return found.pop() if len(found) == 1 and None not in found else None

    def summary(self) -> dict:
        """Per-mask shape, kept count, sparsity and detected N:M, plus the overall figures."""
        per_key = {}
        for name, m in self._masks.items():
            nm = checks.detect_nm(m)
            per_key[name] = {"shape": list(m.shape), "kept": int(m.sum()), "numel": m.numel(),
                             "sparsity": checks.sparsity(m), "nm": f"{nm[0]}:{nm[1]}" if nm else None}
        nms = {v["nm"] for v in per_key.values()}
        return {"masks": len(self), "numel": self.numel, "kept": self.kept, "sparsity": self.sparsity,
                "nm": nms.pop() if len(nms) == 1 else None, "per_key": per_key}

    def compare(self, other: MaskSet) -> dict:
        """Agreement (share of equal entries) and Hamming distance, per common mask and overall."""
        common = [n for n in self._masks if n in other]
        if not common:
            raise LLMPruneError("the two mask sets share no parameter names; nothing to compare")
        per_key, diff, total = {}, 0, 0
        for n in common:
            a, b = self._masks[n], other[n]
            if a.shape != b.shape:
                raise LLMPruneError(f"mask {n} has shape {tuple(a.shape)} here and {tuple(b.shape)} in the other set")
            h = checks.hamming(a, b)
            per_key[n] = {"hamming": h, "agreement": 1 - h / a.numel() if a.numel() else 1.0}
            diff, total = diff + h, total + a.numel()
        return {"common": len(common), "only_here": [n for n in self._masks if n not in other],
                "only_other": [n for n in other if n not in self._masks],
                "hamming": diff, "numel": total, "agreement": 1 - diff / total if total else 1.0,
                "per_key": per_key}

    # -- action ----------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero the pruned weights of ``model`` in place; names and shapes are checked first."""
        params = dict(model.named_parameters())
        for name, m in self._masks.items():
            if name not in params:
                raise LLMPruneError(f"mask {name} names no parameter of {type(model).__name__}")
            if tuple(params[name].shape) != tuple(m.shape):
                raise LLMPruneError(f"mask {name} has shape {tuple(m.shape)}, the parameter "
                                    f"{tuple(params[name].shape)}")
        for name, m in self._masks.items():
            p = params[name]
            p.masked_fill_(~m.to(p.device), 0)  # masked_fill, not multiply: inf/nan weights still become 0
