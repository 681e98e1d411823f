"""The package's import graph: no import circles anywhere (imports inside functions count: a circle held
apart only by a late import is still a circle), and the method folders import neither ``plugins`` nor an
engine (README, Architecture: plugins/ -> method folders, never back)."""

from __future__ import annotations

import ast
from pathlib import Path

import tomllib

from support import REPO

METHOD_FOLDERS = ("attention_backends", "spec_decode", "samplers")
FORBIDDEN_FROM_METHODS = ("afterburner.plugins", "vllm", "sglang")


def package_modules(repo: Path) -> dict[str, Path]:
    """Module name -> file, for every module of the package (pyproject's package-dir mapping)."""
    package_dir = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    modules = {}
    for package, folder in package_dir.items():
        for path in (repo / folder).rglob("*.py"):
            parts = path.relative_to(repo / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            modules[".".join((package, *parts))] = path
    return modules


def imported_names(path: Path, module: str) -> set[str]:
    """Every dotted name ``path`` imports, anywhere in the file; ``from a import b`` gives a.b (which counts
    as a when a.b is not a module: ``import_graph``)."""
    is_package = path.name == "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports (a name that is not a module counts as its package)."""
    graph = {}
    for module, path in modules.items():
        targets = set()
        for name in imported_names(path, module):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_circles():
    graph = import_graph(package_modules(REPO))
    assert len(graph) > 50, "the graph should cover the whole package"
    assert cycles(graph) == []


def test_method_folders_import_neither_plugins_nor_engines():
    modules = package_modules(REPO)
    offenders = []
    for module, path in modules.items():
        if module.split(".")[1] not in METHOD_FOLDERS:
            continue
        for name in imported_names(path, module):
            if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN_FROM_METHODS):
                offenders.append((module, name))
    assert offenders == []


def test_the_checks_catch_a_circle_and_a_forbidden_import(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[tool.setuptools]\npackage-dir = { "afterburner.spec_decode" = "spec_decode", '
        '"afterburner.plugins" = "plugins" }\n')
    for folder in ("spec_decode", "plugins"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "plugins" / "a.py").write_text("def f():\n    from afterburner.plugins import b\n")
    (tmp_path / "plugins" / "b.py").write_text("from . import a\n")
    (tmp_path / "spec_decode" / "x.py").write_text("def g():\n    from afterburner.plugins.a import f\n")
    modules = package_modules(tmp_path)
    graph = import_graph(modules)
    assert cycles(graph) == [["afterburner.plugins.a", "afterburner.plugins.b"]]
    assert "afterburner.plugins.a" in graph["afterburner.spec_decode.x"]
    names = imported_names(modules["afterburner.spec_decode.x"], "afterburner.spec_decode.x")
    assert "afterburner.plugins.a.f" in names
