"""pipeline/ has no import cycle. Every import counts: module level, inside functions and under
TYPE_CHECKING (a reader follows those too); a package's __init__ is a module like any other."""

from __future__ import annotations

import ast
from pathlib import Path

PIPELINE = Path(__file__).resolve().parent.parent / "pipeline"


def module_files(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under package (its __init__ is the package)."""
    files = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the modules of the same package it imports."""
    files = module_files(package)
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            for target in _targets(node, here, files):
                while target and target not in files:  # `pkg.mod.Name` -> `pkg.mod`
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def _targets(node: ast.AST, here: str, files: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: `.` is this package, `..` its parent
        parent = here.split(".")[: len(here.split(".")) - node.level + 1]
        base = ".".join([*parent, base] if base else parent)
    # `from pkg import mod` imports the module pkg.mod; `from pkg.mod import Name` pkg.mod
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import that closes a loop, as the path a -> ... -> a (depth first, sorted)."""
    found: list[list[str]] = []
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> None:
        path.append(node)
        for nxt in sorted(graph[node]):
            if nxt in path:
                found.append([*path[path.index(nxt):], nxt])
            elif nxt not in done:
                visit(nxt)
        path.pop()
        done.add(node)

    for start in sorted(graph):
        if start not in done:
            visit(start)
    return found


def test_pipeline_has_no_import_cycle() -> None:
    graph = import_graph(PIPELINE)
    assert {"pipeline.cli", "pipeline.run", "pipeline.stores"} <= graph.keys()
    assert "pipeline.config" in graph["pipeline.cli"]  # lazy imports inside functions count
    found = cycles(graph)
    assert not found, "import cycles in pipeline/:\n" + "\n".join(" -> ".join(c) for c in found)


def test_cycle_finder_sees_type_checking_relative_and_lazy_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("def f():\n    from pkg.sub import b\n")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\n"
                              "if TYPE_CHECKING:\n    from pkg.sub.b import Thing\n")
    (pkg / "sub" / "b.py").write_text("from .. import a\nfrom . import c\n")
    (pkg / "sub" / "c.py").write_text("import pkg.a\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.a", "pkg.sub.c"}
    assert graph["pkg.sub"] == {"pkg.sub.b"}
    assert graph["pkg.sub.c"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.a"],
                             ["pkg.a", "pkg.sub.b", "pkg.sub.c", "pkg.a"]]
    (pkg / "sub" / "b.py").write_text("x = 1\n")
    assert cycles(import_graph(pkg)) == []
