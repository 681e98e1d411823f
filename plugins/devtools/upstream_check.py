"""Check, without installing it, that an engine release still has what afterburner relies on.

    python -m afterburner.plugins.devtools.upstream_check vllm 0.33.0 [--wheel PATH]

Downloads the release's wheel (``pip download --no-deps``, cached under ``$AFTERBURNER_CACHE/upstream``) and
reads its source with ``ast``, nothing imported (the CUDA build of vLLM needs a CUDA torch to import):
- every patch whose ``verified_on`` range admits the release: its target class and method exist, with
  the parameters the patch expects;
- every ``from <engine>... import Name`` in afterburner's adapters (``plugins/<engine>/``): the module
  exists and defines ``Name`` (or has it as a submodule), but in adapter files that serve only a patched
  feature (``FEATURE_FILES``) when that feature's patches are not claimed for the release.
A failure names the patch or import and what is missing, and the command exits 1. Patches verified on an
older range only are listed as not claimed for this release (the guard leaves the engine stock there).
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from afterburner.patches import SGLANG_PATCHES, VLLM_PATCHES
from afterburner.patches.base import Patch

PATCHES = {"vllm": VLLM_PATCHES, "sglang": SGLANG_PATCHES}
# adapter file -> the patch whose feature it serves: checked only where that patch is claimed
FEATURE_FILES = {"vllm": {"medusa_proposer.py": "vllm.tree_proposer", "tree_speculation.py": "vllm.tree_proposer"}}
ADAPTERS = Path(__file__).resolve().parents[1]  # plugins/


@dataclass(frozen=True)
class Finding:
    what: str  # "patch vllm.engine_config" or "import vllm.config.get_current_vllm_config"
    problem: str | None  # None: present


class WheelSource:
    """A wheel's Python modules, parsed on demand."""

    def __init__(self, wheel: Path):
        self._zip = zipfile.ZipFile(wheel)
        self._names = set(self._zip.namelist())
        self._trees: dict[str, ast.Module | None] = {}

    def is_package(self, module: str) -> bool:
        return f"{module.replace('.', '/')}/__init__.py" in self._names

    def tree(self, module: str) -> ast.Module | None:
        if module not in self._trees:
            base = module.replace(".", "/")
            path = next((p for p in (f"{base}.py", f"{base}/__init__.py") if p in self._names), None)
            self._trees[module] = None if path is None else ast.parse(self._zip.read(path), filename=path)
        return self._trees[module]


def _top_level_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.If, ast.Try)):  # conditional definitions count as defined
            names.update(_top_level_names(ast.Module(body=[*node.body, *getattr(node, "orelse", [])],
                                                     type_ignores=[])))
    return names


def check_patch(source: WheelSource, patch: Patch) -> str | None:
    module, _, qualname = patch.target.partition(":")
    tree = source.tree(module)
    if tree is None:
        return f"module {module} is gone"
    *classes, method = qualname.split(".")
    scope: list[ast.stmt] = tree.body
    for name in classes:
        found = next((n for n in scope if isinstance(n, ast.ClassDef) and n.name == name), None)
        if found is None:
            return f"{module} has no class {name}"
        scope = found.body
    function = next((n for n in scope if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                     and n.name == method), None)
    if function is None:
        return f"{qualname} is not defined there (moved, renamed or inherited)"
    args = function.args
    params = {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]}
    missing = [p for p in patch.expects_params if p not in params]
    return f"{qualname} no longer takes {missing}" if missing else None


def adapter_imports(engine: str, skip_files: frozenset[str] = frozenset()) -> set[tuple[str, str]]:
    """(module, name) of every ``from <engine>... import name`` in plugins/<engine>/ (but ``skip_files``)."""
    found = set()
    for path in sorted((ADAPTERS / engine).rglob("*.py")):
        if path.name in skip_files:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                    and node.module.split(".")[0] == engine:
                found.update((node.module, alias.name) for alias in node.names)
    return found


def check_import(source: WheelSource, module: str, name: str) -> str | None:
    tree = source.tree(module)
    if tree is None:
        return f"module {module} is gone"
    if name in _top_level_names(tree) or source.tree(f"{module}.{name}") is not None:
        return None
    return f"{module} no longer defines {name}"


def check(engine: str, version: str, wheel: Path) -> tuple[list[Finding], list[str]]:
    """(findings for what the release must have, patches not claimed for it)."""
    source = WheelSource(wheel)
    release = Version(Version(version).public)
    findings, unclaimed = [], []
    for patch in PATCHES[engine]:
        if release in SpecifierSet(patch.verified_on):
            findings.append(Finding(f"patch {patch.name} ({patch.target})", check_patch(source, patch)))
        else:
            unclaimed.append(f"{patch.name} (verified on {patch.verified_on})")
    unclaimed_names = {patch.name for patch in PATCHES[engine] if release not in SpecifierSet(patch.verified_on)}
    skip = frozenset(f for f, feature in FEATURE_FILES.get(engine, {}).items() if feature in unclaimed_names)
    for module, name in sorted(adapter_imports(engine, skip)):
        findings.append(Finding(f"import {module}.{name}", check_import(source, module, name)))
    return findings, unclaimed


def download(engine: str, version: str) -> Path:
    cache = Path(os.environ.get("AFTERBURNER_CACHE", Path.home() / ".cache" / "afterburner")) / "upstream"
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob(f"{engine}-{version}-*.whl"))
    if not wheels:
        print(f"[upstream] downloading {engine}=={version} (wheel only, no dependencies)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "-d", str(cache), f"{engine}=={version}"], check=True)
        wheels = sorted(cache.glob(f"{engine}-{version}-*.whl"))
    return wheels[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("engine", choices=sorted(PATCHES))
    parser.add_argument("version")
    parser.add_argument("--wheel", type=Path, help="a local wheel instead of downloading one")
    args = parser.parse_args(argv)
    wheel = args.wheel or download(args.engine, args.version)
    findings, unclaimed = check(args.engine, args.version, wheel)
    failed = [f for f in findings if f.problem]
    for finding in findings:
        print(f"  {'ok  ' if finding.problem is None else 'FAIL'} {finding.what}"
              + (f": {finding.problem}" if finding.problem else ""))
    for name in unclaimed:
        print(f"  skip patch {name}: not claimed for {args.version}")
    print(f"[upstream] {args.engine} {args.version}: {len(findings) - len(failed)} of {len(findings)} present"
          + (f", {len(failed)} missing" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
