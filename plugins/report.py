"""What afterburner did in each engine process, for the demo, the tests and curious users.

Events are kept in memory (``events()``) and, when ``AFTERBURNER_REPORT_DIR`` is set, appended as JSON
lines to ``<dir>/<pid>.jsonl``: engines start worker processes of their own, and a file per process is
the only way the parent (a test, ``make demo``) can see what happened inside them.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

REPORT_DIR_ENV = "AFTERBURNER_REPORT_DIR"

# Bounded: a long-running server records an event per constrained request.
_events: deque[dict[str, Any]] = deque(maxlen=10_000)


def record(event: str, **fields: Any) -> dict[str, Any]:
    entry = {
        "event": event,
        "pid": os.getpid(),
        "process": multiprocessing.current_process().name,
        "argv0": os.path.basename(sys.argv[0]) if sys.argv else "",
        "time": time.time(),
        **fields,
    }
    _events.append(entry)
    folder = os.environ.get(REPORT_DIR_ENV)
    if folder:
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        with open(path / f"{os.getpid()}.jsonl", "a") as out:
            out.write(json.dumps(entry, default=str) + "\n")
    return entry


def events() -> list[dict[str, Any]]:
    """This process's events, oldest first."""
    return list(_events)


def read_dir(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """All events written under ``folder`` by any process, in time order."""
    entries = []
    for path in sorted(Path(folder).glob("*.jsonl")):
        entries += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(entries, key=lambda e: e["time"])
