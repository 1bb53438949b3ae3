"""The package's shape: no import cycle of any kind, a short top level, one home per type.

Imports are read from the source (ast), so an import inside a function or under TYPE_CHECKING counts
as much as one at the top of a module: a cycle hidden that way is still a cycle."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "toolchain"
TOP_LEVEL_LIMIT = 12  # modules directly in toolchain/, cli.py and __init__.py aside


def _modules(root: Path) -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _imported(module: str, is_package: bool, node: ast.AST, known: dict) -> list[str]:
    """The project modules an import statement runs, as dotted names."""
    top = module.split(".")[0]
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == top]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    elif (node.module or "").split(".")[0] == top:
        target = node.module
    else:
        return []
    return [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the project modules its source imports anywhere (including the packages an import runs,
    except those the importer lies in: a submodule importing its own package's siblings is no cycle)."""
    known = _modules(root)
    graph: dict[str, set[str]] = defaultdict(set)
    for module, (path, is_package) in known.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _imported(module, is_package, node, known):
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    prefix = ".".join(parts[:i])
                    if prefix in known and prefix != module and not module.startswith(prefix + "."):
                        graph[module].add(prefix)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(set(graph) | {w for ws in graph.values() for w in ws}):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_of_any_kind():
    assert cycles(import_graph()) == []


def test_cycle_finder_sees_a_cycle_hidden_in_a_function_or_type_checking(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .a import A\n")
    (pkg / "sub" / "a.py").write_text("class A:\n    def f(self):\n        from ..b import g\n        return g\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .sub.a import A\n")
    assert cycles(import_graph(pkg)) == [["pkg.b", "pkg.sub", "pkg.sub.a"]]  # importing pkg.sub.a runs pkg.sub too
    (pkg / "b.py").write_text("import os\n")
    assert cycles(import_graph(pkg)) == []


def test_top_level_is_short():
    top = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in {"__init__.py", "cli.py"})
    assert len(top) <= TOP_LEVEL_LIMIT, top


def test_one_home_per_type():
    """A class is defined in one module, and a name is not re-exported from a second one: importers go
    to the module that defines and builds it."""
    homes: dict[str, list[str]] = defaultdict(list)
    for module, (path, _) in _modules(PACKAGE).items():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef):
                homes[node.name].append(module)
    assert {name: where for name, where in homes.items() if len(where) > 1} == {}
    for module, (path, is_package) in _modules(PACKAGE).items():
        if is_package:
            continue  # a package's __init__ may present its modules' API
        src = path.read_text(encoding="utf-8")
        assert "noqa: F401" not in src, f"{module} re-exports a name it does not use"
