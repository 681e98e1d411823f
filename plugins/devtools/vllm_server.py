"""Start a real `vllm serve` subprocess on 127.0.0.1 and make sure it ends (tests, demo, benchmarks).

`vllm serve` starts an API server, an engine core and workers. Each server starts in a session and process
group of its own, and ``stop`` ends the whole group (SIGTERM, then SIGKILL for whatever is left), so no
engine process outlives it. A watchdog process per server ends the group too if the process that started it
dies without stopping it (killed, crashed): a parent killed with SIGKILL runs no cleanup of its own.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

VLLM = str(Path(sys.executable).with_name("vllm"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command(model: Path, port: int, *extra: str, max_model_len: int = 512) -> list[str]:
    return [VLLM, "serve", str(model), "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
            "--enforce-eager", "--max-model-len", str(max_model_len), *extra]


def post(port: int, path: str, body: dict, timeout: float = 120) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


# Run by a watchdog process: poll the owner; when it is gone, end the server's group (argv: owner pid, pgid).
_WATCHDOG = """
import os, signal, sys, time
owner, group = int(sys.argv[1]), int(sys.argv[2])
def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
while alive(owner) and os.getppid() == owner:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        sys.exit(0)  # the server group ended on its own
    time.sleep(1)
for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 0)):
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        sys.exit(0)
    deadline = time.time() + wait
    while time.time() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            sys.exit(0)
        time.sleep(0.5)
"""


def group_alive(pgid: int) -> bool:
    """Whether any process of process group ``pgid`` is still running."""
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


class VllmServer:
    """One `vllm serve` process group: ``start`` returns at once, ``wait`` blocks until /health answers
    (printing progress if asked), ``stop`` ends the group and returns the API server's exit code."""

    def __init__(self, model: Path, *extra: str, log: Path, env: dict | None = None, max_model_len: int = 512):
        self.port = free_port()
        self.log = log
        self.command = serve_command(model, self.port, *extra, max_model_len=max_model_len)
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None
        self.watchdog: subprocess.Popen | None = None

    @property
    def pgid(self) -> int:
        return self.process.pid  # a session leader's group id is its pid

    def start(self) -> VllmServer:
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        self.watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(self.pgid)],
                                         start_new_session=True, stdin=subprocess.DEVNULL)
        return self

    def wait(self, timeout: float = 600, progress: str | None = None) -> VllmServer:
        """Until /health answers; ``progress``: a label to print a line under every 30 s while waiting."""
        started = time.time()
        next_note = started + 30
        while not _healthy(self.port):
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.process.returncode} (log: {self.log}):\n"
                                   f"{self._tail()}")
            if time.time() > started + timeout:
                raise TimeoutError(f"vllm serve not healthy after {timeout:.0f} s (log: {self.log}):\n{self._tail()}")
            if progress and time.time() > next_note:
                print(f"[{progress}] still starting after {time.time() - started:.0f} s (log: {self.log})",
                      flush=True)
                next_note += 30
            time.sleep(1)
        return self

    def stop(self, grace: float = 60) -> int | None:
        """SIGTERM to the API server (it shuts its engine down cleanly), then end whatever is left of its
        process group: SIGTERM, then SIGKILL. Returns the API server's exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            if not group_alive(self.pgid):
                break
            try:
                os.killpg(self.pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.time() + wait
            while group_alive(self.pgid) and time.time() < deadline:
                time.sleep(0.2)
        if self.watchdog is not None and self.watchdog.poll() is None:
            self.watchdog.kill()
            self.watchdog.wait()
        return self.process.returncode

    def post(self, path: str, body: dict, timeout: float = 120) -> dict:
        return post(self.port, path, body, timeout)

    def counters(self, prefix: str) -> dict[str, float]:
        """The server's Prometheus counters whose name starts with ``prefix`` (``..._total`` samples, summed
        over labels), by name."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as response:
            lines = response.read().decode().splitlines()
        counters: dict[str, float] = {}
        for line in lines:
            name = line.split("{")[0].split(" ")[0]
            if line.startswith(prefix) and name.endswith("_total"):
                counters[name] = counters.get(name, 0) + float(line.rsplit(" ", 1)[1])
        return counters

    def spec_counters(self) -> dict[str, float]:
        """vLLM's own spec-decode counters (``vllm:spec_decode_num_*_total``)."""
        return self.counters("vllm:spec_decode_num_")

    def _tail(self) -> str:
        return self.log.read_text()[-3000:]


def spec_steps(before: dict[str, float], after: dict[str, float]) -> dict:
    """What speculation did between two ``spec_counters`` readings: verification steps, draft tokens carried
    and accepted, and tokens emitted per verification step (1 + accepted / steps; None without a step)."""
    def delta(name: str) -> float:
        key = f"vllm:spec_decode_num_{name}_total"
        return after.get(key, 0) - before.get(key, 0)

    steps, drafted, accepted = delta("drafts"), delta("draft_tokens"), delta("accepted_tokens")
    return {"verification_steps": int(steps), "drafted": int(drafted), "accepted": int(accepted),
            "tokens_per_verification_step": round((steps + accepted) / steps, 3) if steps else None}


@contextmanager
def vllm_server(model: Path, *extra: str, log: Path, env: dict | None = None, max_model_len: int = 512):
    """Yields a healthy VllmServer; ends its process group on exit."""
    server = VllmServer(model, *extra, log=log, env=env, max_model_len=max_model_len).start()
    try:
        yield server.wait()
    finally:
        server.stop()
