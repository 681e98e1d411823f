"""Run a Python script as a worker process and read back the one value it reports.

One process holds one engine, and some engine settings are read once at import (``VLLM_PLUGINS``,
``TRITON_INTERPRET``): so benchmarks run each configuration, and tests each engine unlike the session's,
in a fresh process. The protocol is one stdout line, ``RESULT <json>``: the worker calls ``print_result``,
the parent ``run_worker``, which returns the decoded value and the worker's stderr, or raises
``WorkerError`` ending with the stderr tail when the worker failed, timed out or reported nothing.
A benchmark's command line calls ``run_worker_or_exit``; tests call ``support.worker.run_worker_or_fail``.
A benchmark script is both: ``main_or_worker`` runs its worker when called with ``--worker``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

PREFIX = "RESULT "
STDERR_TAIL = 3000  # characters of the worker's stderr a failure shows: its traceback, not its whole log


class WorkerError(RuntimeError):
    """The worker exited non-zero, ran past its timeout or printed no ``RESULT`` line."""


def print_result(value: object) -> None:
    """Report ``value`` (JSON-serializable) to ``run_worker``: one stdout line, flushed at once."""
    print(PREFIX + json.dumps(value), flush=True)


def _text(stream: str | bytes | None) -> str:
    # TimeoutExpired carries bytes whatever text=True says (subprocess docs).
    return stream.decode(errors="replace") if isinstance(stream, bytes) else stream or ""


def run_worker(script: str | os.PathLike, *args: object, env: Mapping[str, str] | None = None,
               unset: Iterable[str] = (), timeout: float | None = None) -> tuple[object, str]:
    """Run ``[sys.executable, script, *args]`` (args as ``str``): (the decoded RESULT value, its stderr).

    env: variables set on top of this process's environment; unset: variables removed from it.
    timeout: seconds before the worker is killed (None: no limit)."""
    command = [sys.executable, str(script), *map(str, args)]
    environment = {**os.environ, **(env or {})}
    for name in unset:
        environment.pop(name, None)
    what = " ".join([Path(script).name, *command[2:]])
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment)
    except subprocess.TimeoutExpired as error:
        raise WorkerError(f"{what}: no result after {timeout} s; stderr ends:\n"
                          f"{_text(error.stderr)[-STDERR_TAIL:]}") from None
    if run.returncode != 0:
        raise WorkerError(f"{what}: exit status {run.returncode}; stderr ends:\n{run.stderr[-STDERR_TAIL:]}")
    line = next((line for line in run.stdout.splitlines() if line.startswith(PREFIX)), None)
    if line is None:
        raise WorkerError(f"{what}: no {PREFIX.strip()} line on stdout; stderr ends:\n{run.stderr[-STDERR_TAIL:]}")
    return json.loads(line.removeprefix(PREFIX)), run.stderr


def run_worker_or_exit(name: str, script: str | os.PathLike, *args: object,
                       env: Mapping[str, str] | None = None) -> object:
    """``run_worker``'s value (no timeout), or this program exits with ``<name> failed:`` and the reason."""
    try:
        return run_worker(script, *args, env=env)[0]
    except WorkerError as error:
        sys.exit(f"{name} failed: {error}")


def main_or_worker(main: Callable[[], object], worker: Callable[[argparse.Namespace], object],
                   **flags: type | tuple[type, str]) -> object:
    """A script's entry point: ``worker(args)`` when ``--worker`` is on its command line, parsing ``flags``
    (``decode_tokens=int`` is ``--decode-tokens N``; ``(int, "+")`` takes several values), else ``main()``."""
    if "--worker" not in sys.argv:
        return main()
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    for name, kind in flags.items():
        kind, nargs = kind if isinstance(kind, tuple) else (kind, None)
        parser.add_argument("--" + name.replace("_", "-"), type=kind, nargs=nargs)
    return worker(parser.parse_args())
