"""A small declarative patch mechanism for engine methods.

A ``Patch`` names one upstream callable (``"module:Class.method"``), the engine version range it was
verified on and where our hook runs (before or after the original). ``apply`` checks the version, that
the target exists and is callable and is not patched already, wraps it (never copies it), and records
the patch so it can be listed and reverted. Anything unexpected raises ``PatchError`` with the reason;
callers revert what they applied and leave the engine stock.

Hooks:
- ``before``: ``hook(*args, **kwargs)``, runs before the original; its return value is ignored.
- ``after``:  ``hook(result, *args, **kwargs)``, runs after the original; the original's result is
  returned unchanged.
- ``before_async`` / ``after_async``: for a coroutine method, ``await hook(*args, **kwargs)`` before awaiting
  the original, or ``await hook(result, *args, **kwargs)`` after it (the result returned unchanged, though
  the hook may change it in place); a hook that must not block the engine's event loop hands its work to a
  thread and awaits it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Literal

from packaging.specifiers import SpecifierSet
from packaging.version import Version

_MARK = "__afterburner_patch__"


class PatchError(RuntimeError):
    """A patch cannot be applied: wrong version, target moved, or already patched."""


@dataclass(frozen=True)
class Patch:
    name: str
    target: str  # "package.module:Class.method"
    verified_on: str  # PEP 440 specifier over the engine's release version
    when: Literal["before", "after", "before_async", "after_async"]
    # Parameter names the target must have; a rename upstream fails loudly instead of misbehaving.
    expects_params: tuple[str, ...] = ()


@dataclass
class _Applied:
    patch: Patch
    owner: Any
    attr: str
    original: Callable


_applied: dict[str, _Applied] = {}


def _resolve(target: str) -> tuple[Any, str]:
    module_name, _, qualname = target.partition(":")
    try:
        owner: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise PatchError(f"module {module_name} cannot be imported ({exc})") from None
    *parents, attr = qualname.split(".")
    for part in parents:
        if not hasattr(owner, part):
            raise PatchError(f"{module_name} has no {part} (target {target} moved?)")
        owner = getattr(owner, part)
    if not callable(getattr(owner, attr, None)):
        raise PatchError(f"{target} is missing or not callable (target moved?)")
    return owner, attr


def _check_signature(patch: Patch, original: Callable) -> None:
    params = inspect.signature(original).parameters
    missing = [name for name in patch.expects_params if name not in params]
    if missing:
        raise PatchError(f"{patch.target} no longer takes {missing} (signature changed upstream)")


def _wrap(patch: Patch, original: Callable, hook: Callable) -> Callable:
    if patch.when == "before_async":

        @functools.wraps(original)
        async def wrapper(*args, **kwargs):
            await hook(*args, **kwargs)
            return await original(*args, **kwargs)

    elif patch.when == "after_async":

        @functools.wraps(original)
        async def wrapper(*args, **kwargs):
            result = await original(*args, **kwargs)
            await hook(result, *args, **kwargs)
            return result

    elif patch.when == "before":

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            hook(*args, **kwargs)
            return original(*args, **kwargs)

    else:

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            hook(result, *args, **kwargs)
            return result

    setattr(wrapper, _MARK, patch.name)
    return wrapper


def apply(patch: Patch, hook: Callable, *, engine_version: str) -> None:
    """Wrap ``patch.target`` with ``hook``; raises ``PatchError`` (engine untouched) if anything is off."""
    if patch.name in _applied:
        raise PatchError(f"patch {patch.name} is applied already")
    release = Version(Version(engine_version).public)
    if release not in SpecifierSet(patch.verified_on):
        raise PatchError(f"patch {patch.name} was verified on {patch.verified_on}, not on {engine_version}")
    owner, attr = _resolve(patch.target)
    original = inspect.getattr_static(owner, attr)
    if getattr(original, _MARK, None):
        raise PatchError(f"{patch.target} is already wrapped by patch {getattr(original, _MARK)}")
    if isinstance(original, (staticmethod, classmethod)):
        raise PatchError(f"{patch.target} is a {type(original).__name__}; only plain methods are supported")
    _check_signature(patch, original)
    is_async = patch.when.endswith("_async")
    if is_async != inspect.iscoroutinefunction(original):
        raise PatchError(f"{patch.target} is {'not ' * is_async}a coroutine function; a {patch.when!r} patch "
                         "cannot wrap it")
    setattr(owner, attr, _wrap(patch, original, hook))
    _applied[patch.name] = _Applied(patch, owner, attr, original)


def revert(name: str) -> None:
    entry = _applied.pop(name)
    setattr(entry.owner, entry.attr, entry.original)


def revert_all() -> None:
    for name in list(_applied)[::-1]:
        revert(name)


def applied() -> list[str]:
    """Names of the patches in force in this process, in the order they were applied."""
    return list(_applied)
