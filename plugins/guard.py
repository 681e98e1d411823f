"""The guarded start shared by every engine adapter: off switch, version check, patches applied
all-or-nothing. Whatever goes wrong here, the engine is left stock and one line says why."""

from __future__ import annotations

import os
from typing import Callable, Iterable

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
    try:
        for patch in patches:
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
