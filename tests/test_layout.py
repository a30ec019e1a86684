"""The package layout the design asks for, checked on the source: no private names imported from
another package, training jobs share `train/` instead of importing each other, and the report
module does not reach up into the chain."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "llmprune"


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llmprune"):
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("llmprune")]
    return out


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_private_name_is_imported_from_another_package():
    bad = []
    for path in SRC.rglob("*.py"):
        here = _package("llmprune." + ".".join(path.relative_to(SRC).with_suffix("").parts))
        for module, names in _imports(path):
            if _package(module) != here:
                bad += [f"{path.relative_to(SRC)}: {module}.{n}" for n in names
                        if n.startswith("_") and not n.endswith("__")]
    assert not bad, bad


def test_recover_and_maskllm_share_train_and_never_import_each_other():
    for pkg, other in (("recover", "llmprune.maskllm"), ("maskllm", "llmprune.recover")):
        for path in (SRC / pkg).rglob("*.py"):
            assert not [m for m, _ in _imports(path) if m.startswith(other)], path


def test_the_report_module_does_not_import_the_chain():
    assert not [m for m, _ in _imports(SRC / "report.py") if m.startswith("llmprune.chain")]
