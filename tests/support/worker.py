"""A worker script in a fresh process, run from a test (``afterburner.plugins.devtools.worker``): a worker
that fails, times out or reports nothing fails the test with a message ending in the worker's stderr tail."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import pytest

from afterburner.plugins.devtools.worker import WorkerError, run_worker


def run_worker_or_fail(script: str | os.PathLike, *args: object, env: Mapping[str, str] | None = None,
                       unset: Iterable[str] = (), timeout: float) -> tuple[object, str]:
    """``run_worker``'s (decoded RESULT value, stderr), or the test fails with its message."""
    try:
        return run_worker(script, *args, env=env, unset=unset, timeout=timeout)
    except WorkerError as error:
        pytest.fail(str(error), pytrace=False)
