"""Run a script of ``scripts/`` in a fresh Python process (one engine each) and read its ``RESULT <json>``
line (``support.worker``): engine settings that differ from the session engine's need their own process."""

from pathlib import Path

from support.worker import run_worker_or_fail

SCRIPTS = Path(__file__).parent / "scripts"


def run_result_script(script: str, *args: str, env: dict | None = None) -> tuple[object, str]:
    """Run ``scripts/<script>``: (the decoded RESULT value, the process's stderr); fails the test with the
    script's stderr tail if the script fails."""
    return run_worker_or_fail(SCRIPTS / script, *args, env=env, timeout=300)
