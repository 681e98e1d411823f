"""Run a script of ``scripts/`` in a fresh Python process (one engine each) and read its ``RESULT <json>``
line: engine settings that differ from the session engine's need their own process."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).parent / "scripts"


def run_result_script(script: str, *args: str, env: dict | None = None) -> tuple[object, str]:
    """Run ``scripts/<script>``: (the decoded RESULT value, the process's stderr); fails the test if the
    script fails."""
    run = subprocess.run([sys.executable, str(SCRIPTS / script), *map(str, args)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, **(env or {})})
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(l for l in run.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT ")), run.stderr
