"""No engine process outlives the process that started `vllm serve` (the demo, a test, a benchmark), even
when that process is killed outright: its server's whole process group is ended by the watchdog."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from afterburner.plugins.devtools.vllm_server import group_alive

SCRIPT = Path(__file__).parent / "scripts" / "serve_then_hang.py"


def _members(pgid: int) -> list[int]:
    """PIDs of the processes in group ``pgid`` (from /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                members.append(int(entry.name))
    return members


def test_killing_the_starter_leaves_no_engine_process(tiny_model, tmp_path):
    line = ""
    parent = subprocess.Popen([sys.executable, str(SCRIPT), str(tiny_model), str(tmp_path / "serve.log")],
                              stdout=subprocess.PIPE, text=True)
    try:
        line = parent.stdout.readline()
        assert line.startswith("PGID "), (tmp_path / "serve.log").read_text()[-3000:]
        pgid = int(line.split()[1])
        assert len(_members(pgid)) >= 2, "vllm serve runs an API server and an engine process"
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 60
        while group_alive(pgid) and time.time() < deadline:
            time.sleep(1)
        assert not group_alive(pgid), f"orphaned engine processes: {_members(pgid)}"
    finally:
        if parent.poll() is None:
            parent.kill()
        if line.startswith("PGID ") and group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
