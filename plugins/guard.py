"""The guarded start shared by every engine adapter: off switch, version check, patches applied
all-or-nothing. Whatever goes wrong here, the engine is left stock and one line says why.

A patch verified on an older range than the running release (e.g. the tree-speculation runner patches,
0.32 only, on vLLM 0.33, which has no Medusa) is left out with one line: its feature stays stock and the
others register. A patch whose target moved inside its verified range still leaves the whole engine stock."""

from __future__ import annotations

import os
from typing import Callable, Iterable

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from afterburner.patches import base as patching
from afterburner.plugins import compat, report
from afterburner.plugins.config import print_uncaught_config_errors
from afterburner.plugins.log import get_logger

DISABLE_ENV = "AFTERBURNER_DISABLE"
logger = get_logger(__name__)


def guarded_register(
    engine: compat.Engine,
    patches: Iterable[patching.Patch],
    hooks: dict[str, Callable],
    register_extras: Callable[[], list[str]] = lambda: [],
) -> bool:
    """Apply ``patches`` with their ``hooks`` and then ``register_extras`` (registrations that are not
    patches; returns their names). Returns whether afterburner is active in this process."""
    if os.environ.get(DISABLE_ENV, "").lower() in ("1", "true", "yes"):
        logger.info("afterburner: disabled by %s; registering nothing", DISABLE_ENV)
        report.record("skipped", engine=engine, reason=f"{DISABLE_ENV} is set")
        return False
    verdict = compat.check_version(engine, compat.installed_version(engine))
    if not verdict.should_register:
        logger.warning(verdict.message)
        report.record("skipped", engine=engine, version=verdict.version, reason=verdict.message)
        return False
    if verdict.status == "untested":
        logger.warning(verdict.message)
    release = Version(Version(verdict.version).public)
    unverified = [p for p in patches if release not in SpecifierSet(p.verified_on)]
    if unverified:
        names = ", ".join(f"{p.name} ({p.verified_on})" for p in unverified)
        logger.warning("afterburner: on %s %s these patches are not verified and stay off, with their features: %s",
                       engine, verdict.version, names)
        report.record("patches_skipped", engine=engine, version=verdict.version, patches=[p.name for p in unverified])
    try:
        for patch in patches:
            if patch not in unverified:
                patching.apply(patch, hooks[patch.name], engine_version=verdict.version)
        extras = register_extras()
    except Exception as exc:  # noqa: BLE001 - any failure must leave the engine stock
        patching.revert_all()
        message = (f"afterburner: cannot hook {engine} {verdict.version}: {exc}; registering nothing, "
                   f"{engine} runs stock")
        logger.warning(message)
        report.record("skipped", engine=engine, version=verdict.version, reason=message)
        return False
    print_uncaught_config_errors()
    registered = patching.applied() + extras
    logger.info("afterburner: active on %s %s: %s", engine, verdict.version, ", ".join(registered))
    report.record("registered", engine=engine, version=verdict.version, status=verdict.status, registered=registered)
    return True
