"""House rules that a tool can check: method folders are engine-free; every package is packaged."""

import ast

import pytest
import tomllib

from support import REPO

ENGINE_FREE = ("attention_backends", "spec_decode", "samplers")
ENGINES = ("vllm", "sglang")


def _imported_roots(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module",
            "__import__",
        ):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                yield node.args[0].value.split(".")[0]


@pytest.mark.parametrize("folder", ENGINE_FREE)
def test_method_folders_never_import_engines(folder):
    files = sorted((REPO / folder).rglob("*.py"))
    assert files, f"{folder}/ has no Python files"
    offenders = [(str(f.relative_to(REPO)), root) for f in files for root in _imported_roots(f) if root in ENGINES]
    assert offenders == []


def test_the_import_checker_catches_engine_imports(tmp_path):
    sample = tmp_path / "bad.py"
    sample.write_text("import vllm.config\nfrom sglang.srt import x\nimportlib.import_module('vllm')\n")
    assert [r for r in _imported_roots(sample) if r in ENGINES] == ["vllm", "sglang", "vllm"]


def test_every_package_folder_is_listed_in_pyproject():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = set()
    for package, folder in setuptools["package-dir"].items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder).parts
            found.add(".".join((package, *rel)))
    assert found == listed


def test_top_level_layout():
    for name in ("pyproject.toml", "plugins", "attention_backends", "spec_decode", "samplers", "patches",
                 "tests", "README.md", "Makefile", "benchmarks", ".ci/run"):
        assert (REPO / name).exists(), name


def test_tests_mirror_the_package_and_share_helpers_only_through_support():
    """Unit tests live in tests/unit/<folder>/, <folder> the top-level package folder they test; test
    modules take shared helpers from tests/support, never from another test module or a conftest."""
    folders = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    unit = REPO / "tests" / "unit"
    assert not list(unit.glob("*.py"))
    assert {p.name for p in unit.iterdir() if p.is_dir() and p.name != "__pycache__"} <= folders
    offenders = [(str(f.relative_to(REPO)), root) for f in sorted((REPO / "tests").rglob("test_*.py"))
                 for root in _imported_roots(f) if root.startswith("test_") or root == "conftest"]
    assert offenders == []
