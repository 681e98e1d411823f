"""Start a real `vllm serve` subprocess on 127.0.0.1 and stop it by its own PID (tests, demo, benchmarks)."""

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


class VllmServer:
    """One `vllm serve` process: ``start`` returns at once (start several side by side), ``wait`` blocks
    until /health answers, ``stop`` sends SIGTERM to its PID and waits for the exit code."""

    def __init__(self, model: Path, *extra: str, log: Path, env: dict | None = None, max_model_len: int = 512):
        self.port = free_port()
        self.log = log
        self.command = serve_command(model, self.port, *extra, max_model_len=max_model_len)
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None

    def start(self) -> VllmServer:
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        return self

    def wait(self, timeout: float = 300) -> VllmServer:
        deadline = time.time() + timeout
        while not _healthy(self.port):
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.process.returncode}:\n{self._tail()}")
            if time.time() > deadline:
                raise TimeoutError(f"vllm serve not healthy after {timeout} s:\n{self._tail()}")
            time.sleep(1)
        return self

    def stop(self) -> int:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def post(self, path: str, body: dict, timeout: float = 120) -> dict:
        return post(self.port, path, body, timeout)

    def _tail(self) -> str:
        return self.log.read_text()[-3000:]


@contextmanager
def vllm_server(model: Path, *extra: str, log: Path, env: dict | None = None, max_model_len: int = 512):
    """Yields a healthy VllmServer; stops it by PID on exit."""
    server = VllmServer(model, *extra, log=log, env=env, max_model_len=max_model_len).start()
    try:
        yield server.wait()
    finally:
        server.stop()
