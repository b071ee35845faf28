"""The bench scripts are not run by the suite (they measure speed) and mypy does not read them,
so a refactor that moves a name can break one silently (bench/classify.py did): every
`from facecal… import name` in bench/ must resolve."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def facecal_imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every `from facecal… import name` in the file, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("facecal"):
            found += [(str(node.module), alias.name) for alias in node.names]
    return found


@pytest.mark.parametrize("script", sorted(BENCH.glob("*.py")), ids=lambda p: p.name)
def test_bench_imports_resolve(script: Path) -> None:
    missing = []
    for module_name, name in facecal_imports(script):
        module = importlib.import_module(module_name)
        if hasattr(module, name):
            continue
        try:  # `from facecal import landmarks`: a submodule, not an attribute yet
            importlib.import_module(f"{module_name}.{name}")
        except ModuleNotFoundError:
            missing.append(f"{module_name}.{name}")
    assert not missing, f"{script.name} imports names that do not exist: {missing}"


def test_the_check_sees_a_missing_name(tmp_path: Path) -> None:
    script = tmp_path / "stale.py"
    script.write_text("def f():\n    from facecal.classifier import ExpressionCNN\n")
    assert facecal_imports(script) == [("facecal.classifier", "ExpressionCNN")]
    assert not hasattr(importlib.import_module("facecal.classifier"), "ExpressionCNN")
