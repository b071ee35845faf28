"""The import structure of src/facecal: no cycle, no stage importing another stage, no library
module importing a stage (facecal.stages). Imports inside functions count too."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

from facecal import cli
from facecal.stages import ENTRY_POINTS, STAGE_COMMANDS, STAGE_MODULES

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "facecal").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_edges(mods: dict[str, Path]) -> set[tuple[str, str, int]]:
    """(importer, imported facecal module, line) for every import statement, at any depth.
    ``from facecal.x import y`` is an edge to facecal.x.y where that is a module."""
    edges = set()
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names
                ]
            else:
                continue
            for target in targets:
                if target == "facecal" or target.startswith("facecal."):
                    while target not in mods:  # `import facecal.x.y` of a name in a module
                        target = target.rpartition(".")[0]
                    if target != name:
                        edges.add((name, target, node.lineno))
    return edges


def cycles(edges: set[tuple[str, str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for a, b, _ in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _listing(edges) -> str:
    return "\n".join(f"  {a}:{line} imports {b}" for a, b, line in sorted(edges))


def test_stage_modules_exist_and_match_dvc_yaml():
    mods = modules()
    assert set(STAGE_MODULES) <= set(mods), set(STAGE_MODULES) - set(mods)
    assert not set(STAGE_MODULES) & set(ENTRY_POINTS)
    commands = re.findall(r"^\s*cmd:\s*facecal\s+([\w-]+)", (ROOT / "dvc.yaml").read_text(), re.M)
    assert commands, "no `cmd: facecal …` in dvc.yaml"
    assert sorted(set(commands)) == sorted(STAGE_COMMANDS), "dvc.yaml stages ≠ STAGE_COMMANDS"
    cli_module = {c.name: c.module for c in cli.COMMANDS}
    for command, module in STAGE_COMMANDS.items():
        assert cli_module[command] == module, f"facecal {command} runs {cli_module[command]}"


def test_no_import_cycle():
    edges = import_edges(modules())
    found = cycles(edges)
    assert not found, "import cycles:\n" + "\n".join(
        " ↔ ".join(c) + "\n" + _listing(e for e in edges if e[0] in c and e[1] in c) for c in found
    )


def test_stages_import_no_other_stage():
    bad = {e for e in import_edges(modules()) if e[0] in STAGE_MODULES and e[1] in STAGE_MODULES}
    assert not bad, "stage modules importing stage modules:\n" + _listing(bad)


def test_library_modules_import_no_stage():
    lib = set(modules()) - set(STAGE_MODULES) - set(ENTRY_POINTS)
    bad = {e for e in import_edges(modules()) if e[0] in lib and e[1] in STAGE_MODULES}
    assert not bad, "library modules importing stage modules:\n" + _listing(bad)


# Modules a stage imports that cannot change what it writes: the version string, exception
# classes, MLflow logging (a side effect outside the stage's outs) and the default locations
# (dvc.yaml fixes the outs). Docstring-only package __init__ files are left out too.
NOT_RESULT_CODE = {"facecal", "facecal.errors", "facecal.tracking", "facecal.paths"}


def _docstring_only(path: Path) -> bool:
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def imported_closure(start: str, edges) -> set[str]:
    """Every facecal module that running `start` imports, at any depth, packages included
    (importing facecal.gan.models runs facecal/gan/__init__.py first)."""
    graph: dict[str, set[str]] = {}
    for a, b, _ in edges:
        graph.setdefault(a, set()).add(b)
    seen: set[str] = set()
    todo = [start]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += graph.get(m, ())
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
    return seen


def test_every_stage_depends_on_all_the_code_it_imports():
    """A change to any module a stage runs must make `dvc repro` run it again (before this
    test, generate did not depend on gan/models.py, nor any stage on tables.py)."""
    mods = modules()
    edges = import_edges(mods)
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    missing = {}
    for command, module in STAGE_COMMANDS.items():
        deps = [
            d if isinstance(d, str) else next(iter(d))
            for d in stages[command.replace("-", "_")]["deps"]
        ]
        for m in sorted(imported_closure(module, edges) - NOT_RESULT_CODE):
            path = mods[m]
            if path.name == "__init__.py" and _docstring_only(path):
                continue
            rel = path.relative_to(ROOT).as_posix()
            if not any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps):
                missing.setdefault(command, []).append(rel)
    assert not missing, "dvc.yaml deps missing code the stage imports:\n" + "\n".join(
        f"  {c}: {', '.join(files)}" for c, files in missing.items()
    )
