"""What ``llmprune masks export | apply | inspect`` do, as functions returning JSON-able dicts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from llmprune.errors import LLMPruneError
from llmprune.jobs.kind import JobKind
from llmprune.masks import files
from llmprune.masks.maskset import MaskSet, param_shapes
from llmprune.options import Recipe
from llmprune.sparsity.patterns import Target


def _is_gguf(name_or_path: str) -> bool:
    p = Path(name_or_path).expanduser()
    return p.is_file() and p.suffix == ".gguf"


def model_shapes(name_or_path: str, trust_remote_code: bool = False) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a model from its config alone: built on the meta device, no weights
    read (a ``.gguf`` file has no separate config, so it is loaded)."""
    from transformers import AutoModelForCausalLM

    from llmprune.models.loading import check_model_exists, load_config, load_model

    check_model_exists(name_or_path)
    if _is_gguf(name_or_path):
        return param_shapes(load_model(name_or_path)[0])
    config = load_config(name_or_path, trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return param_shapes(model)


def is_mask_file(path: Path) -> bool:
    """Whether ``path`` is a mask file (MaskLLM layout) that :func:`files.read_packed` accepts."""
    try:
        files.read_packed(path)
    except LLMPruneError:
        return False
    return True


def parse_target(pattern: str) -> Target:
    """``N:M`` (e.g. 2:4) or an unstructured sparsity (e.g. 0.5)."""
    if ":" in pattern:
        return Target.parse(pattern, None)
    try:
        return Target.unstructured(float(pattern))
    except ValueError:
        raise LLMPruneError(f"pattern {pattern!r} is neither N:M (e.g. 2:4) nor a sparsity (e.g. 0.5)") from None


def export_masks(model: str, out: str | Path, overwrite: bool = False, trust_remote_code: bool = False) -> dict:
    """Write the mask of ``model``'s prunable linears to ``out`` (MaskLLM layout): as recorded in a
    llmprune output (its ``masks.npz``, or its weights completed to the N:M pattern its report
    records), else the nonzero pattern of the weights."""
    from llmprune.export.save import check_output_file
    from llmprune.models.loading import check_model_exists, input_paths, load_model

    out = check_output_file(out, overwrite, input_paths(model), what="a mask file", ours=is_mask_file)
    check_model_exists(model)
    loaded = load_model(model, trust_remote_code=trust_remote_code, need_tokenizer=False)[0]
    local = Path(model).expanduser()
    masks = MaskSet.of_output(local, loaded) if local.is_dir() else MaskSet.from_model(loaded)
    masks.save(out)
    return {"file": str(out), **masks.summary()}


class MasksConfig(Recipe):
    """``llmprune masks apply``: a model, a mask file, where to save the masked model."""

    model: str = Field(description="bundled name, local HF dir, .gguf file or hub id")
    masks: str = Field(description="mask file (.npz, MaskLLM layout)")
    out: str = Field(description="directory for the masked model (HF dir + pruning.json)")
    overwrite: bool = Field(False, strict=True, description="replace a previous 'masks apply' output at --out")
    trust_remote_code: bool = Field(False, strict=True, description="allow the model repository's own code")


def apply_masks(model: str, masks: str | Path, out: str | Path, overwrite: bool = False,
                trust_remote_code: bool = False) -> dict:
    """Load ``model``, zero what ``masks`` prunes, save a plain HF dir at ``out`` (with the mask
    as its ``masks.npz``); the report."""
    import time

    from llmprune.eval.sparsity import measure_sparsity
    from llmprune.export.save import check_output_dir, output_lock, save_pruned
    from llmprune.jobs.context import Job
    from llmprune.jobs.header import header
    from llmprune.models.loading import input_paths, load_model

    config = MasksConfig(model=model, masks=str(masks), out=str(out), overwrite=overwrite,
                         trust_remote_code=trust_remote_code)
    check_output_dir(out, overwrite, inputs=[*input_paths(model), masks], kind="masks")
    packed = files.read_packed(masks)
    with output_lock(out):
        if not _is_gguf(model):  # names and sizes checked on the meta model, before loading weights
            files.unpack(packed, model_shapes(model, trust_remote_code), source=str(masks))
        t0 = time.perf_counter()
        loaded, tok = load_model(model, trust_remote_code=trust_remote_code)
        job = Job(config, loaded, kind="masks", timings={"load_s": time.perf_counter() - t0})
        maskset = MaskSet(files.unpack(packed, param_shapes(loaded), source=str(masks)))
        maskset.apply(loaded)
        report = {**header(job), "masks": {"file": str(masks), **maskset.summary()},
                  "sparsity": measure_sparsity(loaded)["overall"]}
        save_pruned(loaded, tok, out, report, overwrite=overwrite, inputs=[*input_paths(model), masks],
                    extra_files={files.MASK_FILE: maskset.save})
    return report


def summary(report: dict) -> list[str]:
    return [f"masks from {report['masks']['file']}", f"sparsity of decoder linears: {report['sparsity']:.4f}"]


KIND = JobKind(name="masks", config=MasksConfig,
               run=lambda c, progress: apply_masks(c.model, c.masks, c.out, c.overwrite, c.trust_remote_code),
               summary=summary, output="sparse", chain=False)


def _packed_compare(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict:
    """Hamming distance from packed bits alone (padding bits are zero in both)."""
    common = [n for n in a if n in b]
    if not common:
        raise LLMPruneError("the two mask files share no parameter names; nothing to compare")
    per_key, diff, total = {}, 0, 0
    for n in common:
        if a[n].size != b[n].size:
            raise LLMPruneError(f"key {n + files.SUFFIX!r} has {a[n].size} packed bytes in one file, {b[n].size} in the other")
        h = int(np.unpackbits(a[n] ^ b[n]).sum())
        per_key[n] = {"hamming": h, "agreement_approx": 1 - h / (8 * a[n].size)}
        diff, total = diff + h, total + 8 * a[n].size
    return {"common": len(common), "only_here": [n for n in a if n not in b],
            "only_other": [n for n in b if n not in a], "hamming": diff,
            "agreement_approx": 1 - diff / total, "per_key": per_key}


def inspect_masks(path: str | Path, model: str | None = None, against: str | Path | None = None,
                  pattern: str | None = None, tol: float = 0.01, trust_remote_code: bool = False) -> dict:
    """Summary of a mask file; with ``pattern`` a per-mask check, with ``against`` the agreement.

    Shapes come from ``model``'s config; without it only what the packed bits say is reported
    (kept counts, sparsity out of 8 x bytes), and an N:M check is refused up front (it needs
    each weight's in-features).
    """
    target = parse_target(pattern) if pattern else None
    if target is not None and target.is_nm and model is None:
        raise LLMPruneError(f"checking --pattern {pattern} needs each weight's in-features: pass --model "
                            "(its config is read, not its weights)")
    packed = files.read_packed(path)
    other = files.read_packed(against) if against is not None else None
    if model is None:
        stats = files.packed_stats(packed)
        kept = sum(s["kept"] for s in stats.values())
        bound = sum(s["numel_max"] for s in stats.values())
        res = {"file": str(path), "shapes_known": False, "masks": len(stats), "kept": kept,
               "numel_max": bound, "sparsity_approx": 1 - kept / bound if bound else 0.0, "per_key": stats}
        if target is not None:
            bad = {n: f"sparsity about {s['sparsity_approx']:.4f}, not {target.sparsity:g} ± {tol:g}"
                   for n, s in stats.items() if abs(s["sparsity_approx"] - target.sparsity) > tol}
            res["check"] = {"target": str(target), "ok": not bad, "violations": bad, "approx": True}
        if other is not None:
            res["against"] = {"file": str(against), **_packed_compare(packed, other)}
        return res
    shapes = model_shapes(model, trust_remote_code)
    masks = MaskSet(files.unpack(packed, shapes, source=str(path)))
    res = {"file": str(path), "shapes_known": True, "model": model, **masks.summary()}
    if target is not None:
        bad = masks.violations(target, tol)
        res["check"] = {"target": str(target), "ok": not bad, "violations": bad}
    if other is not None:
        res["against"] = {"file": str(against),
                          **masks.compare(MaskSet(files.unpack(other, shapes, source=str(against))))}
    return res
